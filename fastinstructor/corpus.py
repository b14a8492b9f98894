"""The offline embedding job: a corpus in, a folder of embedding shards and a manifest out.

Streaming and bounded: the input is read one shard of rows at a time (``shard_rows``); within a shard the
rows are sorted by length and cut into token-budget batches (``Instructor.embed_tokens``), and the shard is
written in input order. Memory is bounded by one shard, whatever the corpus size. Unless the caller sets
``batch_size`` or ``max_batch_tokens``, the backend decides the batches: ``DEFAULT_EMBED_POLICY`` (32 rows, 16,384
padded tokens), or ``DEFAULT_PACKED_POLICY`` (real tokens) on a backend that takes packed batches (triton).

Resumable: the manifest is written before the first shard; each shard is written to a temporary file and
renamed into place, then recorded in ``manifest.json`` (itself replaced atomically), so a kill at any step
leaves finished shards and a manifest that lists exactly them (a shard file it does not list is removed on
the next run). A re-run of the same command skips the input rows that finished shards consumed and
continues; a shard's content depends only on its rows and the settings, so the result is identical to an
uninterrupted run. A re-run with other settings is refused unless ``overwrite``. The manifest records the batches
the job cuts (``batch_size``, ``max_batch_tokens``, and ``packed_batches`` when the budget counts real tokens); a
re-run that does not set them continues with those, whatever the default is now.

Never silently wrong: the manifest records the input's size and modification time and, per shard, a rolling
sha256 of every row consumed so far; a resume re-reads the consumed rows anyway (to skip them) and refuses
to continue if they hash differently (a line inserted, edited or removed). Standard input cannot be
re-read, so a job reading it cannot be resumed. One job at a time: the folder is locked for the whole run
(``.fastinstructor.lock``) and a second run into it is refused at once, naming the holder. Ids must be
strings or integers; duplicate ids are counted (``on_duplicate_id``: warn, error or keep).

Split (``num_shards``, ``shard_index``: a job array): part K of N embeds the blocks of ``shard_rows`` input rows
numbered K modulo N into ``output/part-K-of-N/``, a job folder of its own; ``read_embeddings(output)`` joins them.

The output folder's files, its atomic writes and ``read_embeddings`` are in ``fastinstructor.shards``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from . import shards
from .backends.base import takes_large_batches
from .batching import DEFAULT_EMBED_POLICY, BatchPolicy, default_policy
from .locking import LockHeld, hold
from .model import Instructor, load
from .readers import CorpusReader, InputSpec, Row
from .resume import hash_rows, input_identity, input_stat, verify_complete_input, verify_input
from .shards import DTYPES, LOCK, MANIFEST, OUTPUT_FORMATS, CorpusError, read_embeddings
from .version import __version__

__all__ = ["CorpusError", "DTYPES", "EmbedSettings", "OUTPUT_FORMATS", "embed_corpus", "read_embeddings"]

ON_ERROR = ("fail", "skip")
ON_DUPLICATE_ID = ("warn", "error", "keep")
_MAX_LISTED_SKIPS = 1000  # per shard; the count is always exact


@dataclass(frozen=True)
class EmbedSettings:
    """Everything that decides the output; a re-run into the same folder must match it exactly.

    ``batch_size`` and ``max_batch_tokens`` left ``None`` (both): the backend's default (``batch_policy_for``). The
    manifest records the policy the job runs with, not these fields.
    """

    instruction: str | None = None
    output_format: str = "parquet"
    dtype: str = "float32"
    normalize: bool = True
    shard_rows: int = 10_000
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format {self.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        policy = self.batch_policy  # batch_size and max_batch_tokens are checked there, as plain ints (a numpy
        if self.batch_size is not None:  # integer would not go into the manifest's JSON)
            object.__setattr__(self, "batch_size", policy.max_rows)
        if self.max_batch_tokens is not None:
            object.__setattr__(self, "max_batch_tokens", policy.max_tokens)
        for name in ("shard_rows", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def batch_policy(self) -> BatchPolicy:
        """``batch_policy_for`` a backend that takes padded batches."""
        return self.batch_policy_for(large_batches=False)

    def batch_policy_for(self, large_batches: bool) -> BatchPolicy:
        """Neither ``batch_size`` nor ``max_batch_tokens`` set: ``DEFAULT_PACKED_POLICY`` (real tokens) for a backend
        with ``large_batches`` (the triton backend), else ``DEFAULT_EMBED_POLICY``. Either set: ``batch_size`` rows
        (default 32) and ``max_batch_tokens`` padded tokens (default 16,384), on every backend."""
        if self.batch_size is None and self.max_batch_tokens is None and large_batches:
            return default_policy(large_batches)
        return BatchPolicy(
            DEFAULT_EMBED_POLICY.max_rows if self.batch_size is None else self.batch_size,
            DEFAULT_EMBED_POLICY.max_tokens if self.max_batch_tokens is None else self.max_batch_tokens,
        )


class _Progress:
    """A tqdm bar on a terminal; otherwise a line per shard and at most every 30 s; nothing when quiet."""

    def __init__(self, reader: CorpusReader, quiet: bool) -> None:
        self.reader, self.quiet = reader, quiet
        self.start = self.last_line = time.perf_counter()
        self.rows = self.tokens = 0
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=reader.total, unit=reader.unit, unit_scale=True, desc="embed", file=sys.stderr)

    def update(self, rows: int, tokens: int, shard_done: bool = False) -> None:
        self.rows += rows
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.reader.position - self.bar.n)
            self.bar.set_postfix(rows=self.rows, tokens_per_s=f"{rate:,.0f}", refresh=False)
        elif not self.quiet and (shard_done or time.perf_counter() - self.last_line >= 30):
            self.last_line = time.perf_counter()
            done = f", {100 * self.reader.position / self.reader.total:.1f}% of input" if self.reader.total else ""
            print(
                f"embed: {self.rows} rows, {self.tokens} tokens, {rate:,.0f} tokens/s, {elapsed:.0f} s{done}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _IdSet:
    """The ids seen so far, as 64-bit hashes in sorted runs that at least double in size from the newest to the
    oldest (a log-structured merge): 8 bytes per id and amortized O(log n) per id, for corpora of any size.
    Two different ids share a hash with odds of about n^2 / 2^65: nil for any real corpus."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def add(self, ids: list[str]) -> np.ndarray:
        """Record ``ids``; returns a mask of those that were seen before (earlier in ``ids`` too)."""
        hashes = np.array(
            [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
            dtype=np.uint64,
        )
        seen = np.zeros(len(ids), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            seen |= run[at] == hashes
        unique, first = np.unique(hashes, return_index=True)
        repeated = np.ones(len(ids), dtype=bool)
        repeated[first] = False  # within ids, every occurrence but the first is a repeat
        seen |= repeated
        new = unique[~np.isin(unique, hashes[seen & ~repeated])]
        if len(new):
            self.runs.append(new)
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            newest = self.runs.pop()
            self.runs[-1] = np.union1d(self.runs[-1], newest)
        return seen


def _good_ids(chunk: list[Row]) -> list[str]:
    """The ids of the rows of ``chunk`` that are embedded (as ``embed_shard`` filters them)."""
    return [row.id for row in chunk if row.error is None and row.text.strip()]


def _summarize(manifest: dict) -> None:
    shards = manifest["shards"]
    manifest["totals"] = {
        key: sum(s.get(key, 0) for s in shards)
        for key in ("rows", "input_rows", "skipped", "truncated", "tokens", "duplicate_ids")
    }


def _say(quiet: bool, *parts: str) -> None:
    if not quiet:
        print(*parts, file=sys.stderr, flush=True)


def _describe_choice(model: Instructor) -> str:
    """Two lines: the model, and the backend the dispatcher chose with its parity figure and what it skipped."""
    report = model.backend_report
    parity = (
        f"parity vs the float32 reference: min cos {report['parity']['min_cos']:.6f}"
        if report["parity"]
        else "the reference itself"
    )
    skipped = "; ".join(f"{s['candidate']} ({s['why']})" for s in report["skipped"]) or "none"
    return (
        f"model: {model}\nbackend: {report['backend']} {report['precision']} on {report['device']}, {parity}; "
        f"skipped: {skipped}"
    )


def embed_corpus(
    model: Instructor | str | os.PathLike,
    input: str | os.PathLike | Sequence[str | os.PathLike] | InputSpec,
    output: str | os.PathLike,
    *,
    instruction: str | None = None,
    instruction_field: str | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    input_format: str = "auto",
    output_format: str = "parquet",
    dtype: str = "float32",
    normalize: bool = True,
    shard_rows: int = 10_000,
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    limit: int | None = None,
    on_error: str = "fail",
    on_duplicate_id: str = "warn",
    overwrite: bool = False,
    quiet: bool = False,
    backend: str = "auto",
    precision: str = "auto",
    pooling_rule: str = "instructor",
    max_seq_length: int | None = None,
    threads: int | None = None,
    num_shards: int | None = None,
    shard_index: int | None = None,
) -> dict:
    """Embed a corpus into ``output`` (see the module docstring); returns the final manifest.

    ``input``: a file, a folder, a glob pattern, several of these, or ``-`` (``fastinstructor.readers``).
    ``model`` is a loaded ``Instructor`` or anything ``fastinstructor.load`` takes (then ``backend``, ``precision``,
    ``pooling_rule``, ``max_seq_length``, ``threads`` apply; it is loaded once the output folder is locked, so a second
    run into a busy folder is refused before any work). One ``instruction`` for every row, or ``instruction_field`` for
    one per row, or neither for plain texts. ``on_error="fail"`` stops at the first bad row (file, row number,
    reason), keeping finished shards; ``"skip"`` skips, counts and lists bad rows in the manifest.
    ``on_duplicate_id``: ``"warn"`` (count them in the manifest and say so), ``"error"`` (stop at the first repeated
    id) or ``"keep"`` (neither: ids are not tracked). ``batch_size`` rows and ``max_batch_tokens`` padded tokens per
    batch at most; neither set: 32 rows and 16,384 padded tokens, or ``DEFAULT_PACKED_POLICY`` (1,024 rows, 65,536
    real tokens) on a backend that takes packed batches, or, resuming a job, the batches it started with. ``dtype``:
    float32, float16, or int8, uint8, binary, ubinary as ``quantize_embeddings`` (ranges: ``shards.store_as``).
    ``num_shards``, ``shard_index``: run part ``shard_index`` of the job split ``num_shards`` ways (module docstring).
    """
    if instruction is not None and instruction_field is not None:
        raise ValueError("pass either instruction (one for all rows) or instruction_field (one per row), not both")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error {on_error!r} is not one of {', '.join(ON_ERROR)}")
    if on_duplicate_id not in ON_DUPLICATE_ID:
        raise ValueError(f"on_duplicate_id {on_duplicate_id!r} is not one of {', '.join(ON_DUPLICATE_ID)}")
    settings = EmbedSettings(
        instruction, output_format, dtype, normalize, shard_rows, batch_size, max_batch_tokens, limit
    )
    if num_shards is not None and dtype in shards.CALIBRATED:
        raise ValueError(f"--dtype {dtype} cannot be split (--num-shards): each part would fix its own ranges")
    spec = (
        input
        if isinstance(input, InputSpec)
        else InputSpec(input, input_format, text_field, id_field, instruction_field)
    )
    reader = CorpusReader(spec)
    if output_format == "parquet":
        import pyarrow  # noqa: F401  (fail before any work if it is missing)
    output = root = Path(output)
    if num_shards is not None or shard_index is not None:  # checked, and the part's own folder
        output = shards.part_output(output, num_shards, shard_index)
    named = [] if spec.path == "-" else [spec.path] if isinstance(spec.path, str) else list(spec.path)
    shards.check_output_folder(output, overwrite, [*named, *spec.files], root)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    try:
        with hold(output / LOCK, wait=False, what=f"output folder {output}"):
            part = None if num_shards is None else (num_shards, shard_index)
            job = _Job(reader, spec, output, settings, on_error, on_duplicate_id, quiet, part)
            return job.run(
                model,
                overwrite,
                backend=backend,
                precision=precision,
                pooling_rule=pooling_rule,
                max_seq_length=max_seq_length,
                threads=threads,
            )
    except LockHeld as err:
        raise CorpusError(f"{err}, or choose another --output folder") from None
    except BaseException:
        if created and all(shards.is_ours(p) for p in output.iterdir()):  # failed before writing anything (no model)
            shutil.rmtree(output, ignore_errors=True)
        raise


@dataclass
class _Job:
    """One run of the job, with the output folder locked."""

    reader: CorpusReader
    spec: InputSpec
    output: Path
    settings: EmbedSettings
    on_error: str
    on_duplicate_id: str
    quiet: bool
    part: tuple[int, int] | None  # (N, K): this job embeds the input's blocks b with b % N == K; None: all
    # Set by run():
    model: Instructor = field(init=False)
    policy: BatchPolicy = field(init=False)
    manifest: dict = field(init=False)
    progress: _Progress = field(init=False)
    ids: _IdSet | None = field(init=False)  # None: --on-duplicate-id keep

    def run(self, model: Instructor | str | os.PathLike, overwrite: bool, **load_options) -> dict:
        spec, output, settings, quiet = self.spec, self.output, self.settings, self.quiet
        if not isinstance(model, Instructor):
            model = load(model, **load_options)
            _say(quiet, _describe_choice(model))
        self.model = model
        if settings.instruction is not None and model.tokenizer.fills_length(settings.instruction):
            raise CorpusError(
                f"the instruction takes all {model.max_seq_length} tokens of max_seq_length but </s>: no token of any "
                "text would be embedded, and every row would get the same vector. Shorten it (or raise "
                "--max-seq-length)."
            )
        self.policy = self._batch_policy(overwrite)
        identity = {
            "model_fingerprint": model.checkpoint.fingerprint,
            "backend": model.backend_name,
            "precision": model.precision,
            "pooling_rule": model.tokenizer.pooling_rule,
            "max_seq_length": model.max_seq_length,
            "input": input_identity(spec),
            "input_format": self.reader.format,
            "text_field": spec.text_field,
            "id_field": spec.id_field,
            "instruction_field": spec.instruction_field,
            **asdict(settings),
            **shards.policy_identity(self.policy),  # the policy, not the settings' None for "the backend's default"
            **({} if self.part is None else {"num_shards": self.part[0], "shard_index": self.part[1]}),
        }
        self.manifest = manifest = shards.open_output(output, identity, spec.path == "-", overwrite)
        if self.policy != (default := settings.batch_policy_for(takes_large_batches(model.backend))):
            _say(quiet, f"embed: continuing with the batches the job started with, {self.policy} (default {default})")
        stat = input_stat(spec)
        rows: Iterator[Row] = iter(self.reader)
        if manifest["complete"]:
            if stat == manifest.get("input_stat"):
                _say(quiet, f"{output} is already complete: nothing to do")
                return manifest
            verify_complete_input(rows, manifest, self.reader, output, settings.shard_rows, settings.limit)
            manifest["input_stat"] = stat
            shards.write_json(output / MANIFEST, manifest)
            _say(quiet, f"{output} is already complete (its input was touched but holds the same rows)")
            return manifest
        self.ids = None if self.on_duplicate_id == "keep" else _IdSet()
        seen = None if self.ids is None else (lambda chunk: self.ids.add(_good_ids(chunk)))  # ids read so far
        digest, read = verify_input(rows, manifest, self.reader, output, settings.shard_rows, seen)
        manifest.update(
            {
                "fastinstructor_version": __version__,
                "model": str(model.checkpoint.path),
                "random_weights": (model.checkpoint.path / "fastinstructor_test_model.json").is_file(),
                "dim": model.dim,
                "backend_report": model.backend_report,  # the dispatcher's choice and its parity figures
                "input_stat": stat,
            }
        )
        _summarize(manifest)
        shards.write_json(output / MANIFEST, manifest)  # before the first shard: a folder with shards always has one
        if settings.limit is not None:
            rows = islice(rows, max(settings.limit - read, 0))
        self.progress = _Progress(self.reader, quiet)
        block, (parts, part) = read // settings.shard_rows, self.part or (1, 0)  # blocks of shard_rows input rows
        try:
            while chunk := list(islice(rows, settings.shard_rows)):
                read += hash_rows(digest, chunk)
                if block % parts == part:
                    manifest["shards"].append(self.embed_shard(chunk, digest.hexdigest(), block))
                    _summarize(manifest)
                    shards.write_json(output / MANIFEST, manifest)
                elif seen is not None:  # another part's block: its ids count for duplicates as in one job
                    seen(chunk)
                self.progress.update(0, 0, shard_done=block % parts == part)
                block += 1
        finally:
            self.progress.close()
        manifest["complete"] = True
        manifest["input_read"] = {"rows": read, "sha256": digest.hexdigest()}  # every part reads the same
        _summarize(manifest)
        shards.write_json(output / MANIFEST, manifest)
        return manifest

    def _batch_policy(self, overwrite: bool) -> BatchPolicy:
        """The settings' policy for this backend; but when they leave it to the backend and the folder holds a job
        to resume, the policy that job recorded, so that a changed default neither refuses nor alters the resume."""
        settings = self.settings
        policy = settings.batch_policy_for(takes_large_batches(self.model.backend))
        if settings.batch_size is not None or settings.max_batch_tokens is not None or overwrite:
            return policy
        recorded = shards.recorded_policy(self.output)
        return policy if recorded is None else recorded

    def _kept(self) -> str:
        again = (
            "a job from standard input cannot be resumed" if self.spec.path == "-" else "a re-run continues after them"
        )
        return f"the {len(self.manifest['shards'])} finished shard(s) in {self.output} are kept; {again}"

    def embed_shard(self, chunk: list[Row], input_sha256: str, block: int) -> dict:
        settings, spec = self.settings, self.spec
        good: list[Row] = []
        skipped: list[dict] = []
        tokenizer = self.model.tokenizer
        for row in chunk:
            error = row.error or (None if row.text.strip() else "empty text")
            if error is None and spec.instruction_field is not None and tokenizer.fills_length(row.instruction):
                error = (
                    f"its instruction takes all {tokenizer.max_length} tokens: no token of the text would be embedded"
                )
            if error is None:
                good.append(row)
            elif self.on_error == "fail":
                raise CorpusError(
                    f"{self.reader.locate(row.number)}: {error}. Fix the row or re-run with --on-error skip; "
                    f"{self._kept()}."
                )
            else:
                at = {"at": self.reader.locate(row.number)} if len(spec.files) > 1 else {}  # file:row
                skipped.append({"row": row.number, "reason": error, **at})
        row_ids = [row.id for row in good]
        duplicates = self._duplicates(good, row_ids)
        instructions = [settings.instruction if spec.instruction_field is None else row.instruction for row in good]
        sentences = [row.text if i is None else [i, row.text] for i, row in zip(instructions, good, strict=True)]
        tokenized = self.model.tokenizer(sentences)
        embeddings = self.model.embed_tokens(
            tokenized.ids,
            tokenized.pool_start,
            self.policy,
            lambda n: self.progress.update(n, 0),
        )
        if settings.normalize:
            embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
        array = shards.store_as(embeddings.numpy(), settings.dtype, self.manifest)  # quantized: ranges fixed once
        index = len(self.manifest["shards"])
        tokens = sum(len(ids) for ids in tokenized.ids)
        listed = self.manifest.setdefault("instructions", [])  # instruction(s) used, the first 100 distinct ones
        listed += [i for i in dict.fromkeys(instructions) if i not in listed][: max(100 - len(listed), 0)]
        self.progress.update(0, tokens)
        return {
            "index": index,
            "files": shards.write_shard(self.output, index, row_ids, array, settings.output_format),
            "block": block,  # of shard_rows input rows; the index unless the job is split (--num-shards)
            "first_input_row": chunk[0].number,
            "input_rows": len(chunk),
            "input_sha256": input_sha256,  # of every row read so far: what a resume checks
            "rows": len(good),
            "tokens": tokens,
            "truncated": sum(tokenized.truncated),
            "skipped": len(skipped),
            "skipped_rows": skipped[:_MAX_LISTED_SKIPS],
            "duplicate_ids": duplicates,
        }

    def _duplicates(self, good: list[Row], row_ids: list[str]) -> int:
        """How many of this shard's ids were used before; an error or a warning as the policy says."""
        if self.ids is None:
            return 0
        repeated = np.flatnonzero(self.ids.add(row_ids))
        if len(repeated) == 0:
            return 0
        first = good[repeated[0]]
        if self.on_duplicate_id == "error":
            raise CorpusError(
                f"{self.reader.locate(first.number)}: id {first.id!r} was already used by an earlier row. Give every "
                f"row a unique id (or leave out --id-field to number the rows), or re-run with --on-duplicate-id "
                f"warn or keep; {self._kept()}."
            )
        _say(
            self.quiet,
            f"embed: warning: {len(repeated)} duplicate id(s) in input rows {good[0].number}-{good[-1].number}, "
            f"first {first.id!r} at row {first.number}; kept, and counted in the manifest "
            "(--on-duplicate-id error refuses them, keep stops tracking)",
        )
        return len(repeated)
