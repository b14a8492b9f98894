"""``fastinstructor serve``: an ASGI embedding server, OpenAI- and TEI-compatible, with dynamic batching.

- ``POST /v1/embeddings``: the OpenAI embeddings API (``input`` string or list, ``model``, ``encoding_format``
  float or base64, ``dimensions`` only if equal to the model's) plus ``instruction`` (one, or one per input).
- ``POST /embed``: text-embeddings-inference's API (``inputs``, ``normalize``, ``truncate``) plus ``instruction``.
- ``GET /health`` (200 once the model is loaded, with its parity check passed), ``GET /info``, ``GET /metrics``
  (both behind the API key when there is one; ``metrics_without_key`` opens ``/metrics`` to loopback clients).

Requests are tokenized off the event loop, then queued row by row; one batcher task forms batches by a
token budget, waiting for more rows until its oldest row has waited ``max_wait_ms``, runs the backend in a
worker thread and resolves each request's future. The queue is bounded (429 with ``Retry-After`` when full),
bodies are bounded while they are read and inputs are bounded (413), API keys are compared in constant time
(401), every error is a JSON body, and shutdown finishes the queued work. ``serve`` runs the app in uvicorn with
a connection limit and a timeout for request headers (``_guarded_h11``). Clients are told the model's served
name (``served_name``), never its local path.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path

import numpy as np
import torch

from .batching import pad_batch
from .model import Instructor
from .tokenization import lone_surrogate

__all__ = ["ServerSettings", "create_app", "serve", "served_name"]

log = logging.getLogger(__name__)


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
    request_timeout_s: float = 60.0  # also bounds the time a request's body takes to arrive (then: 408)
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_without_key: bool = False  # /metrics answers loopback clients without the key (a local scraper)
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers, browsers on other origins are refused
    # Enforced by ``serve`` (the connection, not the app): beyond max_connections a new connection is answered
    # 503 and closed; a client has header_timeout_s to send a request's headers; keep-alive idles are closed.
    max_connections: int = 512
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "max_inputs",
            "max_body_bytes",
            "max_batch_tokens",
            "max_batch_rows",
            "max_queued_rows",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for name in ("request_timeout_s", "header_timeout_s", "keep_alive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


# For errors answered before the body has been read to its end: closing beats reading and discarding the rest
# (uvicorn would, for as long as the client keeps sending).
_CLOSE = {"Connection": "close"}


def _error(status: int, message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


def served_name(model: str) -> str:
    """The name clients see for ``model`` (``serve``'s argument): a hub id as given, a local folder by its last
    component, so that no response tells a client where the server keeps its files."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def _is_loopback(client) -> bool:
    try:
        address = ipaddress.ip_address(client.host)
    except (AttributeError, ValueError):  # no client (a Unix socket) or not an address
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _check_text(value: str, where: str) -> None:
    """JSON can carry lone surrogates (``"\\ud800"``), which are no Unicode text: the tokenizer cannot take them."""
    at = lone_surrogate(value)
    if at is not None:
        raise HTTPError(
            400,
            f"{where} has a lone surrogate ({ascii(value[at])}) at character {at}, which is not "
            "Unicode text; send valid UTF-8 (a character beyond U+FFFF escaped as a surrogate pair)",
        )


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
                except asyncio.TimeoutError:
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
    for i, text in enumerate(texts):
        _check_text(text, f"'{text_key}' item {i}")
    instruction = body.get("instruction")
    if instruction is None or isinstance(instruction, str):
        if instruction is not None:
            _check_text(instruction, "'instruction'")
        instructions = [instruction] * len(texts)
    elif isinstance(instruction, list) and all(isinstance(i, str) for i in instruction):
        if len(instruction) != len(texts):
            raise HTTPError(
                400,
                f"'instruction' has {len(instruction)} items for {len(texts)} inputs; send one "
                "instruction, or one per input",
            )
        for i, text in enumerate(instruction):
            _check_text(text, f"'instruction' item {i}")
        instructions = instruction
    else:
        raise HTTPError(400, "'instruction' must be a string or a list of strings")
    return texts, instructions


def create_app(model: Instructor, settings: ServerSettings | None = None, model_name: str | None = None):
    """The ASGI app serving ``model``, under ``model_name`` (default: its checkpoint folder's name)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    settings = settings or ServerSettings()
    registry, metrics = _metrics()
    batcher = Batcher(model, settings, metrics)
    tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastinstructor-tokenize")
    name = model_name or model.checkpoint.path.name
    allowed = {
        "/v1/embeddings": {"input", "model", "encoding_format", "dimensions", "user", "instruction"},
        "/embed": {"inputs", "normalize", "truncate", "instruction", "truncation_direction", "prompt_name"},
    }

    def check_key(request: Request, loopback_without_key: bool = False) -> None:
        if not settings.api_keys or (loopback_without_key and _is_loopback(request.client)):
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_keys):
            raise HTTPError(
                401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "authentication_error", _CLOSE
            )

    async def read_body(request: Request) -> bytearray:
        """The body as it arrives, refused as soon as it passes the limit (a chunked body has no length to check
        first); uvicorn holds a few hundred KiB of it at most ahead of this loop (it pauses reading past 64 KiB)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise HTTPError(
                413, f"request body of {length} bytes exceeds the limit of {settings.max_body_bytes}", headers=_CLOSE
            )

        async def collect() -> bytearray:
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > settings.max_body_bytes:
                    raise HTTPError(
                        413, f"request body exceeds the limit of {settings.max_body_bytes} bytes", headers=_CLOSE
                    )
            return raw

        try:
            return await asyncio.wait_for(collect(), settings.request_timeout_s)
        except asyncio.TimeoutError:  # not TimeoutError: Python 3.10 has two
            raise HTTPError(
                408, f"the request body did not arrive within {settings.request_timeout_s} s", "timeout", _CLOSE
            ) from None
        except ClientDisconnect:  # nobody to answer; counted as a 400, not logged as an internal error
            raise HTTPError(400, "the client closed the connection before the whole body arrived") from None

    async def read_json(request: Request) -> dict:
        check_key(request)
        given = request.headers.get("content-type")
        if (given or "").partition(";")[0].strip().lower() != "application/json":
            # Not only for clarity: a browser sends a cross-origin text/plain POST without asking (no preflight).
            raise HTTPError(
                415,
                f"the body must be JSON sent with 'Content-Type: application/json' (got {given or 'no Content-Type'})",
                headers=_CLOSE,
            )
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPError(400, f"the body is not valid JSON: {err}") from None
        except RecursionError:
            raise HTTPError(
                400, 'the body\'s JSON is nested too deeply; send an object such as {"input": ["a text", ...]}'
            ) from None
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
        except asyncio.TimeoutError:
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
                response = JSONResponse(_error(err.status, err.message, err.kind), err.status, headers=err.headers)
            except Exception as err:  # never let one request take the server down
                # The details (which may name local files) go to the server's log, not to the client.
                log.exception("internal error answering %s", endpoint)
                message = f"internal error ({type(err).__name__}); the server log has the details"
                response = JSONResponse(_error(500, message, "server_error"), 500)
            metrics["requests"].labels(endpoint, str(response.status_code)).inc()
            return response

        return handle

    async def openai_embeddings(request: Request) -> Response:
        body = await read_json(request)
        texts, instructions = _texts_and_instructions(body, "input")
        requested = body.get("model")
        if requested is not None:
            if not isinstance(requested, str):
                raise HTTPError(400, f"'model' must be a string, got {type(requested).__name__}")
            _check_text(requested, "'model'")
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
                "model": requested or name,
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

        check_key(request)
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

        check_key(request, loopback_without_key=settings.metrics_without_key)
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
        Route("/info", handler("/info", info), methods=["GET"]),
        Route("/metrics", handler("/metrics", metrics_endpoint), methods=["GET"]),
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

    async def routing_error(request: Request, err: StarletteHTTPException) -> Response:  # 404, 405: JSON too
        return JSONResponse(_error(err.status_code, str(err.detail), "invalid_request_error"), err.status_code)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={StarletteHTTPException: routing_error},
    )
    app.state.batcher = batcher
    return app


