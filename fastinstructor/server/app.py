"""The ASGI app: the OpenAI and TEI endpoints, ``/health``, ``/ready``, ``/info``, ``/metrics`` and
``/openapi.json``, over a ``Batcher``.

Requests are read within their limits (body size while it arrives, time, inputs, API key), validated against their
schema (``schemas``), resolved to sentences (``inputs``: named and default instructions, left truncation), tokenized
off the event loop, and their rows handed to the batcher; every error is a JSON body in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..backends.base import takes_packed
from ..model import Instructor
from ..version import __version__
from .batcher import Batcher, QueueFull
from .inputs import check_text, left_truncate, sentences, tokens
from .protocol import CLOSE, HTTPError, error_body, is_loopback
from .schemas import EmbeddingsRequest, EmbedRequest, TokenizeRequest, openapi_document, validate
from .settings import ServerSettings

__all__ = ["create_app"]

log = logging.getLogger("fastinstructor.server")

TOKENIZE_WORKERS = 2  # threads that tokenize requests off the event loop
# nginx's "client closed request": the status counted for a request whose client left before its answer (sent to
# nobody).
CLIENT_CLOSED = 499


async def _disconnect(request: Request) -> None:
    """Returns when the client closes its connection. Called once the body is read: the next ASGI message is then
    the disconnect (uvicorn sends it when the socket closes, or once the response has been sent)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # CPU seconds, resident memory, open file descriptors, start time
    PlatformCollector(registry=registry)  # the Python version
    return registry, {
        "request_seconds": Histogram(
            "fastinstructor_request_duration_seconds",
            "Time from a request's arrival to its response, by endpoint (every status)",
            ["endpoint"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
        ),
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


class _Api:
    """The endpoints serving ``model`` under ``name``, within ``settings``' limits, and what they share."""

    def __init__(self, model: Instructor, settings: ServerSettings, name: str) -> None:
        self.model, self.settings, self.name = model, settings, name
        self.created = int(time.time())
        self.openapi_json: dict | None = None
        self.registry, self.metrics = _metrics()
        self.batcher = Batcher(
            model,
            settings.batch_policy_for(takes_packed(model.backend)),
            self.metrics,
            max_wait_ms=settings.max_wait_ms,
            max_queued_rows=settings.max_queued_rows,
        )
        self.tokenize_pool = ThreadPoolExecutor(TOKENIZE_WORKERS, thread_name_prefix="fastinstructor-tokenize")

    @asynccontextmanager
    async def lifespan(self, app):
        self.batcher.start()
        yield
        await self.batcher.stop()  # graceful: queued work finishes first
        self.tokenize_pool.shutdown(wait=True)

    def check_key(self, request: Request, loopback_without_key: bool = False) -> None:
        keys = self.settings.api_keys
        if not keys or (loopback_without_key and is_loopback(request.client)):
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
            raise HTTPError(
                401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "authentication_error", CLOSE
            )

    async def read_body(self, request: Request) -> bytearray:
        """The body as it arrives, refused as soon as it passes the limit (a chunked body has no length to check
        first); uvicorn holds a few hundred KiB of it at most ahead of this loop (it pauses reading past 64 KiB)."""
        limit, timeout = self.settings.max_body_bytes, self.settings.request_timeout_s
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HTTPError(413, f"request body of {length} bytes exceeds the limit of {limit}", headers=CLOSE)

        async def collect() -> bytearray:
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise HTTPError(413, f"request body exceeds the limit of {limit} bytes", headers=CLOSE)
            return raw

        try:
            return await asyncio.wait_for(collect(), timeout)
        except asyncio.TimeoutError:  # not TimeoutError: Python 3.10 has two
            raise HTTPError(408, f"the request body did not arrive within {timeout} s", "timeout", CLOSE) from None
        except ClientDisconnect:  # nobody to answer; counted, not logged as an internal error
            raise HTTPError(CLIENT_CLOSED, "the client closed the connection before the whole body arrived") from None

    async def read_json(self, request: Request, schema):
        """The body, read within its limits, parsed, and validated as a ``schema`` instance."""
        self.check_key(request)
        given = request.headers.get("content-type")
        if (given or "").partition(";")[0].strip().lower() != "application/json":
            # Not only for clarity: a browser sends a cross-origin text/plain POST without asking (no preflight).
            raise HTTPError(
                415,
                f"the body must be JSON sent with 'Content-Type: application/json' (got {given or 'no Content-Type'})",
                headers=CLOSE,
            )
        raw = await self.read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:  # ValueError: JSONDecodeError, or an int of > 4300 digits
            raise HTTPError(400, f"the body is not valid JSON: {err}") from None
        except RecursionError:
            raise HTTPError(
                400, 'the body\'s JSON is nested too deeply; send an object such as {"input": ["a text", ...]}'
            ) from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return validate(schema, body)

    def submit(self, ids: list[list[int]], starts: list[int]) -> list[asyncio.Future]:
        if len(ids) > self.batcher.max_queued_rows:  # a 429 would be retried for ever: the queue never holds it
            raise HTTPError(
                413,
                f"{len(ids)} inputs exceed the queue's {self.batcher.max_queued_rows} rows (--max-queued-rows); send "
                "fewer per request",
            )
        try:
            return self.batcher.submit(ids, starts)
        except QueueFull as err:
            raise HTTPError(
                429,
                f"the queue is full ({err.queued} rows waiting); retry shortly",
                "rate_limit_error",
                {"Retry-After": "1"},
            ) from None

    def check_model(self, requested: str | None) -> None:
        """A request's ``model`` must be the one served (or absent): else a 404 as OpenAI answers it."""
        if requested is not None and requested != self.name:
            check_text(requested, "'model'")
            raise HTTPError(
                404,
                f"the model {requested!r} does not exist here: this server serves {self.name!r} (GET /v1/models); "
                "send that name, or no model",
                param="model",
            )

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions not in (None, self.model.dim):
            raise HTTPError(
                400,
                f"dimensions={dimensions!r} is not supported: this model returns {self.model.dim} dimensions "
                "(omit the field)",
                param="dimensions",
            )

    def _tokenize(self, batch: list, left: bool):
        """In the tokenize pool: the sentences, cut from the left first when asked, and their tokens."""
        if left:
            batch = [left_truncate(self.model.tokenizer, s) for s in batch]
        return batch, self.model.tokenizer(batch)

    async def tokenize(self, request: Request, batch: list, left: bool = False, deadline: float | None = None):
        """The sentences and their tokens, from the tokenize pool; a 504 past ``deadline`` (default: the request
        timeout from now), which covers the tokenizing as it covers the embedding."""
        if len(batch) > self.settings.max_inputs:
            raise HTTPError(413, f"{len(batch)} inputs exceed the limit of {self.settings.max_inputs} per request")
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self.tokenize_pool, self._tokenize, batch, left)
        result = await self.within(request, deadline or started + self.settings.request_timeout_s, work)
        self.metrics["tokenize_seconds"].observe(time.perf_counter() - started)
        return result

    async def within(self, request: Request, deadline: float, work):
        """``work``'s result; a 504 once ``deadline`` (``time.perf_counter()``) passes, or a 499 when the client
        closes its connection first. Either way ``work`` is cancelled: for the rows' futures (a ``gather``), their
        rows still queued are then dropped by the batcher, and a client that gave up costs no batch."""
        work = asyncio.ensure_future(work)
        left = asyncio.ensure_future(_disconnect(request))
        try:
            timeout = max(deadline - time.perf_counter(), 0.0)
            done, _ = await asyncio.wait([work, left], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()  # nothing where it is done; cancelling a gather cancels its futures
            left.cancel()
        if work in done:
            return work.result()
        if left in done:
            raise HTTPError(CLIENT_CLOSED, "the client closed the connection before its answer", "client_closed")
        raise HTTPError(504, f"the request took longer than {self.settings.request_timeout_s} s", "timeout")

    async def embed_rows(
        self, request: Request, batch: list, truncate: bool, left: bool = False
    ) -> tuple[np.ndarray, int]:
        settings, model, metrics = self.settings, self.model, self.metrics
        deadline = time.perf_counter() + settings.request_timeout_s
        _, tokenized = await self.tokenize(request, batch, left and truncate, deadline)
        if not truncate and any(tokenized.truncated):
            first = tokenized.truncated.index(True)
            raise HTTPError(
                413,
                f"input {first} is longer than the model's {model.max_seq_length} tokens; "
                "shorten it or send truncate=true",
            )
        for i, sentence in enumerate(batch):  # only </s> would be pooled: one vector whatever the text says
            if not isinstance(sentence, str) and model.tokenizer.fills_length(sentence[0]):
                raise HTTPError(
                    400,
                    f"input {i}: its instruction takes all of the model's {model.max_seq_length} tokens and leaves "
                    "none for the text; send a shorter instruction",
                    param="instruction",
                )
        futures = self.submit(tokenized.ids, tokenized.pool_start)
        vectors = await self.within(request, deadline, asyncio.gather(*futures))
        tokens = sum(len(ids) for ids in tokenized.ids)
        metrics["inputs"].inc(len(batch))
        metrics["tokens"].inc(tokens)
        return np.stack(vectors), tokens

    def handler(self, endpoint: str, work):
        async def handle(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await work(request)
            except HTTPError as err:
                body = error_body(err.status, err.message, err.kind, err.param)
                response = JSONResponse(body, err.status, headers=err.headers)
            except Exception as err:  # never let one request take the server down
                # The details (which may name local files) go to the server's log, not to the client.
                log.exception("internal error answering %s", endpoint)
                message = f"internal error ({type(err).__name__}); the server log has the details"
                response = JSONResponse(error_body(500, message, "server_error"), 500)
            self.metrics["requests"].labels(endpoint, str(response.status_code)).inc()
            self.metrics["request_seconds"].labels(endpoint).observe(time.perf_counter() - started)
            return response

        return handle

    async def openai_embeddings(self, request: Request) -> Response:
        body = await self.read_json(request, EmbeddingsRequest)
        self.check_model(body.model)
        self.check_dimensions(body.dimensions)
        vectors, tokens = await self.embed_rows(request, sentences(body, "input", self.settings), truncate=True)
        if body.encoding_format == "base64":
            values = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            values = vectors.tolist()
        data = [{"object": "embedding", "index": i, "embedding": value} for i, value in enumerate(values)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": self.name, "usage": usage})

    async def tei_embed(self, request: Request) -> Response:
        body = await self.read_json(request, EmbedRequest)
        self.check_dimensions(body.dimensions)
        left = body.truncation_direction.lower() == "left"
        vectors, _ = await self.embed_rows(request, sentences(body, "inputs", self.settings), bool(body.truncate), left)
        if body.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return JSONResponse(vectors.tolist())

    async def tei_tokenize(self, request: Request) -> Response:
        body = await self.read_json(request, TokenizeRequest)
        left = body.truncation_direction.lower() == "left"
        batch, tokenized = await self.tokenize(request, sentences(body, "inputs", self.settings), left)
        rows = zip(batch, tokenized.ids, tokenized.pool_start, strict=True)
        tokenizer, special = self.model.tokenizer, body.add_special_tokens
        return JSONResponse([tokens(tokenizer, s, ids, start, special) for s, ids, start in rows])

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "fastinstructor"}

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model_endpoint(self, request: Request) -> Response:
        self.check_key(request)
        self.check_model(request.path_params["model"])
        return JSONResponse(self.model_card())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Readiness, as a load balancer or Kubernetes asks: the model is loaded and passed its parity check (this
        app exists only then), the batcher runs and is not stopping, and the queue can take a row."""
        report = self.model.backend_report.get("parity")
        queued, limit = len(self.batcher.pending), self.settings.max_queued_rows
        running = self.batcher.task is not None and not self.batcher.task.done() and not self.batcher.stopping
        checks = {
            "model": "loaded",
            "parity": "reference" if report is None else ("passed" if report.get("passed") else "failed"),
            "batcher": "running" if running else "stopped",
            "queue": f"{queued} of {limit} rows",
        }
        good = {"parity": checks["parity"] != "failed", "batcher": running, "queue": queued < limit}
        failing = [f"{name} {checks[name]}" for name, ok in good.items() if not ok]
        if failing:
            message = f"not ready: {', '.join(failing)}"
            return JSONResponse(error_body(503, message, "server_error"), 503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "checks": checks})

    async def openapi(self, request: Request) -> Response:
        if self.openapi_json is None:  # built once, on first use
            self.openapi_json = openapi_document(f"fastinstructor serve: {self.name}", __version__)
        return JSONResponse(self.openapi_json)

    async def info(self, request: Request) -> Response:
        self.check_key(request)
        model, settings = self.model, self.settings
        default = settings.default_instruction
        return JSONResponse(
            {
                # text-embeddings-inference's fields
                "model_id": self.name,
                "model_sha": None,
                "model_dtype": model.precision,
                "model_type": {"embedding": {"pooling": "mean"}},
                "max_concurrent_requests": settings.max_connections,
                "max_input_length": model.max_seq_length,
                "max_batch_tokens": settings.max_batch_tokens,
                "max_batch_requests": settings.max_batch_rows,
                "max_client_batch_size": settings.max_inputs,
                "auto_truncate": False,  # /embed: truncate=true to cut; /v1/embeddings always cuts
                "tokenization_workers": TOKENIZE_WORKERS,
                "version": __version__,
                "sha": None,
                "docker_label": None,
                "prompts": settings.named_instructions,
                "default_prompt": settings.default_instruction_text,
                "default_prompt_name": default if default in settings.named_instructions else None,
                # this server's
                "model": self.name,
                "dim": model.dim,
                "max_seq_length": model.max_seq_length,
                "backend": model.backend_name,
                "precision": model.precision,
                "parity": model.backend_report.get("parity"),
                "limits": {k: v for k, v in asdict(settings).items() if k not in ("api_keys", "instructions")},
                "versions": {"fastinstructor": __version__, "torch": torch.__version__},
            }
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.check_key(request, loopback_without_key=self.settings.metrics_without_key)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


async def _routing_error(request: Request, err: StarletteHTTPException) -> Response:  # 404, 405: JSON too
    body = error_body(err.status_code, str(err.detail), "invalid_request_error")
    return JSONResponse(body, err.status_code, headers=err.headers)  # a 405's Allow


def _routed(endpoints: dict):
    """``(path, (METHOD, endpoint))`` for every route of ``schemas.ROUTES`` but the probes, which are not counted."""
    from .schemas import ROUTES

    for method, path, *_ in ROUTES:
        if path not in ("/health", "/ready"):
            yield path, (method.upper(), endpoints[path])


def create_app(model: Instructor, settings: ServerSettings | None = None, model_name: str | None = None):
    """The ASGI app serving ``model``, under ``model_name`` (default: its checkpoint folder's name). Its routes are
    those of ``schemas.ROUTES``, which the OpenAPI document lists."""
    api = _Api(model, settings or ServerSettings(), model_name or model.checkpoint.path.name)
    endpoints = {
        "/v1/embeddings": api.openai_embeddings,
        "/v1/models": api.models,
        "/v1/models/{model}": api.model_endpoint,
        "/embed": api.tei_embed,
        "/": api.tei_embed,  # TEI answers its task on its root too (huggingface_hub's InferenceClient posts there)
        "/tokenize": api.tei_tokenize,
        "/info": api.info,
        "/metrics": api.metrics_endpoint,
        "/openapi.json": api.openapi,
    }
    # {model:path}: a hub id ('hkunlp/instructor-large', the default served name) holds a '/'
    routes = [
        Route(path.replace("{model}", "{model:path}"), api.handler(path, work), methods=[method])
        for path, (method, work) in _routed(endpoints)
    ]
    routes += [Route("/health", api.health, methods=["GET"]), Route("/ready", api.ready, methods=["GET"])]
    middleware = []
    if api.settings.cors_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(api.settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    app = Starlette(
        routes=routes,
        lifespan=api.lifespan,
        middleware=middleware,
        exception_handlers={StarletteHTTPException: _routing_error},
    )
    app.state.batcher = api.batcher
    return app
