"""Embed-job benchmark: token-budget batching against fixed-size batches and sentence-transformers.

The workload is a long-tailed length mix, the shipped climate-fever articles (many past 512 tokens) and
evidence sentences, alternating in input order, under one instruction. Three contenders embed it in one
process with interleaved repeats:

- ``embed``: ``fastinstructor.embed_corpus`` end to end (read the JSON Lines file, sort each shard by length,
  cut batches by rows and a padded-token budget, embed, write Parquet), the cpu backend;
- ``fixed``: the same backend fed fixed-size batches of 32 rows in input order, padded to each batch's longest
  row (what a naive loop does);
- ``sentence-transformers``: ``encode(texts, prompt=instruction, batch_size=32)`` with ``include_prompt=False``,
  its native INSTRUCTOR mode (it sorts by character length and pads each batch to its longest row).

Reported: rows/s, real tokens/s (padding excluded), ratios from the same run, and the padding efficiency
(real tokens / padded tokens) of each batching strategy.

    .venv/bin/python bench/bench_embed.py [--model DIR] [--rows 192] [--repeat 3] [--precision float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import DEFAULT_MODEL, DEFAULT_OUT, command, ensure_model, machine, require_shared_data, write_results

import fastinstructor
from fastinstructor import compute_thread
from fastinstructor.batching import pad_batch
from fastinstructor.benchmark import interleaved, load_sentence_transformers, markdown_table, record
from fastinstructor.corpus import EmbedSettings
from fastinstructor.data import read_jsonl_texts
from fastinstructor.parity import TOLERANCES, compare

INSTRUCTION = "Represent the Wikipedia document for retrieval:"
FIXED_BATCH = 32


def load_rows(total: int) -> list[tuple[str, str]]:
    data = require_shared_data("bench_embed")
    articles = read_jsonl_texts(data / "climate_fever_articles.jsonl", total // 2)
    evidence = read_jsonl_texts(data / "climate_fever_evidence.jsonl", total - total // 2)
    mixed = [row for pair in zip(articles, evidence, strict=False) for row in pair]
    return mixed + articles[len(evidence) :] + evidence[len(articles) :]


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(len(rows) * max(lengths[i] for i in rows) for rows in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint (base preset built if absent)")
    parser.add_argument("--rows", type=int, default=192, help="rows: half articles, half evidence (default 192)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved timed passes per contender")
    parser.add_argument("--precision", default="float32", help="cpu backend precision for embed and fixed")
    parser.add_argument("--also", default="int8", help="more embed precisions to time, comma-separated ('' for none)")
    parser.add_argument("--batch-size", type=int, default=None, help="embed's --batch-size (default: its own)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="embed's token budget (default: its own)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    ensure_model(args.model)
    rows = load_rows(args.rows)
    texts = [text for _, text in rows]
    model = fastinstructor.load(args.model, backend="cpu", precision=args.precision)
    st = load_sentence_transformers(args.model)
    tokenized = model.tokenizer([[INSTRUCTION, t] for t in texts])
    lengths = [len(ids) for ids in tokenized.ids]
    real = sum(lengths)

    workdir = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows), encoding="utf-8")
    embed_options = {
        k: v for k, v in (("batch_size", args.batch_size), ("max_batch_tokens", args.max_batch_tokens)) if v is not None
    }
    defaults = EmbedSettings(**embed_options).batch_policy  # the cpu backend's: padded
    embed_batches = defaults.plan(lengths)
    fixed_batches = [list(range(i, min(i + FIXED_BATCH, len(rows)))) for i in range(0, len(rows), FIXED_BATCH)]
    # sentence-transformers' own order: longest text (in characters) first, then batches of 32.
    st_order = np.argsort([-len(t) for t in texts])
    st_batches = [[int(i) for i in st_order[j : j + FIXED_BATCH]] for j in range(0, len(rows), FIXED_BATCH)]

    def embed_with(instructor: fastinstructor.Instructor) -> np.ndarray:
        fastinstructor.embed_corpus(
            instructor, corpus, workdir / "out", instruction=INSTRUCTION, overwrite=True, quiet=True, **embed_options
        )
        return fastinstructor.read_embeddings(workdir / "out")[1]

    also = [p for p in args.also.split(",") if p and p != args.precision]
    extra = {p: fastinstructor.load(args.model, backend="cpu", precision=p) for p in also}

    def run_fixed() -> np.ndarray:
        tok = model.tokenizer([[INSTRUCTION, t] for t in texts])
        out = [
            model.backend.embed(*pad_batch([tok.ids[i] for i in b], [tok.pool_start[i] for i in b]))
            for b in fixed_batches
        ]
        return torch.cat(out).numpy()

    def run_st() -> np.ndarray:
        return st.encode(texts, prompt=INSTRUCTION, batch_size=FIXED_BATCH, show_progress_bar=False)

    embed_name = f"embed {args.precision}"
    fixed_name = f"fixed {args.precision}"
    runs = {embed_name: lambda: embed_with(model), fixed_name: run_fixed, "sentence-transformers": run_st}
    runs.update({f"embed {p}": (lambda m=m: embed_with(m)) for p, m in extra.items()})
    precisions = {embed_name: args.precision, fixed_name: args.precision, "sentence-transformers": "float32"}
    precisions.update({f"embed {p}": p for p in extra})
    for instructor in (model, *extra.values()):  # warm-up on a few rows, not a whole pass
        instructor.encode([[INSTRUCTION, t] for t in texts[:8]])
    st.encode(texts[:8], prompt=INSTRUCTION)
    times, loadavg, last = interleaved(runs, args.repeat)
    medians = {name: statistics.median(t) for name, t in times.items()}
    padding = {name: padded_tokens(lengths, embed_batches) for name in runs if name.startswith("embed")}
    padding[fixed_name] = padded_tokens(lengths, fixed_batches)
    padding["sentence-transformers"] = padded_tokens(lengths, st_batches)
    table_rows = []
    for name in runs:
        report = compare(last[name], last["sentence-transformers"])
        tolerance = TOLERANCES[precisions[name]]
        table_rows.append(
            {
                "name": name,
                "times_s": times[name],
                "loadavg_1m_after": loadavg[name],
                "median_s": medians[name],
                "rows_per_s": len(rows) / medians[name],
                "tokens_per_s": real / medians[name],
                "precision": precisions[name],
                "tolerance": str(tolerance),
                "vs_fixed": medians[fixed_name] / medians[name],
                "vs_sentence_transformers": medians["sentence-transformers"] / medians[name],
                "padded_tokens": padding[name],
                "padding_efficiency": real / padding[name],
                "min_cos_vs_st": report.min_cos,
                "parity": "baseline"
                if name == "sentence-transformers"
                else ("FAIL" if report.failures(tolerance) else "PASS"),
            }
        )

    header = [
        "contender",
        "median s",
        "min–max s",
        "rows/s",
        "real tokens/s",
        "× fixed",
        "× sent-tr",
        "padded tokens",
        "real/padded",
        "min cos vs sent-tr",
        "parity",
    ]
    table = markdown_table(
        header,
        [
            [
                r["name"],
                f"{r['median_s']:.2f}",
                f"{min(r['times_s']):.2f}–{max(r['times_s']):.2f}",
                f"{r['rows_per_s']:.1f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['vs_fixed']:.2f}",
                f"{r['vs_sentence_transformers']:.2f}",
                str(r["padded_tokens"]),
                f"{r['padding_efficiency']:.2f}",
                f"{r['min_cos_vs_st']:.6f}",
                r["parity"],
            ]
            for r in table_rows
        ],
    )
    print(table)
    result = record(
        command("bench_embed.py"),
        model=str(args.model.resolve()),
        rows=len(rows),
        real_tokens=real,
        precision=args.precision,
        embed_batch_size=defaults.max_rows,
        embed_max_batch_tokens=defaults.max_tokens,
        fixed_batch=FIXED_BATCH,
        repeat=args.repeat,
        results=table_rows,
    )
    n_articles = args.rows // 2
    summary = (
        f"{len(rows)} rows ({n_articles} climate-fever articles and {len(rows) - n_articles} evidence sentences, "
        f"alternating), {real} real tokens after truncation to 512; instruction {INSTRUCTION!r}; cpu backend "
        f"({args.precision} for fixed); embed batches: at most {defaults.max_rows} rows and "
        f"{defaults.max_tokens} padded tokens; median of {args.repeat} interleaved passes; max 1-minute load "
        f"average after a pass {max(max(v) for v in loadavg.values()):.1f}. Random-weight base checkpoint (speed "
        "carries over, the embeddings mean nothing). Parity column: against sentence-transformers (float32) with the "
        "tolerance of the row's precision (docs/design.md section 5)."
    )
    write_results(args.out, "embed", result, "Embed-job benchmark", f"{summary}\n\n{table}\n\n{machine(result)}\n")


if __name__ == "__main__":
    # sentence-transformers on the thread the embed job's cpu model computes on: PyTorch work on a second thread
    # would slow both (fastinstructor.compute_thread).
    compute_thread.run(main)
