"""bench/gpu_triton.py, issue 5's GPU check, run end to end on the CPU under the Triton interpreter (--smoke), so
that the scarce GPU runs cannot fail on the script itself. The figures mean nothing here; what is checked is
that every step runs, every implementation agrees and every contender passes parity."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Not importorskip: triton reads TRITON_INTERPRET when first imported, and test_kernels.py imports it with the flag.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install '.[dev]' brings it)"
)

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_triton.py"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_every_step_runs_and_agrees(tmp_path):
    out = tmp_path / "results"
    done = run_script(
        "--smoke", "--texts", "4", "--presets", "tiny", "--lengths", "16,24", "--attention-tokens", "48",
        "--tile-rows", "40", "--repeat", "1", "--out", str(out), "--models", str(tmp_path / "models"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = out.glob("gpu-triton-*.json")
    result = json.loads(json_path.read_text())
    assert result["smoke"] and result["texts"] == 4 and result["bf16_matmul_peak_tflops"] > 0

    attention = {(r["L"], r["impl"]): r for r in result["attention"]}
    impls = ("sdpa_materialized_bias", "flex_attention", "triton_kernel")
    assert set(attention) == {(length, impl) for length in (16, 24) for impl in impls}
    assert attention[(16, "triton_kernel")]["batch"] == 3 and attention[(24, "triton_kernel")]["batch"] == 2
    for row in result["attention"]:
        assert row["ms"] > 0 and row["max_abs_diff"] < 2e-2, row  # bfloat16 against SDPA on the same inputs

    # 3 matmul shapes x (bfloat16: cuBLAS + 6 tiles, int8: cuBLAS + 8 tiles, float8: cuBLASLt), 4 attention tiles per
    # length, the pooling head's two rows.
    tiles = result["tiles"]
    assert [r["op"] for r in tiles] == ["matmul"] * 51 + ["attention"] * 8 + ["head"] * 2
    assert [r["dtype"] for r in tiles[:17]] == ["bfloat16"] * 7 + ["int8"] * 9 + ["float8"]
    assert sum(r["tile"] == "cuBLAS (torch)" for r in tiles) == 6
    assert not any(r["chosen"] for r in tiles)  # the interpreter has no table entry: nothing is marked
    for row in tiles:
        limit = {"bfloat16": 2e-2, "int8": 3e-2, "float8": 0.1, "float32": 1e-5}[row["dtype"]]  # against float32
        assert row["ms"] > 0 and row["relative_error"] < limit, row

    contenders = [r["contender"] for r in result["backends"]]
    assert contenders == [
        "reference float32", "reference bfloat16", "reference float16",
        "triton bfloat16", "triton float16", "triton int8", "triton float8",
    ]  # fmt: skip
    for row in result["backends"]:
        assert row["passed"] and row["tokens_per_s"] > 0 and 0 < row["fraction_of_bf16_peak"], row
        assert row["layout"] == ("packed" if row["contender"].startswith("triton") else "padded") and row["load_s"] > 0
    assert [s["contender"] for s in result["skipped"]] == ["onnx float16"]  # no CUDA execution provider here
    markdown = json_path.with_suffix(".md").read_text()
    assert "| tiny | triton bfloat16 |" in markdown and "Smoke run" in markdown
    assert (
        '("linear", "bfloat16", "large"):' in markdown and '("attention", "bfloat16", "large"): {"BLOCK_M":' in markdown
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_says_so(tmp_path):
    done = run_script("--out", str(tmp_path))
    assert done.returncode != 0 and "no CUDA device (--smoke checks the script on the CPU)" in done.stderr
    assert not list(tmp_path.iterdir())
