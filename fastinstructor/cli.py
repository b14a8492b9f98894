"""The ``fastinstructor`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_INSTRUCTION = "Represent the Wikipedia document for retrieval:"


def _make_test_model(args: argparse.Namespace) -> int:
    from .testmodel import make_test_model

    out = make_test_model(args.preset, args.out, seed=args.seed)
    print(f"wrote a RANDOM-WEIGHT {args.preset} test checkpoint to {out} (for tests and speed only: see its README.md)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from . import load
    from .data import sample_passages

    passages, source = sample_passages(args.limit)
    if not passages:
        raise ValueError(f"no sample text found in {source}")
    model = load(args.model, backend=args.backend, precision=args.precision)
    random_weights = (Path(model.checkpoint.path) / "fastinstructor_test_model.json").is_file()
    print(f"model: {model}")
    print(f"text: {len(passages)} passages from {source}")
    print(f"instruction: {args.instruction!r}")
    sentences = [[args.instruction, text] for _, text in passages]
    tokens = sum(len(row) for row in model.tokenizer(sentences)[0])
    start = time.perf_counter()
    embeddings = model.encode(sentences, batch_size=args.batch_size, show_progress_bar=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", embeddings)
    (out / "ids.txt").write_text("".join(f"{pid}\n" for pid, _ in passages), encoding="utf-8")
    (out / "run.json").write_text(
        json.dumps(
            {
                "model": str(model.checkpoint.path),
                "backend": model.backend_name,
                "precision": model.precision,
                "instruction": args.instruction,
                "rows": len(passages),
                "dim": model.dim,
                "real_tokens": tokens,
                "seconds": round(seconds, 3),
                "random_weights": random_weights,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(
        f"embedded {len(passages)} texts ({tokens} real tokens) in {seconds:.1f} s: "
        f"{len(passages) / seconds:.1f} texts/s, {tokens / seconds:.0f} tokens/s"
    )
    print(f"output: {out / 'embeddings.npy'} {embeddings.shape} float32, ids in {out / 'ids.txt'}")
    if random_weights:
        print(
            "NOTE: this checkpoint has RANDOM weights, so these embeddings are meaningless; the speed is real. "
            "For meaningful embeddings pass a real checkpoint: --model hkunlp/instructor-large (or its folder)."
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .backends import BACKENDS
    from .testmodel import PRESETS

    parser = argparse.ArgumentParser(prog="fastinstructor", description="Fast, exact INSTRUCTOR text embeddings.")
    parser.add_argument("--version", action="version", version=f"fastinstructor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-test-model", help="write a random-weight checkpoint in the INSTRUCTOR layout")
    make.add_argument(
        "--preset", choices=list(PRESETS), required=True, help="dimensions (base/large/xl are the real ones)"
    )
    make.add_argument("--out", required=True, help="new folder to write")
    make.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    make.set_defaults(run=_make_test_model)

    demo = commands.add_parser("demo", help="embed sample text and report throughput")
    demo.add_argument("--model", required=True, help="checkpoint folder or hub id")
    demo.add_argument("--backend", choices=list(BACKENDS), default="cpu")
    demo.add_argument("--precision", default="float32", help="float32 (default), bfloat16 or int8 (cpu backend)")
    demo.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    demo.add_argument("--limit", type=int, default=512, help="number of sample passages (default 512)")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--out", default="demo-output", help="folder for embeddings.npy, ids.txt, run.json")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        return args.run(args)
    except (CheckpointError, ValueError, TypeError, FileExistsError, ImportError, OSError) as err:
        print(f"fastinstructor {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
