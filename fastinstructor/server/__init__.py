"""``fastinstructor serve``: an ASGI embedding server, OpenAI- and TEI-compatible, with dynamic batching.

- ``POST /v1/embeddings``: the OpenAI embeddings API (``input`` string or list, ``model``, ``encoding_format``
  float or base64, ``dimensions`` only if equal to the model's) plus ``instruction`` (one, or one per input) and
  ``prompt_name`` (a named instruction); ``GET /v1/models`` (and ``/v1/models/{id}``): the one model served.
- ``POST /embed`` (and ``POST /``): text-embeddings-inference's API (``inputs``, ``normalize``, ``truncate``,
  ``truncation_direction``, ``prompt_name``) plus ``instruction``; ``POST /tokenize``: TEI's tokens with offsets.
- ``GET /health`` (alive), ``GET /ready`` (model loaded, parity passed, taking rows), ``GET /openapi.json`` (the
  schemas of ``schemas``), ``GET /info`` (TEI's field names plus ours), ``GET /metrics`` (both behind the API key
  when there is one; ``metrics_without_key`` opens ``/metrics`` to loopback clients).

Requests are validated against pydantic schemas (``schemas``: an unknown field or a wrong type is a 422),
tokenized off the event loop, then queued row by row; one batcher task forms batches by the server's
``BatchPolicy`` (rows, and tokens: padded, or real ones on a backend that takes packed batches), waiting for more
rows until its oldest row has waited ``max_wait_ms``, runs the backend on ``fastinstructor.compute_thread`` and
resolves each request's future. The queue is bounded (429 with ``Retry-After`` when full), bodies are bounded while
they are read and inputs are bounded (413), API keys are compared in constant time (401), every error is a JSON
body, and shutdown finishes the queued work. ``serve`` runs the app in uvicorn with a connection limit and a timeout
for request headers. Clients are told the model's served name (``served_name``), never its local path.

Modules: ``settings`` (``ServerSettings``, ``served_name``, every flag and its environment variable: importable
without the server extra), ``schemas`` (request and response models, the OpenAPI document), ``inputs`` (named
instructions, left truncation, ``/tokenize``'s tokens), ``batcher`` (``Batcher``), ``app`` (the endpoints,
``create_app``) and ``protocol`` (``HTTPError``, JSON error bodies, ``serve`` and its hardened h11 protocol).
"""

from .settings import ServerSettings, served_name

__all__ = ["Batcher", "HTTPError", "QueueFull", "ServerSettings", "create_app", "serve", "served_name"]

_LAZY = {
    "create_app": "app",
    "Batcher": "batcher",
    "QueueFull": "batcher",
    "HTTPError": "protocol",
    "serve": "protocol",
}


def __getattr__(name: str):
    """The parts that need the server extra (starlette, pydantic), imported on first use, so that ``settings``
    (the command line's flags) imports without it."""
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
