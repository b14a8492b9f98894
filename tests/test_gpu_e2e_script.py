"""bench/gpu_e2e.py, bench/gpu_targets.py and bench/gpu_triton.sh, the rest of issue 15's GPU check, on the CPU:
gpu_e2e.py --smoke end to end under the Triton interpreter and gpu_targets.py on what it wrote (the scarce GPU runs
must not fail on the scripts themselves), the targets' rules on made-up figures, and the shell script's wiring
with a stand-in Python (its real steps are the smoke runs here and in test_gpu_triton_script.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TRITON = importlib.util.find_spec("triton") is not None
ST = importlib.util.find_spec("sentence_transformers") is not None


def run_script(name: str, *args, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    argv = [sys.executable, str(BENCH / name), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def bench_modules(monkeypatch):
    """Import the scripts in bench/ as the scripts import each other (bench/ on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_e2e
    import gpu_targets

    return gpu_e2e, gpu_targets


# Made-up forward-pass figures in gpu_triton.py's layout: on base every target is met, on large none.
BACKENDS = [
    ("base", "reference bfloat16", 1000.0, 0.99, 0.1),
    ("base", "triton bfloat16", 2500.0, 0.999, 0.45),
    ("base", "triton int8", 3500.0, 0.98, 0.2),  # fast, but its parity rules it out ...
    ("base", "triton float8", 3300.0, 0.995, 0.3),  # ... this one counts: 1.32x
    ("large", "reference bfloat16", 1000.0, 0.99, 0.1),
    ("large", "triton bfloat16", 1500.0, 0.999, 0.45),  # 45 % < 50 %, 1.5x < 2x
    ("large", "triton int8", 3000.0, 0.95, 0.2),  # 2x, but min cos 0.95: not met
]


def made_up_triton(smoke: bool = False) -> dict:
    rows = [
        {"preset": p, "contender": c, "tokens_per_s": t, "min_cos": m, "fraction_of_bf16_peak": f, "passed": True}
        for p, c, t, m, f in BACKENDS
    ]
    skipped = [{"preset": "large", "contender": "triton float8", "reason": "no FP8 tensor cores"}]
    return {"date": "2026-12-01", "smoke": smoke, "device_name": "GPU", "backends": rows, "skipped": skipped}


def test_targets_rules_on_made_up_figures(bench_modules):
    _, targets = bench_modules
    e2e = {
        "smoke": False,
        "ratios": [
            {"preset": "base", "ratio": 4.5, "fastinstructor_tokens_per_s": 450.0, "st_best_tokens_per_s": 100.0}
            | {"st_dtype": "float16", "st_best_batch_size": 128}
        ],
        "host": [
            {"preset": "base", "ratio_to_gpu_forward": 1.5, "tokens_per_s": 3.0, "gpu_forward_tokens_per_s": 2.0}
            | {"cpu_count": 16}
        ],
        "latency": [
            {"preset": "base", "p99_over_p50": 2.5, "p50_ms": 4.0, "p99_ms": 10.0, "load_s": 3.0}
            | {"graph": "measured", "forward_eager_ms": 4.0, "forward_graph_ms": 3.0}
        ],
        "errors": [{"preset": "large", "step": "load and batch-1 latency", "error": "RuntimeError: out of memory"}],
    }
    rows = targets.judge(made_up_triton(), e2e, ["base", "large"])
    status = {(r["preset"], r["target"].split(" >= ")[0].split(" <= ")[0]): r for r in rows}
    assert len(rows) == 14 and not any(r["smoke"] for r in rows)
    graph = status[("base", "CUDA graph replay < eager batch-1 forward (keep graphs only if met)")]
    assert graph["status"] == "met" and graph["value"] == pytest.approx(0.75)
    expected = {
        ("base", "forward bf16"): "met",  # 45 % >= 40 % (base's target) ...
        ("large", "forward bf16"): "not met",  # ... < 50 % (large's); and 1.5x < 2x
        ("base", "int8 or float8"): "met",
        ("large", "int8 or float8"): "not met",
        ("base", "end to end"): "met",
        ("large", "end to end"): "not measured",
        ("base", "host pipeline"): "not met",
        ("base", "batch-1 latency p99"): "not met",
        ("large", "batch-1 latency p99"): "not measured",
    }
    for key, want in expected.items():
        assert status[key]["status"] == want, status[key]
    forward = [r for r in rows if r["target"].startswith("forward bf16 >= 2x")]
    assert [(r["preset"], r["value"], r["status"]) for r in forward] == [
        ("base", 2.5, "met"),
        ("large", 1.5, "not met"),
    ]
    quantized = status[("base", "int8 or float8")]
    assert quantized["value"] == pytest.approx(3300 / 2500) and "int8 1.40x at min cos 0.9800" in quantized["measured"]
    large = status[("large", "int8 or float8")]
    assert large["value"] == 2.0 and "float8: no FP8 tensor cores" in large["measured"]
    assert "out of memory" in status[("large", "batch-1 latency p99")]["measured"]
    assert all(
        r["status"] == "not measured" and "no gpu-triton" in r["measured"]
        for r in targets.judge(None, e2e, ["base"])[:3]
    )


def test_quantized_precisions_missing_or_unavailable_are_skipped_with_the_reason(bench_modules, monkeypatch):
    gpu_e2e, _ = bench_modules
    from fastinstructor.backends import TritonBackend

    monkeypatch.setattr(TritonBackend, "precisions", ("bfloat16", "float8"))  # a build without int8
    monkeypatch.setattr(TritonBackend, "unavailable", classmethod(lambda cls, p, d, h: f"no {p} on this GPU"))
    result = {"skipped": [], "e2e": []}
    run = gpu_e2e.Run(Namespace(smoke=True, repeat=1), "cpu", [["Represent:", "text"]], result)
    for precision in ("int8", "float8"):
        gpu_e2e.quantized_step(run, "base", Path("unused"), precision, {})
    assert result["e2e"] == []
    reasons = {s["contender"]: s["reason"] for s in result["skipped"]}
    assert reasons["fastinstructor triton int8"].startswith("not in this build: the triton backend runs")
    assert reasons["fastinstructor triton float8"] == "no float8 on this GPU"


@pytest.mark.skipif(not (TRITON and ST), reason="needs triton and sentence-transformers (pip install '.[dev]')")
def test_e2e_smoke_runs_every_step_and_the_targets_read_it(tmp_path, tiny_model):
    out, models = tmp_path / "results", tmp_path / "models"
    models.mkdir()
    (models / "instructor-tiny-random").symlink_to(tiny_model)  # the session's tiny checkpoint
    env = {"FASTINSTRUCTOR_CACHE": str(tmp_path / "cache")}
    done = run_script("gpu_e2e.py", "--smoke", "--out", out, "--models", models, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    (json_path,) = out.glob("gpu-e2e-*.json")
    result = json.loads(json_path.read_text())
    assert result["smoke"] and result["texts"] == 6 and result["errors"] == [] and result["cpu_count"] == os.cpu_count()

    e2e = {r["contender"]: r for r in result["e2e"]}
    st = [e2e["sentence-transformers float32, batch 2"], e2e["sentence-transformers float32, batch 4"]]
    assert all("smoke: float32" in r["note"] for r in st)
    assert "fastinstructor triton bfloat16" in e2e and "fastinstructor triton int8" in e2e
    for row in result["e2e"]:  # every contender checked against the float32 reference
        assert row["passed"] and row["tokens_per_s"] > 0 and row["min_cos"] > 0.99, row
    for skip in result["skipped"]:
        assert skip["reason"], skip
    (ratio,) = result["ratios"]
    best = max(st, key=lambda r: r["tokens_per_s"])
    assert ratio["st_best_batch_size"] == best["batch_size"]
    assert ratio["ratio"] == pytest.approx(e2e["fastinstructor triton bfloat16"]["tokens_per_s"] / best["tokens_per_s"])
    (forward,) = result["forward"]
    (host,) = result["host"]
    assert host["ratio_to_gpu_forward"] == pytest.approx(host["tokens_per_s"] / forward["tokens_per_s"])
    (latency,) = result["latency"]
    assert latency["calls"] == 3 == len(set(latency["ms"])) and latency["distinct_lengths"] == 3
    assert latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"] and latency["load_s"] > 0
    assert "Smoke run" in json_path.with_suffix(".md").read_text()

    (out / "gpu-triton-2026-12-01-gpu.json").write_text(json.dumps(made_up_triton(smoke=True)))
    done = run_script("gpu_targets.py", "--results", out, "--presets", "tiny,base")
    assert done.returncode == 0, done.stderr[-4000:]
    (targets_path,) = out.glob("gpu-targets-*.json")
    rows = {(r["preset"], r["target"]): r for r in json.loads(targets_path.read_text())["targets"]}
    assert len(rows) == 14 and all(r["smoke"] for r in rows.values())
    graph = rows[("tiny", "CUDA graph replay < eager batch-1 forward (keep graphs only if met)")]
    assert graph["status"] == "not measured" and graph["measured"] == "needs CUDA" == latency["graph"]
    tiny = {target.split(" ")[0]: r for (preset, target), r in rows.items() if preset == "tiny"}
    assert tiny["end"]["value"] == pytest.approx(ratio["ratio"]) and tiny["end"]["status"] == "not met"
    assert tiny["host"]["value"] == pytest.approx(host["ratio_to_gpu_forward"])
    assert tiny["batch-1"]["value"] == pytest.approx(latency["p99_over_p50"])
    peak = rows[("tiny", "forward bf16 >= 40% of the bf16 matmul peak")]  # made-up figures for base only
    assert peak["status"] == "not measured" and peak["measured"] == "no triton bf16 row on tiny in gpu-triton"
    assert rows[("base", "forward bf16 >= 40% of the bf16 matmul peak")]["status"] == "met"
    assert "(smoke: meaningless)" in targets_path.with_suffix(".md").read_text()


STUB = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in *gpu_e2e.py*) exit "${E2E_EXIT:-0}";; esac
"""


@pytest.mark.parametrize("smoke, e2e_exit", [(True, 0), (True, 1), (False, 0)])
def test_the_one_command_runs_every_step(tmp_path, smoke, e2e_exit):
    stub, calls = tmp_path / "python", tmp_path / "calls"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = os.environ | {"PY": str(stub), "CALLS": str(calls), "OUT": str(tmp_path / "out"), "E2E_EXIT": str(e2e_exit)}
    argv = ["bash", str(BENCH / "gpu_triton.sh"), *(["--smoke"] if smoke else []), "--texts", "99"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    steps = [line for line in calls.read_text().splitlines() if line.startswith(("bench/", "-m pytest"))]
    names = ["bench/gpu_triton.py", "bench/gpu_e2e.py", "bench/gpu_targets.py"]
    assert [s.split()[0] for s in steps if not s.startswith("-m")] == names
    assert steps[-3].endswith("--texts 99")  # the command's arguments go to gpu_triton.py, after its smoke sizes
    if smoke:
        assert all("--smoke" in s for s in steps[:2]) and "--presets tiny" in steps[0] and "--presets tiny" in steps[2]
        assert not steps[0].startswith("-m pytest") and "kernel tests skipped" in done.stdout
    else:
        assert steps[0].startswith("-m pytest") and "tests/test_kernels.py" in steps[0] and "--smoke" not in str(steps)
    assert (tmp_path / "out" / "gpu-triton.log").is_file()
    if e2e_exit:
        assert done.returncode == 1 and "failed: gpu_e2e.py" in done.stdout
    else:
        assert done.returncode == 0 and "every step passed" in done.stdout, done.stdout
