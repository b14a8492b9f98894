"""What the parity gate costs at the first load of a model: ``fastinstructor.load`` with the parity cache off.

For each backend x precision: the median load time over ``--repeat`` loads (the first, uncounted load fills the
ONNX export cache and the page cache), the calibration rows measured and the parity figures. Later loads read
the parity result from the cache and cost none of this.

    .venv/bin/python bench/bench_parity_cost.py [--model DIR] [--candidates cpu/int8,onnx/int8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import DEFAULT_MODEL, DEFAULT_OUT, command, ensure_model, machine, write_results

import fastinstructor
from fastinstructor.benchmark import markdown_table, record


def _measure(model: Path, backend: str, precision: str, repeat: int) -> dict:
    fastinstructor.load(model, backend=backend, precision=precision)  # the export cache, the page cache
    times, parity = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        loaded = fastinstructor.load(model, backend=backend, precision=precision, parity_cache=False)
        times.append(time.perf_counter() - start)
        parity = loaded.backend_report["parity"]
    return {
        "candidate": f"{backend}/{precision}",
        "median_s": statistics.median(times),
        "times_s": times,
        "rows": parity["rows"],
        "min_cos": parity["min_cos"],
        "mean_cos": parity["mean_cos"],
        "calibration_sha256": parity["calibration_sha256"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--candidates", default="cpu/int8,onnx/int8", help="backend/precision, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    ensure_model(args.model)
    os.environ.setdefault("FASTINSTRUCTOR_CACHE", tempfile.mkdtemp(prefix="fastinstructor-parity-cost-"))
    rows = []
    for candidate in args.candidates.split(","):
        backend, precision = candidate.split("/")
        rows.append(_measure(args.model, backend, precision, args.repeat))
        print(f"{candidate}: {rows[-1]['median_s']:.1f} s", file=sys.stderr)
    result = record(command("bench_parity_cost.py"), model=args.model.name, repeat=args.repeat, rows=rows)
    table = markdown_table(
        ["backend/precision", "load with parity, s (median)", "calibration rows", "min cos", "mean cos"],
        [
            [r["candidate"], f"{r['median_s']:.1f}", str(r["rows"]), f"{r['min_cos']:.6f}", f"{r['mean_cos']:.6f}"]
            for r in rows
        ],
    )
    markdown = f"Model {args.model.name}; median of {args.repeat} loads.\n\n{table}\n\n{machine(result)}\n"
    write_results(args.out, "parity-cost", result, "The parity gate at first load", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
