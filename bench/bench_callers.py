"""One text per call, from the thread that loaded the model, from a pool of threads, and from many callers at once.

What a model costs where a host calls it from threads of its own (a web framework's thread pool, LangChain's async
methods): each contender (``backend:precision``) is loaded, warmed up, then given one climate claim per call, in
one of three ways, each way in a fresh process (a thread that has run PyTorch's parallel ops keeps its OpenMP team
for the life of the process):

- ``loading thread``: every call from the thread that loaded the model;
- ``pool in turn``: each call from one of ``--threads`` pool threads, the next after the last returned;
- ``pool at once``: ``--threads`` pool threads calling together (latency includes the wait for the others).

Rounds take turns over the checkouts, contenders and ways; the table gives the median over rounds of each
process's p50, p90 and calls per second. ``--before DIR`` adds a checkout of another commit (its package first on
``PYTHONPATH``, its native op built or copied in), measured in the same rounds: ``fastinstructor.compute_thread`` is
what makes the three ways cost the same on the cpu backend.

    .venv/bin/python bench/bench_callers.py [--contenders cpu:int8,cpu:float32,onnx:int8] [--calls 120]
        [--threads 8] [--ways "loading thread,pool in turn,pool at once"] [--rounds 3] [--before DIR]
        [--name callers]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import DEFAULT_MODEL, DEFAULT_OUT, command, ensure_model, machine, require_shared_data, write_results

WAYS = ("loading thread", "pool in turn", "pool at once")
WARMUP_CALLS = 10


def _child(args: argparse.Namespace) -> dict:
    """One process: one contender, one way."""
    import fastinstructor
    from fastinstructor.benchmark import load_workload

    backend, precision = args.contender.split(":")
    model = fastinstructor.load(args.model, backend=backend, precision=precision)
    pairs = load_workload("claims", args.calls, model.tokenizer).pairs
    for pair in pairs[:WARMUP_CALLS]:
        model.encode([pair])

    def call(pair) -> float:
        start = time.perf_counter()
        model.encode([pair])
        return time.perf_counter() - start

    start = time.perf_counter()
    if args.way == WAYS[0]:
        times = [call(pair) for pair in pairs]
    else:
        with ThreadPoolExecutor(args.threads) as pool:
            if args.way == WAYS[1]:
                times = [pool.submit(call, pair).result() for pair in pairs]
            else:
                times = list(pool.map(call, pairs))
    wall = time.perf_counter() - start
    times.sort()
    return {
        "p50_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))],
        "calls_per_s": len(times) / wall,
        "package": str(Path(fastinstructor.__file__).parent),
    }


def _run_child(args: argparse.Namespace, checkout: Path | None, contender: str, way: str) -> dict:
    argv = [sys.executable, __file__, "--child", "--contender", contender, "--way", way, "--model", str(args.model),
            "--calls", str(args.calls), "--threads", str(args.threads)]  # fmt: skip
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"bench_callers.py: {contender}, {way} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--contenders", default="cpu:int8,cpu:float32,onnx:int8", help="backend:precision, ...")
    parser.add_argument("--calls", type=int, default=120, help="calls per process, one claim each")
    parser.add_argument("--threads", type=int, default=8, help="pool threads")
    parser.add_argument("--ways", default=",".join(WAYS), help="which of: " + ", ".join(WAYS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a checkout of another commit, measured in the same rounds")
    parser.add_argument("--name", default="callers", help="the result files' kind")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ways = args.ways.split(",")
    if unknown := set(ways) - set(WAYS):
        parser.error(f"unknown --ways {', '.join(sorted(unknown))}; choose from: {', '.join(WAYS)}")
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    require_shared_data("bench_callers.py")
    ensure_model(args.model)
    contenders = args.contenders.split(",")
    checkouts = [None] if args.before is None else [args.before.resolve(), None]
    runs: dict = {}  # package -> contender -> way -> each round's figures
    for turn in range(args.rounds):
        for checkout in checkouts:
            for contender in contenders:
                for way in ways:
                    result = _run_child(args, checkout, contender, way)
                    package = result.pop("package")
                    runs.setdefault(package, {}).setdefault(contender, {}).setdefault(way, []).append(result)
                    print(f"round {turn + 1}: {package}, {contender}, {way}: p50 {result['p50_ms']:.1f} ms, "
                          f"{result['calls_per_s']:.1f} calls/s", file=sys.stderr)  # fmt: skip
    from fastinstructor.benchmark import markdown_table, record

    rows = [
        {"package": package, "contender": c, "way": w}
        | {k: statistics.median(r[k] for r in figures) for k in ("p50_ms", "p90_ms", "calls_per_s")}
        for package, by_contender in runs.items()
        for c, by_way in by_contender.items()
        for w, figures in by_way.items()
    ]
    result = record(command("bench_callers.py"), model=args.model.name, calls=args.calls, threads=args.threads,
                    rounds=args.rounds, rows=rows, runs=runs)  # fmt: skip
    table = markdown_table(
        ["package", "contender", "calls from", "p50 ms", "p90 ms", "calls/s"],
        [
            [f"`{r['package']}`", r["contender"], r["way"]]
            + [f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['calls_per_s']:.1f}"]
            for r in rows
        ],
    )
    markdown = (
        f"Model {args.model.name}; one climate claim per call, {args.calls} calls per process after "
        f"{WARMUP_CALLS} to warm up; a pool of {args.threads} threads; each figure the median over {args.rounds} "
        f"rounds of one process per package, contender and way, taking turns.\n\n{table}\n\n{machine(result)}\n"
    )
    write_results(args.out, args.name, result, "A model called from other threads", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
