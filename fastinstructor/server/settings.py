"""The server's limits (``ServerSettings``) and the name it serves the model under (``served_name``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..batching import DEFAULT_SERVER_POLICY, BatchPolicy

__all__ = ["ServerSettings", "served_name"]


@dataclass(frozen=True)
class ServerSettings:
    max_inputs: int = 512  # per request
    max_body_bytes: int = 4 * 2**20
    # tokens per backend call: padded (rows x longest), or real tokens on a backend that takes packed batches
    max_batch_tokens: int | None = DEFAULT_SERVER_POLICY.max_tokens
    max_batch_rows: int = DEFAULT_SERVER_POLICY.max_rows
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
        _ = self.batch_policy  # max_batch_rows and max_batch_tokens are checked there
        for name in ("max_inputs", "max_body_bytes", "max_queued_rows", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for name in ("request_timeout_s", "header_timeout_s", "keep_alive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")

    @property
    def batch_policy(self) -> BatchPolicy:
        """How the batcher cuts the queue into backend calls: ``max_batch_rows`` rows, ``max_batch_tokens``."""
        return self.batch_policy_for(packed_input=False)

    def batch_policy_for(self, packed_input: bool) -> BatchPolicy:
        """``batch_policy`` for a backend: on one that takes packed batches (``packed_input``, the triton backend)
        ``max_batch_tokens`` counts real tokens, since padding costs it nothing; the numbers are the same."""
        return BatchPolicy(self.max_batch_rows, self.max_batch_tokens, packed=packed_input)


def served_name(model: str) -> str:
    """The name clients see for ``model`` (``serve``'s argument): a hub id as given, a local folder by its last
    component, so that no response tells a client where the server keeps its files."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model
