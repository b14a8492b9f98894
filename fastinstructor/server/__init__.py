"""``fastinstructor serve``: an ASGI embedding server, OpenAI- and TEI-compatible, with dynamic batching.

- ``POST /v1/embeddings``: the OpenAI embeddings API (``input`` string or list, ``model``, ``encoding_format``
  float or base64, ``dimensions`` only if equal to the model's) plus ``instruction`` (one, or one per input).
- ``POST /embed``: text-embeddings-inference's API (``inputs``, ``normalize``, ``truncate``) plus ``instruction``.
- ``GET /health`` (200 once the model is loaded, with its parity check passed), ``GET /info``, ``GET /metrics``
  (both behind the API key when there is one; ``metrics_without_key`` opens ``/metrics`` to loopback clients).

Requests are tokenized off the event loop, then queued row by row; one batcher task forms batches by the server's
``BatchPolicy`` (rows, and tokens: padded, or real ones on a backend that takes packed batches), waiting for more
rows until its oldest row has waited ``max_wait_ms``, runs the backend in a worker thread and resolves each
request's future. The queue is bounded (429 with ``Retry-After`` when full), bodies are bounded while they are read
and inputs are bounded (413), API keys are compared in constant time (401), every error is a JSON body, and
shutdown finishes the queued work. ``serve`` runs the app in uvicorn with a connection limit and a timeout for
request headers. Clients are told the model's served name (``served_name``), never its local path.

Modules: ``settings`` (``ServerSettings``, ``served_name``), ``batcher`` (``Batcher``), ``app`` (the endpoints,
``create_app``) and ``protocol`` (``HTTPError``, JSON error bodies, ``serve`` and its hardened h11 protocol).
"""

from .app import create_app
from .batcher import Batcher, QueueFull
from .protocol import HTTPError, serve
from .settings import ServerSettings, served_name

__all__ = ["Batcher", "HTTPError", "QueueFull", "ServerSettings", "create_app", "serve", "served_name"]
