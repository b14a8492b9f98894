"""One capability table per backend class, and one set of precision names (with fp32/bf16/fp16 aliases)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import needs_cpu_bfloat16

import fastinstructor
from fastinstructor.backends import BACKENDS, CpuBackend, OnnxBackend, ReferenceBackend
from fastinstructor.backends.base import why_not
from fastinstructor.checkpoint import load_checkpoint
from fastinstructor.cli import main as cli_main
from fastinstructor.dispatch import all_candidates, candidates, probe, unavailable_reason
from fastinstructor.precisions import ALIASES, PRECISIONS, canonical_precision


def test_every_backend_declares_its_table():
    for name, cls in BACKENDS.items():
        assert cls.name == name and cls.capabilities
        assert set(cls.precisions) <= set(PRECISIONS)
        assert {c.device for c in cls.capabilities} <= {"cpu", "cuda"}
        assert len(set(cls.capabilities)) == len(cls.capabilities)


def test_the_dispatchers_candidates_come_from_the_tables():
    cpu = dataclasses.replace(probe(), cuda_device=None)
    gpu = dataclasses.replace(cpu, cuda_device="Fake GPU")
    table = {(n, c.precision, c.device) for n, cls in BACKENDS.items() for c in cls.capabilities}
    listed = [(c.backend, c.precision, c.device) for c in all_candidates(cpu)]
    assert set(listed) == table and len(listed) == len(table)  # every entry once, nothing else
    for hardware, device in ((cpu, "cpu"), (gpu, "cuda")):
        ranked = sorted(
            (cls.rank(c, hardware), n, c.precision)
            for n, cls in BACKENDS.items()
            for c in cls.capabilities
            if c.device == device and cls.rank(c, hardware) is not None
        )
        assert [(c.backend, c.precision) for c in candidates(hardware)] == [(n, p) for _, n, p in ranked]


def test_why_not_names_the_table_when_a_backend_does_not_run_a_precision_there():
    hardware = dataclasses.replace(probe(), cuda_device=None)
    assert "runs float32 or bfloat16 or int8 on the CPU" in why_not(CpuBackend, "float32", "cuda", hardware)
    assert "runs int8 or float32 on the CPU; float16 or float32 on CUDA" in why_not(
        OnnxBackend, "float16", "cpu", hardware
    )
    assert why_not(ReferenceBackend, "float32", "cpu", hardware) is None


def test_constructors_refuse_what_their_table_does_not_have(tiny_model):
    checkpoint = load_checkpoint(tiny_model)
    with pytest.raises(ValueError, match=r"backend 'cpu' runs .* on the CPU; not float32 on device='cuda'"):
        CpuBackend(checkpoint, "float32", "cuda")
    pytest.importorskip("onnxruntime", reason="the onnx backend needs onnxruntime (pip install '.[onnx]')")
    with pytest.raises(ValueError, match=r"float16 or float32 on CUDA; not float16 on device='cpu'"):
        OnnxBackend(checkpoint, "float16", "cpu")


def test_aliases_name_the_canonical_precisions():
    assert {canonical_precision(a) for a in ALIASES} == {"float32", "bfloat16", "float16", "float8"}
    assert all(canonical_precision(p) == p for p in PRECISIONS)
    assert canonical_precision("auto", allow_auto=True) == "auto"
    with pytest.raises(ValueError, match="unknown precision 'int4'; choose one of: float32, .*float8, .*fp8"):
        canonical_precision("int4")
    with pytest.raises(ValueError, match="unknown precision 'auto'"):
        canonical_precision("auto")


@pytest.mark.parametrize("alias", ["fp32", pytest.param("bf16", marks=needs_cpu_bfloat16)])
def test_load_and_the_cli_take_the_aliases(tiny_model, tmp_path, alias):
    model = fastinstructor.load(tiny_model, backend="cpu", precision=alias)
    assert model.precision == canonical_precision(alias) and model.backend.precision == model.precision
    out = tmp_path / "out"
    args = ["embed", "--model", str(tiny_model), "--backend", "cpu", "--precision", alias, "--quiet"]
    source = tmp_path / "in.txt"
    source.write_text("one text\nanother\n")
    assert cli_main([*args, "--input", str(source), "--input-format", "text", "--output", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend_report"]["precision"] == canonical_precision(alias)


def test_the_cli_refuses_an_unknown_precision_naming_the_choices(tiny_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["embed", "--model", str(tiny_model), "--precision", "int4", "--input", "x", "--output", "y"])
    assert exit_.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_float8_is_refused_off_the_triton_backend_naming_what_runs(tiny_model):
    with pytest.raises(
        ValueError, match="backend 'cpu' does not support precision 'float8'; choose one of float32, bfloat16, int8"
    ):
        fastinstructor.load(tiny_model, backend="cpu", precision="fp8")


def test_device_cpu_on_a_cuda_machine_walks_the_cpu_order(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTINSTRUCTOR_CACHE", str(tmp_path / "cache"))
    from fastinstructor.dispatch import choose
    from fastinstructor.tokenization import PairTokenizer, load_tokenizer

    gpu = dataclasses.replace(probe(), cuda_device="Fake GPU")
    checkpoint = load_checkpoint(tiny_model)
    tokenizer = PairTokenizer(load_tokenizer(checkpoint.path), checkpoint.max_seq_length)
    _, candidate, report = choose(checkpoint, tokenizer, backend="cpu", device="cpu", hardware=gpu)
    cpu_order = [c for c in all_candidates(gpu) if (c.backend, c.device) == ("cpu", "cpu")]
    first = next(c for c in cpu_order if unavailable_reason(c, gpu) is None)  # the first the CPU can run
    assert candidate == first and report["parity"]["passed"]
