"""The command line as a user runs it: real processes, exit codes, messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastinstructor import read_embeddings

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastinstructor", *args], capture_output=True, text=True, cwd=cwd)


def test_make_test_model_command(tmp_path):
    result = run_cli("make-test-model", "--preset", "tiny", "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert "RANDOM-WEIGHT" in result.stdout and (tmp_path / "m" / "modules.json").is_file()
    again = run_cli("make-test-model", "--preset", "tiny", "--out", str(tmp_path / "m"))
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    assert not list(tmp_path.glob(".m.partial-*"))


def test_errors_exit_non_zero_with_a_message(tmp_path):
    missing = run_cli(
        "embed",
        "--model",
        str(tmp_path / "nowhere"),
        "--input",
        __file__,
        "--input-format",
        "text",
        "--output",
        str(tmp_path / "out"),
    )
    assert missing.returncode == 2 and "no such folder" in missing.stderr and "Traceback" not in missing.stderr
    bad_preset = run_cli("make-test-model", "--preset", "huge", "--out", str(tmp_path / "x"))
    assert bad_preset.returncode == 2 and "invalid choice: 'huge'" in bad_preset.stderr


@pytest.mark.skipif(
    not (REPO / ".venv" / ".installed").is_file(), reason="runs `make demo`, which needs `make setup` first"
)
def test_make_demo(tiny_model, tmp_path):
    """The README's demo command, on the tiny model instead of the base one to keep the suite fast."""
    out = tmp_path / "demo-output"
    result = subprocess.run(
        ["make", "-s", "demo", f"DEMO_MODEL={tiny_model}", f"DEMO_OUT={out}"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The Makefile's input: the shared evidence where the checkout has it, else the README's lines, of which --limit
    # 500 reads the first 500 and the job embeds the non-blank ones.
    if (REPO.parent / "shared" / "data" / "climate_fever_evidence.jsonl").is_file():
        rows = 500
    else:
        rows = sum(1 for line in (REPO / "README.md").read_text().splitlines()[:500] if line.strip())
    assert f"embedded {rows} rows" in result.stdout and "RANDOM weights" in result.stdout
    ids, embeddings = read_embeddings(out)
    assert len(ids) == rows and embeddings.shape == (rows, 48)


# Issue 13, defect 13: options that cannot work here end in one line that says what was wrong and what to do.
_ON_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine these can run")


@pytest.mark.parametrize(
    "command, expected",
    [
        (["embed", "--threads", "0"], "argument --threads: expected a whole number of at least 1, got '0'"),
        (["serve", "--max-seq-length", "0"], "argument --max-seq-length: expected a whole number of at least 1"),
        (["check", "--precision", "int4"], "argument --precision: invalid choice: 'int4' (choose from 'float32'"),
        pytest.param(
            ["embed", "--backend", "onnx", "--precision", "float16"],
            "no backend for backend='onnx', precision='float16' on this machine. Tried: onnx/float16/cpu: backend "
            "'onnx' runs int8 or float32 on the CPU; float16 or float32 on CUDA",
            marks=_ON_CUDA,
        ),
        pytest.param(
            ["serve", "--backend", "onnx", "--precision", "float16"], "no backend for backend='onnx'", marks=_ON_CUDA
        ),
        pytest.param(["embed", "--backend", "triton"], "backend 'triton' is not available here", marks=_ON_CUDA),
        pytest.param(["check", "--backend", "triton"], "triton is not available on this machine", marks=_ON_CUDA),
    ],
    ids=[
        "embed-threads-0",
        "serve-max-seq-length-0",
        "check-unknown-precision",
        "embed-onnx-float16",
        "serve-onnx-float16",
        "embed-triton",
        "check-triton",
    ],
)
def test_defect13_option_that_cannot_work_here_is_a_one_line_error(tiny_model, tmp_path, command, expected):
    name, *options = command
    if name == "embed":
        options += ["--input", __file__, "--input-format", "text", "--output", str(tmp_path / "out")]
    result = run_cli(name, "--model", str(tiny_model), *options)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert name != "embed" or not (tmp_path / "out").exists(), "a run that did nothing left an output folder"
    *_, last = result.stderr.strip().splitlines()
    assert last.startswith(f"fastinstructor {name}: error: {expected}"), result.stderr
