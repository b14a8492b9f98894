"""``fastinstructor serve``: an ASGI embedding server, OpenAI- and TEI-compatible, with dynamic batching.

- ``POST /v1/embeddings``: the OpenAI embeddings API (``input`` string or list, ``model``, ``encoding_format``
  float or base64, ``dimensions`` only if equal to the model's) plus ``instruction`` (one, or one per input).
- ``POST /embed``: text-embeddings-inference's API (``inputs``, ``normalize``, ``truncate``) plus ``instruction``.
- ``GET /health`` (200 once the model is loaded, with its parity check passed), ``GET /info``, ``GET /metrics``.

Requests are tokenized off the event loop, then queued row by row; one batcher task forms batches by a
token budget, waiting for more rows until its oldest row has waited ``max_wait_ms``, runs the backend in a
worker thread and resolves each request's future. The queue is bounded (429 with ``Retry-After`` when full),
bodies and inputs are bounded (413), API keys are compared in constant time (401), every error is a JSON
body, and shutdown finishes the queued work.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .batching import pad_batch
from .model import Instructor

__all__ = ["ServerSettings", "create_app"]


@dataclass(frozen=True)
class ServerSettings:
    max_inputs: int = 512  # per request
    max_body_bytes: int = 4 * 2**20
    max_batch_tokens: int = 16_384  # padded tokens per backend call
    max_batch_rows: int = 128
    # 0: a batch takes what queued while the backend was busy, and a lone request never waits (measured:
    # bench/results/serve-*.md); more trades latency for fuller batches on bigger machines.
    max_wait_ms: float = 0.0
    max_queued_rows: int = 8192  # beyond this: 429
    request_timeout_s: float = 60.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers, browsers on other origins are refused

    def __post_init__(self) -> None:
        for name in ("max_inputs", "max_body_bytes", "max_batch_tokens", "max_batch_rows", "max_queued_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


@dataclass
class _Row:
    ids: list[int]
    pool_start: int
    future: asyncio.Future
    enqueued: float


class Batcher:
    """One queue, one task: batches by token budget with a short wait, the backend in a worker thread."""

    def __init__(self, model: Instructor, settings: ServerSettings, metrics) -> None:
        self.model, self.settings, self.metrics = model, settings, metrics
        self.queue: asyncio.Queue[_Row] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastinstructor-backend")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        await self.queue.join()
        if self.task is not None:
            self.task.cancel()
        self.worker.shutdown(wait=True)

    def submit(self, ids: list[list[int]], starts: list[int]) -> list[asyncio.Future]:
        if self.queue.qsize() + len(ids) > self.settings.max_queued_rows:
            self.metrics["rejected"].inc()
            raise HTTPError(
                429,
                f"the queue is full ({self.queue.qsize()} rows waiting); retry shortly",
                "rate_limit_error",
                {"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        futures = []
        for row, start in zip(ids, starts, strict=True):
            future = loop.create_future()
            self.queue.put_nowait(_Row(row, start, future, time.perf_counter()))
            futures.append(future)
        self.metrics["queue_depth"].set(self.queue.qsize())
        return futures

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            # The wait counts from when the oldest row arrived: a row that queued behind a busy backend has
            # already waited, so its wait is at most max(max_wait_ms, the batch that was running).
            deadline = batch[0].enqueued + self.settings.max_wait_ms / 1000
            while len(batch) < self.settings.max_batch_rows:
                longest = max(len(r.ids) for r in batch)
                if not self.queue.empty():
                    nxt = self.queue._queue[0]  # peek: stop before the row that would break the budget
                    if (len(batch) + 1) * max(longest, len(nxt.ids)) > self.settings.max_batch_tokens:
                        break
                    batch.append(self.queue.get_nowait())
                    continue
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            self.metrics["queue_depth"].set(self.queue.qsize())
            started = time.perf_counter()
            for row in batch:
                self.metrics["queue_seconds"].observe(started - row.enqueued)
            live = [r for r in batch if not r.future.done()]  # timed-out requests are dropped here
            try:
                if live:
                    inputs = pad_batch([r.ids for r in live], [r.pool_start for r in live])
                    out = await loop.run_in_executor(self.worker, self._embed, inputs)
                    for row, vector in zip(live, out, strict=True):
                        if not row.future.done():
                            row.future.set_result(vector)
                    self.metrics["batch_rows"].observe(len(live))
                    self.metrics["inference_seconds"].observe(time.perf_counter() - started)
            except Exception as err:  # a backend failure fails this batch's requests, not the server
                for row in live:
                    if not row.future.done():
                        row.future.set_exception(err)
            finally:
                for _ in batch:
                    self.queue.task_done()

    def _embed(self, inputs) -> np.ndarray:
        with torch.inference_mode():
            return self.model.backend.embed(*inputs).float().cpu().numpy()


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    return registry, {
        "requests": Counter(
            "fastinstructor_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=registry
        ),
        "inputs": Counter("fastinstructor_inputs", "Inputs embedded", registry=registry),
        "tokens": Counter("fastinstructor_tokens", "Real tokens embedded", registry=registry),
        "rejected": Counter(
            "fastinstructor_rejected", "Requests refused because the queue was full", registry=registry
        ),
        "queue_depth": Gauge("fastinstructor_queue_depth", "Rows waiting for a batch", registry=registry),
        "batch_rows": Histogram(
            "fastinstructor_batch_rows",
            "Rows per backend call",
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        ),
        "queue_seconds": Histogram(
            "fastinstructor_queue_seconds", "Time a row waited for its batch", registry=registry
        ),
        "tokenize_seconds": Histogram(
            "fastinstructor_tokenize_seconds", "Tokenization time per request", registry=registry
        ),
        "inference_seconds": Histogram("fastinstructor_inference_seconds", "Backend time per batch", registry=registry),
    }


def _texts_and_instructions(body: dict, text_key: str) -> tuple[list[str], list[str | None]]:
    raw = body.get(text_key)
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise HTTPError(400, f"'{text_key}' must be a string or a list of strings")
    if not texts:
        raise HTTPError(400, f"'{text_key}' is empty; send at least one text")
    instruction = body.get("instruction")
    if instruction is None or isinstance(instruction, str):
        instructions = [instruction] * len(texts)
    elif isinstance(instruction, list) and all(isinstance(i, str) for i in instruction):
        if len(instruction) != len(texts):
            raise HTTPError(
                400,
                f"'instruction' has {len(instruction)} items for {len(texts)} inputs; send one "
                "instruction, or one per input",
            )
        instructions = instruction
    else:
        raise HTTPError(400, "'instruction' must be a string or a list of strings")
    return texts, instructions


def create_app(model: Instructor, settings: ServerSettings | None = None, model_name: str | None = None):
    """The ASGI app serving ``model``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    settings = settings or ServerSettings()
    registry, metrics = _metrics()
    batcher = Batcher(model, settings, metrics)
    tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastinstructor-tokenize")
    name = model_name or str(model.checkpoint.path)
    allowed = {
        "/v1/embeddings": {"input", "model", "encoding_format", "dimensions", "user", "instruction"},
        "/embed": {"inputs", "normalize", "truncate", "instruction", "truncation_direction", "prompt_name"},
    }

    async def read_json(request: Request) -> dict:
        if settings.api_keys:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_keys):
                raise HTTPError(
                    401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "authentication_error"
                )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise HTTPError(413, f"request body of {length} bytes exceeds the limit of {settings.max_body_bytes}")
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise HTTPError(413, f"request body exceeds the limit of {settings.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        unknown = sorted(set(body) - allowed[request.url.path])
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; accepted: {sorted(allowed[request.url.path])}")
        return body

    async def embed_rows(texts: list[str], instructions: list[str | None], truncate: bool) -> tuple[np.ndarray, int]:
        if len(texts) > settings.max_inputs:
            raise HTTPError(413, f"{len(texts)} inputs exceed the limit of {settings.max_inputs} per request")
        sentences = [t if i is None else [i, t] for t, i in zip(texts, instructions, strict=True)]
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        tokenized = await loop.run_in_executor(tokenize_pool, model.tokenizer, sentences)
        metrics["tokenize_seconds"].observe(time.perf_counter() - started)
        if not truncate and any(tokenized.truncated):
            first = tokenized.truncated.index(True)
            raise HTTPError(
                413,
                f"input {first} is longer than the model's {model.max_seq_length} tokens; "
                "shorten it or send truncate=true",
            )
        futures = batcher.submit(tokenized.ids, tokenized.pool_start)
        try:
            vectors = await asyncio.wait_for(asyncio.gather(*futures), settings.request_timeout_s)
        except TimeoutError:
            for f in futures:
                f.cancel()
            raise HTTPError(504, f"the request took longer than {settings.request_timeout_s} s", "timeout") from None
        tokens = sum(len(ids) for ids in tokenized.ids)
        metrics["inputs"].inc(len(texts))
        metrics["tokens"].inc(tokens)
        return np.stack(vectors), tokens

    def handler(endpoint: str, work):
        async def handle(request: Request) -> Response:
            try:
                response = await work(request)
            except HTTPError as err:
                response = JSONResponse(
                    {"error": {"message": err.message, "type": err.kind, "code": err.status}},
                    err.status,
                    headers=err.headers,
                )
            except Exception as err:  # never let one request take the server down
                response = JSONResponse(
                    {
                        "error": {
                            "message": f"internal error: {type(err).__name__}: {err}",
                            "type": "server_error",
                            "code": 500,
                        }
                    },
                    500,
                )
            metrics["requests"].labels(endpoint, str(response.status_code)).inc()
            return response

        return handle

    async def openai_embeddings(request: Request) -> Response:
        body = await read_json(request)
        texts, instructions = _texts_and_instructions(body, "input")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise HTTPError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}")
        if body.get("dimensions") not in (None, model.dim):
            raise HTTPError(
                400,
                f"dimensions={body['dimensions']!r} is not supported: this model returns "
                f"{model.dim} dimensions (omit the field)",
            )
        vectors, tokens = await embed_rows(texts, instructions, truncate=True)
        data = []
        for i, vector in enumerate(vectors):
            value = (
                base64.b64encode(vector.astype("<f4").tobytes()).decode() if encoding == "base64" else (vector.tolist())
            )
            data.append({"object": "embedding", "index": i, "embedding": value})
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body.get("model") or name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def tei_embed(request: Request) -> Response:
        body = await read_json(request)
        texts, instructions = _texts_and_instructions(body, "inputs")
        for key in ("normalize", "truncate"):
            if not isinstance(body.get(key, False), bool):
                raise HTTPError(400, f"'{key}' must be true or false")
        vectors, _ = await embed_rows(texts, instructions, truncate=body.get("truncate", False))
        if body.get("normalize", True):
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return JSONResponse(vectors.tolist())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(request: Request) -> Response:
        from . import __version__

        return JSONResponse(
            {
                "model": name,
                "dim": model.dim,
                "max_seq_length": model.max_seq_length,
                "backend": model.backend_name,
                "precision": model.precision,
                "parity": model.backend_report.get("parity"),
                "limits": {k: v for k, v in asdict(settings).items() if k != "api_keys"},
                "versions": {"fastinstructor": __version__, "torch": torch.__version__},
            }
        )

    async def metrics_endpoint(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()  # graceful: queued work finishes first
        tokenize_pool.shutdown(wait=True)

    routes = [
        Route("/v1/embeddings", handler("/v1/embeddings", openai_embeddings), methods=["POST"]),
        Route("/embed", handler("/embed", tei_embed), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    middleware = []
    if settings.cors_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.batcher = batcher
    return app
