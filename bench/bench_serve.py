"""Serving benchmark: throughput and p50/p99 latency at concurrency 1, 8 and 64, with dynamic batching and
with batching disabled (``--max-batch-rows 1``), on the base preset and the shipped claims, in one run.

Each configuration is a real ``fastinstructor serve`` process on a loopback port; clients are threads with
their own HTTP connection, each sending one claim per request (the serving case: many small requests).

    .venv/bin/python bench/bench_serve.py [--model DIR] [--requests 256] [--backend auto]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from harness import DEFAULT_MODEL, DEFAULT_OUT, command, ensure_model, machine, require_shared_data, write_results

from fastinstructor.benchmark import markdown_table, record
from fastinstructor.data import read_jsonl_texts

INSTRUCTION = "Represent the climate claim for retrieving supporting documents:"


def start_server(model: Path, backend: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "fastinstructor",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--backend",
        backend,
        *extra,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if process.poll() is not None:
            sys.exit(f"bench_serve: the server exited: {process.communicate()[1]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.25)
    process.kill()
    sys.exit("bench_serve: the server did not become healthy")


def load(url: str, texts: list[str], concurrency: int) -> dict:
    latencies: list[float] = []

    def client(chunk: list[str]) -> None:
        with httpx.Client(timeout=300) as session:
            for text in chunk:
                start = time.perf_counter()
                reply = session.post(url + "/v1/embeddings", json={"input": text, "instruction": INSTRUCTION})
                latencies.append(time.perf_counter() - start)
                reply.raise_for_status()

    chunks = [texts[i::concurrency] for i in range(concurrency)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(client, chunks))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "requests": len(texts),
        "wall_s": wall,
        "requests_per_s": len(texts) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    ensure_model(args.model)
    data = require_shared_data("bench_serve")
    texts = [t for _, t in read_jsonl_texts(data / "climate_fever_claims.jsonl", args.requests)]
    modes = {"dynamic batching": [], "batching disabled": ["--max-batch-rows", "1", "--max-wait-ms", "0"]}
    rows = []
    for mode, extra in modes.items():
        process, url = start_server(args.model, args.backend, extra)
        try:
            info = httpx.get(url + "/info").json()
            load(url, texts[:16], 4)  # warm-up
            for concurrency in (1, 8, 64):
                result = load(url, texts, concurrency)
                rows.append(
                    {
                        "mode": mode,
                        "concurrency": concurrency,
                        "backend": info["backend"],
                        "precision": info["precision"],
                        **result,
                    }
                )
                print(rows[-1], file=sys.stderr)
        finally:
            process.terminate()
            process.wait(timeout=120)
    table = markdown_table(
        ["mode", "concurrency", "backend", "requests/s", "p50 ms", "p99 ms"],
        [
            [
                r["mode"],
                str(r["concurrency"]),
                f"{r['backend']} {r['precision']}",
                f"{r['requests_per_s']:.1f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
            ]
            for r in rows
        ],
    )
    print(table)
    result = record(command("bench_serve.py"), requests=len(texts), rows=rows)
    body = (
        f"{len(texts)} requests of one climate-fever claim each per concurrency level, random-weight base preset; "
        f"clients on the same machine.\n\n{table}\n\n{machine(result)}\n"
    )
    write_results(args.out, "serve", result, "Serving benchmark", body)


if __name__ == "__main__":
    main()
