"""The cpu backend's packed forward against its padded one (issue 16), and the share of attention in each.

For each workload and precision: the same batches (``encode``'s default on the CPU, 32 rows, sorted by length)
through ``CpuBackend.embed`` (padded ``[B, L]``, SDPA with the bias + padding mask) and ``CpuBackend.embed_packed``
(packed ``[T]``, attention per sequence by ``fastinstructor.native``: the C++ op where built, else its PyTorch
fallback), the forward pass alone (tokenized and batched beforehand), interleaved, median of ``--repeat``. The
attention share: the same pass with attention replaced by a no-op (its output is its query), ``1 - that / full``.

    .venv/bin/python bench/bench_packed_cpu.py [--model DIR] [--texts 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from harness import DEFAULT_MODEL, DEFAULT_OUT, command, ensure_model, machine, write_results

from fastinstructor import native
from fastinstructor.backends import cpu
from fastinstructor.batching import DEFAULT_ENCODE_POLICY, pack_batch, pad_batch
from fastinstructor.benchmark import load_workload, markdown_table, record
from fastinstructor.checkpoint import load_checkpoint
from fastinstructor.tokenization import PairTokenizer, load_tokenizer


def _no_attention(layout: str):
    """A patch that makes the layout's attention return its query (same shape and dtype, no work)."""
    if layout == "padded":
        return mock.patch.object(cpu.F, "scaled_dot_product_attention", lambda q, k, v, **_: q)
    return mock.patch.object(cpu, "varlen_attention", lambda q, k, v, cu, bias: q)


def _passes(backend, batches: dict) -> dict:
    """One timed pass per (layout, attention on/off), in that order."""
    times = {}
    for layout, built in batches.items():
        run = backend.embed_packed if layout == "packed" else (lambda batch: backend.embed(*batch))
        for attention in (True, False):
            with contextlib.nullcontext() if attention else _no_attention(layout):
                start = time.perf_counter()
                for batch in built:
                    run(batch)
                times[(layout, attention)] = time.perf_counter() - start
    return times


def measure(model: Path, workload: str, precision: str, texts: int, repeat: int) -> dict:
    checkpoint = load_checkpoint(model)
    tokenizer = PairTokenizer(load_tokenizer(checkpoint.path), checkpoint.max_seq_length)
    pairs = load_workload(workload, texts, tokenizer).pairs
    tokenized = tokenizer(pairs)
    lengths = [len(ids) for ids in tokenized.ids]
    plan = DEFAULT_ENCODE_POLICY.plan(lengths)
    rows = [([tokenized.ids[i] for i in r], [tokenized.pool_start[i] for i in r]) for r in plan]
    batches = {"padded": [pad_batch(*r) for r in rows], "packed": [pack_batch(*r) for r in rows]}
    backend = cpu.CpuBackend(checkpoint, precision=precision)
    with torch.inference_mode():
        _passes(backend, batches)  # warm-up: oneDNN's first calls, the allocator
        runs = [_passes(backend, batches) for _ in range(repeat)]
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    tokens = sum(lengths)
    padded_tokens = sum(len(r[0]) * max(map(len, r[0])) for r in rows)
    row = {"workload": workload, "precision": precision, "texts": len(pairs), "tokens": tokens}
    row |= {"padded_tokens": padded_tokens, "batches": len(plan)}
    for layout in ("padded", "packed"):
        full, without = median[(layout, True)], median[(layout, False)]
        row[f"{layout}_s"], row[f"{layout}_tokens_per_s"] = full, tokens / full
        row[f"{layout}_attention_share"] = max(0.0, 1 - without / full)
    row["packed_over_padded"] = row["padded_s"] / row["packed_s"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--workloads", default="evidence,mixed")
    parser.add_argument("--precisions", default="float32,bfloat16,int8")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    ensure_model(args.model)
    rows = []
    for workload in args.workloads.split(","):
        for precision in args.precisions.split(","):
            rows.append(measure(args.model, workload, precision, args.texts, args.repeat))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, file=sys.stderr)
    available, why = native.availability()
    result = record(command("bench_packed_cpu.py"), model=args.model.name, native=why, rows=rows)
    table = markdown_table(
        ["workload", "precision", "real / padded tokens", "padded tok/s", "packed tok/s", "packed / padded"]
        + ["attention share padded", "attention share packed"],
        [
            [r["workload"], r["precision"], f"{r['tokens']:,} / {r['padded_tokens']:,}"]
            + [f"{r['padded_tokens_per_s']:,.0f}", f"{r['packed_tokens_per_s']:,.0f}", f"{r['packed_over_padded']:.2f}"]
            + [f"{r['padded_attention_share']:.0%}", f"{r['packed_attention_share']:.0%}"]
            for r in rows
        ],
    )
    markdown = (
        f"Model {args.model.name}, {args.texts} texts per workload, batches of "
        f"{DEFAULT_ENCODE_POLICY.max_rows} rows sorted by length, forward pass only, median of {args.repeat} "
        f"interleaved passes. Packed attention: {why}.\n\n{table}\n\n{machine(result)}\n"
    )
    write_results(args.out, "packed-cpu", result, "The cpu backend, packed against padded", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
