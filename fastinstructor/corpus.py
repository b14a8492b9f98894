"""The offline embedding job: a corpus in, a folder of embedding shards and a manifest out.

Streaming and bounded: the input is read one shard of rows at a time (``shard_rows``); within a shard the
rows are sorted by length and cut into token-budget batches (``Instructor.embed_tokens``), and the shard is
written in input order. Memory is bounded by one shard, whatever the corpus size.

Resumable: each shard is written to a temporary file and renamed into place, then recorded in
``manifest.json`` (itself replaced atomically). A re-run of the same command skips the input rows that
finished shards consumed and continues; a shard's content depends only on its rows and the settings, so the
result is identical to an uninterrupted run. A re-run with other settings is refused unless ``overwrite``.

Output folder::

    manifest.json                     model, backend, precision, instruction(s), dims, rows, checksums, skips
    part-00000.parquet                id (string) + embedding (fixed-size list of float32/float16), or
    part-00000.npy + part-00000.ids.jsonl
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .model import Instructor, load
from .readers import CorpusReader, InputSpec, Row

__all__ = ["CorpusError", "EmbedSettings", "embed_corpus", "read_embeddings"]

MANIFEST = "manifest.json"
OUTPUT_FORMATS = ("parquet", "npy")
DTYPES = ("float32", "float16")
ON_ERROR = ("fail", "skip")
_MAX_LISTED_SKIPS = 1000  # per shard; the count is always exact


class CorpusError(ValueError):
    """A bad input row under ``on_error="fail"``, or an output folder that cannot be used."""


@dataclass(frozen=True)
class EmbedSettings:
    """Everything that decides the output; a re-run into the same folder must match it exactly."""

    instruction: str | None = None
    output_format: str = "parquet"
    dtype: str = "float32"
    normalize: bool = True
    shard_rows: int = 10_000
    batch_size: int = 32
    max_batch_tokens: int | None = 16_384
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format {self.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("shard_rows", "batch_size", "max_batch_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))


def _write_shard(folder: Path, index: int, ids: list[str], embeddings: np.ndarray, output_format: str) -> list[dict]:
    """Write one shard's files; return their names and checksums."""
    stem = f"part-{index:05d}"
    if output_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        values = pa.array(embeddings.reshape(-1))
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(values, embeddings.shape[1]),
            }
        )
        files = {f"{stem}.parquet": lambda tmp: pq.write_table(table, tmp)}
    else:

        def write_npy(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, embeddings)

        lines = "".join(json.dumps(i) + "\n" for i in ids)
        files = {f"{stem}.npy": write_npy, f"{stem}.ids.jsonl": lambda tmp: tmp.write_text(lines, encoding="utf-8")}
    written = []
    for name, write in files.items():
        _write_atomic(folder / name, write)
        written.append({"file": name, "bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)})
    return written


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


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary files of a writer that was killed mid-write (their pid is gone) are garbage."""
    for tmp in output.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def _open_output(output: Path, identity: dict, overwrite: bool) -> dict:
    """The manifest to continue from: a new one, the matching one, or an error for a mismatched folder."""
    manifest_path = output / MANIFEST
    if output.exists() and not output.is_dir():
        raise CorpusError(f"output {output} is a file; pass a folder")
    if output.is_dir():
        _remove_stale_temporaries(output)
    if manifest_path.is_file() and not overwrite:
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise CorpusError(f"{manifest_path} is damaged ({err}); re-run with --overwrite to start again") from None
        if manifest.get("identity") != identity:
            theirs = manifest.get("identity", {})
            changed = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
            raise CorpusError(
                f"{output} holds the output of a different job (differs in: {', '.join(changed)}). "
                "Use another --output folder, or --overwrite to replace it."
            )
        # Sizes, not checksums: a resume must not re-read terabytes; read_embeddings verifies the checksums.
        for shard in manifest["shards"]:
            for entry in shard["files"]:
                path = output / entry["file"]
                if not path.is_file() or path.stat().st_size != entry["bytes"]:
                    raise CorpusError(
                        f"{path} is missing or not the size recorded in {manifest_path}; the output was modified. "
                        "Re-run with --overwrite to start again."
                    )
        return manifest
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CorpusError(f"output folder {output} is not empty and has no {MANIFEST}; choose an empty folder")
    output.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in list(output.glob("part-*")) + [manifest_path]:
            old.unlink(missing_ok=True)
    return {"identity": identity, "shards": [], "complete": False}


def _summarize(manifest: dict) -> None:
    shards = manifest["shards"]
    manifest["totals"] = {
        key: sum(s[key] for s in shards) for key in ("rows", "input_rows", "skipped", "truncated", "tokens")
    }


def embed_corpus(
    model: Instructor | str | os.PathLike,
    input: str | os.PathLike | InputSpec,
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
    batch_size: int = 32,
    max_batch_tokens: int | None = 16_384,
    limit: int | None = None,
    on_error: str = "fail",
    overwrite: bool = False,
    quiet: bool = False,
    backend: str = "auto",
    precision: str = "auto",
) -> dict:
    """Embed a corpus into ``output`` (see the module docstring); returns the final manifest.

    ``model`` is a loaded ``Instructor`` or anything ``fastinstructor.load`` takes (then ``backend`` and
    ``precision`` apply). One ``instruction`` for every row, or ``instruction_field`` for one per row, or
    neither for plain texts. ``on_error="fail"`` stops at the first bad row (file, row number, reason),
    keeping finished shards; ``"skip"`` skips, counts and lists bad rows in the manifest.
    """
    if instruction is not None and instruction_field is not None:
        raise ValueError("pass either instruction (one for all rows) or instruction_field (one per row), not both")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error {on_error!r} is not one of {', '.join(ON_ERROR)}")
    settings = EmbedSettings(
        instruction, output_format, dtype, normalize, shard_rows, batch_size, max_batch_tokens, limit
    )
    spec = (
        input
        if isinstance(input, InputSpec)
        else InputSpec(str(input), input_format, text_field, id_field, instruction_field)
    )
    reader = CorpusReader(spec)
    if output_format == "parquet":
        import pyarrow  # noqa: F401  (fail before any work if it is missing)
    if not isinstance(model, Instructor):
        model = load(model, backend=backend, precision=precision)
    output = Path(output)
    identity = {
        "model_fingerprint": model.checkpoint.fingerprint,
        "backend": model.backend_name,
        "precision": model.precision,
        "pooling_rule": model.tokenizer.pooling_rule,
        "max_seq_length": model.max_seq_length,
        "input": "-" if spec.path == "-" else str(Path(spec.path).resolve()),
        "input_format": reader.format,
        "text_field": spec.text_field,
        "id_field": spec.id_field,
        "instruction_field": spec.instruction_field,
        **asdict(settings),
    }
    manifest = _open_output(output, identity, overwrite)
    manifest.update(
        {
            "fastinstructor_version": __version__,
            "model": str(model.checkpoint.path),
            "random_weights": (model.checkpoint.path / "fastinstructor_test_model.json").is_file(),
            "dim": model.dim,
            "backend_report": model.backend_report,  # the dispatcher's choice and its parity figures
        }
    )
    if manifest["complete"]:
        if not quiet:
            print(f"{output} is already complete: nothing to do", file=sys.stderr)
        return manifest

    rows: Iterator[Row] = iter(reader)
    consumed = sum(s["input_rows"] for s in manifest["shards"])
    for _ in islice(rows, consumed):  # rows that finished shards already hold
        pass
    if limit is not None:
        rows = islice(rows, max(limit - consumed, 0))
    progress = _Progress(reader, quiet)
    try:
        while chunk := list(islice(rows, shard_rows)):
            manifest["shards"].append(_embed_shard(model, settings, chunk, spec, on_error, output, manifest, progress))
            _summarize(manifest)
            _write_json(output / MANIFEST, manifest)
            progress.update(0, 0, shard_done=True)
    finally:
        progress.close()
    manifest["complete"] = True
    _summarize(manifest)
    _write_json(output / MANIFEST, manifest)
    return manifest


def _embed_shard(
    model: Instructor,
    settings: EmbedSettings,
    chunk: list[Row],
    spec: InputSpec,
    on_error: str,
    output: Path,
    manifest: dict,
    progress: _Progress,
) -> dict:
    good: list[Row] = []
    skipped: list[dict] = []
    for row in chunk:
        error = row.error or (None if row.text.strip() else "empty text")
        if error is None:
            good.append(row)
        elif on_error == "fail":
            raise CorpusError(
                f"{spec.name}:{row.number}: {error}. Fix the row or re-run with --on-error skip; "
                f"the {len(manifest['shards'])} finished shard(s) in {output} are kept and a re-run continues "
                "after them."
            )
        else:
            skipped.append({"row": row.number, "reason": error})
    instructions = [settings.instruction if spec.instruction_field is None else row.instruction for row in good]
    sentences = [row.text if i is None else [i, row.text] for i, row in zip(instructions, good, strict=True)]
    tokenized = model.tokenizer(sentences)
    embeddings = model.embed_tokens(
        tokenized.ids,
        tokenized.pool_start,
        settings.batch_size,
        settings.max_batch_tokens,
        lambda n: progress.update(n, 0),
    )
    if settings.normalize:
        embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
    array = embeddings.numpy().astype(settings.dtype)
    index = len(manifest["shards"])
    tokens = sum(len(ids) for ids in tokenized.ids)
    listed = manifest.setdefault("instructions", [])  # instruction(s) used, the first 100 distinct ones
    listed += [i for i in dict.fromkeys(instructions) if i not in listed][: max(100 - len(listed), 0)]
    progress.update(0, tokens)
    return {
        "index": index,
        "files": _write_shard(output, index, [row.id for row in good], array, settings.output_format),
        "first_input_row": chunk[0].number,
        "input_rows": len(chunk),
        "rows": len(good),
        "tokens": tokens,
        "truncated": sum(tokenized.truncated),
        "skipped": len(skipped),
        "skipped_rows": skipped[:_MAX_LISTED_SKIPS],
    }


def read_embeddings(output: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """All ids and embeddings of a finished ``embed_corpus`` output, in input order (checksums verified)."""
    output = Path(output)
    manifest_path = output / MANIFEST
    if not manifest_path.is_file():
        raise CorpusError(f"{output} has no {MANIFEST}; it is not the output of fastinstructor embed")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if not manifest.get("complete"):
        raise CorpusError(f"{output} is not complete; re-run the embed command to finish it")
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for shard in manifest["shards"]:
        files = {entry["file"]: entry["sha256"] for entry in shard["files"]}
        for name, digest in files.items():
            if _sha256(output / name) != digest:
                raise CorpusError(f"{output / name} does not match its checksum in {manifest_path}")
        stem = f"part-{shard['index']:05d}"
        if f"{stem}.parquet" in files:
            import pyarrow.parquet as pq

            table = pq.read_table(output / f"{stem}.parquet")
            ids += table.column("id").to_pylist()
            flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            parts.append(flat.reshape(len(table), manifest["dim"]))
        else:
            lines = (output / f"{stem}.ids.jsonl").read_text(encoding="utf-8").splitlines()
            ids += [json.loads(line) for line in lines]
            parts.append(np.load(output / f"{stem}.npy"))
    dtype = manifest["identity"]["dtype"]
    return ids, np.concatenate(parts) if parts else np.zeros((0, manifest["dim"]), dtype=dtype)
