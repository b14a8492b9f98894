"""Core benchmark: fastinstructor's cpu and onnx backends against transformers and sentence-transformers.

Every contender embeds the same climate-fever claims and evidence sentences with their INSTRUCTOR instructions
(batch size 32) in one process; the repeats are interleaved (A B C D E, A B C D E, ...) so that drift in a
noisy machine hits every contender alike, and speed is reported as ratios of medians from the same run.
Parity is measured against the float32 reference backend with DESIGN section 5's tolerances.

    .venv/bin/python bench/bench_core.py [--model DIR] [--texts 512] [--repeat 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import (
    DEFAULT_MODEL,
    DEFAULT_OUT,
    ensure_model,
    environment,
    interleaved,
    load_sentence_transformers,
    markdown_table,
    median,
    source_version,
    write_results,
)
from sentence_transformers import SentenceTransformer

import fastinstructor
from fastinstructor.data import read_jsonl_texts, shared_data_dir
from fastinstructor.parity import TOLERANCES, compare

CLAIM_INSTRUCTION = "Represent the climate claim for retrieving supporting documents:"
EVIDENCE_INSTRUCTION = "Represent the Wikipedia document for retrieval:"
BATCH_SIZE = 32
WARMUP_TEXTS = 4  # per instruction group
REFERENCE = "reference"
SENTENCE_TRANSFORMERS = "sentence-transformers"

Groups = list[tuple[str, list[str]]]  # (instruction, texts), in output order


@dataclass(frozen=True)
class Contender:
    name: str
    precision: str  # selects the parity tolerance
    load: Callable[[], Any]
    encode: Callable[[Any, Groups], np.ndarray]  # (loaded model, groups) -> [N, dim] float32, rows in group order


def encode_fastinstructor(model: fastinstructor.Instructor, groups: Groups) -> np.ndarray:
    pairs = [[instruction, text] for instruction, texts in groups for text in texts]
    return model.encode(pairs, batch_size=BATCH_SIZE)


def encode_sentence_transformers(model: SentenceTransformer, groups: Groups) -> np.ndarray:
    # One call per instruction: sentence-transformers takes a single prompt per encode call.
    return np.concatenate(
        [
            model.encode(texts, prompt=instruction, batch_size=BATCH_SIZE, show_progress_bar=False)
            for instruction, texts in groups
        ]
    )


def load_onnx(model_dir: Path, precision: str, optimize: bool) -> fastinstructor.Instructor:
    """The ONNX Runtime backend on a graph exported once into .models/onnx/ (export time is not timed)."""
    from fastinstructor.export.onnx_export import MODEL_FILE, export_onnx

    from fastinstructor.checkpoint import load_checkpoint

    folder = model_dir.parent / "onnx" / f"{model_dir.name}-{precision}-{'optimized' if optimize else 'plain'}"
    checkpoint = load_checkpoint(model_dir)
    if not (folder / MODEL_FILE).is_file():
        print(f"exporting {folder}", file=sys.stderr)
        export_onnx(checkpoint, folder, precision=precision, optimize=optimize, parity=False)
    return fastinstructor.load(model_dir, backend="onnx", precision=precision, backend_options={"onnx_dir": folder})


def contenders(model_dir: Path) -> list[Contender]:
    def fast(backend: str, precision: str) -> Callable[[], fastinstructor.Instructor]:
        return partial(fastinstructor.load, model_dir, backend=backend, precision=precision)

    onnx = []
    if fastinstructor.backends.OnnxBackend.availability()[0]:
        onnx = [
            Contender(
                "onnx float32", "float32", partial(load_onnx, model_dir, "float32", False), encode_fastinstructor
            ),
            Contender(
                "onnx float32 optimized",
                "float32",
                partial(load_onnx, model_dir, "float32", True),
                encode_fastinstructor,
            ),
            Contender("onnx int8", "int8", partial(load_onnx, model_dir, "int8", True), encode_fastinstructor),
        ]
    return [
        Contender(REFERENCE, "float32", fast("reference", "float32"), encode_fastinstructor),
        Contender("cpu float32", "float32", fast("cpu", "float32"), encode_fastinstructor),
        Contender("cpu bfloat16", "bfloat16", fast("cpu", "bfloat16"), encode_fastinstructor),
        Contender("cpu int8", "int8", fast("cpu", "int8"), encode_fastinstructor),
        *onnx,
        Contender(
            SENTENCE_TRANSFORMERS,
            "float32",
            partial(load_sentence_transformers, model_dir),
            encode_sentence_transformers,
        ),
    ]


def load_groups(total: int) -> Groups:
    data = shared_data_dir()
    if data is None:
        sys.exit(
            "bench_core: the shared data folder (climate_fever_*.jsonl) was not found; the benchmark needs real "
            "text. Set FASTINSTRUCTOR_DATA to the folder, or place it at ../shared/data beside the checkout."
        )
    halves = (
        ("climate_fever_claims.jsonl", CLAIM_INSTRUCTION, total // 2),
        ("climate_fever_evidence.jsonl", EVIDENCE_INSTRUCTION, total - total // 2),
    )
    groups = []
    for name, instruction, count in halves:
        texts = [text for _, text in read_jsonl_texts(data / name, count)]
        if len(texts) < count:
            sys.exit(f"bench_core: {data / name} has {len(texts)} rows, fewer than the {count} requested")
        groups.append((instruction, texts))
    return groups


def results_table(rows: list[dict]) -> str:
    header = [
        "contender",
        "load s",
        "median s",
        "min–max s",
        "texts/s",
        "real tokens/s",
        "× reference",
        "× sent-tr",
        "min cos",
        "mean cos",
        "max abs",
        "tolerance",
        "parity",
    ]
    return markdown_table(
        header,
        [
            [
                r["name"],
                f"{r['load_s']:.1f}",
                f"{r['median_s']:.2f}",
                f"{r['min_s']:.2f}–{r['max_s']:.2f}",
                f"{r['texts_per_s']:.1f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['vs_reference']:.2f}",
                f"{r['vs_sentence_transformers']:.2f}",
                f"{r['min_cos']:.6f}",
                f"{r['mean_cos']:.6f}",
                f"{r['max_abs']:.2e}",
                r["tolerance"],
                r["parity"],
            ]
            for r in rows
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="checkpoint folder; the random-weight base preset is built there if absent",
    )
    parser.add_argument("--texts", type=int, default=512, help="texts in total: half claims, half evidence")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved timed passes per contender")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and Markdown results")
    args = parser.parse_args()
    if args.texts < 2 or args.repeat < 1:
        parser.error(f"--texts must be at least 2 and --repeat at least 1, got {args.texts} and {args.repeat}")

    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
    source = source_version()  # at the start: others may commit to the checkout while this runs
    groups = load_groups(args.texts)
    ensure_model(args.model)
    n_texts = sum(len(texts) for _, texts in groups)
    warmup = [(instruction, texts[:WARMUP_TEXTS]) for instruction, texts in groups]

    lineup = contenders(args.model)
    models: dict[str, Any] = {}
    load_s: dict[str, float] = {}
    for contender in lineup:
        start = time.perf_counter()
        models[contender.name] = contender.load()
        load_s[contender.name] = time.perf_counter() - start
        contender.encode(models[contender.name], warmup)
        print(f"loaded {contender.name} in {load_s[contender.name]:.1f} s", file=sys.stderr)

    # Real tokens: what fastinstructor's tokenizer produces for each input, padding excluded; one count for all.
    ids = models[REFERENCE].tokenizer([[instruction, text] for instruction, texts in groups for text in texts])[0]
    n_tokens = sum(len(row) for row in ids)

    runs = {c.name: partial(c.encode, models[c.name], groups) for c in lineup}
    timings, loadavg, last = interleaved(runs, args.repeat)
    medians = {name: median(times) for name, times in timings.items()}
    rows = []
    for contender in lineup:
        name = contender.name
        report = compare(last[name], last[REFERENCE])
        figures = {"min_cos": report.min_cos, "mean_cos": report.mean_cos, "max_abs": report.max_abs}
        tolerance = TOLERANCES[contender.precision]
        rows.append(
            {
                "name": name,
                "precision": contender.precision,
                "load_s": load_s[name],
                "times_s": timings[name],
                "loadavg_1m_after": loadavg[name],
                "median_s": medians[name],
                "min_s": min(timings[name]),
                "max_s": max(timings[name]),
                "texts_per_s": n_texts / medians[name],
                "tokens_per_s": n_tokens / medians[name],
                # Same token count for everyone: a tokens/s ratio is the inverse ratio of median times.
                "vs_reference": medians[REFERENCE] / medians[name],
                "vs_sentence_transformers": medians[SENTENCE_TRANSFORMERS] / medians[name],
                **figures,
                "tolerance": str(tolerance),
                "parity": "baseline" if name == REFERENCE else ("FAIL" if report.failures(tolerance) else "PASS"),
            }
        )

    env = environment()
    command = shlex.join([sys.executable, *sys.argv])
    reproduce = shlex.join([".venv/bin/python", "bench/bench_core.py", *sys.argv[1:]])
    table = results_table(rows)
    print(table)

    result = {
        "command": command,
        "model": str(args.model.resolve()),
        "texts": n_texts,
        "real_tokens": n_tokens,
        "batch_size": BATCH_SIZE,
        "repeat": args.repeat,
        "groups": [{"instruction": instruction, "texts": len(texts)} for instruction, texts in groups],
        "environment": env,
        "source": source,
        "rows": rows,
    }
    commit = f"commit {str(source['git_commit'])[:12]}" + (", package modified" if source["package_modified"] else "")
    max_load = max(max(loads) for loads in loadavg.values())
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in env["cpu_flags"].items())
    summary = (
        f"{n_texts} texts ({n_tokens} real tokens), batch size {BATCH_SIZE}, median of {args.repeat} interleaved "
        "passes; random-weight base checkpoint (speed and parity carry over, the embeddings mean nothing)."
    )
    setup = (
        f"CPU: {env['cpu_model']}, {env['torch_threads']} torch threads; {flags}. torch {env['torch']}, "
        f"transformers {env['transformers']}, sentence-transformers {env['sentence_transformers']}, "
        f"fastinstructor {env['fastinstructor']} ({commit})."
    )
    load_note = (
        f"Highest 1-minute load average after a pass: {max_load:.1f} (this benchmark alone keeps it near "
        f"{env['torch_threads']}; more means other work shared the CPU)."
    )
    write_results(
        args.out,
        "core",
        result,
        f"# Core benchmark, {datetime.date.today().isoformat()}, {env['hostname']}\n\n"
        f"{summary}\n\n{setup} {load_note}\n\n{table}\n\n"
        f"Reproduce from the repository root:\n\n```\n{reproduce}\n```\n",
    )


if __name__ == "__main__":
    main()
