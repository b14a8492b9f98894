"""The ASGI app: the OpenAI and TEI embedding endpoints, ``/health``, ``/info`` and ``/metrics``, over a ``Batcher``.

Requests are read within their limits (body size while it arrives, time, inputs, API key), tokenized off the
event loop, and their rows handed to the batcher; every error is a JSON body.
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
from ..tokenization import lone_surrogate
from ..version import __version__
from .batcher import Batcher, QueueFull
from .protocol import CLOSE, HTTPError, error_body, is_loopback
from .settings import ServerSettings

__all__ = ["create_app"]

log = logging.getLogger("fastinstructor.server")

# The body fields each endpoint accepts; anything else is a 400 that lists these.
_FIELDS = {
    "/v1/embeddings": {"input", "model", "encoding_format", "dimensions", "user", "instruction"},
    "/embed": {"inputs", "normalize", "truncate", "instruction", "truncation_direction", "prompt_name"},
}


def _check_text(value: str, where: str) -> None:
    """JSON can carry lone surrogates (``"\\ud800"``), which are no Unicode text: the tokenizer cannot take them."""
    at = lone_surrogate(value)
    if at is not None:
        raise HTTPError(
            400,
            f"{where} has a lone surrogate ({ascii(value[at])}) at character {at}, which is not "
            "Unicode text; send valid UTF-8 (a character beyond U+FFFF escaped as a surrogate pair)",
        )


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


class _Api:
    """The endpoints serving ``model`` under ``name``, within ``settings``' limits, and what they share."""

    def __init__(self, model: Instructor, settings: ServerSettings, name: str) -> None:
        self.model, self.settings, self.name = model, settings, name
        self.registry, self.metrics = _metrics()
        self.batcher = Batcher(
            model,
            settings.batch_policy_for(takes_packed(model.backend)),
            self.metrics,
            max_wait_ms=settings.max_wait_ms,
            max_queued_rows=settings.max_queued_rows,
        )
        self.tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastinstructor-tokenize")

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
        except ClientDisconnect:  # nobody to answer; counted as a 400, not logged as an internal error
            raise HTTPError(400, "the client closed the connection before the whole body arrived") from None

    async def read_json(self, request: Request) -> dict:
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
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPError(400, f"the body is not valid JSON: {err}") from None
        except RecursionError:
            raise HTTPError(
                400, 'the body\'s JSON is nested too deeply; send an object such as {"input": ["a text", ...]}'
            ) from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        allowed = _FIELDS[request.url.path]
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; accepted: {sorted(allowed)}")
        return body

    def submit(self, ids: list[list[int]], starts: list[int]) -> list[asyncio.Future]:
        try:
            return self.batcher.submit(ids, starts)
        except QueueFull as err:
            raise HTTPError(
                429,
                f"the queue is full ({err.queued} rows waiting); retry shortly",
                "rate_limit_error",
                {"Retry-After": "1"},
            ) from None

    async def embed_rows(
        self, texts: list[str], instructions: list[str | None], truncate: bool
    ) -> tuple[np.ndarray, int]:
        settings, model, metrics = self.settings, self.model, self.metrics
        if len(texts) > settings.max_inputs:
            raise HTTPError(413, f"{len(texts)} inputs exceed the limit of {settings.max_inputs} per request")
        sentences = [t if i is None else [i, t] for t, i in zip(texts, instructions, strict=True)]
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        tokenized = await loop.run_in_executor(self.tokenize_pool, model.tokenizer, sentences)
        metrics["tokenize_seconds"].observe(time.perf_counter() - started)
        if not truncate and any(tokenized.truncated):
            first = tokenized.truncated.index(True)
            raise HTTPError(
                413,
                f"input {first} is longer than the model's {model.max_seq_length} tokens; "
                "shorten it or send truncate=true",
            )
        futures = self.submit(tokenized.ids, tokenized.pool_start)
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

    def handler(self, endpoint: str, work):
        async def handle(request: Request) -> Response:
            try:
                response = await work(request)
            except HTTPError as err:
                response = JSONResponse(error_body(err.status, err.message, err.kind), err.status, headers=err.headers)
            except Exception as err:  # never let one request take the server down
                # The details (which may name local files) go to the server's log, not to the client.
                log.exception("internal error answering %s", endpoint)
                message = f"internal error ({type(err).__name__}); the server log has the details"
                response = JSONResponse(error_body(500, message, "server_error"), 500)
            self.metrics["requests"].labels(endpoint, str(response.status_code)).inc()
            return response

        return handle

    async def openai_embeddings(self, request: Request) -> Response:
        body = await self.read_json(request)
        texts, instructions = _texts_and_instructions(body, "input")
        requested = body.get("model")
        if requested is not None:
            if not isinstance(requested, str):
                raise HTTPError(400, f"'model' must be a string, got {type(requested).__name__}")
            _check_text(requested, "'model'")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise HTTPError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}")
        if body.get("dimensions") not in (None, self.model.dim):
            raise HTTPError(
                400,
                f"dimensions={body['dimensions']!r} is not supported: this model returns "
                f"{self.model.dim} dimensions (omit the field)",
            )
        vectors, tokens = await self.embed_rows(texts, instructions, truncate=True)
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
                "model": requested or self.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def tei_embed(self, request: Request) -> Response:
        body = await self.read_json(request)
        texts, instructions = _texts_and_instructions(body, "inputs")
        for key in ("normalize", "truncate"):
            if not isinstance(body.get(key, False), bool):
                raise HTTPError(400, f"'{key}' must be true or false")
        vectors, _ = await self.embed_rows(texts, instructions, truncate=body.get("truncate", False))
        if body.get("normalize", True):
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return JSONResponse(vectors.tolist())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        self.check_key(request)
        model = self.model
        return JSONResponse(
            {
                "model": self.name,
                "dim": model.dim,
                "max_seq_length": model.max_seq_length,
                "backend": model.backend_name,
                "precision": model.precision,
                "parity": model.backend_report.get("parity"),
                "limits": {k: v for k, v in asdict(self.settings).items() if k != "api_keys"},
                "versions": {"fastinstructor": __version__, "torch": torch.__version__},
            }
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.check_key(request, loopback_without_key=self.settings.metrics_without_key)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


async def _routing_error(request: Request, err: StarletteHTTPException) -> Response:  # 404, 405: JSON too
    return JSONResponse(error_body(err.status_code, str(err.detail), "invalid_request_error"), err.status_code)


def create_app(model: Instructor, settings: ServerSettings | None = None, model_name: str | None = None):
    """The ASGI app serving ``model``, under ``model_name`` (default: its checkpoint folder's name)."""
    api = _Api(model, settings or ServerSettings(), model_name or model.checkpoint.path.name)
    routes = [
        Route("/v1/embeddings", api.handler("/v1/embeddings", api.openai_embeddings), methods=["POST"]),
        Route("/embed", api.handler("/embed", api.tei_embed), methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/info", api.handler("/info", api.info), methods=["GET"]),
        Route("/metrics", api.handler("/metrics", api.metrics_endpoint), methods=["GET"]),
    ]
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
