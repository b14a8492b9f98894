"""The host pipeline alone (issue 15, item 3): tokenize, plan, and pad or pack each batch, into a null backend.

What the host must sustain to keep a GPU busy, measured without one: ``PairTokenizer`` on real text (evidence
sentences and climate-fever articles, 2:1, articles cut at the checkpoint's 512 tokens), then
``Instructor.embed_tokens`` with a backend that computes nothing (it returns zeros of the right shape), so the
time is the plan plus the background thread building each batch's tensors (``pad_batch`` or ``pack_batch``)
plus the hand-over. For each layout and budget: the median of ``--repeat`` runs of the whole (tokenize +
batches), in real tokens per second, and the two parts. The tokenizer is the checkpoint's (T5's SentencePiece,
the same in every preset); its Rust code uses every core.

    .venv/bin/python bench/bench_host_pipeline.py [--model DIR] [--texts 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from harness import DEFAULT_MODEL, DEFAULT_OUT, ROOT, command, ensure_model, machine, write_results

from fastinstructor.batching import DEFAULT_ENCODE_POLICY, DEFAULT_PACKED_POLICY, BatchPolicy
from fastinstructor.benchmark import markdown_table, record
from fastinstructor.checkpoint import load_checkpoint
from fastinstructor.data import read_jsonl_texts, shared_data_dir
from fastinstructor.model import Instructor
from fastinstructor.tokenization import PairTokenizer, load_tokenizer

INSTRUCTIONS = ("Represent the climate evidence for retrieval:", "Represent the Wikipedia document for retrieval:")

BEFORE = "padded, 32 rows, before (per-row pad loop, no thread)"
# (name, policy, whether the backend takes packed batches)
MODES = [
    (BEFORE, DEFAULT_ENCODE_POLICY, False),
    ("padded, 32 rows (encode's default on the CPU)", DEFAULT_ENCODE_POLICY, False),
    ("padded, 1,024 rows / 65,536 padded tokens", BatchPolicy(1024, 65_536), False),
    ("packed, 1,024 rows / 65,536 real tokens (DEFAULT_PACKED_POLICY)", DEFAULT_PACKED_POLICY, True),
]


class NullBackend:
    """Receives the batches and computes nothing: what is left is the host's work."""

    name = "null"
    device = torch.device("cpu")

    def __init__(self, packed: bool, dim: int) -> None:
        self.packed_input, self.dim = packed, dim

    def embed(self, input_ids, attention_mask, pool_start) -> torch.Tensor:
        return torch.zeros((input_ids.shape[0], self.dim))

    def embed_packed(self, batch) -> torch.Tensor:
        return torch.zeros((batch.rows, self.dim))


