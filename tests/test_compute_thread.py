"""The one thread that runs the package's PyTorch work on the CPU (``fastinstructor.compute_thread``): a model
loaded and called from any threads computes on it, an onnx model on its callers' threads, an interrupted caller
stops the work it no longer waits for, and a forked child and ``set_threads`` find it as they should."""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fastinstructor
from fastinstructor import compute_thread
from fastinstructor.backends import BACKENDS
from fastinstructor.backends.base import uses_compute_thread
from fastinstructor.backends.cpu import CpuBackend
from fastinstructor.batching import BatchPolicy


def test_run_calls_fn_on_one_thread_inline_there_and_raises_what_it_raises():
    with ThreadPoolExecutor(3) as callers:
        seen = set(callers.map(lambda _: compute_thread.run(threading.get_ident), range(6)))
    (ident,) = seen
    assert ident != threading.get_ident()
    assert compute_thread.run(compute_thread.run, threading.get_ident) == ident  # inline there: no deadlock
    assert compute_thread.on_compute_thread(threading.get_ident)() == ident
    assert compute_thread.run(lambda a, b=0: a + b, 1, b=2) == 3

    def fail():
        raise ValueError("from the compute thread")

    with pytest.raises(ValueError, match="from the compute thread"):
        compute_thread.run(fail)


def test_a_cpu_model_loads_and_computes_on_the_compute_thread_whoever_calls(monkeypatch, tmp_path, tiny_model):
    """The parity check at load, ``encode`` from the loading thread and from a pool, ``embed_tokens`` and
    ``similarity``: all on the compute thread, with the same embeddings from every caller."""
    import fastinstructor.model

    seen: list[int] = []
    real_embed_packed, real_cos_sim = CpuBackend.embed_packed, fastinstructor.model.cos_sim

    def embed_packed(self, batch):
        seen.append(threading.get_ident())
        return real_embed_packed(self, batch)

    def cos_sim(a, b):
        seen.append(threading.get_ident())
        return real_cos_sim(a, b)

    monkeypatch.setattr(CpuBackend, "embed_packed", embed_packed)
    monkeypatch.setattr(fastinstructor.model, "cos_sim", cos_sim)
    monkeypatch.setenv("FASTINSTRUCTOR_CACHE", str(tmp_path))  # no parity result cached: the check runs
    model = fastinstructor.load(tiny_model, backend="cpu", precision="float32")
    assert seen, "the parity check ran no batch"
    pairs = [["Represent the sentence:", f"sentence number {i}"] for i in range(5)]
    here = model.encode(pairs)
    with ThreadPoolExecutor(4) as callers:
        elsewhere = list(callers.map(lambda pair: model.encode([pair])[0], pairs))
    np.testing.assert_allclose(np.stack(elsewhere), here, atol=1e-6)
    tokenized = model.tokenizer(pairs)
    np.testing.assert_allclose(model.embed_tokens(tokenized.ids, tokenized.pool_start).numpy(), here, atol=1e-6)
    model.similarity(here, here)
    assert set(seen) == {compute_thread.run(threading.get_ident)} != {threading.get_ident()}


def test_only_a_backend_computing_with_pytorch_on_the_cpu_uses_the_compute_thread():
    """ONNX Runtime has its own thread pool and serves concurrent callers faster: an onnx model's calls stay on the
    caller's thread, as a GPU backend's do."""
    assert {name for name, cls in BACKENDS.items() if cls.pytorch_cpu} == {"cpu", "reference"}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_compute_thread(SimpleNamespace(pytorch_cpu=True, device=cpu))
    assert not uses_compute_thread(SimpleNamespace(pytorch_cpu=True, device=cuda))  # the reference on a GPU
    assert not uses_compute_thread(SimpleNamespace(pytorch_cpu=False, device=cpu))
    assert not uses_compute_thread(SimpleNamespace(device=cpu))  # a stand-in without the flag


class _Interrupted(Exception):
    pass


class _Slow:
    """The model's backend, each batch taking ``delay`` longer; counts its batches."""

    def __init__(self, backend, delay: float) -> None:
        self.backend, self.delay, self.batches = backend, delay, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def embed_packed(self, batch):
        self.batches += 1
        time.sleep(self.delay)
        return self.backend.embed_packed(batch)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals reach the main thread")
