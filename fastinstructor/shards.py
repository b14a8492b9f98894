"""The embed job's output folder on disk: the shard files, ``manifest.json``, atomic writes, reading it back.

Output folder::

    manifest.json                     model, backend, precision, instruction(s), dims, rows, checksums, skips
    part-00000.parquet                id (string) + embedding (fixed-size list of float32/float16), or
    part-00000.npy + part-00000.ids.jsonl
    .fastinstructor.lock              held by the job writing the folder (and its ``.holder``: who)

Every file is written to a temporary ``.<name>.tmp-<pid>`` beside it, fsynced and renamed into place, so a crash
leaves the old file or the new one, never half of one. The job (``fastinstructor.corpus``) holds the lock while
it writes; ``open_output`` checks a folder a job is about to continue, and ``read_embeddings`` reads a finished
one, verifying every checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .batching import BatchPolicy

__all__ = [
    "CorpusError",
    "DTYPES",
    "LOCK",
    "MANIFEST",
    "OUTPUT_FORMATS",
    "check_output_folder",
    "file_sha256",
    "is_ours",
    "load_manifest",
    "open_output",
    "policy_identity",
    "read_embeddings",
    "recorded_policy",
    "remove_temporaries",
    "shard_ids",
    "write_atomic",
    "write_json",
    "write_shard",
]

MANIFEST = "manifest.json"
OUTPUT_FORMATS = ("parquet", "npy")
DTYPES = ("float32", "float16")
LOCK = ".fastinstructor.lock"  # and LOCK + ".holder": who holds it


class CorpusError(ValueError):
    """A bad input row under ``on_error="fail"``, or an output folder that cannot be used."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))


