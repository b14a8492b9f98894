"""The dispatcher: each decision path, with real backends where this machine has them and fakes where not."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from conftest import needs_cpu_bfloat16

import fastinstructor
from fastinstructor import dispatch
from fastinstructor.backends import BACKENDS, CpuBackend
from fastinstructor.backends.cpu import Int8Linear
from fastinstructor.cli import main as cli_main
from fastinstructor.dispatch import Candidate, candidates, probe, unavailable_reason
from fastinstructor.parity import TOLERANCES, Tolerance

pytest.importorskip("onnxruntime", reason="the dispatcher's CPU order has onnx second (pip install '.[onnx]')")


@pytest.fixture(autouse=True)
def auto(monkeypatch, tmp_path):
    """auto for real (conftest pins cpu/float32 for the other tests), with a private parity cache."""
    monkeypatch.delenv("FASTINSTRUCTOR_BACKEND", raising=False)
    monkeypatch.delenv("FASTINSTRUCTOR_PRECISION", raising=False)
    monkeypatch.setenv("FASTINSTRUCTOR_CACHE", str(tmp_path / "cache"))


AMX = frozenset({"amx_tile", "amx_bf16", "amx_int8"})


@pytest.fixture(autouse=True)
def vnni_without_amx(monkeypatch):
    """These tests expect auto's order on a CPU with VNNI and without AMX, cpu/int8 then onnx/int8 first, whichever
    CPU runs them (only the order: the backends still see the real CPU); test_the_cpu_order covers the others."""
    real = dispatch.probe
    monkeypatch.setattr(
        dispatch, "probe", lambda: dataclasses.replace(real(), cpu_flags=real().cpu_flags - AMX | {"avx512_vnni"})
    )


def test_the_cpu_order():
    """The cpu backend's int8 leads onnx/int8 on every CPU family measured (bench/results/2026-12-01-vm/evidence.md
    with AMX, 2026-12-08-vm/evidence.md with AVX-512 VNNI, 2026-12-07-vm/evidence-cpu-int8.md on AVX2); with AMX its
    bfloat16 comes first (AMX's tile units: faster than onnx int8 there, and the more exact). float32 on the cpu
    backend before onnx's."""
    flags = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
    vnni = dataclasses.replace(probe(), cuda_device=None, cuda_capability=None, cpu_flags=flags)
    tail = ["cpu/float32/cpu", "onnx/float32/cpu", "reference/float32/cpu"]
    assert [str(c) for c in candidates(vnni)] == ["cpu/int8/cpu", "onnx/int8/cpu", "cpu/bfloat16/cpu", *tail]
    amx = dataclasses.replace(vnni, cpu_flags=flags | AMX)
    assert [str(c) for c in candidates(amx)] == ["cpu/bfloat16/cpu", "cpu/int8/cpu", "onnx/int8/cpu", *tail]
    avx2 = dataclasses.replace(vnni, cpu_flags=frozenset({"avx2"}))
    assert [str(c) for c in candidates(avx2)] == ["cpu/int8/cpu", "onnx/int8/cpu", "cpu/bfloat16/cpu", *tail]


def test_cpu_machine_picks_cpu_int8_after_parity(tiny_model):
    model = fastinstructor.load(tiny_model)
    report = model.backend_report
    assert (report["backend"], report["precision"], report["device"]) == ("cpu", "int8", "cpu")
    assert model.backend_name == "cpu" and model.precision == "int8"
    parity = report["parity"]
    assert parity["passed"] and parity["min_cos"] >= 0.99 and parity["rows"] >= 30 and not parity["cached"]
    assert 0 <= parity["topk_agreement"] <= 1 and report["skipped"] == []


def test_auto_skips_what_cannot_run_here_naming_why(tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(Int8Linear, "available", staticmethod(lambda: False))
    with caplog.at_level(logging.INFO, logger="fastinstructor.dispatch"):
        model = fastinstructor.load(tiny_model)
    skipped = {s["candidate"]: s["why"] for s in model.backend_report["skipped"]}
    assert skipped.pop("cpu/int8/cpu").startswith("this torch build has no oneDNN int8 linear")
    assert "skipping cpu/int8/cpu: this torch build has no oneDNN int8 linear" in caplog.text
    assert (model.backend_name, model.precision) == ("onnx", "int8") and not skipped
    monkeypatch.setattr(BACKENDS["onnx"], "availability", classmethod(lambda cls: (False, "onnxruntime missing")))
    with caplog.at_level(logging.INFO, logger="fastinstructor.dispatch"):
        model = fastinstructor.load(tiny_model)
    skipped = {s["candidate"]: s["why"] for s in model.backend_report["skipped"]}
    assert skipped.pop("onnx/int8/cpu") == "onnxruntime missing"
    assert "skipping onnx/int8/cpu: onnxruntime missing" in caplog.text
    assert model.backend_name == "cpu" and model.precision in ("bfloat16", "float32")  # bfloat16: if native
    with pytest.raises(ImportError, match="backend 'onnx' is not available here: onnxruntime missing"):
        fastinstructor.load(tiny_model, backend="onnx")


class Perturbed(CpuBackend):
    """The cpu backend made wrong: what the parity check exists to catch."""

    def embed(self, input_ids, attention_mask, pool_start):
        out = super().embed(input_ids, attention_mask, pool_start)
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        return torch.nn.functional.normalize(out + 0.5 * noise, dim=1)


def test_a_candidate_failing_parity_is_skipped_with_the_reason(tiny_model, monkeypatch, caplog):
    monkeypatch.setitem(BACKENDS, "cpu", Perturbed)
    with caplog.at_level(logging.WARNING, logger="fastinstructor.dispatch"):
        model = fastinstructor.load(tiny_model)
    assert (model.backend_name, model.precision) == ("onnx", "int8")
    skipped = model.backend_report["skipped"]
    assert [s["candidate"] for s in skipped] == ["cpu/int8/cpu"]
    assert all(s["why"].startswith("parity failed: min cosine") for s in skipped)
    assert "skipping cpu/int8/cpu: parity failed" in caplog.text
    with pytest.raises(RuntimeError, match=r"no backend .* Tried: cpu/int8/cpu: parity failed"):
        fastinstructor.load(tiny_model, allow_fallback=False)
    with pytest.raises(RuntimeError, match="parity failed"):  # an explicit request is not degraded either
        fastinstructor.load(tiny_model, backend="cpu", precision="float32")


def test_policy_knobs(tiny_model):
    assert fastinstructor.load(tiny_model, allow_int8=False).precision in ("bfloat16", "float32")  # bf16: if native
    strict = fastinstructor.load(tiny_model, min_cosine=0.99999)  # int8 cannot meet it
    assert strict.precision != "int8" and strict.backend_report["skipped"][0]["candidate"] == "cpu/int8/cpu"
    assert "the required 0.99999" in strict.backend_report["skipped"][0]["why"]


@needs_cpu_bfloat16
def test_explicit_requests_are_honoured_or_fail_with_the_list(tiny_model, monkeypatch):
    model = fastinstructor.load(tiny_model, backend="cpu", precision="bfloat16")
    assert (model.backend_name, model.precision) == ("cpu", "bfloat16") and model.backend_report["parity"]["passed"]
    monkeypatch.setenv("FASTINSTRUCTOR_BACKEND", "reference")
    assert fastinstructor.load(tiny_model).backend_name == "reference"
    assert fastinstructor.load(tiny_model).backend_report["parity"] is None  # the yardstick itself
    monkeypatch.setenv("FASTINSTRUCTOR_BACKEND", "cpu")
    monkeypatch.setenv("FASTINSTRUCTOR_PRECISION", "int8")
    assert (fastinstructor.load(tiny_model).backend_name, fastinstructor.load(tiny_model).precision) == ("cpu", "int8")
    with pytest.raises(ValueError, match="does not support precision 'float16'; choose one of float32, bfloat16, int8"):
        fastinstructor.load(tiny_model, backend="cpu", precision="float16")
    with pytest.raises(RuntimeError, match=r"device='cuda'.*Backends here: reference .*cpu .*onnx"):
        fastinstructor.load(tiny_model, backend="reference", precision="float32", device="cuda")


def test_parity_cache_hit_and_invalidation(tiny_model, tmp_path, monkeypatch):
    first = fastinstructor.load(tiny_model)
    assert not first.backend_report["parity"]["cached"]
    # Second start: cached, and the reference model is not even built.
    from fastinstructor.backends import reference

    monkeypatch.setattr(reference.ReferenceBackend, "__init__", lambda *a, **k: pytest.fail("reference was built"))
    second = fastinstructor.load(tiny_model)
    assert second.backend_report["parity"]["cached"] and second.precision == first.precision
    monkeypatch.undo()
    monkeypatch.delenv("FASTINSTRUCTOR_BACKEND", raising=False)
    monkeypatch.delenv("FASTINSTRUCTOR_PRECISION", raising=False)
    monkeypatch.setenv("FASTINSTRUCTOR_CACHE", str(tmp_path / "cache"))
    # A library version change invalidates it.
    real_probe = dispatch.probe
    monkeypatch.setattr(
        dispatch,
        "probe",
        lambda: dataclasses.replace(real_probe(), packages={**real_probe().packages, "onnxruntime": "0.0-other"}),
    )
    assert not fastinstructor.load(tiny_model).backend_report["parity"]["cached"]
    monkeypatch.setattr(dispatch, "probe", real_probe)
    # Other weights invalidate it.
    import shutil

    from safetensors.torch import load_file, save_file

    changed = shutil.copytree(tiny_model, tmp_path / "changed")
    weights = load_file(str(changed / "model.safetensors"))
    weights["encoder.final_layer_norm.weight"] = weights["encoder.final_layer_norm.weight"] * 1.01
    save_file(weights, str(changed / "model.safetensors"))
    assert not fastinstructor.load(changed).backend_report["parity"]["cached"]
    assert not fastinstructor.load(tiny_model, parity_cache=False).backend_report["parity"]["cached"]
    assert dispatch.clear_cache() >= 3


def test_a_further_check_reuses_the_references_calibration_embeddings(tiny_model, monkeypatch):
    """The reference's calibration embeddings are measured once per model and machine: a check whose own result
    is not cached (here: removed) runs only its candidate, and gets the figures of the first check."""
    from fastinstructor.backends.reference import ReferenceBackend
    from fastinstructor.locking import cache_dir

    def check(**options) -> dict:
        return fastinstructor.load(tiny_model, backend="cpu", precision="float32", **options).backend_report["parity"]

    def forget_results() -> None:
        for result in cache_dir("parity").glob("*.json"):
            result.unlink()

    first = check()
    (kept,) = cache_dir("parity").glob("reference-*.npy")
    assert np.load(kept).shape == (first["rows"], 48)  # tiny's Dense output
    forget_results()
    runs = []
    embed = ReferenceBackend.embed
    monkeypatch.setattr(ReferenceBackend, "embed", lambda self, *batch: runs.append(1) or embed(self, *batch))
    second = check()
    assert not runs and not second["cached"]
    assert (second["min_cos"], second["max_abs"]) == (first["min_cos"], first["max_abs"])

    # parity_cache=False measures the reference again, and neither reads nor writes the kept embeddings.
    kept.write_bytes(kept.read_bytes()[:100])  # torn
    assert check(parity_cache=False)["min_cos"] == first["min_cos"] and runs and kept.stat().st_size == 100
    # A torn file is measured again and replaced.
    forget_results()
    runs.clear()
    assert check()["min_cos"] == first["min_cos"] and runs and np.load(kept).shape == (first["rows"], 48)
    assert dispatch.clear_cache() == 2 and not kept.exists()  # the result and the embeddings


def test_a_damaged_cached_result_is_measured_again_and_a_cached_failure_says_so(tiny_model, caplog):
    import json

    from fastinstructor.locking import cache_dir

    def load():
        return fastinstructor.load(tiny_model, backend="cpu", precision="float32")

    load()
    (result,) = cache_dir("parity").glob("*.json")
    for damage in ('{"passed": tr', "[]", '{"passed": true}'):  # torn, another kind, another layout
        result.write_text(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastinstructor.dispatch"):
            parity = load().backend_report["parity"]
        assert parity["passed"] and not parity["cached"] and "is unreadable" in caplog.text
        assert json.loads(result.read_text())["passed"]  # and written again
    # Kept reference embeddings that are not finite are measured again, not used to fail every candidate.
    (kept,) = cache_dir("parity").glob("reference-*.npy")
    np.save(kept, np.full_like(np.load(kept), np.nan))
    result.unlink()
    assert load().backend_report["parity"]["passed"] and np.isfinite(np.load(kept)).all()
    # A failure read from the cache says so, and how to measure again.
    result.write_text(json.dumps({**json.loads(result.read_text()), "passed": False, "failures": ["min cosine 0.5"]}))
    with pytest.raises(RuntimeError, match=r"min cosine 0.5 \(a cached result: parity_cache=False, or .*--clear-cache"):
        load()


def test_the_reference_runs_in_small_batches_the_candidate_in_the_pipelines_with_progress_on_a_terminal(
    tiny_model, monkeypatch
):
    """The check feeds the candidate the embed job's batches (the shapes it will run) and the reference, whose
    embeddings do not depend on its batches beyond rounding, batches of at most ``REFERENCE_POLICY.max_tokens``
    padded tokens; on a terminal each run shows a progress bar."""
    import io

    from fastinstructor.backends.reference import ReferenceBackend
    from fastinstructor.calibration import calibration_pairs
    from fastinstructor.parity import REFERENCE_POLICY, calibration_batches

    shapes = {"reference": [], "cpu": []}
    for name, cls in (("reference", ReferenceBackend), ("cpu", CpuBackend)):
        embed = cls.embed
        monkeypatch.setattr(
            cls,
            "embed",
            lambda self, ids, *rest, e=embed, n=name: shapes[n].append(tuple(ids.shape)) or e(self, ids, *rest),
        )

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    model = fastinstructor.load(tiny_model, backend="cpu", precision="float32")
    tokenizer = model.tokenizer
    assert shapes["cpu"] == [tuple(batch[0].shape) for _, batch in calibration_batches(tokenizer)]
    assert max(rows * length for rows, length in shapes["cpu"]) > REFERENCE_POLICY.max_tokens  # so the test bites
    assert sum(rows for rows, _ in shapes["reference"]) == len(calibration_pairs())
    assert all(rows * length <= REFERENCE_POLICY.max_tokens or rows == 1 for rows, length in shapes["reference"])
    shown = terminal.getvalue()
    assert "parity check: float32 reference" in shown and "parity check: cpu/float32/cpu" in shown


def test_cuda_machine_order_and_reasons():
    """A CUDA machine without onnxruntime-gpu (faked: this machine has no GPU, which the backends' own probes
    still see)."""
    fake = dataclasses.replace(
        probe(), cuda_device="Fake GPU", cuda_capability=(9, 0), onnx_providers=("CPUExecutionProvider",)
    )
    order = candidates(fake)
    assert [str(c) for c in order] == [
        "triton/bfloat16/cuda",
        "triton/float16/cuda",
        "onnx/float16/cuda",
        "reference/float32/cuda",
    ]
    assert "no CUDA device" in unavailable_reason(order[0], fake)  # triton's own probe: this machine has no GPU
    assert "not part of this build" in unavailable_reason(Candidate("flash", "bfloat16", "cuda"), fake)
    assert "no CUDA provider" in unavailable_reason(order[2], fake)
    assert unavailable_reason(order[3], fake) is None
    cpu_only = dataclasses.replace(fake, cuda_device=None)
    assert unavailable_reason(Candidate("reference", "float32", "cuda"), cpu_only) == "no CUDA device"
    no_bf16 = dataclasses.replace(cpu_only, cpu_flags=frozenset({"avx2"}))
    assert "no native bfloat16" in unavailable_reason(Candidate("cpu", "bfloat16", "cpu"), no_bf16)


@needs_cpu_bfloat16
def test_check_command_table_and_exit_code(tiny_model, capsys, monkeypatch):
    assert cli_main(["check", "--model", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    for row in (
        "| reference/float32/cpu | yes",
        "| cpu/float32/cpu | yes",
        "| onnx/int8/cpu | yes",
        "| onnx/float32/cpu | yes",
        "| triton/bfloat16/cuda | no",
    ):
        assert row in out, row
    assert out.count("PASS") >= 6
    monkeypatch.setitem(TOLERANCES, "int8", Tolerance(min_cos=0.9999999))
    assert cli_main(["check", "--model", str(tiny_model), "--backend", "cpu", "--precision", "int8", "--no-cache"]) == 1
    assert "FAIL: min cosine" in capsys.readouterr().out


def test_info_and_embed_manifest_record_the_choice(tiny_model, tmp_path, capsys):
    assert cli_main(["info", "--model", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert '"fastinstructor"' in out and '"backend": "cpu"' in out and '"precision": "int8"' in out
    (tmp_path / "in.txt").write_text("Sea ice is melting.\nGlaciers retreat.\n")
    manifest = fastinstructor.embed_corpus(
        tiny_model,
        tmp_path / "in.txt",
        tmp_path / "out",
        instruction="Represent:",
        quiet=True,
        backend="auto",
        precision="auto",
    )
    assert manifest["backend_report"]["backend"] == "cpu" and manifest["backend_report"]["parity"]["passed"]
    ids, embeddings = fastinstructor.read_embeddings(tmp_path / "out")
    assert ids == ["1", "2"] and np.isfinite(embeddings).all()
