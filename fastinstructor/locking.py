"""Files that several processes share: inter-process locks, portable (``filelock``: fcntl on POSIX, msvcrt on
Windows), that name their holder; ``cache_dir``, where the folders they guard live; and ``write_atomic``, the one way
the package replaces a file that another process may be reading.

The operating system releases the lock when its holder dies, so a killed process never leaves a folder
locked. Beside the lock file, the holder writes who it is (pid, host, command, since when) to
``<lock>.holder``, so that a refused process can say which process holds it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["LockHeld", "cache_dir", "hold", "write_atomic"]


def cache_dir(name: str) -> Path:
    """``$FASTINSTRUCTOR_CACHE/<name>`` (default ``~/.cache/fastinstructor/<name>``): the package's caches (onnx,
    parity, ray, tuning), each under its own name."""
    return Path(os.environ.get("FASTINSTRUCTOR_CACHE", "~/.cache/fastinstructor")).expanduser() / name


class LockHeld(RuntimeError):
    """The lock is held by another process (``holder`` says which, as far as it is known)."""

    def __init__(self, message: str, holder: dict | None) -> None:
        super().__init__(message)
        self.holder = holder


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')}: {holder.get('command')})"


@contextmanager
def hold(path: str | os.PathLike, *, wait: bool = True, what: str = "this file") -> Iterator[None]:
    """Hold the lock ``path`` for the duration of the block.

    ``wait=True`` blocks until the lock is free (one process does the work, the others then use it);
    ``wait=False`` raises ``LockHeld`` at once, naming the holder and ``what`` it protects.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder_file = path.with_name(path.name + ".holder")
    lock = FileLock(str(path), timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(holder_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            holder = None
        raise LockHeld(f"{what} is in use by {_describe(holder)}; wait for it to finish", holder) from None
    try:
        holder_file.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": " ".join(sys.argv) or sys.executable,
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            ),
            encoding="utf-8",
        )
        yield
    finally:
        holder_file.unlink(missing_ok=True)
        lock.release()


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, rename: a crash leaves the old file or the new one, never half of one, and a
    concurrent reader sees one of them whole. The temporary is ``.<name>.tmp-<pid>`` beside ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
