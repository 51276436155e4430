"""Connection limits of the thread-per-connection HTTP servers (the scheduler API, the
daemon's peer and control API), and the request-body rules they share.

Owns how many connections may be open (`Limits`): at most `max_connections` in all and
`max_per_client` from one client address, each dropped once idle for `idle_timeout`
(handlers derive from `BoundedHandler`). A connection over a limit is answered 503 and
closed by the accepting thread itself: it never gets a thread, so a flood of idle
connections cannot exhaust threads or memory. Never parses a request beyond the body
framing headers, and never blocks the accepting thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import ssl
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler
from typing import Any

from syncbit import tls

# Body refusals are errors of the one tree (servers answer them by its status table);
# BodyError is re-exported for the servers that catch it.
from syncbit.errors import BodyError, LengthRequiredError, PayloadTooLargeError

log = logging.getLogger("syncbit.serving")

IDLE_TIMEOUT = 120.0  # seconds a connection may sit between (or inside) requests
MAX_JSON_DEPTH = 32  # nesting of arrays/objects in a request body: every body is shallow


@dataclass(frozen=True)
class Limits:
    """How many connections a server keeps open, and for how long when idle."""

    max_connections: int = 1024  # in all: each is a thread
    max_per_client: int = 256  # from one client address
    idle_timeout: float = IDLE_TIMEOUT  # seconds between (or inside) requests


def body_length(headers: Message, limit: int) -> int:
    """The Content-Length of a request, checked before a byte of the body is read.

    Raises BodyError: LengthRequiredError for a chunked body (no length to check),
    PayloadTooLargeError for one over `limit` (the route's limit), BodyError itself for a
    malformed length.
    """
    if headers.get("Transfer-Encoding", "").strip().lower() not in ("", "identity"):
        raise LengthRequiredError("request bodies need a Content-Length")
    raw = headers.get("Content-Length")
    if raw is None or not raw.strip():
        return 0
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 18:  # isdigit also admits no sign, no spaces
        raise BodyError(f"invalid Content-Length {raw[:40]!r}")
    length = int(raw)
    if length > limit:
        what = "takes no request body" if limit == 0 else f"takes at most {limit} bytes"
        raise PayloadTooLargeError(f"request body of {length} bytes refused: this endpoint {what}")
    return length


def json_depth_ok(doc: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `doc` (decoded JSON) nests arrays/objects at most `limit` deep. Iterative:
    a deep document must not recurse here either."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def loads_bounded(raw: bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` of a request body whose nesting is at most `limit` deep.

    Raises ValueError (with the reason) for invalid JSON and for nesting deeper than the
    limit: the C decoder recurses once per level and raises RecursionError around a
    thousand levels, which must be a client error, not a server failure.
    """
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ValueError(f"nested deeper than {limit} levels") from None
    if not json_depth_ok(doc, limit):
        raise ValueError(f"nested deeper than {limit} levels")
    return doc


class BoundedHandler(BaseHTTPRequestHandler):
    """A request handler whose connection is dropped once idle for the server's
    `idle_timeout` (a timeout on every socket read and write)."""

    server: BoundedServer
    # What a request line too broken to name a version is answered in: with the stdlib's
    # HTTP/0.9 the refusal would go out without a status line.
    default_request_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout  # type: ignore[misc]  # per connection
        super().setup()


class BoundedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A thread-per-connection TCP server whose connections are capped in all and per
    client address (see the module docstring). Subclasses set the handler and limits."""

    allow_reuse_address = True
    daemon_threads = True
    # Many clients connect at once (every node at start-up, a flood that is refused here):
    # socketserver's default backlog of 5 drops their SYNs, costing each a second's retry.
    request_queue_size = 1024
    # What a refused connection reads before it is closed; servers may say it in JSON.
    refusal_body = b"too many connections\n"
    refusal_type = "text/plain"
    # Serve TLS to clients that open a TLS session (set by servers configured with one).
    tls: ssl.SSLContext | None = None

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[socketserver.BaseRequestHandler],
        limits: Limits,
        family: socket.AddressFamily = socket.AF_INET,
    ) -> None:
        self.address_family = family
        self.limits = limits
        self._conns: dict[socket.socket, str] = {}  # open connection -> client address
        self._per_client: Counter[str] = Counter()
        self._conn_lock = threading.Lock()
        self.refused_connections = 0
        super().__init__(address, handler)

    def open_connections(self) -> list[socket.socket]:
        """The connections open now."""
        with self._conn_lock:
            return list(self._conns)

    def process_request(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0]) if isinstance(client_address, tuple) else ""
        with self._conn_lock:
            over = (
                len(self._conns) >= self.limits.max_connections
                or self._per_client[host] >= self.limits.max_per_client
            )
            if over:
                self.refused_connections += 1
            else:
                self._conns[request] = host
                self._per_client[host] += 1
        if over:
            self._refuse(request)
            return
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 and close, from the accepting thread: the few bytes fit the empty
        send buffer of a new socket, and a client that does not read loses them."""
        head = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            f"Content-Type: {self.refusal_type}\r\n"
            f"Content-Length: {len(self.refusal_body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(head + self.refusal_body)
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_RDWR)
        request.close()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Serve one connection, over TLS when the client opens it so (`syncbit.tls`: the
        handshake runs here, in the connection's own thread, never the accepting one)."""
        try:
            conn = tls.accept(request, self.tls)
        except OSError as exc:  # ssl.SSLError too: a failed handshake is the client's
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        if conn is request:
            super().finish_request(conn, client_address)
            return
        self._swap(request, conn)  # the TLS socket owns the descriptor now
        try:
            super().finish_request(conn, client_address)
        finally:
            self._swap(conn, request)  # `shutdown_request` gets the accepted socket
            tls.close_quietly(conn)

    def _swap(self, old: socket.socket, new: socket.socket) -> None:
        with self._conn_lock:
            host = self._conns.pop(old, None)
            if host is not None:
                self._conns[new] = host

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            host = self._conns.pop(request, None)
            if host is not None:
                self._per_client[host] -= 1
                if self._per_client[host] <= 0:
                    del self._per_client[host]
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished or stalled is routine; anything else is logged once,
        never printed raw to stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("connection from %s dropped: %s", client_address, exc)
        else:
            log.exception("unexpected error serving %s", client_address)

    def drop_connections(self) -> None:
        """Wake handler threads parked on idle keep-alive connections so they exit."""
        for conn in self.open_connections():
            with contextlib.suppress(OSError):  # already closed by the peer
                conn.shutdown(socket.SHUT_RDWR)


__all__ = [
    "IDLE_TIMEOUT",
    "MAX_JSON_DEPTH",
    "BodyError",
    "BoundedHandler",
    "BoundedServer",
    "Limits",
    "body_length",
    "json_depth_ok",
    "loads_bounded",
]
