"""The HTTP server, started for real on a loopback port, exercised as clients would."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import fastinstructor

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install '.[dev]')")
pytest.importorskip("starlette", reason="the server extra is not installed (pip install '.[server]')")

INSTRUCTION = "Represent the Wikipedia document for retrieval:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_path, *options):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fastinstructor", "serve", "--model", str(model_path), "--port", str(port), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.communicate()[1]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become healthy in 120 s")


@pytest.fixture(scope="module")
def server(tiny_model):
    process, url = _start(tiny_model, "--max-inputs", "64")
    yield url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def model(tiny_model):
    return fastinstructor.load(tiny_model)


def test_openai_api_equals_encode(server, model, real_texts):
    texts = real_texts[:6]
    reply = httpx.post(server + "/v1/embeddings", json={"input": texts, "model": "tiny", "instruction": INSTRUCTION})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [d["index"] for d in body["data"]] == list(range(6)) and body["model"] == "tiny"
    got = np.array([d["embedding"] for d in body["data"]])
    np.testing.assert_allclose(got, model.encode([[INSTRUCTION, t] for t in texts]), atol=1e-6)
    tokens = sum(len(ids) for ids in model.tokenizer([[INSTRUCTION, t] for t in texts]).ids)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    single = httpx.post(server + "/v1/embeddings", json={"input": texts[0]}).json()  # no instruction: plain text
    np.testing.assert_allclose(single["data"][0]["embedding"], model.encode([texts[0]])[0], atol=1e-6)


def test_base64_and_per_input_instructions(server, model, real_texts):
    texts, instructions = real_texts[:3], ["Represent the claim:", INSTRUCTION, "Represent the title:"]
    body = httpx.post(
        server + "/v1/embeddings", json={"input": texts, "instruction": instructions, "encoding_format": "base64"}
    ).json()
    got = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    np.testing.assert_allclose(got, model.encode([list(p) for p in zip(instructions, texts, strict=True)]), atol=1e-6)


def test_official_openai_client(server, model, real_texts):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    reply = client.embeddings.create(model="tiny", input=real_texts[:4], extra_body={"instruction": INSTRUCTION})
    got = np.array([d.embedding for d in reply.data])
    np.testing.assert_allclose(got, model.encode([[INSTRUCTION, t] for t in real_texts[:4]]), atol=1e-6)


def test_tei_api(server, model, real_texts):
    texts = real_texts[:3]
    reply = httpx.post(server + "/embed", json={"inputs": texts, "instruction": INSTRUCTION})
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(np.array(reply.json()), model.encode([[INSTRUCTION, t] for t in texts]), atol=1e-6)
    long_text = "warming " * 2000
    refused = httpx.post(server + "/embed", json={"inputs": [long_text]})
    assert refused.status_code == 413 and "truncate=true" in refused.json()["error"]["message"]
    truncated = httpx.post(server + "/embed", json={"inputs": [long_text], "truncate": True})
    np.testing.assert_allclose(truncated.json()[0], model.encode([long_text])[0], atol=1e-6)


@pytest.mark.parametrize(
    "path, payload, status, message",
    [
        ("/v1/embeddings", b"{not json", 400, "not valid JSON"),
        ("/v1/embeddings", b"[1, 2]", 400, "must be a JSON object"),
        ("/v1/embeddings", {"input": 42}, 422, "'input' must be a text, or a non-empty list of texts, got a number"),
        ("/v1/embeddings", {"input": ["a", 3]}, 422, "got a list whose item 1 is a number"),
        ("/v1/embeddings", {"input": []}, 422, "got an empty list"),
        ("/v1/embeddings", {"input": ["a"] * 65}, 413, "65 inputs exceed the limit of 64"),
        ("/v1/embeddings", {"input": "a", "colour": "red"}, 422, "unknown field 'colour' (accepted: input, model,"),
        ("/v1/embeddings", {"input": "a", "dimensions": 7}, 400, "dimensions=7 is not supported"),
        ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, 422, "'encoding_format' must be 'float' or"),
        ("/v1/embeddings", {"input": ["a", "b"], "instruction": ["x"]}, 400, "'instruction' has 1 items for 2"),
        ("/embed", {"inputs": "a", "normalize": "yes"}, 422, "'normalize' must be true or false"),
        ("/v1/embeddings", b'{"input": "' + b"a" * (5 * 2**20) + b'"}', 413, "exceeds the limit"),
    ],
)
def test_bad_requests(server, path, payload, status, message):
    kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    reply = httpx.post(server + path, headers={"content-type": "application/json"}, **kwargs)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]["message"]
    assert httpx.get(server + "/health").status_code == 200  # still answering


def test_many_concurrent_clients_get_their_own_answers(server, model):
    """64 clients x 20 requests, each with its own text: every answer matches its request; metrics add up."""
    before = httpx.get(server + "/metrics").text

    def client(c: int) -> bool:
        with httpx.Client(timeout=120) as session:
            for r in range(20):
                text = f"Client {c} request {r}: sea ice is melting at rate {c * 7 + r}."
                reply = session.post(server + "/v1/embeddings", json={"input": [text], "instruction": INSTRUCTION})
                got = np.array(reply.json()["data"][0]["embedding"])
                if not np.allclose(got, model.encode([[INSTRUCTION, text]])[0], atol=1e-5):
                    return False
        return True

    with ThreadPoolExecutor(max_workers=64) as pool:
        assert all(pool.map(client, range(64)))
    after = httpx.get(server + "/metrics").text

    def count(text: str) -> float:
        line = next(
            (
                x
                for x in text.splitlines()
                if x.startswith('fastinstructor_requests_total{endpoint="/v1/embeddings",status="200"}')
            ),
            None,
        )
        return float(line.split()[-1]) if line else 0.0

    assert count(after) - count(before) == 64 * 20

    def metric(text: str, name: str) -> float:
        return float(next(x for x in text.splitlines() if x.startswith(name + " ")).split()[-1])

    rows = metric(after, "fastinstructor_batch_rows_sum") - metric(before, "fastinstructor_batch_rows_sum")
    batches = metric(after, "fastinstructor_batch_rows_count") - metric(before, "fastinstructor_batch_rows_count")
    assert rows == 64 * 20 and batches < rows, f"{rows} rows in {batches} batches: no dynamic batching happened"


def test_api_keys_and_a_full_queue(tiny_model):
    process, url = _start(tiny_model, "--api-key", "s3cret", "--max-queued-rows", "2")
    try:
        assert httpx.post(url + "/embed", json={"inputs": "a"}).status_code == 401
        wrong = httpx.post(url + "/embed", json={"inputs": "a"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.post(url + "/embed", json={"inputs": "a"}, headers=ok).status_code == 200
        larger = httpx.post(url + "/embed", json={"inputs": ["a", "b", "c"]}, headers=ok)  # than the queue: for good
        assert larger.status_code == 413 and "--max-queued-rows" in larger.json()["error"]["message"]
        # Under load against a tiny queue: some requests are refused, none is lost or answered with another's.
        model = fastinstructor.load(tiny_model)

        def client(c: int) -> tuple[int, int]:
            refused = 0
            with httpx.Client(timeout=120, headers=ok) as session:
                for r in range(10):
                    text = f"client {c} request {r}"
                    reply = session.post(url + "/embed", json={"inputs": [text]})
                    if reply.status_code == 429:
                        assert reply.headers["retry-after"] == "1"
                        refused += 1
                        continue
                    assert reply.status_code == 200, reply.text
                    np.testing.assert_allclose(reply.json()[0], model.encode([text])[0], atol=1e-5)
            return refused, 10 - refused

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(client, range(16)))
        refused = sum(r for r, _ in results)
        assert sum(a for _, a in results) > 0  # how many are refused depends on timing; none may be wrong
        metrics = httpx.get(url + "/metrics", headers=ok).text
        counted = f'fastinstructor_requests_total{{endpoint="/embed",status="429"}} {float(refused)}'
        assert counted in metrics or not refused
        assert 'fastinstructor_requests_total{endpoint="/embed",status="413"} 1.0' in metrics
        info = httpx.get(url + "/info", headers=ok).json()
        assert info["backend"] == "cpu" and info["dim"] == 48 and "api_keys" not in json.dumps(info)
    finally:
        process.terminate()
        process.wait(timeout=60)


# Scheduling, timeouts and shutdown: the app in a real uvicorn server on a loopback port, in a thread of this
# process, with a backend slowed by a known delay so that the batcher's timing is under the test's control.


class _SlowBackend:
    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s, self.batches = inner, delay_s, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _wait(self, rows: int) -> None:
        self.batches.append(rows)
        time.sleep(self.delay_s)

    def embed(self, input_ids, attention_mask, pool_start):
        self._wait(input_ids.shape[0])
        return self.inner.embed(input_ids, attention_mask, pool_start)

    def embed_packed(self, batch):  # the cpu backend takes packed batches: the batcher calls this one
        self._wait(batch.rows)
        return self.inner.embed_packed(batch)


@contextlib.contextmanager
def _threaded_server(tiny_model, delay_s: float, **settings):
    import uvicorn

    from fastinstructor.server import ServerSettings, create_app

    model = fastinstructor.load(tiny_model)
    model.backend = _SlowBackend(model.backend, delay_s)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(model, ServerSettings(**settings)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while not server.started:
        assert thread.is_alive(), "the server thread died while starting"
        time.sleep(0.05)
    try:
        yield url, server, model
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "the server did not stop"


def test_a_request_past_its_timeout_gets_504_and_the_server_goes_on(tiny_model, model):
    with _threaded_server(tiny_model, delay_s=1.0, request_timeout_s=0.3) as (url, _, slow):
        late = httpx.post(url + "/embed", json={"inputs": ["slow"]}, timeout=30)
        assert late.status_code == 504 and "longer than 0.3 s" in late.json()["error"]["message"]
        slow.backend.delay_s = 0.0
        time.sleep(1.0)  # the abandoned batch still runs to its end; after it, requests are fast again
        ok = httpx.post(url + "/embed", json={"inputs": ["fast"]}, timeout=30)
        assert ok.status_code == 200
        np.testing.assert_allclose(ok.json()[0], model.encode(["fast"])[0], atol=1e-6)


def test_a_client_that_leaves_costs_no_batch_and_is_counted_499(tiny_model, model):
    """A client that closes its connection while its rows wait has them dropped before they take a batch (its
    rows' futures cancelled as it leaves), and the request is counted as 499, not as a 200."""
    with _threaded_server(tiny_model, delay_s=1.0, max_wait_ms=10) as (url, _, slow):
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(httpx.post, url + "/embed", json={"inputs": ["first"]}, timeout=30)
            time.sleep(0.3)  # its batch runs for a second
            with pytest.raises(httpx.ReadTimeout):  # httpx closes the connection as it gives up
                httpx.post(url + "/embed", json={"inputs": ["gone", "gone too"]}, timeout=0.3)
            assert first.result().status_code == 200
        time.sleep(0.5)  # the batch of the rows left behind would have started by now
        assert slow.backend.batches == [1], slow.backend.batches
        metrics = httpx.get(url + "/metrics").text
        assert 'fastinstructor_requests_total{endpoint="/embed",status="499"} 1.0' in metrics
        assert 'fastinstructor_requests_total{endpoint="/embed",status="200"} 1.0' in metrics
        ok = httpx.post(url + "/embed", json={"inputs": ["after"]}, timeout=30)
        np.testing.assert_allclose(ok.json()[0], model.encode(["after"])[0], atol=1e-6)


def test_rows_wait_at_most_the_max_wait_plus_one_batch(tiny_model, model):
    """Requests arriving while a batch runs join the next batch; none waits behind more than one batch.

    With a backend taking `delay` per batch and `max_wait`: a lone request is answered within max_wait + delay;
    requests that arrive while that batch runs go together into the next one, within delay (the batch that was
    not theirs) + max_wait + delay (their own). The margin covers thread scheduling on a busy machine.
    """
    delay, max_wait, margin = 0.5, 0.25, 0.4
    arrivals = [0.0, 0.35, 0.45, 0.55]  # the first alone; the others while its batch runs (0.25 to 0.75 s)
    with _threaded_server(tiny_model, delay_s=delay, max_wait_ms=max_wait * 1000) as (url, _, slow):

        def request(i: int) -> float:
            time.sleep(arrivals[i])
            start = time.perf_counter()
            reply = httpx.post(url + "/embed", json={"inputs": [f"text {i}"]}, timeout=30)
            assert reply.status_code == 200, reply.text
            replies[i] = reply.json()[0]
            return time.perf_counter() - start

        replies: dict[int, list] = {}
        with ThreadPoolExecutor(max_workers=4) as pool:
            latencies = list(pool.map(request, range(4)))
    for i, vector in replies.items():  # after the timing: the model computes on the thread the server's batches ran on
        np.testing.assert_allclose(vector, model.encode([f"text {i}"])[0], atol=1e-6)
    assert slow.backend.batches == [1, 3], f"batch sizes {slow.backend.batches}: expected [1] then [3]"
    assert latencies[0] < max_wait + delay + margin, latencies
    assert max(latencies[1:]) < delay + max_wait + delay + margin, latencies


# The batcher alone, with a backend that records its batches: how it cuts the queue by the BatchPolicy.


class _Recorder:
    """A backend that records the real lengths of each batch's rows; a row of length ``fail_on`` fails its batch."""

    device = torch.device("cpu")

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on

    def embed(self, input_ids, attention_mask, pool_start):
        lengths = attention_mask.sum(1).tolist()
        self.batches.append(lengths)
        if self.fail_on in lengths:
            raise RuntimeError("backend failure")
        return torch.tensor([[float(n), 0.0] for n in lengths])


class _Instrument:
    def inc(self, *args) -> None:
        pass

    set = observe = inc


def _batcher(policy, backend, max_wait_ms: float = 0.0, max_queued_rows: int = 10_000):
    from collections import defaultdict
    from types import SimpleNamespace

    from fastinstructor.server import Batcher

    model = SimpleNamespace(backend=backend)
    return Batcher(model, policy, defaultdict(_Instrument), max_wait_ms=max_wait_ms, max_queued_rows=max_queued_rows)


def test_serve_loads_the_model_on_the_thread_its_batches_run_on(monkeypatch, tmp_path, tiny_model):
    """``fastinstructor serve`` loads the model (its parity check included) on the compute thread, and the batcher
    runs its batches there: a model loaded on one thread and run on another gives the process a second OpenMP team,
    which makes every parallel CPU op wake its threads from sleep (fastinstructor.compute_thread)."""
    import asyncio
    import threading

    import fastinstructor.server as server
    from fastinstructor import compute_thread
    from fastinstructor.backends.cpu import CpuBackend
    from fastinstructor.batching import BatchPolicy
    from fastinstructor.cli import main

    seen, real_embed_packed = {}, CpuBackend.embed_packed

    def embed_packed(self, batch):  # the parity check at load runs the candidate
        seen.setdefault("load", threading.get_ident())
        return real_embed_packed(self, batch)

    monkeypatch.setattr(CpuBackend, "embed_packed", embed_packed)
    monkeypatch.setenv("FASTINSTRUCTOR_CACHE", str(tmp_path))  # no parity result cached: the check runs
    monkeypatch.setattr(server, "serve", lambda app, *args: None)
    assert main(["serve", "--model", str(tiny_model), "--backend", "cpu", "--precision", "float32"]) == 0

    class Where(_Recorder):
        def embed(self, *inputs):
            seen["embed"] = threading.get_ident()
            return super().embed(*inputs)

    async def one_row():
        batcher = _batcher(BatchPolicy(max_rows=4, max_tokens=64), Where())
        batcher.start()
        await asyncio.gather(*batcher.submit(*_rows([3])))
        await batcher.stop()

    asyncio.run(one_row())
    compute = compute_thread.run(threading.get_ident)
    assert seen["embed"] == seen["load"] == compute != threading.get_ident()


def _rows(lengths):
    return [[1] * n for n in lengths], [0] * len(lengths)


def test_the_batcher_fills_batches_up_to_the_policy_budget():
    """Rows queued behind a busy backend are cut in arrival order, each batch as full as the policy allows: a batch
    ends only where the next row would break the rows or the tokens budget."""
    import asyncio
    import itertools
    import random

    from fastinstructor.batching import BatchPolicy

    policy = BatchPolicy(max_rows=8, max_tokens=256)
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    backend = _Recorder()

    async def scenario():
        batcher = _batcher(policy, backend)
        futures = batcher.submit(*_rows(lengths))  # all queued before the task starts: one busy-backend backlog
        batcher.start()
        vectors = await asyncio.gather(*futures)
        await batcher.stop()
        return vectors

    vectors = asyncio.run(scenario())
    assert [v[0] for v in vectors] == lengths  # every request got its own row's vector
    assert [n for batch in backend.batches for n in batch] == lengths  # first in, first out
    for batch, following in itertools.pairwise(backend.batches):
        assert len(batch) <= policy.max_rows and len(batch) * max(batch) <= policy.max_tokens
        assert not policy.fits(len(batch), max(batch), following[0]), (batch, following[0])


def test_rows_that_arrive_while_a_batch_waits_keep_to_the_budget():
    """During max_wait_ms the batch takes newly arrived rows only while they fit; the first that does not starts
    the next batch, which does not wait once it is full."""
    import asyncio

    from fastinstructor.batching import BatchPolicy

    backend = _Recorder()

    async def scenario():
        batcher = _batcher(BatchPolicy(max_rows=8, max_tokens=64), backend, max_wait_ms=5_000)
        batcher.start()
        started = time.perf_counter()
        first = batcher.submit(*_rows([30]))
        await asyncio.sleep(0.05)
        later = batcher.submit(*_rows([30, 30, 30]))
        await asyncio.gather(*first, *later)
        waited = time.perf_counter() - started
        await batcher.stop()
        return waited

    waited = asyncio.run(scenario())
    assert backend.batches == [[30, 30], [30, 30]]  # 3 x 30 > 64: never three in a batch
    assert waited < 2.5, f"full batches waited for max_wait_ms ({waited:.1f} s)"


def test_a_backend_failure_fails_its_batch_only_and_a_full_queue_refuses_whole_requests():
    import asyncio

    from fastinstructor.batching import BatchPolicy
    from fastinstructor.server import QueueFull

    backend = _Recorder(fail_on=5)

    async def scenario():
        batcher = _batcher(BatchPolicy(max_rows=1), backend, max_queued_rows=3)
        futures = batcher.submit(*_rows([4, 5, 6]))
        with pytest.raises(QueueFull) as refused:
            batcher.submit(*_rows([7]))
        assert refused.value.queued == 3 and len(batcher.pending) == 3  # nothing of the refused request queued
        batcher.start()
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        return results

    ok, failed, after = asyncio.run(scenario())
    assert ok[0] == 4 and after[0] == 6
    assert isinstance(failed, RuntimeError) and "backend failure" in str(failed)


def test_stopping_the_batcher_finishes_the_queue_without_waiting_for_more_rows():
    import asyncio

    from fastinstructor.batching import BatchPolicy

    backend = _Recorder()

    async def scenario():
        batcher = _batcher(BatchPolicy(max_rows=4, max_tokens=1000), backend, max_wait_ms=60_000)
        batcher.start()
        futures = batcher.submit(*_rows([3, 2, 1, 4, 5, 6]))
        started = time.perf_counter()
        await asyncio.sleep(0)
        await batcher.stop()
        assert all(f.done() and not f.exception() for f in futures)
        return time.perf_counter() - started

    assert asyncio.run(scenario()) < 5  # not the minute of max_wait_ms
    assert backend.batches == [[3, 2, 1, 4], [5, 6]]


def test_shutdown_finishes_the_queued_work(tiny_model, model):
    """Stopping (what SIGTERM does in uvicorn) answers every request already accepted before the server exits."""
    with _threaded_server(tiny_model, delay_s=0.5, max_batch_rows=1) as (url, server, slow):
        texts = [f"queued text {i}" for i in range(6)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            replies = [pool.submit(httpx.post, url + "/embed", json={"inputs": [t]}, timeout=60) for t in texts]
            batcher = server.config.app.state.batcher
            deadline = time.monotonic() + 30
            # Every request accepted (its row run or queued) before the stop: one still connecting when the server
            # stops listening is refused, rightly, and that is not what this test is about.
            while sum(slow.backend.batches) + len(batcher.pending) < len(texts):
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.01)
            assert batcher.pending, "every row ran before the stop: nothing queued was left to finish"
            server.should_exit = True
            for text, reply in zip(texts, replies, strict=True):
                assert reply.result().status_code == 200, reply.result().text
                np.testing.assert_allclose(reply.result().json()[0], model.encode([text])[0], atol=1e-6)
    with pytest.raises(httpx.TransportError):  # and then it is gone
        httpx.post(url + "/embed", json={"inputs": ["late"]}, timeout=5)


def test_cors_is_off_unless_an_origin_is_allowed(tiny_model):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with _threaded_server(tiny_model, delay_s=0.0) as (url, _, _):
        reply = httpx.post(url + "/embed", json={"inputs": ["a"]}, headers={"Origin": "https://app.example"})
        assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers
    with _threaded_server(tiny_model, delay_s=0.0, cors_origins=("https://app.example",)) as (url, _, _):
        assert httpx.options(url + "/embed", headers=preflight).status_code == 200
        reply = httpx.post(url + "/embed", json={"inputs": ["a"]}, headers={"Origin": "https://app.example"})
        assert reply.headers["access-control-allow-origin"] == "https://app.example"


# Hostile and broken clients, against real server processes over real sockets.

KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def guarded(tiny_model):
    """A server with a key, a 1 MiB body limit, 8 connections and 1-2 s timeouts: (process, url, port)."""
    options = ["--api-key", "s3cret", "--max-body-bytes", str(2**20), "--max-connections", "8"]
    options += ["--header-timeout", "1", "--keep-alive-timeout", "1", "--request-timeout", "2"]
    process, url = _start(tiny_model, *options)
    yield process, url, int(url.rsplit(":", 1)[1])
    process.terminate()
    process.wait(timeout=60)


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection; TimeoutError if it is still open after `timeout`."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_chunked_body_over_the_limit_is_refused_while_reading(guarded):
    """200 MiB chunked against a 1 MiB limit: 413, and the server's memory never grows by anything like it (its
    resident size sampled while sending, and its peak, which catches what sampling could miss)."""
    process, _, port = guarded
    hwm_before, rss_before = _status_kb(process.pid, "VmHWM"), _status_kb(process.pid, "VmRSS")
    rss_max, sending = [rss_before], threading.Event()
    sending.set()

    def sample() -> None:
        while sending.is_set():
            rss_max[0] = max(rss_max[0], _status_kb(process.pid, "VmRSS"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    chunk, total, sent = b"a" * 2**20, 200, 0
    sock = socket.create_connection(("127.0.0.1", port))
    head = "POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Type: application/json\r\n"
    sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for _ in range(total):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += 1
        sock.sendall(b"0\r\n\r\n")
    reply = _read_until_closed(sock, timeout=30)
    sock.close()
    sending.clear()
    sampler.join()
    rss_grown, hwm_grown = (rss_max[0] - rss_before) / 1024, (_status_kb(process.pid, "VmHWM") - hwm_before) / 1024
    print(f"VmRSS {rss_before / 1024:.0f} MiB, +{rss_grown:.1f} MiB while sending; VmHWM +{hwm_grown:.1f} MiB")
    print(f"{sent} of {total} MiB sent before the server closed the connection")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    assert b"exceeds the limit of 1048576 bytes" in reply
    assert max(rss_grown, hwm_grown) < 32, f"the server grew by {rss_grown:.0f} MiB (peak +{hwm_grown:.0f})"
    assert sent < total, "the server read the whole body instead of stopping at the limit"
    assert httpx.post(guarded[1] + "/embed", json={"inputs": "a"}, headers=KEY).status_code == 200


def test_slow_connections_are_limited_and_timed_out(guarded):
    """Past --max-connections a connection is refused at once (503); clients too slow with their headers (or
    body, or next request) are answered 408 and closed after --header-timeout (--request-timeout for a body);
    an idle keep-alive connection is closed after --keep-alive-timeout; a normal client is served after."""
    process, url, port = guarded
    fds_before = len(os.listdir(f"/proc/{process.pid}/fd"))
    started = time.monotonic()
    slow_headers = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    for sock in slow_headers:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    slow_body = socket.create_connection(("127.0.0.1", port))
    head = "POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Type: application/json\r\n"
    slow_body.sendall((head + 'Content-Length: 100\r\n\r\n{"inputs": ').encode())
    slow_next = socket.create_connection(("127.0.0.1", port))  # one good request, then a slow second one
    slow_next.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        first += slow_next.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    slow_next.sendall(b"GET /health HTTP/1.1\r\n")
    for _ in range(8):  # the limit is reached: more connections are answered 503 and closed at once
        with socket.create_connection(("127.0.0.1", port)) as extra:
            reply = _read_until_closed(extra, timeout=5)
            assert reply.startswith(b"HTTP/1.1 503") and b"too many connections (limit 8)" in reply, reply
    open_fds = len(os.listdir(f"/proc/{process.pid}/fd"))
    assert open_fds <= fds_before + 8 + 2, f"{open_fds - fds_before} more file descriptors held"
    for sock in [*slow_headers, slow_next]:
        reply = _read_until_closed(sock, timeout=10)
        assert reply.startswith(b"HTTP/1.1 408") and b"headers did not arrive within 1" in reply, reply
    reply = _read_until_closed(slow_body, timeout=10)
    assert b" 408 " in reply and b"body did not arrive within 2" in reply, reply
    assert time.monotonic() - started < 10
    for sock in [*slow_headers, slow_body, slow_next]:
        sock.close()
    # A keep-alive connection left idle is closed; a normal client is served.
    with socket.create_connection(("127.0.0.1", port)) as idle:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_until_closed(idle, timeout=10).startswith(b"HTTP/1.1 200")
    assert httpx.post(url + "/embed", json={"inputs": "a"}, headers=KEY).status_code == 200


def test_deeply_nested_json_is_a_400(server):
    reply = httpx.post(server + "/embed", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert "nested too deeply" in reply.json()["error"]["message"]


@pytest.mark.parametrize(
    "path, body, where",
    [
        ("/embed", b'{"inputs": "\\ud800"}', "'inputs' item 0"),
        ("/embed", b'{"inputs": ["a", "b\\udc00c"]}', "'inputs' item 1"),
        ("/v1/embeddings", b'{"input": "a", "instruction": "Represent \\ud800"}', "'instruction'"),
        ("/v1/embeddings", b'{"input": "a", "model": "\\udfff"}', "'model'"),
    ],
)
def test_lone_surrogates_are_400s(server, path, body, where):
    reply = httpx.post(server + path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert where in message and "lone surrogate" in message and "valid UTF-8" in message, message
    pair = httpx.post(
        server + "/embed", content=b'{"inputs": "\\ud83d\\ude00"}', headers={"content-type": "application/json"}
    )
    assert pair.status_code == 200, pair.text  # a surrogate pair is an emoji: fine


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_not_sent_as_application_json_is_a_415(server, content_type):
    headers = {"content-type": content_type} if content_type else {}
    reply = httpx.post(server + "/embed", content=b'{"inputs": "a"}', headers=headers)
    assert reply.status_code == 415, reply.text
    assert "Content-Type: application/json" in reply.json()["error"]["message"]
    charset = httpx.post(
        server + "/embed", content=b'{"inputs": "a"}', headers={"content-type": "application/json; charset=utf-8"}
    )
    assert charset.status_code == 200


def test_info_and_metrics_need_the_api_key(guarded):
    _, url, _ = guarded
    for path in ("/info", "/metrics"):
        refused = httpx.get(url + path)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"], path
        assert httpx.get(url + path, headers=KEY).status_code == 200, path
    assert httpx.get(url + "/health").status_code == 200  # load balancers need no key


def test_metrics_without_key_are_open_to_loopback_only(model):
    import asyncio

    from fastinstructor.server import ServerSettings, create_app

    async def get(app, path: str, host: str) -> int:
        transport = httpx.ASGITransport(app=app, client=(host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            return (await client.get(path)).status_code

    keyed = create_app(model, ServerSettings(api_keys=("s3cret",), metrics_without_key=True))
    assert asyncio.run(get(keyed, "/metrics", "127.0.0.1")) == 200
    assert asyncio.run(get(keyed, "/metrics", "::1")) == 200
    assert asyncio.run(get(keyed, "/metrics", "203.0.113.7")) == 401
    assert asyncio.run(get(keyed, "/info", "127.0.0.1")) == 401  # only /metrics opens
    closed = create_app(model, ServerSettings(api_keys=("s3cret",)))
    assert asyncio.run(get(closed, "/metrics", "127.0.0.1")) == 401


def test_responses_and_errors_never_show_the_local_model_path(guarded, tiny_model):
    _, url, _ = guarded
    info = httpx.get(url + "/info", headers=KEY)
    assert info.json()["model"] == tiny_model.name and str(tiny_model) not in info.text
    reply = httpx.post(url + "/v1/embeddings", json={"input": "a"}, headers=KEY)
    assert reply.json()["model"] == tiny_model.name and str(tiny_model) not in reply.text


def test_an_internal_error_answers_500_without_the_local_path(tiny_model):
    with _threaded_server(tiny_model, delay_s=0.0) as (url, _, slow):

        def fail(*args):
            raise OSError(f"cannot read {tiny_model / 'model.safetensors'}")

        slow.backend.embed = slow.backend.embed_packed = fail
        reply = httpx.post(url + "/embed", json={"inputs": "a"}, timeout=30)
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error", reply.text
        assert str(tiny_model) not in reply.text and "server log" in reply.json()["error"]["message"]


def test_unknown_routes_and_methods_are_json_errors(server):
    for response, status in ((httpx.get(server + "/nope"), 404), (httpx.get(server + "/v1/embeddings"), 405)):
        assert response.status_code == status
        assert response.json()["error"]["code"] == status and response.json()["error"]["message"]
