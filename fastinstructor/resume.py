"""What the embed job records of its input, and checks again before it continues: never silently wrong.

The manifest records the input's files (``input_identity``), their sizes and modification times (``input_stat``)
and, per shard, a rolling sha256 of every row read until that shard's last one (``hash_rows``): the rows of the
shards of other parts of a split job (``--num-shards``) too, since every part reads the whole input. A resume
re-reads the rows the finished shards consumed (it must read them anyway, to skip them) and ``verify_input``
refuses to continue if they hash differently: a line inserted, edited or removed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

from .readers import CorpusReader, InputSpec, Row
from .shards import CorpusError

__all__ = ["hash_rows", "input_identity", "input_stat", "verify_input", "verify_complete_input"]


def hash_rows(digest, rows: Iterable[Row]) -> int:
    """Feed rows into the input's rolling digest; returns how many. Every field of a row counts, so an inserted,
    removed or edited line changes the digest of every shard from there on."""
    count = 0
    for row in rows:
        digest.update(json.dumps([row.number, row.id, row.instruction, row.text, row.error]).encode() + b"\n")
        count += 1
    return count


def input_identity(spec: InputSpec) -> str | list[str]:
    """The input as the manifest's identity names it: ``-``, the one file's absolute path, or the files' in order."""
    if spec.path == "-":
        return "-"
    files = [str(Path(file).resolve()) for file in spec.files]
    return files[0] if len(files) == 1 else files


def input_stat(spec: InputSpec) -> dict | list[dict] | None:
    """Size and modification time of the input's file, or of each of its files; None for standard input."""
    if spec.path == "-":
        return None
    stats = [os.stat(file) for file in spec.files]
    listed = [{"size": stat.st_size, "mtime_ns": stat.st_mtime_ns} for stat in stats]
    return listed[0] if len(listed) == 1 else listed


def verify_input(
    rows: Iterator[Row],
    manifest: dict,
    reader: CorpusReader,
    output: Path,
    shard_rows: int,
    seen: Callable[[list[Row]], object] | None = None,
):
    """Re-read the rows up to the finished shards' last one and check them against the recorded digests; returns
    the digest to continue from and how many rows were read. Shard ``i`` holds the input rows of block
    ``shard["block"]`` (``i`` where it is not recorded): the ``shard_rows`` rows from row ``block * shard_rows`` on
    (counted from 0). ``seen`` is given the rows read, a block at a time. A mismatch (the input changed since the
    shards were written) is an error."""
    digest = hashlib.sha256()
    read = 0
    for shard in manifest["shards"]:
        start = shard.get("block", shard["index"]) * shard_rows
        end = start + shard["input_rows"]
        while read < end:  # other parts' blocks (a block at a time), then this shard's
            chunk = list(islice(rows, min(shard_rows, start - read) if read < start else end - read))
            if not chunk:
                break
            read += hash_rows(digest, chunk)
            if seen is not None:
                seen(chunk)
        if (ends := read != end) or digest.hexdigest() != shard["input_sha256"]:
            raise CorpusError(
                f"the input {reader.spec.name} changed since {output} was written: its first {end} rows (through "
                f"shard {shard['index']}, which starts at {reader.locate(shard['first_input_row'])}) are not the ones "
                f"that were embedded{' (the input now ends earlier)' if ends else ''}. Continuing would mix two "
                "inputs. Restore the input, or re-run with --overwrite to embed the new input from the start."
            )
    return digest, read


def verify_complete_input(
    rows: Iterator[Row], manifest: dict, reader: CorpusReader, output: Path, shard_rows: int, limit: int | None
) -> None:
    """A completed job's input, touched or copied since: every row the job read (up to ``limit``) must still be the
    same, and none added after them (rows appended since were never embedded: the output is not complete for them)."""
    digest, read = verify_input(rows, manifest, reader, output, shard_rows)
    read += hash_rows(digest, rows if limit is None else islice(rows, max(limit - read, 0)))
    recorded = manifest.get("input_read")
    if recorded is not None and (read, digest.hexdigest()) != (recorded["rows"], recorded["sha256"]):
        raise CorpusError(
            f"the input {reader.spec.name} changed since {output} was completed: it now has {read} rows where the "
            f"job read {recorded['rows']} (rows added or edited after the embedded ones), which this output does not "
            "hold. Restore the input, or re-run with --overwrite to embed it anew."
        )
