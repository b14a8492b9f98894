"""Resident memory of a loaded model, each backend and precision in a fresh process.

``fastinstructor bench`` loads its contenders one after another in one process, where memory freed by one
need not return to the system before the next; here each (backend, precision) gets a process of its own:
the resident set (``VmRSS``) after importing fastinstructor, after ``load`` (dispatcher parity check
included, its cache off), after embedding 64 evidence texts, and the peak (``VmHWM``), the median of
``--repeat`` processes. The checkpoint's float32 weights on disk are the yardstick. An ONNX export not yet in the
cache happens during ``load`` and inflates that row: run twice.

    .venv/bin/python bench/bench_memory.py [--model DIR] [--backends cpu:float32,onnx:int8,...] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from harness import DEFAULT_MODEL, DEFAULT_OUT, command, ensure_model, machine, write_results

from fastinstructor.benchmark import markdown_table, record

DEFAULT_CONTENDERS = "reference:float32,cpu:float32,cpu:bfloat16,cpu:int8,onnx:float32,onnx:int8"

# Run in the child: one load, one embed, the figures as JSON on the last line of stdout.
CHILD = """
import json, sys
from pathlib import Path

def mib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

import fastinstructor
from fastinstructor.data import sample_passages
imported = mib("VmRSS")
model = fastinstructor.load(sys.argv[1], backend=sys.argv[2], precision=sys.argv[3], parity_cache=False)
loaded = mib("VmRSS")
model.encode([["Represent the Wikipedia document for retrieval:", t] for _, t in sample_passages(64)[0]])
print(json.dumps({"imported": imported, "loaded": loaded, "embedded": mib("VmRSS"), "peak": mib("VmHWM")}))
"""


def measure(model: Path, backend: str, precision: str, repeat: int) -> dict:
    """The median of ``repeat`` fresh processes for each figure, and every run's figures."""
    runs = []
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(model), backend, precision], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            return {"backend": backend, "precision": precision, "error": done.stderr.strip().splitlines()[-1]}
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    model_mib = statistics.median(run["loaded"] - run["imported"] for run in runs)
    return {"backend": backend, "precision": precision, **medians, "model_mib": model_mib, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--backends", default=DEFAULT_CONTENDERS, help=f"backend:precision,... ({DEFAULT_CONTENDERS})")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per row; medians count (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    ensure_model(args.model)
    weights_mib = sum(p.stat().st_size for p in args.model.rglob("*.safetensors")) / 2**20
    rows = []
    for spec in args.backends.split(","):
        backend, _, precision = spec.partition(":")
        rows.append(measure(args.model, backend, precision, args.repeat))
        print(rows[-1], file=sys.stderr, flush=True)
    result = record(command("bench_memory.py"), model=str(args.model), weights_mib=weights_mib, rows=rows)

    def fmt(row, key):
        return f"{row[key]:,.0f}" if key in row else "n/a"

    table = markdown_table(
        ["backend", "precision", "MiB after load", "MiB after embedding", "peak MiB", "model MiB (load - import)"],
        [
            [r["backend"], r["precision"], fmt(r, "loaded"), fmt(r, "embedded"), fmt(r, "peak"), fmt(r, "model_mib")]
            if "error" not in r
            else [r["backend"], r["precision"], "failed: " + r["error"], "", "", ""]
            for r in rows
        ],
    )
    markdown = (
        f"Model {args.model.name}, {weights_mib:,.0f} MiB of float32 weights on disk. Resident set after importing "
        f"fastinstructor, after `load` (parity check included, ONNX exports already cached), after embedding 64 "
        f"texts, and the peak: the median of {args.repeat} fresh processes per row.\n\n{table}\n\n"
        f"{machine(result)}\n"
    )
    print(markdown)
    write_results(args.out, "memory", result, "Resident memory per backend", markdown)


if __name__ == "__main__":
    main()
