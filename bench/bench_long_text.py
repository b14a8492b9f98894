"""Tokenizing one very long text: the cut before tokenizing (issue 13, defect 9) against the whole text.

``PairTokenizer`` tokenizes only the prefix of a text that decides its truncated ids (``_prefix``); before,
the whole text went to the tokenizer, as the "whole text" column still does here (the same call the old
code made). For each size: the median time of both, their ratio, and whether the ids are the same. The text is
real articles (``../shared/data``) or this project's README, repeated to the size.

    .venv/bin/python bench/bench_long_text.py [--model DIR] [--sizes 40000,4000000,50000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from harness import DEFAULT_MODEL, DEFAULT_OUT, ROOT, command, ensure_model, machine, write_results

from fastinstructor.benchmark import markdown_table, record
from fastinstructor.checkpoint import load_checkpoint
from fastinstructor.data import read_jsonl_texts, shared_data_dir
from fastinstructor.tokenization import PairTokenizer, load_tokenizer

INSTRUCTION = "Represent the Wikipedia document for retrieval:"


def _source_text() -> str:
    data = shared_data_dir()
    if data is not None:
        return " ".join(text for _, text in read_jsonl_texts(data / "climate_fever_articles.jsonl", 50))
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _timed(work, repeat: int):
    """The median time of ``repeat`` calls, and what the last one returned."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _measure(tokenizer: PairTokenizer, text: str, repeat: int) -> dict:
    joined = (INSTRUCTION + text.strip()).strip()  # what PairTokenizer hands the tokenizer for a pair
    cut_s, cut = _timed(lambda: tokenizer([[INSTRUCTION, text]]).ids[0], repeat)
    whole_s, whole = _timed(  # the call the old code made: the whole text
        lambda: tokenizer.tokenizer([joined], truncation=True, max_length=tokenizer.max_length + 1)["input_ids"][0],
        1 if len(text) > 1_000_000 else repeat,
    )
    length = tokenizer.max_length
    expected = whole[: length - 1] + whole[-1:] if len(whole) > length else whole
    return {
        "chars": len(text),
        "whole_s": whole_s,
        "cut_s": cut_s,
        "ratio": whole_s / cut_s,
        "same_ids": cut == expected,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--sizes", default="40000,4000000,50000000", help="characters per text, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (whole texts over 1 MB: once)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    ensure_model(args.model)
    checkpoint = load_checkpoint(args.model)
    tokenizer = PairTokenizer(load_tokenizer(checkpoint.path), checkpoint.max_seq_length)
    source = _source_text()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        row = _measure(tokenizer, (source * (size // len(source) + 1))[:size], args.repeat)
        rows.append(row)
        print(f"{size:>12,} chars: whole {row['whole_s']:.4f} s, cut {row['cut_s']:.4f} s", file=sys.stderr)
    result = record(command("bench_long_text.py"), model=args.model.name, rows=rows)
    table = markdown_table(
        ["characters", "whole text (before), s", "cut (now), s", "whole / cut", "same ids"],
        [
            [f"{r['chars']:,}", f"{r['whole_s']:.4f}", f"{r['cut_s']:.4f}", f"{r['ratio']:,.0f}x", str(r["same_ids"])]
            for r in rows
        ],
    )
    markdown = f"Model {args.model.name}; median of {args.repeat} runs per figure.\n\n{table}\n\n{machine(result)}\n"
    write_results(args.out, "long-text", result, "One long text through the tokenizer", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
