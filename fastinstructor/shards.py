"""The embed job's output folder on disk: the shard files, ``manifest.json``, atomic writes, reading it back.

Output folder::

    manifest.json                     model, backend, precision, instruction(s), dims, rows, checksums, skips,
                                      and for int8/uint8 output the quantization ranges
    part-00000.parquet                id (string) + embedding (fixed-size list of the stored dtype), or
    part-00000.npy + part-00000.ids.jsonl
    .fastinstructor.lock              held by the job writing the folder (and its ``.holder``: who)

Every file is written to a temporary ``.<name>.tmp-<pid>`` beside it, fsynced and renamed into place, so a crash
leaves the old file or the new one, never half of one. The job (``fastinstructor.corpus``) holds the lock while
it writes; ``open_output`` checks a folder a job is about to continue, and ``read_embeddings`` reads a finished
one, verifying every checksum.

Stored dtypes (``DTYPES``, ``store_as``): float32 and float16, and the quantized ones of sentence-transformers'
``quantize_embeddings`` with its byte layout (``fastinstructor.vectors``): int8 and uint8 (``dim`` values a row) and
binary (int8) and ubinary (uint8): the sign bits packed, ``ceil(dim / 8)`` bytes a row, the last byte padded with
zero bits when ``dim`` is not a multiple of 8 (as sentence-transformers pads). int8 and uint8 need per-dimension
ranges, fixed once for the whole job: the minima and maxima of the first shard that has rows (its float
embeddings, normalized under ``normalize``), exactly as ``quantize_embeddings(..., calibration_embeddings=...)``
computes them, recorded in the manifest as ``"quantization": {"precision": ..., "ranges": [[minima], [maxima]],
"calibration_shard": index}`` with that shard; every later shard and every resume quantizes with the recorded ranges.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .batching import BatchPolicy
from .locking import write_atomic
from .vectors import quantize_embeddings

__all__ = [
    "CorpusError",
    "DTYPES",
    "LOCK",
    "MANIFEST",
    "OUTPUT_FORMATS",
    "all_skipped",
    "check_output_folder",
    "file_sha256",
    "is_ours",
    "load_manifest",
    "open_output",
    "part_folder",
    "part_output",
    "policy_identity",
    "read_embeddings",
    "read_parts",
    "recorded_policy",
    "remove_temporaries",
    "shard_ids",
    "shard_stem",
    "split_count",
    "store_as",
    "stored_type",
    "write_json",
    "write_shard",
]

MANIFEST = "manifest.json"
OUTPUT_FORMATS = ("parquet", "npy")
DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")  # quantized between per-dimension ranges: fixed by the first shard, in the manifest
LOCK = ".fastinstructor.lock"  # and LOCK + ".holder": who holds it
_SHARD_FILE = re.compile(r"part-\d{5,}\.(parquet|npy|ids\.jsonl)")  # write_shard's names, and no other file


def _shard_files(output: Path) -> list[Path]:
    """The shard files in ``output``: only the names ``write_shard`` gives (a file of the user's is never ours)."""
    return [p for p in output.glob("part-*") if _SHARD_FILE.fullmatch(p.name) and p.is_file()]


class CorpusError(ValueError):
    """A bad input row under ``on_error="fail"``, or an output folder that cannot be used."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))


def stored_type(dtype: str, dim: int) -> tuple[np.dtype, int]:
    """The numpy type and the width of a stored row of a ``dim``-dimensional model's embeddings as ``dtype``."""
    width = -(-dim // 8) if dtype.endswith("binary") else dim
    return np.dtype({"binary": "int8", "ubinary": "uint8"}.get(dtype, dtype)), width


def store_as(embeddings: np.ndarray, dtype: str, manifest: dict) -> np.ndarray:
    """The next shard's float32 ``embeddings`` as ``dtype`` stores them (see the module docstring). For int8 and
    uint8: the ranges in ``manifest["quantization"]``, or, when it has none yet, those of these embeddings, recorded
    there (the job writes the manifest after the shard)."""
    if dtype in ("float32", "float16"):
        return embeddings.astype(dtype)
    if dtype not in CALIBRATED or len(embeddings) == 0:
        return quantize_embeddings(embeddings, dtype)
    if "quantization" not in manifest:
        if any(shard.get("rows") for shard in manifest["shards"]):
            raise CorpusError(
                f"the {MANIFEST} of this {dtype} job lacks the quantization ranges its shards were written with; "
                "re-run with --overwrite to start again"
            )
        if len(embeddings) < 2:
            raise CorpusError(
                f"{dtype} output calibrates its ranges on the first shard with rows, and it has only one row: "
                "one embedding has no range. Use a larger --shard-rows (default 10,000)."
            )
        ranges = np.vstack((embeddings.min(axis=0), embeddings.max(axis=0))).astype(np.float32)
        manifest["quantization"] = {
            "precision": dtype,
            "ranges": ranges.tolist(),
            "calibration_shard": len(manifest["shards"]),  # the index this shard gets
        }
    ranges = np.asarray(manifest["quantization"]["ranges"], dtype=np.float32)  # float32 -> JSON -> float32 is exact
    return quantize_embeddings(embeddings, dtype, ranges=ranges)


def shard_stem(index: int) -> str:
    """The name of shard ``index``'s files, less their suffixes."""
    return f"part-{index:05d}"


def write_shard(folder: Path, index: int, ids: list[str], embeddings: np.ndarray, output_format: str) -> list[dict]:
    """Write one shard's files; return their names and checksums."""
    stem = shard_stem(index)
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
    stem = shard_stem(shard["index"])
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


def check_output_folder(output: Path, overwrite: bool, inputs: Sequence[str] = (), root: Path | None = None) -> None:
    """Refuse a file, a folder of someone else's files, or one among ``inputs`` (the input's paths and files), before
    anything is written into it. ``root``: the folder of every part of a split job (``output`` is one part's): no
    input may lie in it, where the other parts write."""
    root = output if root is None else root
    if output.exists() and not output.is_dir():
        raise CorpusError(f"output {output} is a file; pass a folder")
    where = root.resolve()
    for path in inputs:  # an input folder holding the output, or an input file in it: its shards would be read again
        named = Path(path).resolve()
        if where.is_relative_to(named) if named.is_dir() else named.is_relative_to(where):
            raise CorpusError(
                f"output folder {root} lies within the input ({path}): a re-run would read its own shards as "
                "input; choose an output folder outside the input"
            )
    if parts := _part_folders(output):  # not even with overwrite: the parts are other jobs' folders
        raise CorpusError(
            f"output folder {output} holds the parts of a split job ({', '.join(sorted(parts.values()))}); give "
            "--num-shards to run one of them, or choose another folder"
        )
    if (
        output.is_dir()
        and not overwrite
        and not (output / MANIFEST).is_file()
        and any(not is_ours(p) for p in output.iterdir())
    ):
        raise CorpusError(f"output folder {output} is not empty and has no {MANIFEST}; choose an empty folder")


def all_skipped(manifest: dict) -> str | None:
    """Why a job that read rows embedded none, every one skipped (a wrong --text-field, most often); else None."""
    totals = manifest["totals"]
    if totals["rows"] or not totals["skipped"]:
        return None
    first = next(row for shard in manifest["shards"] for row in shard["skipped_rows"])
    return (
        f"every one of the {totals['skipped']} rows was skipped, so nothing was embedded (the first, row "
        f"{first['row']}: {first['reason']}); check --text-field and the input"
    )


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
        for old in _shard_files(output) + [manifest_path]:
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
    for path in _shard_files(output):  # written by a run killed before it recorded them: redone below
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
    """All ids and embeddings of a finished ``embed_corpus`` output, in input order (checksums verified).

    The embeddings as stored (``stored_type``): ``[rows, dim]`` float32, float16, int8 or uint8, or ``[rows,
    ceil(dim / 8)]`` packed bits for binary (int8) and ubinary (uint8). The int8/uint8 ranges, to quantize queries
    alike (``quantize_embeddings(q, precision, ranges=numpy.array(ranges))``), are in ``manifest.json``:
    ``json.load(open(f"{output}/manifest.json"))["quantization"]["ranges"]`` (``[[minima], [maxima]]``)."""
    output = Path(output)
    manifest_path = output / MANIFEST
    if not manifest_path.is_file() and _part_folders(output):
        return read_parts(output)  # a split job's parts (--num-shards): their union
    if not manifest_path.is_file():
        raise CorpusError(f"{output} has no {MANIFEST}; it is not the output of fastinstructor embed")
    manifest = load_manifest(manifest_path)
    if not manifest.get("complete"):
        raise CorpusError(f"{output} is not complete; re-run the embed command to finish it")
    dtype, width = stored_type(manifest["identity"]["dtype"], manifest["dim"])
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for shard in manifest["shards"]:
        files = {entry["file"]: entry["sha256"] for entry in shard["files"]}
        for name, digest in files.items():
            if file_sha256(output / name) != digest:
                raise CorpusError(f"{output / name} does not match its checksum in {manifest_path}")
        ids += shard_ids(output, shard)
        stem = shard_stem(shard["index"])
        if f"{stem}.parquet" in files:
            import pyarrow.parquet as pq

            column = pq.read_table(output / f"{stem}.parquet", columns=["embedding"]).column("embedding")
            flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
            parts.append(flat.reshape(len(column), width))
        else:
            parts.append(np.load(output / f"{stem}.npy"))
    return ids, np.concatenate(parts) if parts else np.zeros((0, width), dtype=dtype)


# A split job (--num-shards N --shard-index K: a job array) ------------------------------------------------------------
#
#     output/part-0-of-N/      a job folder as above (manifest.json, shards, lock): part 0's blocks
#     output/part-1-of-N/      ...
#
# Part K embeds the blocks of shard_rows input rows numbered K modulo N (each shard records its "block"); N processes
# never share a file. read_embeddings(output) checks that all N parts are there, finished, of one job and one input,
# and returns their shards in block order: a single run's result.

_PART = re.compile(r"part-(\d+)-of-(\d+)")


def _part_folders(output: Path) -> dict[tuple[int, int], str]:
    """``(K, N) -> name`` of the part folders in ``output``."""
    if not output.is_dir():
        return {}
    found = {}
    for path in output.iterdir():
        if (match := _PART.fullmatch(path.name)) and path.is_dir():
            found[int(match[1]), int(match[2])] = path.name
    return found


def split_count(output: Path) -> int | None:
    """How many ways the job in ``output`` is split, from its part folders; None where there are none (or several
    counts, which reading the parts refuses)."""
    counts = {count for _, count in _part_folders(output)}
    return counts.pop() if len(counts) == 1 else None


def part_folder(output: str | os.PathLike, index: int, count: int) -> Path:
    """The folder of part ``index`` of a job split ``count`` ways into ``output``."""
    return Path(output) / f"part-{index}-of-{count}"


def part_output(output: Path, num_shards: int | None, shard_index: int | None) -> Path:
    """The folder of part ``shard_index`` of a job split ``num_shards`` ways into ``output``, checked: both given,
    ``0 <= shard_index < num_shards``, and ``output`` holds neither a whole job nor parts of another split."""
    if num_shards is None or shard_index is None:
        given, missing = ("--shard-index", "--num-shards") if num_shards is None else ("--num-shards", "--shard-index")
        raise ValueError(f"{given} needs {missing}: a split job's part is --num-shards N --shard-index K (0 <= K < N)")
    for name, value in (("--num-shards", num_shards), ("--shard-index", shard_index)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"--shard-index {shard_index} --num-shards {num_shards}: need N >= 1 and 0 <= K < N (parts 0 to N - 1)"
        )
    if output.exists() and not output.is_dir():
        raise CorpusError(f"output {output} is a file; pass a folder")
    if (output / MANIFEST).is_file():
        raise CorpusError(f"output folder {output} holds a job that was not split; choose another folder for parts")
    other = sorted({n for _, n in _part_folders(output)} - {num_shards})
    if other:
        raise CorpusError(
            f"output folder {output} holds parts of the job split {other[0]} ways (part-K-of-{other[0]}); run those "
            f"with --num-shards {other[0]}, or choose another folder"
        )
    return part_folder(output, shard_index, num_shards)


def read_parts(output: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``read_embeddings`` of a split job's output: the union of its parts in input order."""
    output = Path(output)
    found = _part_folders(output)
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        raise CorpusError(f"{output} holds parts of jobs split {' and '.join(map(str, counts))} ways; keep one")
    count = counts[0]
    manifests: dict[int, dict] = {}
    missing, unfinished = [], []
    for index in range(count):
        path = part_folder(output, index, count) / MANIFEST
        if (index, count) not in found or not path.is_file():
            missing.append(index)
        elif not (manifest := load_manifest(path)).get("complete"):
            unfinished.append(index)
        else:
            manifests[index] = manifest
    if missing or unfinished:
        listed = [
            f"{what}: {', '.join(map(str, k))}" for what, k in (("missing", missing), ("unfinished", unfinished)) if k
        ]
        raise CorpusError(
            f"{output} is a job split {count} ways and not every part is done (part(s) {'; '.join(listed)}). Run "
            f"the same fastinstructor embed command with --num-shards {count} --shard-index K for each part K listed "
            "(an interrupted part continues where it stopped)."
        )
    first = manifests[0]
    for index, manifest in manifests.items():
        identity = {k: v for k, v in manifest["identity"].items() if k not in ("shard_index", "input")}
        expected = {k: v for k, v in first["identity"].items() if k not in ("shard_index", "input")}
        placed = (manifest["identity"].get("shard_index"), manifest["identity"].get("num_shards")) == (index, count)
        if identity != expected or not placed:
            changed = sorted(k for k in set(identity) | set(expected) if identity.get(k) != expected.get(k))
            raise CorpusError(
                f"part {index} of {output} is not a part of the same job as part 0 (differs in: "
                f"{', '.join(changed) or 'shard_index'}); re-run it with the same settings (and --overwrite)"
            )
        for key in ("input_read", "quantization"):
            if manifest.get(key) != first.get(key):
                what = "read another input" if key == "input_read" else "quantized with other ranges"
                raise CorpusError(f"part {index} of {output} {what} than part 0; re-run it with --overwrite")
    pieces = []  # (block, ids, embeddings) of every shard
    for index, manifest in manifests.items():
        ids, embeddings = read_embeddings(part_folder(output, index, count))
        start = 0
        for shard in manifest["shards"]:
            end = start + shard["rows"]
            pieces.append((shard["block"], ids[start:end], embeddings[start:end]))
            start = end
    pieces.sort(key=lambda piece: piece[0])
    if [block for block, _, _ in pieces] != list(range(len(pieces))):
        raise CorpusError(
            f"the parts of {output} do not hold each block of the input once; re-run them with --overwrite"
        )
    if not pieces:  # no rows at all: part 0's empty array has the dtype and width
        return read_embeddings(part_folder(output, 0, count))
    return [i for _, piece_ids, _ in pieces for i in piece_ids], np.concatenate([e for _, _, e in pieces])
