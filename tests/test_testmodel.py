"""make-test-model: the exact INSTRUCTOR layout, a correct tokenizer, loadable by transformers and ST."""

from __future__ import annotations

import json

import pytest

from fastinstructor.testmodel import PRESETS, make_test_model


def test_layout_and_metadata(tiny_model):
    names = {p.relative_to(tiny_model).as_posix() for p in tiny_model.rglob("*")}
    for required in (
        "modules.json",
        "config.json",
        "model.safetensors",
        "spiece.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
        "3_Normalize",
        "README.md",
    ):
        assert required in names, required
    meta = json.loads((tiny_model / "fastinstructor_test_model.json").read_text())
    assert meta["random_weights"] is True and meta["preset"] == "tiny"
    assert "RANDOM WEIGHTS" in (tiny_model / "README.md").read_text()


def test_tokenizer_agrees_with_sentencepiece(tiny_model, real_texts):
    """transformers can silently build a 104-token all-<unk> T5 tokenizer; ours must be the SentencePiece model."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tiny_model / "spiece.model"))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    assert sp.get_piece_size() > 100
    assert len(tokenizer) == sp.get_piece_size() + 100  # + <extra_id_*>
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for text in real_texts[:10]:
        ids = tokenizer(text)["input_ids"]
        assert ids == sp.encode(text) + [1]
        assert sum(i == 2 for i in ids) <= 1  # real text is almost never <unk>
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == sp.get_piece_size() + 99


def test_loadable_by_transformers_and_sentence_transformers(tiny_model):
    from transformers import T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(str(tiny_model))
    assert encoder.config.d_model == PRESETS["tiny"].d_model
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(tiny_model), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert model.encode(["hello world"]).shape == (1, PRESETS["tiny"].dense_out)


def test_refuses_non_empty_folder_and_unknown_preset(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        make_test_model("tiny", tmp_path / "busy")
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of tiny, tiny-xl, base, large, xl"):
        make_test_model("huge", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_preset_dimensions_are_the_real_ones():
    """docs/design.md section 1."""
    assert [
        (p.d_model, p.num_layers, p.num_heads, p.d_kv, p.d_ff, p.dense_out, p.vocab_rows)
        for p in (PRESETS["base"], PRESETS["large"], PRESETS["xl"])
    ] == [
        (768, 12, 12, 64, 3072, 768, 32128),
        (1024, 24, 16, 64, 4096, 768, 32128),
        (1024, 24, 32, 128, 16384, 768, 32128),
    ]


def test_without_shared_data_the_package_docs_are_used(tmp_path, monkeypatch):
    """On a user's machine without ../shared/data: tokenizer text and demo passages come from our own docs."""
    from fastinstructor.data import sample_passages, shared_data_dir

    monkeypatch.setenv("FASTINSTRUCTOR_DATA", str(tmp_path / "absent"))
    assert shared_data_dir() is None
    passages, source = sample_passages(10)
    assert len(passages) == 10 and "documentation" in source
    path = make_test_model("tiny", tmp_path / "m")
    meta = json.loads((path / "fastinstructor_test_model.json").read_text())
    assert "documentation" in meta["tokenizer_trained_on"] and meta["tokenizer_pieces"] > 100