def _raw_error(status: int, message: str, kind: str) -> bytes:
    """A whole error response, for a connection that has no request (yet) to answer; it is then closed."""
    body = json.dumps(_error(status, message, kind)).encode()
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
    return f"{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body


def _guarded_h11(settings: ServerSettings):
    """uvicorn's h11 protocol with a connection limit and a timeout for request headers.

    uvicorn (0.54) has neither: its keep-alive timer runs only between requests, and ``limit_concurrency`` answers
    503 only once a request's headers are in, so a client that connects and sends its headers slowly (slowloris)
    holds a connection, and a file descriptor, for ever; enough of them exhaust the process's descriptors.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:
                message = f"too many connections (limit {settings.max_connections}); retry shortly"
                transport.write(_raw_error(503, message, "server_error"))
                transport.close()
            else:
                self.header_timer = self.loop.call_later(settings.header_timeout_s, self.headers_too_slow)

        def data_received(self, data: bytes) -> None:
            if self.header_timer is None and self.conn.their_state is h11.IDLE:  # a keep-alive's next request
                self.header_timer = self.loop.call_later(settings.header_timeout_s, self.headers_too_slow)
            super().data_received(data)
            if self.header_timer is not None and self.conn.their_state is not h11.IDLE:  # the headers are in
                self.header_timer.cancel()
                self.header_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing():
                message = f"the request headers did not arrive within {settings.header_timeout_s} s"
                self.transport.write(_raw_error(408, message, "timeout"))
                self.transport.close()

    return GuardedH11Protocol


def serve(app, settings: ServerSettings, host: str, port: int) -> None:
    """Run ``app`` in uvicorn until stopped, with the connection limit and timeouts of ``settings``."""
    import uvicorn

    # h11 whether or not httptools is installed: the guard above is written for uvicorn's h11 protocol.
    http = _guarded_h11(settings)
    uvicorn.run(
        app, host=host, port=port, http=http, timeout_keep_alive=settings.keep_alive_timeout_s, log_level="warning"
    )
