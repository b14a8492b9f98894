"""The ``fastinstructor`` command line."""

from __future__ import annotations

import argparse
import json
import signal
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


def _export(args: argparse.Namespace) -> int:
    from .check import measure_export
    from .checkpoint import load_checkpoint
    from .export.onnx_export import export_onnx, record_parity

    checkpoint = load_checkpoint(args.model)
    print(
        f"exporting {checkpoint.path} to {args.out} ({args.precision}, optimize={args.optimize}) ...", file=sys.stderr
    )
    metadata = export_onnx(checkpoint, args.out, precision=args.precision, optimize=args.optimize)
    fused = ", ".join(f"{op} {n}" for op, n in metadata["fused_ops"].items()) or "none"
    print(
        f"wrote {args.out}/model.onnx ({metadata['precision']}, opset {metadata['opset']}) in "
        f"{metadata['export_seconds']} s; nodes {sum(metadata['op_counts_before'].values())} -> "
        f"{sum(metadata['op_counts_after'].values())}; fused: {fused}"
    )
    parity = measure_export(checkpoint, args.out, metadata["precision"])
    record_parity(args.out, parity)
    if not parity["measured"]:
        print(f"parity not measured: {parity['why']}")
        return 0
    verdict = "PASS" if parity["passed"] else "FAIL: " + "; ".join(parity["failures"])
    print(
        f"parity vs the float32 reference on {parity['rows']} calibration inputs: min cos "
        f"{parity['min_cos']:.6f}, mean cos {parity['mean_cos']:.6f}, max abs {parity['max_abs']:.2e} "
        f"({parity['tolerance']}): {verdict}"
    )
    return 0 if parity["passed"] else 1


def _check(args: argparse.Namespace) -> int:
    from .check import HEADER, check_backends
    from .checkpoint import load_checkpoint
    from .dispatch import clear_cache, probe
    from .hardware import set_threads

    if args.threads is not None:
        set_threads(args.threads)
    if args.clear_cache:
        print(f"removed {clear_cache()} cached parity file(s): results and the reference's calibration embeddings")
    hardware = probe()
    checkpoint = load_checkpoint(args.model)
    rows = check_backends(
        checkpoint, backend=args.backend, precision=args.precision, use_cache=not args.no_cache, hardware=hardware
    )
    print(f"model: {checkpoint.path}\nhardware: {json.dumps(hardware.describe())}\n")
    print(HEADER)
    print("\n".join(row.markdown() for row in rows))
    asked = "/".join(x for x in (args.backend, args.precision) if x)
    if asked and all(row.parity is None for row in rows):  # what was asked for cannot even run here
        print(f"fastinstructor check: error: {asked} is not available on this machine (why: above)", file=sys.stderr)
        return 2
    return 1 if asked and any(row.parity and not row.parity.passed for row in rows) else 0


def _info(args: argparse.Namespace) -> int:
    from . import load
    from .dispatch import probe
    from .version import __version__

    print(json.dumps({"fastinstructor": __version__, **probe().describe()}, indent=2))
    if args.model:
        model = load(args.model)
        report = {k: v for k, v in model.backend_report.items() if k != "hardware"}
        print(json.dumps({"model": str(model.checkpoint.path), "chosen": report}, indent=2))
    return 0


def _precision(value: str) -> str:
    """A precision's canonical name (``fp16`` -> ``float16``); argparse's ``choices`` then says what is allowed."""
    from .precisions import ALIASES

    return ALIASES.get(value, value)


