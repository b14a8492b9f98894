"""Building the next batches in a background thread while the caller runs the current one.

``prefetch(make, items, depth)`` yields ``make(item)`` for each item, in order; one background thread computes
them at most ``depth`` items ahead of the consumer (a semaphore of ``depth`` slots: the thread takes one before
each ``make`` and the consumer gives it back when it takes the result). An exception raised in the thread reaches
the consumer at the item that raised it, with its traceback; closing the generator (a ``for`` left early inside
``contextlib.closing``, an exception in the consumer, ``close()``) stops the thread and waits for it to end, after
the ``make`` it is in.

``Instructor.embed_tokens`` uses it to pad or pack batch ``k + 1`` (and ``k + 2``) while the backend computes
batch ``k``: token ids to tensors is Python and numpy work on the host, the forward is the device's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["PREFETCH_DEPTH", "prefetch"]

PREFETCH_DEPTH = 2  # batches built ahead of the one the backend runs

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()  # the thread's last message when every item was made


class _Failed:
    """The thread's last message when ``make`` (or the items' iterator) raised."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(make: Callable[[T], R], items: Iterable[T], depth: int = PREFETCH_DEPTH) -> Iterator[R]:
    """``make(item)`` for each of ``items``, in order, computed in one background thread at most ``depth`` ahead.

    The thread starts at the first ``next``; close the generator (``contextlib.closing``) when leaving it early.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth!r}")
    results: queue.SimpleQueue = queue.SimpleQueue()  # unbounded: the semaphore bounds it, a put never blocks
    slots = threading.Semaphore(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                slots.acquire()
                if stop.is_set():
                    return
                results.put(make(item))
            results.put(_DONE)
        except BaseException as error:  # every failure goes to the consumer, which raises it
            results.put(_Failed(error))

    thread = threading.Thread(target=produce, name="fastinstructor-prefetch", daemon=True)
    thread.start()
    try:
        while (message := results.get()) is not _DONE:
            if isinstance(message, _Failed):
                raise message.error
            slots.release()  # taken by the consumer: the thread may build one more
            yield message
    finally:
        stop.set()
        slots.release()  # wakes the thread if it waits for a slot; it sees ``stop`` and returns
        thread.join()