def write_shard(folder: Path, index: int, ids: list[str], embeddings: np.ndarray, output_format: str) -> list[dict]:
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
        write_atomic(folder / name, write)
        written.append({"file": name, "bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)})
    return written


def shard_ids(output: Path, shard: dict) -> list[str]:
    stem = f"part-{shard['index']:05d}"
    if (output / f"{stem}.parquet").is_file():
        import pyarrow.parquet as pq

        return pq.read_table(output / f"{stem}.parquet", columns=["id"]).column("id").to_pylist()
    lines = (output / f"{stem}.ids.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def load_manifest(path: Path) -> dict:
    """``manifest.json``, checked for the fields the job relies on; a damaged one is an error that says so."""
    fix = "re-run with --overwrite to start again"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorpusError(f"{path} is damaged ({err}); {fix}") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("identity"), dict)
        or not isinstance(shards, list)
        or not all(isinstance(s, dict) and isinstance(s.get("files"), list) for s in shards)
    ):
        raise CorpusError(
            f"{path} is not a fastinstructor embed manifest (expected an object with 'identity' and a list of "
            f"'shards'); {fix}"
        )
    return manifest


def is_ours(path: Path) -> bool:
    """The lock, and temporaries a killed run left before its first manifest was in place."""
    return path.name.startswith((LOCK, f".{MANIFEST}.tmp-", ".part-"))


def check_output_folder(output: Path, overwrite: bool) -> None:
    """Refuse a file, or a folder of someone else's files, before anything is written into it."""
    if output.exists() and not output.is_dir():
        raise CorpusError(f"output {output} is a file; pass a folder")
    if (
        output.is_dir()
        and not overwrite
        and not (output / MANIFEST).is_file()
        and any(not is_ours(p) for p in output.iterdir())
    ):
        raise CorpusError(f"output folder {output} is not empty and has no {MANIFEST}; choose an empty folder")


def remove_temporaries(output: Path) -> None:
    """Remove every temporary file (``.<name>.tmp-<pid>``) in ``output``. Only the holder of the folder's lock may
    call this: it is the folder's only writer, so a temporary it did not write itself is what a killed job left."""
    for tmp in output.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def open_output(output: Path, identity: dict, from_stdin: bool, overwrite: bool) -> dict:
    """The manifest to continue from (the caller holds the folder's lock): a new one, the matching one, or an
    error for a folder that holds another job or whose input cannot be resumed (``from_stdin``: a stream)."""
    manifest_path = output / MANIFEST
    check_output_folder(output, overwrite)
    remove_temporaries(output)
    if overwrite:
        for old in list(output.glob("part-*")) + [manifest_path]:
            old.unlink(missing_ok=True)
    if not manifest_path.is_file():
        return {"identity": identity, "shards": [], "complete": False}
    manifest = load_manifest(manifest_path)
    if manifest["identity"] != identity:
        theirs = manifest["identity"]
        changed = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
        raise CorpusError(
            f"{output} holds the output of a different job (differs in: {', '.join(changed)}). "
            "Use another --output folder, or --overwrite to replace it."
        )
    if manifest["shards"] or manifest.get("complete"):
        if from_stdin:
            raise CorpusError(
                f"{output} holds a job that read standard input, which cannot be resumed: a stream cannot be "
                "re-read to check that it is the same input. Save the input to a file and embed that, or re-run "
                "with --overwrite to start again."
            )
        if any("input_sha256" not in shard for shard in manifest["shards"]):
            raise CorpusError(
                f"{manifest_path} was written by an older fastinstructor that did not record a checksum of its "
                "input, so a resume cannot be checked; re-run with --overwrite to start again."
            )
    listed = set()
    # Sizes, not checksums: a resume must not re-read terabytes; read_embeddings verifies the checksums.
    for shard in manifest["shards"]:
        for entry in shard["files"]:
            path = output / entry["file"]
            listed.add(entry["file"])
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise CorpusError(
                    f"{path} is missing or not the size recorded in {manifest_path}; the output was modified. "
                    "Re-run with --overwrite to start again."
                )
    for path in output.glob("part-*"):  # written by a run killed before it recorded them: redone below
        if path.name not in listed:
            path.unlink()
    return manifest


def policy_identity(policy: BatchPolicy) -> dict:
    """How a job cuts its batches, as its manifest's identity records it. ``packed_batches`` only when the budget
    counts real tokens: a manifest without it (every manifest written before it existed) counted padded tokens."""
    return {
        "batch_size": policy.max_rows,
        "max_batch_tokens": policy.max_tokens,
        **({"packed_batches": True} if policy.packed else {}),
    }


def recorded_policy(output: Path) -> BatchPolicy | None:
    """The batch policy the manifest in ``output`` records; None without a manifest or with none it can give."""
    path = output / MANIFEST
    if not path.is_file():
        return None
    identity = load_manifest(path)["identity"]
    try:
        return BatchPolicy(identity["batch_size"], identity["max_batch_tokens"], identity.get("packed_batches", False))
    except (KeyError, ValueError):  # not a job's identity: open_output says what the folder holds
        return None


def read_embeddings(output: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """All ids and embeddings of a finished ``embed_corpus`` output, in input order (checksums verified)."""
    output = Path(output)
    manifest_path = output / MANIFEST
    if not manifest_path.is_file():
        raise CorpusError(f"{output} has no {MANIFEST}; it is not the output of fastinstructor embed")
    manifest = load_manifest(manifest_path)
    if not manifest.get("complete"):
        raise CorpusError(f"{output} is not complete; re-run the embed command to finish it")
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for shard in manifest["shards"]:
        files = {entry["file"]: entry["sha256"] for entry in shard["files"]}
        for name, digest in files.items():
            if file_sha256(output / name) != digest:
                raise CorpusError(f"{output / name} does not match its checksum in {manifest_path}")
        ids += shard_ids(output, shard)
        stem = f"part-{shard['index']:05d}"
        if f"{stem}.parquet" in files:
            import pyarrow.parquet as pq

            column = pq.read_table(output / f"{stem}.parquet", columns=["embedding"]).column("embedding")
            flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
            parts.append(flat.reshape(len(column), manifest["dim"]))
        else:
            parts.append(np.load(output / f"{stem}.npy"))
    dtype = manifest["identity"]["dtype"]
    return ids, np.concatenate(parts) if parts else np.zeros((0, manifest["dim"]), dtype=dtype)