def _bench(args: argparse.Namespace) -> int:
    import shlex

    from .benchmark import report_markdown, run_benchmark, write_report
    from .hardware import set_threads

    if args.threads is not None:  # every contender, and the report's torch_threads
        set_threads(args.threads)
    result = run_benchmark(
        args.model,
        backends=args.backends,
        precisions=args.precisions,
        workload=args.workload,
        texts=args.texts,
        instruction=args.instruction,
        batch_tokens=args.batch_tokens,
        batch_size=args.batch_size,
        latency_batch_sizes=args.latency_batch_sizes,
        latency_batches=args.latency_batches,
        repeat=args.repeat,
        sentence_transformers=args.sentence_transformers,
        device=args.device,
        ceiling_size=args.ceiling_size,
        command=shlex.join(["fastinstructor", *args.argv]),
    )
    print(report_markdown(result))
    for path in write_report(result, Path(args.out)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from . import load
    from .server.settings import OPTIONS, resolve, served_name, settings_from

    try:
        import pydantic  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError("fastinstructor serve needs the server extra: pip install 'fastinstructor[server]'") from None
    from .server import create_app, serve

    values = resolve({o.dest: getattr(args, o.dest) for o in OPTIONS if hasattr(args, o.dest)})
    settings = settings_from(values)  # before the load: a bad limit or environment variable fails at once
    if values["engine"] == "ray":  # a Ray Serve deployment of the same application
        from .ray.serving import serve_from_values

        return serve_from_values(values, settings)
    model = load(
        values["model"],
        backend=values["backend"],
        precision=values["precision"],
        max_seq_length=values["max_seq_length"],
        threads=values["threads"],
    )
    name = values["served_model_name"] or served_name(values["model"])
    keys = "on" if settings.api_keys else "off"
    print(
        f"serving {model} as {name!r} on http://{values['host']}:{values['port']} (API keys: {keys})", file=sys.stderr
    )
    serve(create_app(model, settings, model_name=name), settings, values["host"], values["port"])
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill` ending the job), raised where the job is so that it stops as on Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def _embed(args: argparse.Namespace) -> int:
    if args.engine != "ray" and (args.address is not None or args.actor_gpus):
        raise ValueError("--address and --actor-gpus place the job on a Ray cluster: add --engine ray")
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _embed_job(args)
    except _Terminated:
        again = (
            "cannot be resumed from standard input" if args.input == ["-"] else "re-run the same command to continue"
        )
        print(
            "fastinstructor embed: terminated (SIGTERM); the shard in flight was dropped and the finished ones are "
            f"kept: {again}",
            file=sys.stderr,
        )
        return 143  # 128 + SIGTERM, as a shell reports a process it ended


def _embed_job(args: argparse.Namespace) -> int:
    if args.engine == "ray":  # the job's parts as Ray actors
        from .ray.dataset import embed_from_args

        return embed_from_args(args)
    from .corpus import embed_corpus
    from .shards import all_skipped, part_folder

    start = time.perf_counter()
    manifest = embed_corpus(  # loads the model once the output folder is locked, and says what it chose
        args.model,
        args.input,
        args.output,
        instruction=args.instruction,
        instruction_field=args.instruction_field,
        text_field=args.text_field,
        id_field=args.id_field,
        input_format=args.input_format,
        output_format=args.output_format,
        dtype=args.dtype,
        normalize=args.normalize,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        limit=args.limit,
        on_error=args.on_error,
        on_duplicate_id=args.on_duplicate_id,
        overwrite=args.overwrite,
        quiet=args.quiet,
        backend=args.backend,
        precision=args.precision,
        pooling_rule=args.pooling_rule,
        max_seq_length=args.max_seq_length,
        threads=args.threads,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
    )
    seconds = time.perf_counter() - start
    totals = manifest["totals"]
    output = args.output if args.num_shards is None else part_folder(args.output, args.shard_index, args.num_shards)
    print(
        f"embedded {totals['rows']} rows ({totals['tokens']} real tokens) into {len(manifest['shards'])} shard(s) in "
        f"{output}; skipped {totals['skipped']}, truncated {totals['truncated']}, duplicate ids "
        f"{totals['duplicate_ids']}; this run: {seconds:.1f} s"
    )
    if manifest["random_weights"]:
        print(
            "NOTE: this checkpoint has RANDOM weights, so these embeddings are meaningless; the speed is real. "
            "For meaningful embeddings pass a real checkpoint: --model hkunlp/instructor-large (or its folder)."
        )
    if args.num_shards is None and (why := all_skipped(manifest)) is not None:  # a part's own blocks may all be bad
        print(f"fastinstructor embed: error: {why}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS
    from .corpus import DTYPES, ON_DUPLICATE_ID, ON_ERROR, OUTPUT_FORMATS
    from .export.onnx_export import PRECISIONS as GRAPH_PRECISIONS
    from .precisions import ALIASES, PRECISIONS
    from .readers import FORMATS
    from .server.settings import THREADS_HELP, add_engine_arguments, comma_list, positive_int, whole_number
    from .server.settings import add_arguments as add_serve_arguments
    from .testmodel import PRESETS
    from .tokenization import POOLING_RULES
    from .version import __version__

    precisions = list(PRECISIONS)
    aliases = f"(or {', '.join(ALIASES)})"
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

    export = commands.add_parser("export", help="export the model to one ONNX graph (ids -> normalized embedding)")
    export.add_argument("--model", required=True, help="checkpoint folder or hub id")
    export.add_argument("--out", required=True, help="folder for model.onnx and its metadata (replaced)")
    export.add_argument(
        "--precision",
        type=_precision,
        choices=GRAPH_PRECISIONS,
        default="float32",
        help="float32 (default), float16 (for CUDA), int8 (dynamic quantization, for the CPU); fp32, fp16 too",
    )
    export.add_argument(
        "--optimize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run ONNX Runtime's T5 graph optimizer (default on)",
    )
    export.set_defaults(run=_export)

    check = commands.add_parser("check", help="every backend x precision here: availability, parity, throughput")
    check.add_argument("--model", required=True, help="checkpoint folder or hub id")
    check.add_argument("--backend", choices=list(BACKENDS), help="only this backend (exit 1 if it fails parity)")
    check.add_argument(
        "--precision",
        type=_precision,
        choices=precisions,
        help=f"only this precision {aliases} (exit 1 if it fails parity)",
    )
    check.add_argument(
        "--no-cache",
        action="store_true",
        help="measure parity again (the reference's run too) instead of using the cache",
    )
    check.add_argument(
        "--clear-cache",
        action="store_true",
        help="delete every cached parity result and kept reference embedding first",
    )
    check.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    check.set_defaults(run=_check)

    bench = commands.add_parser(
        "bench",
        help="benchmark backends x precisions: throughput, latency, memory, roofline",
        description="Every backend x precision on one workload in one process, with the float32 reference and "
        "sentence-transformers as baselines: real tokens/s (padding excluded) as the median of interleaved "
        "repeats, per-batch latency p50/p99, load and warm-up time, memory, parity, and the achieved fraction "
        "of the matmul ceiling measured in the same run. Writes <workload>.json/.md/.png to OUT/<date>-<host>/.",
    )
    bench.add_argument("--model", required=True, help="checkpoint folder or hub id")
    bench.add_argument(
        "--backends",
        type=comma_list(str),
        default=list(BACKENDS),
        help=f"comma-separated (default: {','.join(BACKENDS)}; unavailable ones are reported as skipped)",
    )
    bench.add_argument(
        "--precisions",
        type=comma_list(_precision),
        help=f"comma-separated, e.g. fp16,int8 {aliases} (default: every precision each backend supports here)",
    )
    bench.add_argument(
        "--workload",
        default="evidence",
        help="claims, evidence (default), articles or mixed (the shared data), synthetic:L (every input L "
        "tokens), or a JSONL/CSV/TSV/Parquet/text file",
    )
    bench.add_argument("--texts", type=int, default=256, help="texts in the workload (default 256)")
    bench.add_argument("--instruction", help="instruction for every text (default: the workload's own)")
    bench.add_argument(
        "--batch-tokens", type=comma_list(int), default=[8192], help="padded-token budgets per batch (default 8192)"
    )
    bench.add_argument("--batch-size", type=int, default=32, help="rows per batch at most (default 32, as encode's)")
    bench.add_argument(
        "--latency-batch-sizes",
        type=comma_list(int),
        default=[1, 8, 32],
        help="batch sizes for latency (default 1,8,32)",
    )
    bench.add_argument("--latency-batches", type=int, default=8, help="batches per size and pass (default 8)")
    bench.add_argument("--repeat", type=int, default=3, help="interleaved passes per contender (default 3)")
    bench.add_argument(
        "--sentence-transformers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include sentence-transformers' INSTRUCTOR mode as a baseline when installed (default on)",
    )
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--ceiling-size", type=int, help="matmul size for the ceilings (default 2048 CPU, 8192 GPU)")
    bench.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    bench.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    bench.set_defaults(run=_bench)

    info = commands.add_parser("info", help="versions, hardware, and (with --model) the backend auto chooses")
    info.add_argument("--model", help="checkpoint folder or hub id")
    info.set_defaults(run=_info)

    from .batching import DEFAULT_EMBED_POLICY as EMBED_BATCHES
    from .batching import DEFAULT_PACKED_POLICY as PACKED_BATCHES

    serve = commands.add_parser(
        "serve",
        help="HTTP server: OpenAI- and TEI-compatible embeddings",
        description="An HTTP server for the model: OpenAI's /v1/embeddings and /v1/models, text-embeddings-"
        "inference's /embed, /tokenize and /info, /health, /ready, /metrics and /openapi.json.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(run=_serve)

    embed = commands.add_parser(
        "embed",
        help="embed a corpus into a folder of shards (streaming, resumable)",
        description="Embed a corpus into a folder of shards with a manifest. Streaming and resumable: re-run the "
        "same command after a crash or Ctrl-C and it continues after the last complete shard.",
    )
    embed.add_argument("--model", required=True, help="checkpoint folder or hub id (e.g. hkunlp/instructor-large)")
    source = embed.add_mutually_exclusive_group()
    source.add_argument("--instruction", help="one instruction for every row, e.g. " + repr(DEFAULT_INSTRUCTION))
    source.add_argument("--instruction-field", help="take each row's instruction from this field")
    embed.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="JSON Lines, CSV, TSV, Parquet or text: a file, a folder (its files of that format, subfolders too, "
        "sorted by path), a glob pattern (quoted: 'data/*.jsonl', '**' spans folders), or several of these, read "
        "in the order given as one stream; - for stdin",
    )
    embed.add_argument("--input-format", choices=("auto", *FORMATS), default="auto", help="default: from the suffix")
    embed.add_argument("--text-field", default="text", help="field or column holding the text (default: text)")
    embed.add_argument("--id-field", help="field holding the row id (default: 'id' where present, else row number)")
    embed.add_argument("--output", required=True, help="output folder (created; a re-run continues in it)")
    embed.add_argument("--output-format", choices=OUTPUT_FORMATS, default="parquet")
    embed.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="stored type (default float32); quantized as sentence-transformers' quantize_embeddings: int8/uint8 "
        "between the first shard's per-dimension minima and maxima (kept in manifest.json), (u)binary: packed bits",
    )
    embed.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="L2-normalize (INSTRUCTOR checkpoints are unit-norm either way: they end in Normalize)",
    )
    embed.add_argument(
        "--backend",
        choices=["auto", *BACKENDS],
        default="auto",
        help="auto (default): the fastest backend that passes its parity check here",
    )
    embed.add_argument(
        "--precision", type=_precision, choices=["auto", *precisions], default="auto", help=f"default: auto {aliases}"
    )
    embed.add_argument("--pooling-rule", choices=POOLING_RULES, default="instructor")
    embed.add_argument("--max-seq-length", type=positive_int, help="tokens per input at most (default: the model's)")
    packed = f"{PACKED_BATCHES.max_rows} rows and {PACKED_BATCHES.max_tokens} real tokens on the triton backend"
    embed.add_argument("--batch-size", type=int, help=f"rows per batch at most (default {EMBED_BATCHES.max_rows})")
    embed.add_argument(
        "--max-batch-tokens",
        type=int,
        help=f"padded tokens per batch at most (default {EMBED_BATCHES.max_tokens}; neither flag: {packed})",
    )
    embed.add_argument("--shard-rows", type=int, default=10_000, help="input rows per shard (default 10000)")
    embed.add_argument("--limit", type=int, help="embed only the first N input rows")
    embed.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    embed.add_argument(
        "--num-shards",
        type=positive_int,
        help="split the job N ways (a job array): run each part with its --shard-index; each writes "
        "OUTPUT/part-K-of-N/ and read_embeddings(OUTPUT) joins them",
    )
    embed.add_argument(
        "--shard-index",
        type=whole_number,
        help="with --num-shards N: the part K (0 to N - 1) this process embeds: the input's blocks of --shard-rows "
        "rows numbered K modulo N",
    )
    embed.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="fail",
        help="bad rows: fail (stop, keep finished shards) or skip (count and list them)",
    )
    embed.add_argument(
        "--on-duplicate-id",
        choices=ON_DUPLICATE_ID,
        default="warn",
        help="an id used by an earlier row: warn (default; counted in the manifest), error (stop) or keep",
    )
    embed.add_argument("--overwrite", action="store_true", help="replace the output of a different job")
    embed.add_argument("--quiet", action="store_true", help="no progress output")
    add_engine_arguments(embed)
    embed.set_defaults(run=_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .dispatch import NoBackendError

    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # the bench records the command that reproduces it
    try:
        return args.run(args)
    # CheckpointError and CorpusError are ValueErrors; NoBackendError: what was asked for cannot run here.
    except (ValueError, TypeError, FileExistsError, ImportError, OSError, NoBackendError) as err:
        print(f"fastinstructor {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"fastinstructor {args.command}: interrupted; finished work is kept (embed: re-run the same command "
            "to continue)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
