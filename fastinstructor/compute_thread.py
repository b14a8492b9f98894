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

``Coalescer`` runs the calls that wait for the thread at the same time as one: when its turn comes, a call takes
every waiting call of the same kind with it, and each caller gets its own part of the result (``encode``'s texts
from callers at once go to the backend in shared batches, as the server's batcher does for requests).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Coalescer", "executor", "is_compute_thread", "on_compute_thread", "run"]

R = TypeVar("R")
T = TypeVar("T")

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


@dataclass(eq=False)
class _Call(Generic[T, R]):
    key: Any
    item: T
    stop: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    result: R | None = None
    error: BaseException | None = None


class Coalescer(Generic[T, R]):
    """``coalescer(key, item)`` returns ``run_many(key, items, stopped)[i]`` for its ``item``, computed on the
    compute thread together with every other call of the same ``key`` waiting there when its turn comes.

    ``run_many`` gets the items in arrival order and returns one result per item; ``stopped()`` says that every
    caller of the batch was interrupted, for ``run_many`` to check between steps. If the batch raises, each of its
    items runs again alone, so that a failure reaches only the callers whose items cause it."""

    def __init__(self, run_many) -> None:
        self.run_many = run_many
        self.lock = threading.Lock()
        self.waiting: list[_Call] = []

    def __call__(self, key, item: T) -> R:
        call = _Call(key, item)
        with self.lock:
            self.waiting.append(call)
        try:
            run(self._serve, call, stop=call.stop)
        except BaseException:
            call.stop.set()  # a batch that took it along stops once all of its callers have
            with self.lock:  # interrupted before its turn: nobody runs it now
                if call in self.waiting:
                    self.waiting.remove(call)
            raise
        if call.error is not None:
            raise call.error
        return call.result

    def _serve(self, call: _Call) -> None:  # on the compute thread
        if call.done:  # an earlier turn took it along
            return
        with self.lock:
            batch = [c for c in self.waiting if c.key == call.key]
            self.waiting = [c for c in self.waiting if c.key != call.key]
        stopped = lambda: all(c.stop.is_set() for c in batch)  # noqa: E731
        try:
            results = self.run_many(call.key, [c.item for c in batch], stopped)
            for c, result in zip(batch, results, strict=True):
                c.result = result
        except Exception as error:
            if len(batch) == 1 or stopped():
                for c in batch:
                    c.error = error
            else:
                for c in batch:
                    try:
                        (c.result,) = self.run_many(c.key, [c.item], c.stop.is_set)
                    except Exception as alone:
                        c.error = alone
        for c in batch:
            c.done = True


def _forget() -> None:  # in a forked child: the parent's thread does not exist there
    global _executor, _ident, _lock
    _executor, _ident, _lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget)
