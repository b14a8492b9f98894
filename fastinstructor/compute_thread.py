"""The one thread that runs the package's PyTorch work on the CPU, whichever thread calls it.

PyTorch's parallel CPU ops run on an OpenMP thread team, and each thread that starts one gets a team of its own.
Once a process has more OpenMP threads than cores (a second team does it when PyTorch uses every core), libgomp
stops spinning its idle threads and wakes them from sleep for every parallel op, 50-100 us each. So a model loaded
on one thread and called from others (a web framework's thread pool, LangChain's async methods, a server's worker
thread) ran slower than one loaded and called on a single thread: one climate claim per call on cpu int8 from a
pool of threads, 64.5 ms p50 before this module against 42.4 after, on a 2-core AVX2-only AMD EPYC
(bench/bench_callers.py, bench/results/callers-2026-12-07-vm.md). ``fastinstructor.load`` and the calls of a model
whose backend computes with PyTorch on the CPU (``Instructor.encode``, ``embed_tokens``, ``similarity``) therefore
run here, and so do the server's batches and the benchmark's runs; callers on other threads wait for them, one call
at a time.

``run(fn, *args)`` runs ``fn`` on the thread and returns its result or raises its exception; called on the thread
itself, it runs ``fn`` inline. A caller interrupted while it waits (Ctrl-C) sets ``stop`` for ``fn`` to check
between steps, so that the thread does not go on with work nobody waits for. A child process made by ``fork`` starts
without the thread and makes its own on first use.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["executor", "is_compute_thread", "on_compute_thread", "run"]

R = TypeVar("R")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_ident: int | None = None  # the thread's threading.get_ident(), once it has started


def _remember_ident() -> None:
    global _ident
    _ident = threading.get_ident()


def executor() -> ThreadPoolExecutor:
    """The thread, as an executor of one worker (for ``loop.run_in_executor``); started on first use."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, "fastinstructor-compute", initializer=_remember_ident)
        return _executor


def is_compute_thread() -> bool:
    return _ident is not None and threading.get_ident() == _ident


def run(fn: Callable[..., R], /, *args, stop: threading.Event | None = None, **kwargs) -> R:
    """``fn(*args, **kwargs)`` on the compute thread (inline when called there); ``stop`` is set if the caller is
    interrupted while it waits."""
    if is_compute_thread():
        return fn(*args, **kwargs)
    future = executor().submit(fn, *args, **kwargs)
    try:
        return future.result()
    except BaseException:  # fn's own exception, or the caller interrupted while waiting
        if not future.cancel() and stop is not None:  # already running: ask it to stop at its next check
            stop.set()
        raise


def on_compute_thread(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn``, its every call run on the compute thread."""

    @functools.wraps(fn)
    def on_thread(*args, **kwargs) -> R:
        return run(fn, *args, **kwargs)

    return on_thread


def _forget() -> None:  # in a forked child: the parent's thread does not exist there
    global _executor, _ident, _lock
    _executor, _ident, _lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget)
