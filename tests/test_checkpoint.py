"""Loading checkpoints: the INSTRUCTOR layout, plain T5 encoders, the Hugging Face cache, and bad folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastinstructor
from fastinstructor import CheckpointError
from fastinstructor.checkpoint import load_checkpoint


@pytest.fixture
def tiny_copy(tiny_model, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_model, tmp_path / "copy")


def test_dimensions_come_from_the_files(make_model):
    ckpt = load_checkpoint(make_model("tiny-xl"))
    assert (ckpt.config.d_model, ckpt.config.num_heads, ckpt.config.d_kv, ckpt.config.d_ff) == (64, 4, 32, 1024)
    assert ckpt.config.inner_dim == 128 and ckpt.out_dim == 48 and ckpt.normalize and ckpt.max_seq_length == 512


def test_fingerprint_is_the_files_that_decide_the_embeddings(tiny_model, tiny_copy):
    """The same for a copy elsewhere; different once a weight, the config or the Dense head changes."""
    original = load_checkpoint(tiny_model).fingerprint
    assert load_checkpoint(tiny_copy).fingerprint == original
    names = [name for name, _ in load_checkpoint(tiny_copy).files]
    assert {"config.json", "model.safetensors", "2_Dense/model.safetensors", "spiece.model"} <= set(names)

    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-5}))
    changed_config = load_checkpoint(tiny_copy).fingerprint
    dense = load_file(str(tiny_copy / "2_Dense" / "model.safetensors"))
    save_file({"linear.weight": dense["linear.weight"] * 2}, str(tiny_copy / "2_Dense" / "model.safetensors"))
    changed_dense = load_checkpoint(tiny_copy).fingerprint
    assert len({original, changed_config, changed_dense}) == 3


def test_load_lets_the_checkpoint_weights_go(tiny_model, real_pairs):
    """The backend holds its own form of the weights; the checkpoint keeps none, and its fingerprint still works."""
    model = fastinstructor.load(tiny_model, backend="cpu", precision="float32")
    assert model.checkpoint.weights_released
    with pytest.raises(CheckpointError, match="weights of .* were released.*load_checkpoint"):
        model.checkpoint.weights  # noqa: B018  (a released checkpoint says so instead of handing out nothing)
    assert model.checkpoint.fingerprint == load_checkpoint(tiny_model).fingerprint
    np.testing.assert_allclose(
        model.encode(real_pairs[:4]),
        fastinstructor.load(tiny_model, backend="reference").encode(real_pairs[:4]),
        atol=1e-5,
    )


def test_pytorch_model_bin_loads_like_safetensors(tiny_model, tiny_copy, real_pairs):
    weights = load_file(str(tiny_copy / "model.safetensors"))
    weights["encoder.embed_tokens.weight"] = weights["shared.weight"]  # older files store the tie twice
    torch.save(weights, tiny_copy / "pytorch_model.bin")
    (tiny_copy / "model.safetensors").unlink()
    expected = fastinstructor.load(tiny_model).encode(real_pairs[:6])
    np.testing.assert_array_equal(fastinstructor.load(tiny_copy).encode(real_pairs[:6]), expected)


def test_plain_t5_encoder_folder(tiny_copy, real_pairs):
    """No modules.json: mean pooling over the encoder output, no Dense; encode normalizes by default."""
    for extra in ("modules.json", "1_Pooling", "2_Dense", "3_Normalize"):
        path = tiny_copy / extra
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    model = fastinstructor.load(tiny_copy, backend="reference")
    assert model.dim == 64 and model.checkpoint.dense_weight is None and not model.checkpoint.normalize
    raw = model.encode(real_pairs[:4], normalize_embeddings=False)
    assert raw.shape == (4, 64) and not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(model.encode(real_pairs[:4]), axis=1), 1.0, atol=1e-6)
    cpu = fastinstructor.load(tiny_copy, backend="cpu").encode(real_pairs[:4], normalize_embeddings=False)
    np.testing.assert_allclose(cpu, raw, atol=1e-5, rtol=0)


def _fake_hf_cache(cache, repo_id, source):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


@pytest.fixture
def offline(monkeypatch):
    """No hub access, as on these machines (huggingface_hub reads HF_HUB_OFFLINE at import, hence both)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_id_resolves_from_local_cache(tiny_model, tmp_path, offline, real_pairs):
    snapshot = _fake_hf_cache(tmp_path / "hub", "hkunlp/instructor-tiny", tiny_model)
    model = fastinstructor.load("hkunlp/instructor-tiny", cache_dir=str(tmp_path / "hub"))
    assert model.checkpoint.path == snapshot
    np.testing.assert_array_equal(model.encode(real_pairs[:3]), fastinstructor.load(tiny_model).encode(real_pairs[:3]))


def test_hub_id_resolves_through_hf_home(tiny_model, tmp_path):
    """As a user would: HF_HOME names the cache, in a fresh process."""
    _fake_hf_cache(tmp_path / "hf" / "hub", "hkunlp/instructor-tiny", tiny_model)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = "import fastinstructor; m = fastinstructor.load('hkunlp/instructor-tiny'); print(m.dim, m.checkpoint.path)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("48 ") and str(tmp_path / "hf" / "hub") in out


def test_hub_id_missing_offline_is_a_clear_error(tmp_path, offline):
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*hkunlp/instructor-large"):
        fastinstructor.load("hkunlp/instructor-large", cache_dir=str(tmp_path / "empty"))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        fastinstructor.load(str(tmp_path / "nowhere" / "model"))


def test_folder_without_modules_or_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        fastinstructor.load(tmp_path / "empty")


