"""The host pipeline that feeds a GPU (issue 15, item 3), on the CPU: the packed batch layout against the padded
one, the real-token budget, the background producer, and ``encode`` through it on the cpu backend and (under the
Triton interpreter) the triton backend."""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import threading
import time
import traceback
from contextlib import closing

import numpy as np
import pytest
import torch

from fastinstructor.batching import (
    DEFAULT_EMBED_POLICY,
    DEFAULT_ENCODE_POLICY,
    DEFAULT_PACKED_POLICY,
    BatchPolicy,
    PackedBatch,
    pack_batch,
    pack_padded,
    pad_batch,
)
from fastinstructor.checkpoint import load_checkpoint
from fastinstructor.prefetch import prefetch
from fastinstructor.tokenization import PairTokenizer, load_tokenizer

TRITON = importlib.util.find_spec("triton") is not None
if TRITON:
    # test_kernels' INTERPRET and DEVICE (conftest.py imported triton with the flag).
    import test_kernels

EDGE_CASES = [
    ["Represent the document for retrieval:", ""],  # empty text: the instruction only
    ["Represent the document for retrieval:", "   "],  # blank text
    ["", "A text under an empty instruction."],
    ["", ""],
    ["Represent the Science title:", "Short."],
    "A plain string, pooled over all its tokens.",
    "",  # an empty plain string: just </s>
    ["Represent the sentence:", "word " * 400],  # cut at max_length
    "token " * 400,  # a plain string cut at max_length
]


def _old_pad_batch(ids, pool_start, pad_id=0):
    """``pad_batch`` as it was before it lost its Python loop: the tensors must stay exactly these."""
    length = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, torch.tensor(pool_start, dtype=torch.long)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    checkpoint = load_checkpoint(tiny_model)
    return PairTokenizer(load_tokenizer(checkpoint.path), 64)  # 64: the long edge cases and real articles are cut


def _batches(tokenized, policy: BatchPolicy):
    for rows in policy.plan([len(row) for row in tokenized.ids]):
        yield [tokenized.ids[i] for i in rows], [tokenized.pool_start[i] for i in rows]


# The packed layout against the padded one.


@pytest.mark.parametrize("inputs", ["real", "edge"])
def test_pack_batch_holds_exactly_the_padded_batch_without_its_padding(tokenizer, real_pairs, inputs):
    sentences = real_pairs if inputs == "real" else EDGE_CASES
    tokenized = tokenizer(sentences)
    assert inputs == "real" or (any(tokenized.truncated) and min(map(len, tokenized.ids)) == 1)
    for ids, starts in _batches(tokenized, BatchPolicy(7, 300)):
        input_ids, mask, pool_start = pad_batch(ids, starts)
        packed = pack_batch(ids, starts)
        keep = mask.bool()
        assert torch.equal(packed.input_ids, input_ids[keep])  # the tokens, row by row, padding stripped
        assert torch.equal(packed.cu_seqlens, torch.cat([torch.zeros(1), mask.sum(1).cumsum(0)]).int())
        assert torch.equal(packed.pool_start, pool_start)
        assert packed.max_len == input_ids.shape[1] == max(map(len, ids))
        assert (packed.input_ids.dtype, packed.cu_seqlens.dtype, packed.pool_start.dtype) == (
            torch.int64,
            torch.int32,
            torch.int64,
        )
        assert (packed.rows, packed.tokens) == (len(ids), sum(map(len, ids)))
        for b, row in enumerate(ids):  # and each row is where cu_seqlens says
            assert packed.input_ids[packed.cu_seqlens[b] : packed.cu_seqlens[b + 1]].tolist() == row
        again = pack_padded(input_ids, mask, pool_start)  # what the triton backend's padded embed does
        for name in ("input_ids", "cu_seqlens", "pool_start"):
            assert torch.equal(getattr(again, name), getattr(packed, name)), name
        assert again.max_len == packed.max_len


