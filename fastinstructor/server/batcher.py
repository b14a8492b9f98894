"""The server's dynamic batcher: rows from every request in one queue, cut into backend calls by a ``BatchPolicy``.

Requests are tokenized elsewhere and ``submit`` their rows, which wait in ``pending`` (a deque, oldest first).
One task takes the oldest row and adds the rows behind it while ``BatchPolicy.fits`` says the next one fits
(the rule the offline planner uses); a row that does not fit stays at the head of ``pending`` and starts the
next batch. When ``pending`` runs dry before the batch is full, the task waits for more rows until the batch's
oldest row has waited ``max_wait_ms`` (counted from its arrival, so a row that queued behind a busy backend has
already waited). The event loop only gathers the rows: building the batch's tensors and the backend call both run
on ``fastinstructor.compute_thread``, the thread ``fastinstructor.load`` loaded the model on (its parity check
included), so the loop goes on serving requests meanwhile; each row's future gets its vector, or the batch's
exception. A second thread running PyTorch's parallel CPU ops would give the process a second OpenMP thread team,
and from then on libgomp wakes its threads from sleep for every parallel op (that module says what it costs).
A backend that takes packed batches (``packed_input``: the cpu and triton backends) gets a ``PackedBatch``
(``pack_batch``, pinned on CUDA) and ``embed_packed``; the others a padded batch (``pad_batch``) and ``embed``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .. import compute_thread
from ..backends.base import batch_inputs, embed_inputs
from ..batching import BatchPolicy

__all__ = ["Batcher", "QueueFull"]


class QueueFull(Exception):
    """``submit`` would take the queue past ``max_queued_rows``; ``queued`` rows are waiting."""

    def __init__(self, queued: int) -> None:
        super().__init__(f"the queue is full ({queued} rows waiting)")
        self.queued = queued


@dataclass
class _Row:
    ids: list[int]
    pool_start: int
    future: asyncio.Future
    enqueued: float  # time.perf_counter() at arrival


class Batcher:
    """One queue, one task: batches by ``policy`` with a short wait; tensors and backend on the compute thread.

    ``metrics`` holds the server's ``rejected``, ``queue_depth``, ``queue_seconds``, ``batch_rows`` and
    ``inference_seconds`` instruments.
    """

    def __init__(self, model, policy: BatchPolicy, metrics: dict, *, max_wait_ms: float, max_queued_rows: int) -> None:
        self.model, self.policy, self.metrics = model, policy, metrics
        self.max_wait_s = max_wait_ms / 1000
        self.max_queued_rows = max_queued_rows
        self.pending: deque[_Row] = deque()  # rows waiting for a batch, oldest first
        self.arrived = asyncio.Event()  # set by submit (and stop) to wake the task
        self.stopping = False
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Finish what is queued (without waiting for more rows), then stop."""
        self.stopping = True
        self.arrived.set()
        if self.task is not None:
            await self.task

    def submit(self, ids: list[list[int]], starts: list[int]) -> list[asyncio.Future]:
        """Queue a request's rows; their futures, in order. ``QueueFull`` (nothing queued) past the bound."""
        if self.stopping:
            raise RuntimeError("the batcher is stopping and takes no more rows")
        if len(self.pending) + len(ids) > self.max_queued_rows:
            self.metrics["rejected"].inc()
            raise QueueFull(len(self.pending))
        loop = asyncio.get_running_loop()
        futures = []
        for row, start in zip(ids, starts, strict=True):
            future = loop.create_future()
            self.pending.append(_Row(row, start, future, time.perf_counter()))
            futures.append(future)
        self.metrics["queue_depth"].set(len(self.pending))
        self.arrived.set()
        return futures

    async def _wait_for_rows(self, timeout: float | None) -> bool:
        """Wait until ``submit`` (or ``stop``) wakes the task; False when ``timeout`` seconds passed first."""
        self.arrived.clear()
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
        except asyncio.TimeoutError:  # not TimeoutError: Python 3.10 has two
            return False
        return True

    async def _next_batch(self) -> list[_Row]:
        """The next batch, oldest row first; empty once stopping with nothing left."""
        while not self.pending:
            if self.stopping:
                return []
            await self._wait_for_rows(None)
        first = self.pending.popleft()
        batch, longest, tokens = [first], len(first.ids), len(first.ids)
        deadline = first.enqueued + self.max_wait_s
        while True:
            while self.pending and self.policy.fits(len(batch), longest, len(self.pending[0].ids), tokens):
                row = self.pending.popleft()
                batch.append(row)
                longest = max(longest, len(row.ids))
                tokens += len(row.ids)
            # A row left in pending does not fit, and fits(..., 0) is False once no row could: the batch is done.
            if self.pending or self.stopping or not self.policy.fits(len(batch), longest, 0, tokens):
                return batch
            timeout = deadline - time.perf_counter()
            if timeout <= 0 or not await self._wait_for_rows(timeout):
                return batch

    async def _run(self) -> None:
        while batch := await self._next_batch():
            self.metrics["queue_depth"].set(len(self.pending))
            await self._embed_batch(batch)

    async def _embed_batch(self, batch: list[_Row]) -> None:
        started = time.perf_counter()
        for row in batch:
            self.metrics["queue_seconds"].observe(started - row.enqueued)
        live = [r for r in batch if not r.future.done()]  # timed-out requests are dropped here
        if not live:
            return
        try:
            ids, starts = [r.ids for r in live], [r.pool_start for r in live]
            out = await asyncio.get_running_loop().run_in_executor(compute_thread.executor(), self._embed, ids, starts)
            for row, vector in zip(live, out, strict=True):
                if not row.future.done():
                    row.future.set_result(vector)
        except Exception as err:  # a backend failure fails this batch's requests, not the server
            for row in live:
                if not row.future.done():
                    row.future.set_exception(err)
            return
        self.metrics["batch_rows"].observe(len(live))
        self.metrics["inference_seconds"].observe(time.perf_counter() - started)

    def _embed(self, ids: list[list[int]], starts: list[int]) -> np.ndarray:
        """On the compute thread: the batch's tensors (padded or packed, as the backend takes them), then its
        embeddings on the host. A failure in either fails the batch."""
        backend = self.model.backend
        inputs = batch_inputs(backend, ids, starts)
        with torch.inference_mode():
            return embed_inputs(backend, inputs).float().cpu().numpy()