def test_file_instead_of_folder(tiny_model):
    with pytest.raises(CheckpointError, match="is a file"):
        fastinstructor.load(tiny_model / "config.json")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights(tiny_copy, damage):
    path = tiny_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a weights file" * 10)
    with pytest.raises(CheckpointError, match="cannot read weights file.*model.safetensors"):
        fastinstructor.load(tiny_copy)


def test_malformed_json(tiny_copy):
    (tiny_copy / "modules.json").write_text("[{not json")
    with pytest.raises(CheckpointError, match="modules.json is not valid JSON"):
        fastinstructor.load(tiny_copy)


def test_wrong_shaped_dense(tiny_copy):
    save_file({"linear.weight": torch.randn(48, 32)}, str(tiny_copy / "2_Dense" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"Dense weight has shape \(48, 32\)"):
        fastinstructor.load(tiny_copy)


def test_missing_and_unexpected_tensors_are_named(tiny_copy):
    weights = load_file(str(tiny_copy / "model.safetensors"))
    del weights["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    weights["encoder.block.7.extra.weight"] = torch.zeros(2)
    save_file(weights, str(tiny_copy / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensors \['encoder.block.1.layer.1.DenseReluDense.wo.weight'\]"
        r".*unexpected tensors \['encoder.block.7.extra.weight'\]",
    ):
        fastinstructor.load(tiny_copy)


def test_config_that_does_not_match_weights(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["d_ff"] = 256
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"d_ff is 256, but the weights hold 128 \(.*wi.weight has shape"):
        fastinstructor.load(tiny_copy)


def test_non_t5_config(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["model_type"] = "bert"
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type is 'bert', expected 't5'"):
        fastinstructor.load(tiny_copy)


def test_pickle_that_is_not_a_state_dict(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], tiny_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds a list, not a mapping of tensor names to tensors"):
        fastinstructor.load(tiny_copy)


def test_authors_module_type_names(tiny_copy, tiny_model, real_pairs):
    """InstructorEmbedding's own module types name the same modules."""
    modules = json.loads((tiny_copy / "modules.json").read_text())
    modules[0]["type"] = "InstructorEmbedding.INSTRUCTOR_Transformer"
    (tiny_copy / "modules.json").write_text(json.dumps(modules))
    np.testing.assert_array_equal(
        fastinstructor.load(tiny_copy).encode(real_pairs[:3]), fastinstructor.load(tiny_model).encode(real_pairs[:3])
    )
    modules[1]["type"] = "sentence_transformers.models.LSTM"
    (tiny_copy / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match="module type 'sentence_transformers.models.LSTM' is not supported"):
        fastinstructor.load(tiny_copy)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: [m[0], m[1], m[3], m[2]], r"modules \['Transformer', 'Pooling', 'Normalize', 'Dense'\]"),
        (lambda m: [*m[:3], m[2], m[3]], r"modules \['Transformer', 'Pooling', 'Dense', 'Dense'\]"),
        (lambda m: [*m[:3], "3_Normalize"], r"entry '3_Normalize' is not a module object"),
        (lambda m: {"modules": m}, r"modules.json holds dict, not a JSON list"),
    ],
)
def test_modules_other_than_one_of_each_in_order_are_refused(tiny_copy, change, message):
    """A second Dense, or Normalize before Dense, is other arithmetic than the pipeline's: refused, never dropped."""
    modules = json.loads((tiny_copy / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    (tiny_copy / "modules.json").write_text(json.dumps(change(modules)))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tiny_copy)


def test_module_folders_without_modules_json_are_refused(tiny_copy):
    """Read as a plain T5 folder, it would lose its Dense and Normalize and embed differently, same shape."""
    (tiny_copy / "modules.json").unlink()
    with pytest.raises(CheckpointError, match=r"module folders .*but no modules.json.*Restore modules.json"):
        load_checkpoint(tiny_copy)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"do_lower_case": True}, "do_lower_case is true; fastinstructor does not lowercase"),
        ({"max_seq_length": 0}, "max_seq_length must be a positive integer, got 0"),
        ({"max_seq_length": 1.7}, "max_seq_length must be a positive integer, got 1.7"),
        ({"max_seq_length": "abc"}, "max_seq_length must be a positive integer, got 'abc'"),
    ],
)
def test_sentence_bert_settings_the_pipeline_would_not_honour_are_refused(tiny_copy, settings, message):
    path = tiny_copy / "sentence_bert_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tiny_copy)
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_lower_case": False, "max_seq_length": None}))
    assert load_checkpoint(tiny_copy).max_seq_length == 512  # null: the T5 default


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_named(tiny_copy, value):
    weights = load_file(str(tiny_copy / "model.safetensors"))
    weights["encoder.final_layer_norm.weight"][3] = value
    save_file(weights, str(tiny_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"\['encoder.final_layer_norm.weight'\] hold NaN or infinite values"):
        load_checkpoint(tiny_copy)


def test_config_files_of_the_wrong_kind_are_named(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": "x"}))
    with pytest.raises(CheckpointError, match="layer_norm_epsilon is not a number"):
        load_checkpoint(tiny_copy)
    (tiny_copy / "config.json").write_text(json.dumps([config]))
    with pytest.raises(CheckpointError, match=r"config.json holds list, not a JSON object"):
        load_checkpoint(tiny_copy)


def test_added_tokens_are_in_the_fingerprint(tiny_copy):
    """They change the tokenizer's ids, so the parity and ONNX caches keyed by the fingerprint must not hold."""
    before = load_checkpoint(tiny_copy).fingerprint
    (tiny_copy / "added_tokens.json").write_text(json.dumps({"<extra>": 1000}))
    assert load_checkpoint(tiny_copy).fingerprint != before


def test_a_name_that_is_no_folder_and_no_hub_id_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="model 'my org/my model': no such folder, and not a valid hub id"):
        load_checkpoint("my org/my model")