def test_a_packed_batch_splits_into_whole_rows_of_about_equal_size(tokenizer, real_pairs):
    tokenized = tokenizer(real_pairs[:40] + EDGE_CASES)
    batch = pack_batch(tokenized.ids, tokenized.pool_start)
    assert batch.split(batch.tokens) == [batch] and batch.split(10**9) == [batch]
    longest = max(map(len, tokenized.ids))
    for max_tokens in (1, 37, 100, batch.tokens // 3, batch.tokens - 1):
        parts = batch.split(max_tokens)
        assert 1 < len(parts) <= -(-batch.tokens // max_tokens)  # fewer where a row is longer than a share
        assert all(part.tokens < max_tokens + longest for part in parts)
        for name in ("input_ids", "pool_start"):  # the rows, in order, each once
            assert torch.equal(torch.cat([getattr(part, name) for part in parts]), getattr(batch, name)), name
        offsets = np.cumsum([0] + [part.tokens for part in parts])
        cu = torch.cat([part.cu_seqlens[:-1] + int(offset) for part, offset in zip(parts, offsets, strict=False)])
        assert torch.equal(torch.cat([cu, batch.cu_seqlens[-1:]]), batch.cu_seqlens)
        for part in parts:
            assert part.cu_seqlens.dtype == torch.int32 and part.cu_seqlens[0] == 0
            assert part.max_len == int(part.cu_seqlens.diff().max())
    assert [part.rows for part in batch.split(1)] == [1] * batch.rows  # every row alone


def test_a_packed_batch_filled_to_a_size_gains_one_row_of_pad_tokens(tokenizer, real_pairs):
    tokenized = tokenizer(real_pairs[:7] + EDGE_CASES)
    batch = pack_batch(tokenized.ids, tokenized.pool_start)
    assert batch.filled_to(batch.tokens) is batch
    for fill in (1, 5, batch.max_len + 3):
        filled = batch.filled_to(batch.tokens + fill)
        assert filled.tokens == batch.tokens + fill and filled.rows == batch.rows + 1
        assert torch.equal(filled.input_ids[: batch.tokens], batch.input_ids)
        assert not filled.input_ids[batch.tokens :].any()  # pad tokens
        assert torch.equal(filled.cu_seqlens[:-1], batch.cu_seqlens) and filled.cu_seqlens.dtype == torch.int32
        assert torch.equal(filled.pool_start[:-1], batch.pool_start) and filled.pool_start[-1] == 0
        assert filled.max_len == max(batch.max_len, fill) == int(filled.cu_seqlens.diff().max())
    with pytest.raises(ValueError, match="cannot be filled"):
        batch.filled_to(batch.tokens - 1)


@pytest.mark.parametrize("inputs", ["real", "edge"])
def test_pad_batch_without_its_loop_gives_the_same_tensors(tokenizer, real_pairs, inputs):
    tokenized = tokenizer(real_pairs if inputs == "real" else EDGE_CASES)
    for ids, starts in _batches(tokenized, BatchPolicy(5)):
        for new, old in zip(pad_batch(ids, starts), _old_pad_batch(ids, starts), strict=True):
            assert new.dtype == old.dtype and torch.equal(new, old)
    assert torch.equal(pad_batch([[5, 6, 1], [7, 1]], [1, 0], pad_id=9)[0], torch.tensor([[5, 6, 1], [7, 1, 9]]))


def test_bad_batches_and_pinned_memory():
    with pytest.raises(ValueError, match="at least one row"):
        pack_batch([], [])
    with pytest.raises(ValueError, match="one pool_start per row"):
        pad_batch([[1, 2]], [0, 0])
    starts = np.array([1, 0])
    batch = pack_batch([[5, 6, 1], [7, 1]], starts, pin_memory=True)  # no CUDA here: a no-op, not an error
    starts[0] = 99  # the batch holds its own copy
    assert batch.pool_start.tolist() == [1, 0]
    assert batch.input_ids.is_pinned() == torch.cuda.is_available()
    assert all(t.is_pinned() == torch.cuda.is_available() for t in pad_batch([[5, 1]], [0], pin_memory=True))


# The real-token budget.


@pytest.mark.parametrize("seed", range(5))
def test_the_packed_planner_keeps_to_the_real_token_budget(tokenizer, real_pairs, seed):
    rng = random.Random(seed)
    sentences = [*real_pairs, *EDGE_CASES]
    rng.shuffle(sentences)
    lengths = [len(row) for row in tokenizer(sentences).ids]
    policy = BatchPolicy(rng.randint(2, 40), rng.randint(40, 400), packed=True)
    lengths.append(policy.max_tokens + 5)  # one row over the budget: it runs alone
    planned = policy.plan(lengths)
    assert sorted(i for rows in planned for i in rows) == list(range(len(lengths)))
    assert [len(lengths) - 1] in planned
    for rows in planned:
        assert len(rows) <= policy.max_rows
        assert len(rows) == 1 or sum(lengths[i] for i in rows) <= policy.max_tokens
    # fits agrees: each batch is what a streaming consumer asking fits would form from the same order.
    order = [i for rows in planned for i in rows]
    streamed, current, longest, tokens = [], [], 0, 0
    for i in order:
        if not policy.fits(len(current), longest, lengths[i], tokens):
            streamed.append(current)
            current, longest, tokens = [], 0, 0
        current.append(i)
        longest, tokens = max(longest, lengths[i]), tokens + lengths[i]
    assert streamed + [current] == planned
    padded = BatchPolicy(policy.max_rows, policy.max_tokens)
    assert len(planned) <= len(padded.plan(lengths))  # never more batches than the padded budget cuts


# The background producer.


def _within(seconds: float, work):
    """``work()``'s result, failing (instead of hanging the run) when it takes longer than ``seconds``."""
    box: dict = {}

    def run():
        try:
            box["result"] = work()
        except BaseException as error:  # noqa: BLE001 - handed to the test below
            box["error"] = error

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(seconds)
    assert not runner.is_alive(), f"still running after {seconds} s: a hang"
    if "error" in box:
        raise box["error"]
    return box["result"]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastinstructor-prefetch"]


@pytest.mark.parametrize("slow", ["producer", "consumer", "neither"])
def test_prefetch_yields_in_order(slow):
    rng = random.Random(0)
    delays = [rng.random() * 0.004 for _ in range(40)]

    def make(i):
        if slow == "producer":
            time.sleep(delays[i])
        return i * i

    def consume():
        out = []
        for value in prefetch(make, range(40), depth=3):
            if slow == "consumer":
                time.sleep(delays[len(out)])
            out.append(value)
        return out

    assert _within(30, consume) == [i * i for i in range(40)]
    assert not _prefetch_threads()


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_prefetch_builds_at_most_depth_ahead(depth):
    made = []

    def consume():
        ahead = []
        for taken, _ in enumerate(prefetch(made.append, range(20), depth=depth), start=1):
            time.sleep(0.01)  # a slow consumer: the producer runs as far ahead as it may
            ahead.append(len(made) - taken)
        return ahead

    ahead = _within(30, consume)
    assert max(ahead) == depth  # it does build ahead, as far as allowed and no further
    assert len(made) == 20


def test_an_exception_in_the_producer_reaches_the_consumer_and_ends_the_thread():
    threads = []

    def make(i):
        threads.append(threading.current_thread())
        if i == 3:
            raise KeyError("batch 3 is broken")
        return i

    def consume():
        got = []
        with pytest.raises(KeyError, match="batch 3 is broken") as raised:
            for value in prefetch(make, range(10)):
                got.append(value)
        return got, raised.value

    got, error = _within(30, consume)
    assert got == [0, 1, 2]  # the batches before it arrive, in order
    assert "in make" in "".join(traceback.format_tb(error.__traceback__))  # the thread's traceback comes along
    assert threads[0] is not threading.current_thread() and not threads[0].is_alive()
    assert not _prefetch_threads()

    def items():  # the items' iterator failing is the same
        yield 1
        raise OSError("no more")

    with pytest.raises(OSError, match="no more"):
        _within(30, lambda: list(prefetch(str, items())))


def test_a_consumer_that_stops_early_ends_the_thread():
    threads = []

    def make(i):
        threads.append(threading.current_thread())
        return i

    def stop_after_two():
        taken = []
        with closing(prefetch(make, range(1000), depth=2)) as values:
            for value in values:
                taken.append(value)
                if len(taken) == 2:
                    break
        return taken

    assert _within(30, stop_after_two) == [0, 1]
    assert not threads[0].is_alive() and len(threads) <= 2 + 2  # 2 taken, at most 2 ahead
    threads.clear()

    def fail_in_the_consumer():
        with closing(prefetch(make, range(1000))) as values:
            for value in values:
                if value == 5:
                    raise RuntimeError("the consumer failed")

    with pytest.raises(RuntimeError, match="the consumer failed"):
        _within(30, fail_in_the_consumer)
    assert not threads[0].is_alive() and not _prefetch_threads()
    with pytest.raises(ValueError, match="depth must be at least 1"):
        next(prefetch(make, range(3), depth=0))


# encode through the pipeline.


@pytest.fixture(scope="module")
def cpu_model(tiny_model):
    import fastinstructor

    return fastinstructor.load(tiny_model, backend="cpu", precision="float32")


def _old_embed_tokens(model, ids, starts, policy):
    """``embed_tokens`` as it was: pad each planned batch and run it, one after the other, on this thread."""
    out = torch.empty((len(ids), model.dim))
    for rows in policy.plan([len(row) for row in ids]):
        out[rows] = model.backend.embed(*_old_pad_batch([ids[i] for i in rows], [starts[i] for i in rows])).float()
    return out


def test_encode_through_the_pipeline_equals_the_old_path_on_the_cpu_backend(cpu_model, real_pairs):
    sentences = [*real_pairs, *EDGE_CASES]
    ids, starts, _ = cpu_model.tokenizer(sentences)
    old = _old_embed_tokens(cpu_model, ids, starts, DEFAULT_ENCODE_POLICY)
    expected = torch.nn.functional.normalize(old, p=2, dim=1).numpy()
    np.testing.assert_allclose(cpu_model.encode(sentences), expected, rtol=0, atol=1e-6)  # the default policy
    policy = BatchPolicy(5, 200)  # many small batches: the thread runs ahead
    np.testing.assert_allclose(
        cpu_model.embed_tokens(ids, starts, policy).numpy(),
        _old_embed_tokens(cpu_model, ids, starts, policy),
        atol=1e-6,
    )
    done = []
    cpu_model.embed_tokens(ids, starts, policy, done.append)
    assert done == [len(rows) for rows in policy.plan([len(row) for row in ids])]


class _PackedStandIn:
    """A backend that takes packed batches: unpacks each into the cpu backend's padded call, and records them."""

    name = "packed-stand-in"
    packed_input = True

    def __init__(self, inner) -> None:
        self.inner, self.device, self.batches = inner, inner.device, []

    def embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        assert isinstance(batch, PackedBatch)
        self.batches.append(batch)
        cu = batch.cu_seqlens.tolist()
        ids = [batch.input_ids[a:b].tolist() for a, b in zip(cu, cu[1:], strict=False)]
        return self.inner.embed(*pad_batch(ids, batch.pool_start.tolist()))


def test_a_packed_backend_gets_packed_batches_and_the_packed_policy(cpu_model, real_pairs):
    from fastinstructor.model import Instructor

    stand_in = _PackedStandIn(cpu_model.backend)
    model = Instructor(cpu_model.checkpoint, stand_in, cpu_model.tokenizer, "float32", {})
    sentences = [*real_pairs, *EDGE_CASES]
    expected = cpu_model.encode(sentences)
    np.testing.assert_allclose(model.encode(sentences), expected, atol=1e-5)
    assert len(stand_in.batches) == 1  # DEFAULT_PACKED_POLICY: every row in one batch here
    assert stand_in.batches[0].rows == len(sentences) <= DEFAULT_PACKED_POLICY.max_rows
    stand_in.batches.clear()
    np.testing.assert_allclose(model.encode(sentences, batch_size=4), expected, atol=1e-5)  # user's: as asked
    n = len(sentences)
    assert [b.rows for b in stand_in.batches] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    stand_in.batches.clear()
    ids, starts, _ = cpu_model.tokenizer(sentences)
    policy = BatchPolicy(64, 150, packed=True)
    out = model.embed_tokens(ids, starts, policy)
    assert len(stand_in.batches) > 3 and all(b.rows == 1 or b.tokens <= 150 for b in stand_in.batches)
    np.testing.assert_allclose(torch.nn.functional.normalize(out, dim=1).numpy(), expected, atol=1e-5)


# encode's tokenization in chunks, the next chunk in a background thread.


class _RecordingTokenizer:
    """The model's tokenizer, recording each call (its thread and size); ``fail_at``: the call that raises."""

    def __init__(self, inner, fail_at: int | None = None) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, []
        self.max_length = inner.max_length
        self.second_started = threading.Event()

    def __call__(self, sentences):
        self.calls.append((threading.current_thread(), len(sentences)))
        if len(self.calls) == 2:
            self.second_started.set()
        if len(self.calls) - 1 == self.fail_at:
            raise ValueError(f"chunk {self.fail_at} is broken")
        return self.inner(sentences)

    def __getattr__(self, name: str):  # the rest of the tokenizer's interface, unrecorded
        return getattr(self.inner, name)


class _WaitingBackend:
    """The cpu backend, saying it runs off the CPU (``device``: "meta", where a GPU backend says "cuda"), whose first
    call waits until the tokenizer has started on the second chunk: it returns only if tokenization runs beside the
    backend (sequentially, the wait would time out). Records each batch's rows."""

    packed_input = False

    def __init__(self, inner, tokenizer: _RecordingTokenizer, device: str = "meta") -> None:
        self.inner, self.device, self.tokenizer = inner, torch.device(device), tokenizer
        self.rows: list[int] = []
        self.overlapped: bool | None = None

    def embed(self, input_ids, attention_mask, pool_start) -> torch.Tensor:
        if self.overlapped is None:
            self.overlapped = self.tokenizer.second_started.wait(30)
        self.rows.append(input_ids.shape[0])
        return self.inner.embed(input_ids, attention_mask, pool_start)


def _chunked(cpu_model, monkeypatch, rows: int, fail_at: int | None = None, device: str = "meta"):
    """An Instructor over the cpu backend whose tokenizer and backend record, tokenizing ``rows`` texts a chunk
    (unless the backend says it runs on the CPU)."""
    import fastinstructor.model
    from fastinstructor.model import Instructor

    monkeypatch.setattr(fastinstructor.model, "TOKENIZE_CHUNK_ROWS", rows)
    monkeypatch.setattr(fastinstructor.model, "TOKENIZE_CHUNK_BATCHES", 1)
    tokenizer = _RecordingTokenizer(cpu_model.tokenizer, fail_at)
    backend = _WaitingBackend(cpu_model.backend, tokenizer, device)
    return Instructor(cpu_model.checkpoint, backend, tokenizer, "float32", {}), tokenizer, backend


def _mixed(real_pairs) -> list:
    sentences = [*real_pairs, *EDGE_CASES] * 2
    random.Random(1).shuffle(sentences)
    return sentences


def test_encode_tokenizes_in_chunks_beside_the_backend_in_input_order(cpu_model, real_pairs, monkeypatch):
    import fastinstructor.model

    sentences = _mixed(real_pairs)  # 122 rows: 18 chunks of 7
    expected = cpu_model.encode(sentences, batch_size=4)  # on the CPU: every row planned together, no thread
    assert fastinstructor.model.tokenize_chunk_rows(BatchPolicy(4), cpu_model.backend.device) is None
    assert fastinstructor.model.tokenize_chunk_rows(BatchPolicy(4), torch.device("cuda")) == 8192
    assert fastinstructor.model.tokenize_chunk_rows(DEFAULT_PACKED_POLICY, torch.device("cuda")) == 8 * 1024
    model, tokenizer, backend = _chunked(cpu_model, monkeypatch, 7)
    bars: list[_Bar] = []
    monkeypatch.setattr(fastinstructor.model, "_progress", lambda total, show: bars.append(_Bar(total)) or bars[-1])
    got = _within(120, lambda: model.encode(sentences, batch_size=4, show_progress_bar=True))
    assert backend.overlapped, "the next chunk was not tokenized while the backend ran"
    assert [n for _, n in tokenizer.calls] == [7] * (len(sentences) // 7) + [len(sentences) % 7]
    assert all(thread.name == "fastinstructor-prefetch" for thread, _ in tokenizer.calls)
    assert not _prefetch_threads()
    assert max(backend.rows) <= 4 and sum(backend.rows) == len(sentences)
    assert len(bars) == 1 and bars[0].closed and bars[0].total == sum(bars[0].updates) == len(sentences)
    # The same embeddings, in input order, though each chunk was planned (sorted by length) on its own.
    assert got.dtype == np.float32 and np.abs(got - expected).max() <= 1e-6
    assert np.abs(got[1:] - expected[:-1]).max() > 0.1  # rows differ: a shuffled order would fail the line above


class _Bar:
    """``encode``'s progress bar, recording its updates."""

    def __init__(self, total: int) -> None:
        self.total, self.updates, self.closed = total, [], False

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("case", ["one chunk", "a backend on the CPU"])
def test_one_chunk_or_a_cpu_backend_tokenizes_on_the_calling_thread(cpu_model, real_pairs, monkeypatch, case):
    sentences = _mixed(real_pairs)
    if case == "one chunk":
        model, tokenizer, backend = _chunked(cpu_model, monkeypatch, len(sentences))
    else:  # chunks of 7, but the backend takes the cores tokenizing would run on: all at once
        model, tokenizer, backend = _chunked(cpu_model, monkeypatch, 7, device="cpu")
    backend.overlapped = True  # nothing to wait for
    threads_before = threading.active_count()
    model.encode(sentences, batch_size=len(sentences))  # one tokenizer call, one batch: no thread at all
    assert [(thread, n) for thread, n in tokenizer.calls] == [(threading.current_thread(), len(sentences))]
    assert threading.active_count() == threads_before and backend.rows == [len(sentences)]


@pytest.mark.parametrize("failure", ["raised", "lone surrogate"])
def test_an_exception_while_tokenizing_a_chunk_reaches_the_caller(cpu_model, real_pairs, monkeypatch, failure):
    sentences = _mixed(real_pairs)
    if failure == "raised":
        model, tokenizer, backend = _chunked(cpu_model, monkeypatch, 7, fail_at=3)
        error, message = ValueError, "chunk 3 is broken"
    else:  # not a string the tokenizer takes: refused before any chunk is tokenized
        model, tokenizer, backend = _chunked(cpu_model, monkeypatch, 7)
        sentences[3 * 7 + 2] = ["Represent the claim:", "a lone surrogate \ud800 here"]
        error, message = ValueError, r"sentences\[23\]\[1\] holds a lone surrogate"

    def encode():
        with pytest.raises(error, match=message):
            model.encode(sentences, batch_size=4)

    _within(120, encode)  # raised in the caller, no hang
    assert not _prefetch_threads()  # and the thread is gone
    if failure == "raised":
        assert len(tokenizer.calls) == 4 and sum(backend.rows) == 3 * 7  # the chunks before it ran; nothing after
    else:
        assert not tokenizer.calls and not backend.rows


# The embed job's batches on a packed backend.


def _corpus(tmp_path, real_texts) -> tuple:
    rows = [(f"doc-{i}", text) for i, text in enumerate([*real_texts, *real_texts])]  # 96 rows
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows), encoding="utf-8")
    return path, rows


class _FailingStandIn(_PackedStandIn):
    """A packed stand-in whose ``fail_at``-th call (counting from 0) raises, as a job killed midway."""

    def __init__(self, inner, fail_at: int) -> None:
        super().__init__(inner)
        self.fail_at = fail_at

    def embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        if len(self.batches) == self.fail_at:
            self.batches.append(batch)
            raise RuntimeError("killed")
        return super().embed_packed(batch)


def _packed_model(cpu_model, backend):
    from fastinstructor.model import Instructor

    return Instructor(cpu_model.checkpoint, backend, cpu_model.tokenizer, "float32", cpu_model.backend_report)


def test_the_embed_job_plans_real_tokens_on_a_packed_backend_unless_told(cpu_model, real_texts, tmp_path):
    from fastinstructor import embed_corpus, read_embeddings

    path, rows = _corpus(tmp_path, real_texts)
    expected = cpu_model.encode([["Represent the claim:", t] for _, t in rows])
    stand_in = _PackedStandIn(cpu_model.backend)
    model = _packed_model(cpu_model, stand_in)
    options = {"instruction": "Represent the claim:", "shard_rows": 50, "quiet": True}
    lengths = [len(ids) for ids in cpu_model.tokenizer([["Represent the claim:", t] for _, t in rows]).ids]
    shards = [lengths[:50], lengths[50:]]
    manifest = embed_corpus(model, path, tmp_path / "packed", **options)
    identity = manifest["identity"]
    assert (identity["batch_size"], identity["max_batch_tokens"], identity["packed_batches"]) == (1024, 65_536, True)
    assert [b.rows for b in stand_in.batches] == [50, 46]  # a shard a batch: over the padded default's 32 rows
    np.testing.assert_allclose(read_embeddings(tmp_path / "packed")[1], expected, rtol=0, atol=1e-5)
    # Values the caller sets are kept, and count padded tokens, on this backend too.
    for n, (given, policy) in enumerate(
        [
            ({"batch_size": 8}, BatchPolicy(8, DEFAULT_EMBED_POLICY.max_tokens)),
            ({"max_batch_tokens": 200}, BatchPolicy(DEFAULT_EMBED_POLICY.max_rows, 200)),
            ({"batch_size": 1024, "max_batch_tokens": 65_536}, BatchPolicy(1024, 65_536)),
        ]
    ):
        stand_in.batches.clear()
        manifest = embed_corpus(model, path, tmp_path / f"given-{n}", **options, **given)
        identity = manifest["identity"]
        assert (identity["batch_size"], identity["max_batch_tokens"]) == (policy.max_rows, policy.max_tokens)
        assert "packed_batches" not in identity  # padded, as every manifest before packed budgets
        got = [sorted(b - a for a, b in itertools.pairwise(batch.cu_seqlens.tolist())) for batch in stand_in.batches]
        assert got == [sorted(shard[i] for i in batch) for shard in shards for batch in policy.plan(shard)]
        np.testing.assert_allclose(read_embeddings(tmp_path / f"given-{n}")[1], expected, rtol=0, atol=1e-5)
    # A padded backend keeps DEFAULT_EMBED_POLICY.
    identity = embed_corpus(cpu_model, path, tmp_path / "cpu", **options)["identity"]
    assert (identity["batch_size"], identity["max_batch_tokens"]) == (32, 16_384) and "packed_batches" not in identity


@pytest.mark.parametrize("started_with", ["padded default", "packed default"])
def test_a_resumed_embed_job_keeps_the_batches_it_started_with(cpu_model, real_texts, tmp_path, started_with):
    from fastinstructor import CorpusError, embed_corpus, read_embeddings

    path, rows = _corpus(tmp_path, real_texts)
    expected = cpu_model.encode([["Represent the claim:", t] for _, t in rows])
    options = {"instruction": "Represent the claim:", "shard_rows": 40, "quiet": True}
    # "padded default": what the job wrote before the packed default existed (the same identity, key for key).
    first = {"batch_size": 32, "max_batch_tokens": 16_384} if started_with == "padded default" else {}
    killed = _FailingStandIn(cpu_model.backend, fail_at=3 if first else 1)  # in the second shard
    with pytest.raises(RuntimeError, match="killed"):
        embed_corpus(_packed_model(cpu_model, killed), path, tmp_path / "out", **options, **first)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and not manifest["complete"]
    assert ("packed_batches" in manifest["identity"]) == (started_with == "packed default")
    resumed = _PackedStandIn(cpu_model.backend)
    model = _packed_model(cpu_model, resumed)
    with pytest.raises(CorpusError, match="differs in: batch_size"):  # a value the caller sets must match
        embed_corpus(model, path, tmp_path / "out", **options, batch_size=16)
    manifest = embed_corpus(model, path, tmp_path / "out", **options)  # the default: the job's own batches
    assert manifest["complete"] and len(manifest["shards"]) == 3 and manifest["totals"]["rows"] == len(rows)
    # Shards 2 and 3 (40 and 16 rows), cut as the job began: 32 rows at most, or packed whole.
    assert [b.rows for b in resumed.batches] == ([32, 8, 16] if first else [40, 16])
    np.testing.assert_allclose(read_embeddings(tmp_path / "out")[1], expected, rtol=0, atol=1e-5)


def test_the_server_batcher_packs_for_a_packed_backend_on_the_compute_thread(cpu_model, monkeypatch):
    import asyncio
    from collections import defaultdict
    from types import SimpleNamespace

    import fastinstructor.server.batcher
    from fastinstructor.backends.base import batch_inputs
    from fastinstructor.server import Batcher, ServerSettings

    built_in: list[str] = []  # the thread each batch's tensors were built in

    def recording_batch_inputs(backend, ids, starts):
        built_in.append(threading.current_thread().name)
        if any(len(row) == 1 for row in ids):
            raise ValueError("no batch holds a 1-token row here")
        return batch_inputs(backend, ids, starts)

    monkeypatch.setattr(fastinstructor.server.batcher, "batch_inputs", recording_batch_inputs)

    class Instrument:
        def inc(self, *args) -> None:
            pass

        set = observe = inc

    stand_in = _PackedStandIn(cpu_model.backend)
    policy = ServerSettings(max_batch_rows=8, max_batch_tokens=64).batch_policy_for(True)
    assert policy == BatchPolicy(8, 64, packed=True)
    assert ServerSettings().batch_policy_for(False) == ServerSettings().batch_policy  # padded backends: as before
    rng = random.Random(0)
    rows = [[rng.randint(5, 90) for _ in range(rng.randint(1, 30))] + [1] for _ in range(40)]

    async def scenario():
        batcher = Batcher(
            SimpleNamespace(backend=stand_in), policy, defaultdict(Instrument), max_wait_ms=0, max_queued_rows=100
        )
        futures = batcher.submit(rows, [0] * len(rows))
        batcher.start()
        vectors = await asyncio.gather(*futures)
        failing = batcher.submit([[7, 1], [1]], [0, 0])  # building this batch fails: its rows get the error
        failed = await asyncio.gather(*failing, return_exceptions=True)
        assert threading.current_thread().name not in built_in  # the event loop built none of them
        await batcher.stop()
        return vectors, failed

    vectors, failed = asyncio.run(scenario())
    assert built_in and all(name.startswith("fastinstructor-compute") for name in built_in), built_in
    assert [type(error) for error in failed] == [ValueError, ValueError] and "1-token row" in str(failed[0])
    expected = cpu_model.backend.embed(*pad_batch(rows, [0] * len(rows))).numpy()
    np.testing.assert_allclose(np.stack(vectors), expected, atol=1e-5)
    assert sum(b.rows for b in stand_in.batches) == len(rows)
    assert all(b.rows <= 8 and (b.rows == 1 or b.tokens <= 64) for b in stand_in.batches)
    assert any(b.rows * b.max_len > 64 for b in stand_in.batches)  # packed: more than a padded budget allows


# The triton backend's packed entry, under the Triton interpreter on the CPU.


@pytest.mark.skipif(not TRITON, reason="triton is not installed (pip install '.[dev]' brings it for these tests)")
def test_triton_embed_packed_equals_its_padded_embed_and_the_reference(make_model, real_pairs, monkeypatch):
    from conftest import assert_parity

    import fastinstructor
    from fastinstructor.backends import TritonBackend
    from fastinstructor.model import Instructor

    if test_kernels.INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the backend reads the flag at run time too
    path = make_model("tiny")
    reference = fastinstructor.load(path, backend="reference", precision="float32")
    backend = TritonBackend(load_checkpoint(path), precision="float32", device=test_kernels.DEVICE)
    sentences = [*real_pairs[:4], EDGE_CASES[0], EDGE_CASES[2], EDGE_CASES[5]]
    ids, starts, _ = reference.tokenizer(sentences)
    packed = backend.embed_packed(pack_batch(ids, starts)).cpu()
    padded = backend.embed(*pad_batch(ids, starts)).cpu()
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-6)  # one forward behind both entries
    assert_parity(packed.numpy(), reference.encode(sentences), "float32")
    model = Instructor(reference.checkpoint, backend, reference.tokenizer, "float32", {})
    policy = BatchPolicy(3, 40, packed=True)
    assert len(policy.plan([len(row) for row in ids])) >= 3  # the thread runs ahead of the backend
    through = model.embed_tokens(ids, starts, policy)
    torch.testing.assert_close(through, packed, rtol=0, atol=1e-6)
