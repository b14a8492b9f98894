"""ONNX export and the ONNX Runtime backend against the float32 reference (docs/design.md section 5)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_parity, ungated

import fastinstructor
from fastinstructor.batching import pad_batch
from fastinstructor.checkpoint import load_checkpoint
from fastinstructor.parity import compare

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'fastinstructor[onnx]')")
from fastinstructor.backends.onnx import OnnxBackend  # noqa: E402
from fastinstructor.export import onnx_export  # noqa: E402
from fastinstructor.export.onnx_export import FP16_KEEP_FLOAT32_OPS, METADATA, export_onnx, read_metadata  # noqa: E402


@pytest.fixture(scope="session")
def exported(make_model, tmp_path_factory):
    """``exported(preset, precision, optimize)``: an export folder, made once per session."""
    made = {}

    def get(preset: str, precision: str = "float32", optimize: bool = True):
        key = (preset, precision, optimize)
        if key not in made:
            folder = tmp_path_factory.mktemp("onnx") / f"{preset}-{precision}-{optimize}"
            export_onnx(load_checkpoint(make_model(preset)), folder, precision=precision, optimize=optimize)
            made[key] = folder
        return made[key]

    return get


def onnx_model(make_model, exported, preset, precision="float32", optimize=True):
    return fastinstructor.load(
        make_model(preset),
        backend="onnx",
        precision=precision,
        backend_options={"onnx_dir": exported(preset, precision, optimize)},
    )


@pytest.mark.parametrize("preset", ["tiny", "tiny-xl"])
@pytest.mark.parametrize("optimize", [False, True])
def test_float32_matches_reference(make_model, exported, real_pairs, preset, optimize):
    expected = fastinstructor.load(make_model(preset), backend="reference").encode(real_pairs)
    actual = onnx_model(make_model, exported, preset, optimize=optimize).encode(real_pairs)
    assert_parity(actual, expected, "float32")


def test_optimizer_fused_rmsnorm_and_recorded_counts(exported):
    meta = read_metadata(exported("tiny"))
    # 2 layers x 2 norms + the final one; all but the first become SkipSimplifiedLayerNormalization.
    assert (
        meta["fused_ops"].get("SimplifiedLayerNormalization", 0)
        + meta["fused_ops"].get("SkipSimplifiedLayerNormalization", 0)
        == 5
    )
    assert sum(meta["op_counts_after"].values()) < sum(meta["op_counts_before"].values())
    assert "ReduceMean" not in meta["op_counts_after"]  # every RMSNorm was fused
    assert meta["opset"] == 17 and meta["inputs"]["pool_start"] == "int64 [B]"


def test_int8_on_base(make_model, exported, real_pairs):
    reference = fastinstructor.load(make_model("base"), backend="reference")
    expected = reference.encode(real_pairs)
    backend = OnnxBackend(reference.checkpoint, precision="int8", onnx_dir=exported("base", "int8"))
    assert "MatMulInteger" in backend.metadata["op_counts_after"]
    actual = ungated(reference, backend).encode(real_pairs)
    assert_parity(actual, expected, "int8")
    assert not np.allclose(actual, expected, atol=1e-6), "int8 gave float32 results: was it quantized?"


def test_float16_graph_keeps_fragile_ops_in_float32(make_model, exported):
    import onnx
    import onnxruntime

    folder = exported("tiny", "float16")
    graph = onnx.load(str(folder / "model.onnx")).graph
    onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])  # it loads
    producers = {out: node for node in graph.node for out in node.output}
    float32_tensors = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    float32_tensors |= {i.name for i in graph.input}
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer), "nothing became float16"

    def is_float32(name: str) -> bool:
        node = producers.get(name)
        if node is None:
            return name in float32_tensors or name == ""
        if node.op_type == "Cast":
            return next(a.i for a in node.attribute if a.name == "to") == onnx.TensorProto.FLOAT
        # Kept ops and the kept FFN output projections write float32 (to be cast for float16 consumers);
        # Constant inputs of these ops are int64 axes.
        return node.op_type in (*FP16_KEEP_FLOAT32_OPS, "Constant") or "DenseReluDense/wo" in node.name

    fragile = [
        n
        for n in graph.node
        if n.op_type
        in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Softmax", "ReduceSum", "ReduceL2")
    ]
    assert len(fragile) >= 5
    for node in fragile:
        assert all(is_float32(name) for name in node.input), f"{node.op_type} {node.name} reads float16"
    wo = [n for n in graph.node if n.op_type == "MatMul" and "DenseReluDense/wo" in n.name]
    assert len(wo) == 2 and all(is_float32(name) for n in wo for name in n.input), "the FFN output left float32"
    assert read_metadata(folder)["float16_kept_float32_nodes"] == 2
    output = next(o for o in graph.output if o.name == "embeddings")
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 out


@pytest.mark.parametrize("batch, length", [(1, 1), (1, 512), (37, 9), (37, 512)])
def test_batch_and_length_extremes(make_model, exported, batch, length):
    checkpoint = load_checkpoint(make_model("tiny"))
    backend = OnnxBackend.from_folder(checkpoint, exported("tiny"))
    reference = fastinstructor.load(make_model("tiny"), backend="reference").backend
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    ids = [torch.randint(3, 2000, (int(n),), generator=generator).tolist()[:-1] + [1] for n in lengths]
    starts = [int(torch.randint(0, len(row), (1,), generator=generator)) for row in ids]
    inputs = pad_batch(ids, starts)
    assert_parity(backend.embed(*inputs).numpy(), reference.embed(*inputs).numpy(), "float32")


def test_wrong_inputs_are_clear_errors(make_model, exported):
    backend = OnnxBackend.from_folder(load_checkpoint(make_model("tiny")), exported("tiny"))
    ids, mask, start = pad_batch([[5, 6, 1], [7, 1]], [1, 0])
    with pytest.raises(ValueError, match=r"input_ids must be an int64 tensor with 2 dims, got torch.int32"):
        backend.embed(ids.int(), mask, start)
    with pytest.raises(ValueError, match=r"attention_mask must be an int64 tensor with 2 dims, got torch.float32"):
        backend.embed(ids, mask.float(), start)
    with pytest.raises(ValueError, match=r"shapes disagree: input_ids \(2, 3\), attention_mask \(2, 2\)"):
        backend.embed(ids, mask[:, :2], start)
    with pytest.raises(ValueError, match=r"pool_start must be an int64 tensor with 1 dims"):
        backend.embed(ids, mask, start[None])


def test_corrupt_and_mismatched_exports(make_model, exported, tmp_path):
    folder = shutil.copytree(exported("tiny"), tmp_path / "copy")
    with pytest.raises(ValueError, match="exported from a different model"):
        OnnxBackend.from_folder(load_checkpoint(make_model("tiny-xl")), folder)
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ValueError, match="model.onnx does not match the checksum recorded at export"):
        OnnxBackend.from_folder(load_checkpoint(make_model("tiny")), folder)
    _sign(folder)  # a graph exactly as exported that onnxruntime still cannot load
    with pytest.raises(ValueError, match="cannot load .*model.onnx: "):
        OnnxBackend.from_folder(load_checkpoint(make_model("tiny")), folder)
    (folder / "fastinstructor_onnx.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a fastinstructor ONNX export"):
        OnnxBackend.from_folder(load_checkpoint(make_model("tiny")), folder)
    with pytest.raises(RuntimeError, match="onnx/float16/cpu: backend 'onnx' runs .*; float16 or float32 on CUDA"):
        fastinstructor.load(make_model("tiny"), backend="onnx", precision="float16")


def test_first_use_exports_once_into_the_cache(tiny_model, tmp_path, real_pairs):
    """Two processes start at once with an empty cache: one exports (under the lock), both get the graph."""
    code = (
        "import fastinstructor, json, logging, sys; logging.basicConfig(level=logging.INFO); "
        "m = fastinstructor.load(sys.argv[1], backend='onnx'); "
        "print(json.dumps({'folder': str(m.backend.folder), 'e': m.encode(['Sea ice.']).tolist()}))"
    )
    env = {**__import__("os").environ, "FASTINSTRUCTOR_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tiny_model)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]
    exported = [err.count(" to ONNX (") for _, err in outputs]  # the log line of an export
    assert sorted(exported) == [0, 1], [err for _, err in outputs]  # exactly one process exported
    assert results[0]["folder"] == results[1]["folder"] and results[0]["e"] == results[1]["e"]
    exports = [p for p in (tmp_path / "cache" / "onnx").iterdir() if p.is_dir()]
    assert len(exports) == 1, exports  # no second export, no leftover temporary folder
    expected = fastinstructor.load(tiny_model).encode(["Sea ice."])
    np.testing.assert_allclose(np.array(results[0]["e"]), expected, atol=1e-5)


def test_export_command(tiny_model, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastinstructor",
            "export",
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "x"),
            "--precision",
            "float32",
        ],
        capture_output=True,
        text=True,
    )
    # float32 on tiny (float16's parity is measured on CUDA only): int8's tolerance is for real shapes
    # (test_int8_on_base); a random d_model-64 model sits at its edge (min cosine 0.989-0.991, moved by as little as
    # a new SentencePiece version's segmentation of the calibration set).
    assert result.returncode == 0, result.stderr
    assert "parity vs the float32 reference" in result.stdout and "PASS" in result.stdout
    meta = read_metadata(tmp_path / "x")
    assert meta["precision"] == "float32" and meta["parity"]["passed"] and meta["parity"]["rows"] >= 30


def test_export_replaces_an_export_but_never_deletes_a_users_files(tiny_model, tmp_path, monkeypatch):
    """The export replaces its folder whole: a folder holding anything but an earlier export is refused before any
    work, whatever names it (".", the checkpoint's own folder), and is left as it was."""
    checkpoint = load_checkpoint(tiny_model)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(mine)
    for out in (".", mine, tiny_model):
        with pytest.raises(ValueError, match="holds files that are not an ONNX export .*pass an empty or new folder"):
            export_onnx(checkpoint, out, optimize=False)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"] and load_checkpoint(tiny_model)
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        export_onnx(checkpoint, mine / "thesis.tex", optimize=False)
    command = [sys.executable, "-m", "fastinstructor", "export", "--model", str(tiny_model), "--out", str(mine)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and "thesis.tex" in result.stderr and "Traceback" not in result.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"
    # An earlier export's folder is replaced.
    first = export_onnx(checkpoint, tmp_path / "graph", optimize=False)
    assert export_onnx(checkpoint, tmp_path / "graph", optimize=False)["files"] == first["files"]


def test_missing_onnxruntime_is_reported(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    ok, why = OnnxBackend.availability()
    assert not ok and "fastinstructor[onnx]" in why
    with pytest.raises(ImportError, match=r"backend 'onnx' is not available here: onnxruntime not installed"):
        fastinstructor.backends.get_backend_class("onnx")


def test_large_models_use_external_data(make_model, exported, tmp_path, monkeypatch):
    """Past protobuf's 2 GB limit the weights go to model.onnx.data (threshold lowered to exercise it), and the graph
    computes what the one-file export computes, to the bit (int8 too: its quantization is the same)."""
    import fastinstructor.export.onnx_export as onnx_export

    checkpoint = load_checkpoint(make_model("tiny"))
    inputs = pad_batch([[5, 6, 7, 8, 1], [9, 10, 1]], [2, 0])
    monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_THRESHOLD", 0)
    for precision in ("float32", "int8"):
        folder = tmp_path / precision
        export_onnx(checkpoint, folder, precision=precision)
        assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
        one_file = OnnxBackend.from_folder(checkpoint, exported("tiny", precision)).embed(*inputs)
        assert torch.equal(OnnxBackend.from_folder(checkpoint, folder).embed(*inputs), one_file)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tamper(graph: Path) -> str:
    """Scale the largest weight of the graph by 1.5 in place (min cosine about 0.95 on tiny); its new sha256."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    weight = max(model.graph.initializer, key=lambda w: np.prod(w.dims) * (w.data_type == onnx.TensorProto.FLOAT))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save_model(model, str(graph))
    return _sha256(graph)


def _sign(folder: Path) -> None:
    """Record the folder's graph as exported (what an export of a different graph would have written)."""
    metadata = json.loads((folder / METADATA).read_text())
    graph = folder / "model.onnx"
    metadata["files"] = {"model.onnx": {"sha256": _sha256(graph), "bytes": graph.stat().st_size}}
    (folder / METADATA).write_text(json.dumps(metadata))


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fresh ONNX and parity cache, auto dispatch for real (conftest pins cpu/float32), and a record of every
    export and of the sha256 of every graph onnxruntime loads."""
    import onnxruntime

    monkeypatch.setenv("FASTINSTRUCTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTINSTRUCTOR_BACKEND", raising=False)
    monkeypatch.delenv("FASTINSTRUCTOR_PRECISION", raising=False)
    seen = SimpleNamespace(exports=0, graphs=[])
    real_export, real_session = onnx_export.export_onnx, onnxruntime.InferenceSession

    def export(*args, **kwargs):
        seen.exports += 1
        return real_export(*args, **kwargs)

    def session(graph, *args, **kwargs):
        seen.graphs.append(_sha256(graph))
        return real_session(graph, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", export)
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    return seen


@pytest.fixture
def onnx_float32_first(monkeypatch):
    """auto with onnx/float32 at the head of the CPU order (on any CPU: with AMX, or where cpu/float32 comes first),
    so that these tests reach the onnx backend's graph checks through auto, and its fallback behind it."""
    monkeypatch.setattr(
        OnnxBackend,
        "rank",
        classmethod(lambda cls, c, hardware: 0 if (c.precision, c.device) == ("float32", "cpu") else c.rank),
    )


def test_tampered_cached_graph_is_never_loaded(tiny_model, cache, real_pairs, caplog, onnx_float32_first):
    """Issue 13, defect 2: a graph altered in the cache after export is never run. The entry is exported again,
    once, with a warning; parity is measured on the new graph (auto and an explicit backend='onnx'); the next
    start uses the verified entry without exporting."""
    import onnxruntime

    checkpoint = load_checkpoint(tiny_model)
    backend = OnnxBackend(checkpoint)  # first use: exported into the cache, no parity measured yet
    folder, graph = backend.folder, backend.folder / "model.onnx"
    assert cache.exports == 1
    reference = fastinstructor.load(tiny_model, backend="reference")
    expected = reference.encode(real_pairs)

    # The probe: what the tampered graph would return is wrong (min cosine about 0.95).
    tampered = _tamper(graph)
    backend.session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    reference.backend = backend
    assert compare(reference.encode(real_pairs), expected).min_cos < 0.99
    cache.graphs.clear()

    with caplog.at_level(logging.WARNING):
        model = fastinstructor.load(tiny_model, allow_int8=False)  # auto: onnx/float32/cpu first (the fixture)
    assert (model.backend_name, model.precision) == ("onnx", "float32") and model.backend.folder == folder
    assert cache.exports == 2, "not exported again exactly once"
    assert str(folder) in caplog.text and "does not match the checksum recorded at export" in caplog.text
    assert tampered not in cache.graphs and _sha256(graph) != tampered
    parity = model.backend_report["parity"]
    assert parity["passed"] and not parity["cached"], "parity was not measured on the exported graph"
    assert_parity(model.encode(real_pairs), expected, "float32")

    tampered = _tamper(graph)
    model = fastinstructor.load(tiny_model, backend="onnx", precision="float32")
    assert cache.exports == 3 and tampered not in cache.graphs and model.backend_report["parity"]["passed"]
    assert_parity(model.encode(real_pairs), expected, "float32")

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = fastinstructor.load(tiny_model, allow_int8=False)  # a second start: verified, nothing to redo
    assert cache.exports == 3 and again.backend_report["parity"]["cached"] and not caplog.text
    assert_parity(again.encode(real_pairs), expected, "float32")


@pytest.mark.parametrize("damage", ["no checksums", "damaged metadata", "graph missing"])
def test_unverifiable_cache_entry_is_exported_again_once(tiny_model, cache, caplog, damage):
    """An entry from an older version (no checksums), or with its metadata or graph damaged, is exported again
    with a warning that says why; then it is used as it is."""
    checkpoint = load_checkpoint(tiny_model)
    folder = OnnxBackend(checkpoint).folder
    if damage == "no checksums":
        metadata = json.loads((folder / METADATA).read_text())
        del metadata["files"]
        (folder / METADATA).write_text(json.dumps(metadata))
    elif damage == "damaged metadata":
        (folder / METADATA).write_text('{"source_fingerprint": ')
    else:
        (folder / "model.onnx").unlink()
    with caplog.at_level(logging.WARNING):
        OnnxBackend(checkpoint)
    why = {"no checksums": "records no checksums", "damaged metadata": "is damaged", "graph missing": "not a"}
    assert cache.exports == 2 and str(folder) in caplog.text and why[damage] in caplog.text
    OnnxBackend(checkpoint)
    assert cache.exports == 2


def test_failed_re_export_says_why(tiny_model, cache, monkeypatch, caplog, onnx_float32_first):
    """When the entry cannot be exported again, the error says why, and auto says it on every start."""
    checkpoint = load_checkpoint(tiny_model)
    folder = OnnxBackend(checkpoint).folder
    tampered = _tamper(folder / "model.onnx")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_export, "export_onnx", full_disk)
    message = rf"{re.escape(str(folder))} cannot be trusted .*; exporting it again failed: OSError: .*space"
    with pytest.raises(RuntimeError, match=message):
        OnnxBackend(checkpoint)
    with caplog.at_level(logging.WARNING):
        model = fastinstructor.load(tiny_model, allow_int8=False)
    assert model.backend_name == "cpu" and "does not match the checksum" in caplog.text
    assert "exporting it again failed" in model.backend_report["skipped"][0]["why"]
    assert tampered not in cache.graphs


def test_tampered_export_folder_is_refused_and_left_alone(make_model, exported, tmp_path):
    """An explicit export folder is the user's: a graph that fails verification is refused with the file, both
    checksums and the fix, and never exported over."""
    folder = shutil.copytree(exported("tiny"), tmp_path / "copy")
    recorded = json.loads((folder / METADATA).read_text())["files"]["model.onnx"]["sha256"]
    tampered = _tamper(folder / "model.onnx")
    checkpoint = load_checkpoint(make_model("tiny"))
    message = (
        rf"{re.escape(str(folder / 'model.onnx'))} does not match the checksum recorded at export: "
        rf"sha256 {recorded} .*expected, {tampered} .*found.*fastinstructor export"
    )
    with pytest.raises(ValueError, match=message):
        OnnxBackend.from_folder(checkpoint, folder)
    with pytest.raises(ValueError, match=message):
        OnnxBackend(checkpoint, onnx_dir=folder)
    with pytest.raises(RuntimeError, match="onnx/float32/cpu: failed to start: .*does not match the checksum"):
        fastinstructor.load(
            make_model("tiny"), backend="onnx", precision="float32", backend_options={"onnx_dir": folder}
        )
    assert _sha256(folder / "model.onnx") == tampered  # left as it was
    metadata = json.loads((folder / METADATA).read_text())
    del metadata["files"]  # an export by an older version
    (folder / METADATA).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="records no checksums .*fastinstructor export"):
        OnnxBackend.from_folder(checkpoint, folder)


def test_parity_cache_never_vouches_for_a_graph_it_did_not_measure(
    make_model, exported, cache, tmp_path, onnx_float32_first
):
    """A cached parity result holds for the graph it measured: another graph of the same model (here a tampered
    one recorded as exported) is measured, fails, and is skipped."""
    good = exported("tiny")
    first = fastinstructor.load(make_model("tiny"), allow_int8=False, backend_options={"onnx_dir": good})
    assert first.backend_name == "onnx" and first.backend_report["parity"]["passed"]
    other = shutil.copytree(good, tmp_path / "other")
    _tamper(other / "model.onnx")
    _sign(other)
    second = fastinstructor.load(make_model("tiny"), allow_int8=False, backend_options={"onnx_dir": other})
    assert second.backend_name == "cpu"
    skipped = second.backend_report["skipped"][0]
    assert skipped["candidate"] == "onnx/float32/cpu" and skipped["why"].startswith("parity failed: min cosine")
    assert not skipped["parity"]["cached"]


def test_an_8_bit_int8_graph_is_refused_on_a_cpu_without_vnni(make_model, tmp_path, monkeypatch):
    """Without VNNI, ONNX Runtime's U8S8 products saturate on weights that use the whole int8 range: the export keeps
    them in 7 bits there, records which it did, and the backend refuses an 8-bit graph on such a CPU."""
    import fastinstructor.backends.onnx as onnx_backend

    checkpoint = load_checkpoint(make_model("tiny"))
    monkeypatch.setattr(onnx_export, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert export_onnx(checkpoint, tmp_path / "vnni", precision="int8")["int8_reduce_range"] is False
    monkeypatch.setattr(onnx_export, "cpu_flags", lambda: frozenset({"avx2"}))
    assert export_onnx(checkpoint, tmp_path / "avx2", precision="int8")["int8_reduce_range"] is True
    monkeypatch.setattr(onnx_backend, "cpu_flags", lambda: frozenset({"avx2"}))
    OnnxBackend.from_folder(checkpoint, tmp_path / "avx2")
    with pytest.raises(ValueError, match=r"int8 weights in 8 bits.*saturate; export it again here"):
        OnnxBackend.from_folder(checkpoint, tmp_path / "vnni")
    monkeypatch.setattr(onnx_backend, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    OnnxBackend.from_folder(checkpoint, tmp_path / "vnni")