def _sentences(count: int) -> list[list[str]]:
    """Evidence sentences and articles, 2:1, each under its instruction; the project's docs without the data."""
    data = shared_data_dir()
    if data is None:
        text = (ROOT / "README.md").read_text(encoding="utf-8")
        return [[INSTRUCTIONS[i % 2], text[(i * 97) % len(text) :][: 200 + 40 * (i % 50)]] for i in range(count)]
    evidence = [t for _, t in read_jsonl_texts(data / "climate_fever_evidence.jsonl", count)]
    articles = [t for _, t in read_jsonl_texts(data / "climate_fever_articles.jsonl", count)]
    out = []
    for i in range(count):
        if i % 3 == 2:
            out.append([INSTRUCTIONS[1], articles[(i // 3) % len(articles)]])
        else:
            out.append([INSTRUCTIONS[0], evidence[(i - i // 3) % len(evidence)]])
    return out


def _loop_pad_batch(ids, pool_start, pad_id=0):
    """``pad_batch`` before issue 15: one tensor per row."""
    length = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, torch.tensor(pool_start, dtype=torch.long)


def _embed_tokens_before(model: Instructor, ids, starts, policy: BatchPolicy) -> torch.Tensor:
    """``Instructor.embed_tokens`` before issue 15: pad and run each batch in turn, on the calling thread."""
    out = torch.empty((len(ids), model.dim), dtype=torch.float32)
    for rows in policy.plan([len(row) for row in ids]):
        out[rows] = model.backend.embed(*_loop_pad_batch([ids[i] for i in rows], [starts[i] for i in rows])).cpu()
    return out


def _run(model: Instructor, sentences, policy: BatchPolicy, before: bool) -> tuple[float, float, int]:
    """Seconds to tokenize, seconds for the batches (plan, build, hand over), and the real tokens."""
    start = time.perf_counter()
    ids, starts, _ = model.tokenizer(sentences)
    tokenized = time.perf_counter()
    if before:
        _embed_tokens_before(model, ids, starts, policy)
    else:
        model.embed_tokens(ids, starts, policy)
    done = time.perf_counter()
    return tokenized - start, done - tokenized, sum(map(len, ids))


def _measure(checkpoint, tokenizer, sentences, name: str, policy: BatchPolicy, packed: bool, repeat: int) -> dict:
    model = Instructor(checkpoint, NullBackend(packed, checkpoint.out_dim), tokenizer, "float32", {})
    runs = [_run(model, sentences, policy, name == BEFORE) for _ in range(repeat)]
    total = statistics.median(t + b for t, b, _ in runs)
    lengths = [len(row) for row in tokenizer(sentences).ids]
    plan = policy.plan(lengths)
    padded = sum(len(rows) * max(lengths[i] for i in rows) for rows in plan)
    tokens = runs[0][2]
    return {
        "mode": name,
        "packed": packed,
        "max_rows": policy.max_rows,
        "max_tokens": policy.max_tokens,
        "batches": len(plan),
        "tokens": tokens,
        "padded_tokens": padded,
        "tokenize_s": statistics.median(t for t, _, _ in runs),
        "batches_s": statistics.median(b for _, b, _ in runs),
        "total_s": total,
        "tokens_per_s": tokens / total,
        "batch_tokens_per_s": tokens / statistics.median(b for _, b, _ in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--texts", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    ensure_model(args.model)
    checkpoint = load_checkpoint(args.model)
    tokenizer = PairTokenizer(load_tokenizer(checkpoint.path), checkpoint.max_seq_length)
    sentences = _sentences(args.texts)
    tokenizer(sentences[:64])  # warm the instruction cache and the tokenizer
    rows = []
    for name, policy, packed in MODES:
        row = _measure(checkpoint, tokenizer, sentences, name, policy, packed, args.repeat)
        rows.append(row)
        print(f"{name}: {row['tokens_per_s']:,.0f} tok/s", file=sys.stderr)
    result = record(command("bench_host_pipeline.py"), model=args.model.name, texts=args.texts, rows=rows)
    table = markdown_table(
        [
            "layout and budget",
            "batches",
            "real / padded tokens",
            "tokenize, s",
            "plan + build + hand over, s",
            "batches alone, tok/s",
            "whole, tok/s",
        ],
        [
            [
                r["mode"],
                str(r["batches"]),
                f"{r['tokens']:,} / {r['padded_tokens']:,}",
                f"{r['tokenize_s']:.3f}",
                f"{r['batches_s']:.3f}",
                f"{r['batch_tokens_per_s']:,.0f}",
                f"{r['tokens_per_s']:,.0f}",
            ]
            for r in rows
        ],
    )
    markdown = (
        f"Model {args.model.name} (its tokenizer), {args.texts:,} texts (evidence and articles 2:1, cut at "
        f"{checkpoint.max_seq_length} tokens), a null backend; median of {args.repeat} runs. Tokens are real "
        "tokens; the packed layout builds only those, the padded one the padded count.\n\n"
        f"{table}\n\n{machine(result)}\n"
    )
    write_results(args.out, "host-pipeline", result, "The host pipeline alone (tokenize, plan, pad or pack)", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
