"""The model made available to Ray workers as a folder, and loaded there once per actor.

``ship_model`` resolves the model once on the driver (a hub id is downloaded there) and ``ship_folder`` puts the
folder's files into Ray's object store (256 MiB objects); on each node the first process that needs it unpacks them
into ``$FASTINSTRUCTOR_CACHE/ray/<sha256 of the files>/<folder name>`` under a file lock, hashing every byte on the
way and refusing a copy that does not match. With ``shared_filesystem=True`` nothing is copied: the workers read the
driver's path, which every node must mount at the same place. ``load_on_worker`` loads it with the actor's CPUs as
its threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from ..locking import cache_dir, hold
from ..model import Instructor, load
from ..model_sources import resolve_model_path

__all__ = ["ShippedFolder", "actor_threads", "load_on_worker", "ship_folder", "ship_model"]

CHUNK_BYTES = 256 * 2**20  # one object in the object store per this many bytes of a file


@dataclass(frozen=True)
class ShippedFolder:
    """A folder made available to Ray workers (``ship_folder``): ``path()`` on a worker gives a local copy.

    ``key`` is the sha256 of the folder's files (relative names and bytes), so two different folders never share
    a cache entry; ``files`` holds each file's chunks in the object store (owned by the driver that shipped it,
    which must stay connected while workers start). With ``shared_path`` the files were not copied: every worker
    reads that path."""

    name: str
    key: str
    files: tuple[tuple[str, tuple[ray.ObjectRef, ...]], ...] = ()
    shared_path: str | None = None
    source: str | None = None  # what ship_model was given (a hub id, a folder): the name a server shows clients

    def path(self) -> Path:
        """The folder on this node: the shared path, or the node's copy, unpacked on first use (one process
        unpacks, the others wait on its lock), each byte hashed on the way and checked against ``key``."""
        if self.shared_path is not None:
            return Path(self.shared_path)
        # the name too: the same files shipped under two folder names are unpacked twice, each under its name
        root = cache_dir("ray") / hashlib.sha256(f"{self.key}\0{self.name}".encode()).hexdigest()[:32]
        if not root.is_dir():
            with hold(root.with_name(root.name + ".lock"), what=f"the node's copy of {self.name}"):
                if not root.is_dir():
                    self._unpack(root)
        return root / self.name

    def _unpack(self, root: Path) -> None:
        staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        digest = hashlib.sha256()
        for relative, chunks in self.files:
            target = staging / self.name / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                for data in _hashed(digest, relative, (ray.get(ref) for ref in chunks)):
                    f.write(data)
        if digest.hexdigest() != self.key:
            shutil.rmtree(staging, ignore_errors=True)
            raise OSError(f"the shipped copy of {self.name} does not match its sha256; ship it again")
        os.rename(staging, root)


def _hashed(digest, relative: str, chunks: Iterable) -> Iterator:
    """One file's ``chunks``, each added to ``digest`` on the way after the file's ``relative`` name and a NUL: the
    recipe of a ShippedFolder's key, for the driver that ships the files and the node that unpacks them."""
    digest.update(f"{relative}\0".encode())
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def _files(folder: Path) -> list[Path]:
    """The folder's files, in a fixed order, without hidden ones (a hub download's ``.cache``, ``.git``)."""
    found = (p for p in folder.rglob("*") if p.is_file())
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def ship_folder(folder: str | os.PathLike, *, shared_filesystem: bool = False) -> ShippedFolder:
    """Make ``folder`` (a checkpoint, an ONNX export) available to this Ray cluster's workers; call it on the driver,
    after ``ray.init``. Copied through the object store once (each file read and put 256 MiB at a time), or, with
    ``shared_filesystem=True``, not copied: the workers read ``folder`` itself, which every node must mount at the
    same path."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} to ship to the Ray workers")
    if shared_filesystem:
        return ShippedFolder(folder.name, "", shared_path=str(folder))
    digest, files = hashlib.sha256(), []
    for file in _files(folder):
        relative = file.relative_to(folder).as_posix()
        with open(file, "rb") as f:
            read = iter(lambda f=f: f.read(CHUNK_BYTES), b"")
            chunks = tuple(ray.put(np.frombuffer(chunk, dtype=np.uint8)) for chunk in _hashed(digest, relative, read))
        files.append((relative, chunks))
    return ShippedFolder(folder.name, digest.hexdigest(), tuple(files))


def ship_model(
    model: str | os.PathLike,
    *,
    shared_filesystem: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> ShippedFolder:
    """``ship_folder`` of a checkpoint: a folder as is, a hub id downloaded once, here on the driver (``cache_dir``,
    ``revision`` as ``fastinstructor.load`` takes them), so that no worker needs the hub."""
    folder = resolve_model_path(model, cache_dir=cache_dir, revision=revision)
    return dataclasses.replace(ship_folder(folder, shared_filesystem=shared_filesystem), source=os.fspath(model))


def actor_threads() -> int | None:
    """The CPUs Ray assigned to this actor or task (at least 1), or None outside a Ray worker."""
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0)))


def load_on_worker(
    model: ShippedFolder | str | os.PathLike,
    *,
    threads: int | None = None,
    onnx_dir: ShippedFolder | str | os.PathLike | None = None,
    backend_options: dict | None = None,
    **options,
) -> Instructor:
    """``fastinstructor.load`` of a shipped (or local) model, computing on ``threads`` CPU threads (default: the
    actor's CPUs); ``onnx_dir``: an ONNX export of it (shipped or a path) for the onnx backend, not exported again."""
    folder = model.path() if isinstance(model, ShippedFolder) else model
    backend_options = dict(backend_options or {})
    if onnx_dir is not None:
        backend_options["onnx_dir"] = str(onnx_dir.path() if isinstance(onnx_dir, ShippedFolder) else onnx_dir)
    threads = actor_threads() if threads is None else threads
    return load(folder, threads=threads, backend_options=backend_options or None, **options)