def test_an_interrupted_caller_stops_the_work_at_the_next_batch(tiny_model):
    """A caller interrupted while it waits (here by a signal whose handler raises, as Ctrl-C's does) gets the
    exception at once; the compute thread ends the call after the batch it is in, and the model stays usable."""
    model = fastinstructor.load(tiny_model, backend="cpu", precision="float32")
    expected = model.encode([["Represent the sentence:", "after the interruption"]])
    slow = model.backend = _Slow(model.backend, delay=0.05)
    pairs = [["Represent the sentence:", f"sentence number {i}"] for i in range(40)]

    def interrupt(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    timer.start()
    try:
        start = time.perf_counter()
        with pytest.raises(_Interrupted):
            model.encode(pairs, batch_size=1)  # 40 batches: 2 s
        waited = time.perf_counter() - start
    finally:
        timer.join()
        signal.signal(signal.SIGUSR1, previous)
    compute_thread.run(lambda: None)  # queued behind the abandoned call: returns once it has ended
    assert waited < 1.5 and slow.batches < 20, (waited, slow.batches)
    model.backend = slow.backend
    np.testing.assert_allclose(model.encode([["Represent the sentence:", "after the interruption"]]), expected)
    tokenized = model.tokenizer(pairs[:3])
    assert model.embed_tokens(tokenized.ids, tokenized.pool_start, BatchPolicy(max_rows=1)).shape[0] == 3


def _ident_in_child(queue) -> None:
    queue.put(compute_thread.run(threading.get_ident))


def test_a_forked_child_starts_its_own_compute_thread():
    """The parent's thread does not exist in a child made by fork: the child must not wait on it forever."""
    parent = compute_thread.run(threading.get_ident)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_ident_in_child, args=(queue,))
    child.start()
    try:
        ident = queue.get(timeout=60)
    finally:
        child.join(60)
    assert child.exitcode == 0 and isinstance(ident, int)
    assert parent == compute_thread.run(threading.get_ident)


def test_set_threads_reaches_the_compute_thread_after_it_started(monkeypatch):
    """PyTorch's thread count is per thread once a thread has used it: ``set_threads`` sets it there too."""
    from fastinstructor import hardware

    monkeypatch.setattr(hardware, "_threads", None)
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")  # set_threads only sets it where unset
    before = compute_thread.run(torch.get_num_threads), torch.get_num_threads()
    try:
        hardware.set_threads(1)
        assert compute_thread.run(torch.get_num_threads) == 1 == torch.get_num_threads()
    finally:
        compute_thread.run(torch.set_num_threads, before[0])
        torch.set_num_threads(before[1])


def _when_waiting(coalescer, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(coalescer.waiting) < count:
        assert time.monotonic() < deadline, f"{len(coalescer.waiting)} of {count} calls are waiting"
        time.sleep(0.005)


def test_calls_waiting_at_once_run_together_and_a_failure_reaches_only_its_caller():
    """Calls of one key waiting while the compute thread is busy run as one batch when their turn comes; another key
    runs apart; when the batch raises, each item runs alone, so only the failing item's caller gets the error."""
    seen: list[tuple] = []

    def run_many(key, items, stopped):
        seen.append((key, tuple(items)))
        if -1 in items:
            raise ValueError("item -1 fails")
        return [2 * item for item in items]

    coalescer = compute_thread.Coalescer(run_many)
    gate = threading.Event()
    busy = compute_thread.executor().submit(gate.wait)  # the thread is busy until the calls are waiting
    calls = [("a", 1), ("a", 2), ("b", 10), ("a", -1), ("a", 3)]
    with ThreadPoolExecutor(len(calls)) as callers:
        futures = []
        for key, item in calls:  # in this order: each waits before the next is made
            futures.append(callers.submit(coalescer, key, item))
            _when_waiting(coalescer, len(futures))
        gate.set()
        busy.result()
        outcomes = [f.exception() or f.result() for f in futures]
    assert outcomes[:3] == [2, 4, 20] and outcomes[4] == 6
    assert isinstance(outcomes[3], ValueError) and "item -1 fails" in str(outcomes[3])
    assert seen == [("a", (1, 2, -1, 3)), ("a", (1,)), ("a", (2,)), ("a", (-1,)), ("a", (3,)), ("b", (10,))]
    assert not coalescer.waiting
    with pytest.raises(ValueError, match="item -1 fails"):  # alone, its caller gets the error
        coalescer("a", -1)


def test_encode_calls_from_threads_at_once_share_the_backends_batches(tiny_model):
    """Four callers' texts, waiting at once, go to the cpu backend as one batch; each gets what it gets alone."""
    model = fastinstructor.load(tiny_model, backend="cpu", precision="float32")
    pairs = [["Represent the sentence:", f"sentence number {i} " * (1 + i)] for i in range(4)]
    alone = [model.encode([pair])[0] for pair in pairs]
    counting = model.backend = _Slow(model.backend, delay=0.0)
    gate = threading.Event()
    busy = compute_thread.executor().submit(gate.wait)
    with ThreadPoolExecutor(len(pairs)) as callers:
        futures = []
        for pair in pairs:
            futures.append(callers.submit(model.encode, [pair]))
            _when_waiting(model._coalesce, len(futures))
        gate.set()
        busy.result()
        together = [f.result()[0] for f in futures]
    assert counting.batches == 1
    np.testing.assert_allclose(np.stack(together), np.stack(alone), atol=1e-6)
    model.encode(pairs[:2], precision="int8")  # an output precision of its own: not coalesced, and still right
    assert counting.batches == 2
