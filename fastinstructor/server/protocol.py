"""The server's HTTP plumbing, independent of the model: errors as JSON bodies, and ``serve``, which runs an app in
uvicorn with its h11 protocol hardened by a connection limit and a timeout for request headers (``guarded_h11``)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from http import HTTPStatus

from .settings import ServerSettings

__all__ = ["CLOSE", "HTTPError", "error_body", "guarded_h11", "is_loopback", "raw_error", "serve"]

# For errors answered before the body has been read to its end: closing beats reading and discarding the rest
# (uvicorn would, for as long as the client keeps sending).
CLOSE = {"Connection": "close"}


class HTTPError(Exception):
    """An answer other than 200: ``status``, a message that says what was wrong and how to fix it, OpenAI's error
    ``kind`` (``type``), the request field at fault (``param``) and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers, self.param = status, message, kind, headers or {}, param


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    """OpenAI's error shape, with the HTTP status as ``code``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def is_loopback(client) -> bool:
    try:
        address = ipaddress.ip_address(client.host)
    except (AttributeError, ValueError):  # no client (a Unix socket) or not an address
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def raw_error(status: int, message: str, kind: str) -> bytes:
    """A whole error response, for a connection that has no request (yet) to answer; it is then closed."""
    body = json.dumps(error_body(status, message, kind)).encode()
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
    return f"{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body


def guarded_h11(max_connections: int, header_timeout_s: float):
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
            if len(self.connections) > max_connections:
                message = f"too many connections (limit {max_connections}); retry shortly"
                transport.write(raw_error(503, message, "server_error"))
                transport.close()
            else:
                self.header_timer = self.loop.call_later(header_timeout_s, self.headers_too_slow)

        def data_received(self, data: bytes) -> None:
            if self.header_timer is None and self.conn.their_state is h11.IDLE:  # a keep-alive's next request
                self.header_timer = self.loop.call_later(header_timeout_s, self.headers_too_slow)
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
                message = f"the request headers did not arrive within {header_timeout_s} s"
                self.transport.write(raw_error(408, message, "timeout"))
                self.transport.close()

    return GuardedH11Protocol


def serve(app, settings: ServerSettings, host: str, port: int) -> None:
    """Run ``app`` in uvicorn until stopped, with the connection limit and timeouts of ``settings``."""
    import uvicorn

    # h11 whether or not httptools is installed: the guard above is written for uvicorn's h11 protocol.
    http = guarded_h11(settings.max_connections, settings.header_timeout_s)
    uvicorn.run(
        app, host=host, port=port, http=http, timeout_keep_alive=settings.keep_alive_timeout_s, log_level="warning"
    )
