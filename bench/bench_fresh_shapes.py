"""Token counts not seen before: the cpu backend's forwards filled to shape buckets (``CpuBackend.fill_forwards``,
``backends.cpu.shape_bucket``), against the same forwards unfilled, at each precision whatever its default.

oneDNN builds (JIT-compiles) a product's kernels once per shape. ``make bench`` times passes over the same texts,
so after its first pass every shape is known; a corpus, or a server's requests, bring new token counts all the
time. Each measurement runs in a fresh process (oneDNN's kernel cache empty), filled and unfilled alternating:

- corpus: the workload's texts in ``--chunks`` chunks of ``--chunk``, each encoded once after a warm-up chunk
  (new counts), then the same chunks again (every count known: what the filling costs);
- single texts: ``--singles`` texts of the workload, one ``encode`` call each (a server's requests): the total
  time, p50 and p90.

    .venv/bin/python bench/bench_fresh_shapes.py [--model DIR] [--precisions bfloat16,int8] [--workload evidence]
        [--chunk 256] [--chunks 6] [--singles 392] [--repeat 2] [--name fresh-shapes]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import DEFAULT_MODEL, DEFAULT_OUT, command, ensure_model, machine, write_results

import fastinstructor
from fastinstructor.benchmark import load_workload, markdown_table, record

MODES = ("filled", "unfilled")


def _child(args: argparse.Namespace) -> dict:
    """One process, one precision, one mode: the figures of both scenarios."""
    model = fastinstructor.load(args.model, backend="cpu", precision=args.precision)
    model.backend.fill_forwards = args.child == "filled"
    needed = args.chunk * (args.chunks + 1) + args.singles
    pairs = load_workload(args.workload, needed, model.tokenizer).pairs
    if len(pairs) < needed:
        sys.exit(f"workload {args.workload} has {len(pairs)} texts; --chunk, --chunks and --singles need {needed}")
    chunks = [pairs[i * args.chunk : (i + 1) * args.chunk] for i in range(args.chunks + 1)]
    singles = pairs[len(chunks) * args.chunk :]
    model.encode(chunks[0])
    figures = {}
    for name in ("corpus_once_s", "corpus_again_s"):
        start = time.perf_counter()
        for chunk in chunks[1:]:
            model.encode(chunk)
        figures[name] = time.perf_counter() - start
    latencies = []
    for pair in singles:
        start = time.perf_counter()
        model.encode([pair])
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    figures["singles_s"] = sum(latencies)
    figures["single_p50_ms"] = latencies[len(latencies) // 2] * 1e3
    figures["single_p90_ms"] = latencies[int(len(latencies) * 0.9)] * 1e3
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--precisions", default="bfloat16,int8")
    parser.add_argument("--workload", default="evidence")
    parser.add_argument("--chunk", type=int, default=256, help="texts per encode call in the corpus scenario")
    parser.add_argument("--chunks", type=int, default=6, help="timed chunks (after one warm-up chunk)")
    parser.add_argument("--singles", type=int, default=392, help="texts encoded one per call")
    parser.add_argument("--repeat", type=int, default=2, help="processes per precision and mode (medians)")
    parser.add_argument("--name", default="fresh-shapes", help="result file stem")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    ensure_model(args.model)
    rows = []
    for precision in args.precisions.split(","):
        runs = {mode: [] for mode in MODES}
        for _ in range(args.repeat):
            for mode in MODES:
                argv = [sys.executable, __file__, *sys.argv[1:], "--child", mode, "--precision", precision]
                done = subprocess.run(argv, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.exit(f"{precision} {mode}: the measuring process failed:\n{done.stderr[-3000:]}")
                runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
        for mode in MODES:
            row = {"precision": precision, "forwards": mode}
            row.update({key: statistics.median(run[key] for run in runs[mode]) for key in runs[mode][0]})
            rows.append(row)
            print(f"{precision} {mode}: {row}", file=sys.stderr)
    result = record(command("bench_fresh_shapes.py"), model=args.model.name, workload=args.workload, rows=rows)
    table = markdown_table(
        ["precision", "forwards", "corpus, each text once s", "the same again s", "single texts s", "p50 ms", "p90 ms"],
        [
            [r["precision"], r["forwards"]]
            + [f"{r[key]:.2f}" for key in ("corpus_once_s", "corpus_again_s", "singles_s")]
            + [f"{r['single_p50_ms']:.1f}", f"{r['single_p90_ms']:.1f}"]
            for r in rows
        ],
    )
    markdown = (
        f"Model {args.model.name}, workload {args.workload}, the cpu backend. Corpus: {args.chunks} chunks of "
        f"{args.chunk} texts, each encoded once after a warm-up chunk, then the same chunks again. Single texts: "
        f"{args.singles} texts, one `encode` call each. Medians of {args.repeat} fresh processes per precision and "
        f"mode, filled and unfilled alternating (`CpuBackend.fill_forwards` set either way; the backend's default "
        f"fills bfloat16 only).\n\n{table}\n\n{machine(result)}\n"
    )
    write_results(args.out, args.name, result, "New token counts: forwards filled to shape buckets", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
