"""The host pipeline alone (issue 15, item 3): tokenize, plan, and pad or pack each batch, into a null backend.

What the host must sustain to keep a GPU busy, measured without one: ``PairTokenizer`` on real text (evidence
sentences and climate-fever articles, 2:1, articles cut at the checkpoint's 512 tokens), then
``Instructor.embed_tokens`` with a backend that computes nothing (it returns zeros of the right shape), so the
time is the plan plus the background thread building each batch's tensors (``pad_batch`` or ``pack_batch``)
plus the hand-over. For each layout and budget: the median of ``--repeat`` runs of the whole (tokenize +
batches), in real tokens per second, and the two parts. The tokenizer is the checkpoint's (T5's SentencePiece,
the same in every preset); its Rust code uses every core.

Then the whole of ``encode`` (tokenization included) before and after its tokenization was overlapped with the
backend: "before" tokenizes every text, then runs ``embed_tokens`` (encode until issue 15's chunked tokenization);
"after" is ``encode`` today, which, for a backend off the CPU, tokenizes a large input in chunks
(``tokenize_chunk_rows``: 8,192 texts for both encode defaults), the next chunk in a background thread while the
backend runs the current one. Both backends here say they run on CUDA (no GPU is used; with CUDA present the
batches are pinned, as for one): the null backend, and a simulated device that takes ``tokens / --device-rate``
seconds per batch (the tokens it is handed, padding included) in ``time.sleep``, which releases the GIL as waiting
for a GPU does. Before and after alternate within each of the ``--repeat`` runs; the medians are reported, and the
median of each run's before / after (less moved by a shared machine's load than the ratio of the medians). Chunks
overlap only when there are several: use ``--texts`` of a few times 8,192.

    .venv/bin/python bench/bench_host_pipeline.py [--model DIR] [--texts 4096] [--repeat 3]
        [--device-rate 1000000] [--name host-pipeline]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import DEFAULT_MODEL, DEFAULT_OUT, ROOT, command, ensure_model, machine, write_results

from fastinstructor.batching import DEFAULT_ENCODE_POLICY, DEFAULT_PACKED_POLICY, BatchPolicy
from fastinstructor.benchmark import markdown_table, record
from fastinstructor.checkpoint import load_checkpoint
from fastinstructor.data import read_jsonl_texts, shared_data_dir
from fastinstructor.model import Instructor, tokenize_chunk_rows
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


class SleepBackend(NullBackend):
    """A stand-in for a device: each batch takes (tokens handed, padding included) / ``rate`` seconds, asleep, with
    the GIL released, as a host waiting for a GPU is."""

    def __init__(self, packed: bool, dim: int, rate: float) -> None:
        super().__init__(packed, dim)
        self.rate = rate

    def embed(self, input_ids, attention_mask, pool_start) -> torch.Tensor:
        time.sleep(input_ids.numel() / self.rate)
        return super().embed(input_ids, attention_mask, pool_start)

    def embed_packed(self, batch) -> torch.Tensor:
        time.sleep(batch.tokens / self.rate)
        return super().embed_packed(batch)


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


def _encode_before(model: Instructor, sentences, policy: BatchPolicy) -> torch.Tensor:
    """``Instructor.encode`` before its tokenization was chunked: every text tokenized, then the batches."""
    ids, starts, _ = model.tokenizer(sentences)
    return F.normalize(model.embed_tokens(ids, starts, policy), p=2, dim=1).numpy()


# (name, the policy encode picks when given no batch arguments, packed_input)
ENCODE_MODES = [
    ("padded, 32 rows (encode's default on a padded backend, e.g. onnx on CUDA)", DEFAULT_ENCODE_POLICY, False),
    ("packed, DEFAULT_PACKED_POLICY (encode's default on triton)", DEFAULT_PACKED_POLICY, True),
]


def _chunked_padding(lengths: list[int], policy: BatchPolicy) -> tuple[int, int, int, int]:
    """Batches and padded tokens when the whole input is planned at once, and when each chunk is planned alone."""
    size = tokenize_chunk_rows(policy, torch.device("cuda"))

    def cost(parts: list[list[int]]) -> tuple[int, int]:
        plans = [(policy.plan(part), part) for part in parts]
        batches = sum(len(plan) for plan, _ in plans)
        return batches, sum(len(rows) * max(part[i] for i in rows) for plan, part in plans for rows in plan)

    return (*cost([lengths]), *cost([lengths[i : i + size] for i in range(0, len(lengths), size)]))


def _measure_encode(checkpoint, tokenizer, sentences, rate: float, repeat: int) -> list[dict]:
    lengths = [len(row) for row in tokenizer(sentences).ids]
    rows = []
    for name, policy, packed in ENCODE_MODES:
        size = tokenize_chunk_rows(policy, torch.device("cuda"))
        whole_batches, whole_padded, chunk_batches, chunk_padded = _chunked_padding(lengths, policy)
        handed = sum(lengths) if packed else chunk_padded  # what the device is handed after
        for device in ("null", "simulated"):
            if device == "simulated":
                backend = SleepBackend(packed, checkpoint.out_dim, rate)
            else:
                backend = NullBackend(packed, checkpoint.out_dim)
            backend.device = torch.device("cuda")  # off the CPU: encode tokenizes in chunks beside it
            model = Instructor(checkpoint, backend, tokenizer, "float32", {})
            before, after = [], []
            for _ in range(repeat):  # interleaved
                start = time.perf_counter()
                _encode_before(model, sentences, policy)
                before.append(time.perf_counter() - start)
                start = time.perf_counter()
                model.encode(sentences)  # no batch arguments: the policy above
                after.append(time.perf_counter() - start)
            rows.append(
                {
                    "mode": name,
                    "backend": device,
                    "device_rate": rate if device == "simulated" else None,
                    "chunk_rows": size,
                    "chunks": -(-len(sentences) // size),
                    "tokens": sum(lengths),
                    "batches_before": whole_batches,
                    "batches_after": chunk_batches,
                    "padded_before": whole_padded,
                    "padded_after": chunk_padded,
                    "device_s_after": handed / rate if device == "simulated" else 0.0,
                    "before_s": statistics.median(before),
                    "after_s": statistics.median(after),
                    "before_runs_s": before,
                    "after_runs_s": after,
                    "paired_speedup": statistics.median(b / a for b, a in zip(before, after, strict=True)),
                }
            )
            row = rows[-1]
            print(f"encode, {name}, {device}: {row['before_s']:.3f} s -> {row['after_s']:.3f} s", file=sys.stderr)
    return rows


def _encode_table(rows: list[dict]) -> str:
    return markdown_table(
        [
            "policy",
            "backend",
            "chunks of (count)",
            "batches / padded tokens, whole input planned",
            "same, planned per chunk",
            "device alone, s",
            "before, s",
            "after, s",
            "before, tok/s",
            "after, tok/s",
            "before / after",
            "same, median of paired runs",
        ],
        [
            [
                r["mode"],
                "null" if r["device_rate"] is None else f"simulated, {r['device_rate']:,.0f} tok/s",
                f"{r['chunk_rows']:,} ({r['chunks']})",
                f"{r['batches_before']} / {r['padded_before']:,}",
                f"{r['batches_after']} / {r['padded_after']:,}",
                f"{r['device_s_after']:.3f}",
                f"{r['before_s']:.3f}",
                f"{r['after_s']:.3f}",
                f"{r['tokens'] / r['before_s']:,.0f}",
                f"{r['tokens'] / r['after_s']:,.0f}",
                f"{r['before_s'] / r['after_s']:.2f}x",
                f"{r['paired_speedup']:.2f}x",
            ]
            for r in rows
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--texts", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device-rate", type=float, default=1e6, help="the simulated device's tokens/s")
    parser.add_argument("--name", default="host-pipeline", help="results file name: <name>-<date>-<host>.{json,md}")
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
    encode_rows = _measure_encode(checkpoint, tokenizer, sentences, args.device_rate, args.repeat)
    result = record(
        command("bench_host_pipeline.py"), model=args.model.name, texts=args.texts, rows=rows, encode_rows=encode_rows
    )
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
        f"{table}\n\n"
        "The whole of `encode` (tokenization included), before (every text tokenized, then the batches) and after "
        "(tokenized in chunks, the next chunk in a background thread beside the backend); median of "
        f"{args.repeat} interleaved runs. The simulated device sleeps (GIL released) for the tokens it is handed, "
        "padding included, at the rate shown; 'device alone' is that sleep summed ('after' cannot beat the larger of "
        "it and the tokenization). Padded tokens: what the batches hold (for the packed policy, what a padded layout "
        "would have held).\n\n"
        f"{_encode_table(encode_rows)}\n\n{machine(result)}\n"
    )
    write_results(args.out, args.name, result, "The host pipeline alone (tokenize, plan, pad or pack)", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
