"""What every benchmark here shares: the model, the environment record, interleaved timing, result files.

Benchmarks are scripts (``python bench/<name>.py``), so this folder is on ``sys.path`` and they import this
module as ``harness``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

import fastinstructor
from fastinstructor.testmodel import make_test_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / ".models" / "instructor-base-random"  # the folder `make demo` builds and uses
DEFAULT_OUT = ROOT / "bench" / "results"
CPU_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def ensure_model(model_dir: Path) -> None:
    if not (model_dir / "modules.json").is_file():
        print(f"building the random-weight base checkpoint in {model_dir}", file=sys.stderr)
        make_test_model("base", model_dir)


def load_sentence_transformers(model_dir: Path) -> SentenceTransformer:
    """sentence-transformers' native INSTRUCTOR mode: the instruction as ``prompt``, excluded from pooling."""
    model = SentenceTransformer(str(model_dir), device="cpu")
    if not isinstance(model[1], Pooling):
        raise RuntimeError(f"{model_dir}: module 1 is {type(model[1]).__name__}, expected Pooling")
    model[1].include_prompt = False
    return model


def environment() -> dict[str, object]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    fields: dict[str, str] = {}  # the last CPU's values; keys are padded with tabs in /proc/cpuinfo
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name", platform.processor()),
        "cpu_count": text.count("processor\t:"),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "fastinstructor": fastinstructor.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }


def source_version() -> dict[str, object]:
    """The checkout's commit, and whether the package differs from it: the library changes between runs."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        # --no-optional-locks: read only, never refresh the index of a checkout others are working in.
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"git_commit": None, "package_modified": None}
    return {
        "git_commit": head.stdout.strip(),
        "package_modified": git("diff", "--quiet", "HEAD", "--", "fastinstructor").returncode != 0,
    }


def interleaved(runs: dict[str, Callable[[], object]], repeat: int) -> tuple[dict, dict, dict]:
    """Time each run ``repeat`` times as A B C, A B C, ...; return times, load averages and last results.

    The machines are shared: the 1-minute load average after each pass shows when other work took the CPU.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    loadavg: dict[str, list[float]] = {name: [] for name in runs}
    last: dict[str, object] = {}
    for r in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            last[name] = run()
            times[name].append(time.perf_counter() - start)
            loadavg[name].append(os.getloadavg()[0])
            print(f"repeat {r + 1}/{repeat} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    return times, loadavg, last


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_results(out: Path, kind: str, result: dict, markdown: str) -> tuple[Path, Path]:
    """``<kind>-<date>-<host>.json`` and ``.md`` in ``out``."""
    stem = f"{kind}-{datetime.date.today().isoformat()}-{socket.gethostname()}"
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    print(f"\nwrote {json_path} and {md_path}", file=sys.stderr)
    return json_path, md_path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
