"""The HTTP server plumbing shared by the test servers (origin, Hub, Kubernetes API): keep-alive
connections tracked so `stop()` ends them, no DNS at bind, quiet logs. Test servers only;
nothing in the product imports this."""

from __future__ import annotations

import contextlib
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, BinaryIO, Protocol, Self


class LoopbackServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256  # the default 5 drops SYNs when clients open many connections

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall for
        # seconds on machines without DNS; a loopback server needs none of it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns[conn] = threading.current_thread()

    def untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.pop(conn, None)

    def drop_connections(self, timeout: float = 5.0) -> None:
        """Wake every handler blocked on a keep-alive connection and wait for it to end."""
        with self._conns_lock:
            conns = dict(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in conns.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away mid-request: nothing to report
        super().handle_error(request, client_address)


UNSATISFIABLE = "unsatisfiable"


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """One `bytes=` range -> (first, last); None to ignore the header (send the whole
    body); or UNSATISFIABLE."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # multipart ranges are not supported: a full 200 is allowed instead
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if not first:
            suffix = int(last)
            if suffix <= 0 or size == 0:
                return UNSATISFIABLE
            return max(0, size - suffix), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or (last and end < start):
        return None  # syntactically invalid: ignored, as RFC 9110 14.2 allows
    if start >= size:
        return UNSATISFIABLE
    return start, min(end, size - 1)


@dataclass(kw_only=True)
class ServedCounts:
    """What a test server's handler threads share with its owner about what it served:
    body bytes in all and by path, and the status every request fails with while the test
    sets one. Guarded by `lock` (re-entrant: a server's own state may take it again)."""

    fail_with: int | None = None
    bytes_served: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def count(self, path: str, n: int) -> None:
        """`n` body bytes served for `path` (negative: taken back, as a HEAD's were)."""
        with self.lock:
            self.bytes_served += n
            total = self.by_path.get(path, 0) + n
            if total:
                self.by_path[path] = total
            else:
                self.by_path.pop(path, None)

    def reset(self) -> None:
        with self.lock:
            self.bytes_served = 0
            self.by_path = {}


class CountingOwner:
    """The owner's side of `ServedCounts` (its `_state`): what the tests read and set."""

    _state: ServedCounts

    @property
    def bytes_served(self) -> int:
        with self._state.lock:
            return self._state.bytes_served

    @property
    def bytes_by_path(self) -> dict[str, int]:
        with self._state.lock:
            return dict(self._state.by_path)

    def reset_stats(self) -> None:
        self._state.reset()

    @property
    def fail_with(self) -> int | None:
        return self._state.fail_with

    @fail_with.setter
    def fail_with(self, status: int | None) -> None:
        self._state.fail_with = status


class TrackedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sys_version = ""
    timeout = 120.0  # idle keep-alive connections end after this
    server: LoopbackServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without NODELAY small responses can
        # wait for a delayed ACK (40 ms per request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        return None  # quiet: tests and benchmarks read their own output

    def _count(self, key: str, n: int) -> None:
        """Record `n` body bytes served for `key` (negative: taken back)."""
        raise NotImplementedError

    def _simple(
        self,
        status: int,
        body: str | bytes,
        content_type: str = "text/plain; charset=utf-8",
        head: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            try:
                self.wfile.write(data)
            except OSError:
                self.close_connection = True

    def _send_body(self, f: BinaryIO, start: int, length: int, key: str) -> None:
        # Counted before sending, so a client that has received the whole body always sees
        # it counted; whatever did not go out is taken back below.
        self._count(key, length)
        f.seek(start)
        try:
            self.connection.sendfile(f, start, length)
        except OSError:
            self.close_connection = True
        finally:
            # socket.sendfile leaves the file position after the last byte actually sent,
            # also when it fails half-way.
            unsent = length - (f.tell() - start)
            if unsent:
                self._count(key, -unsent)
                # The file shrank or the client left: the promised Content-Length was not met.
                self.close_connection = True

    def _drain_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if length > 0:
            self.rfile.read(length)


class ServedInThread:
    """One `LoopbackServer` served from a background thread: `start()` (idempotent; a
    stopped server starts again on the same port), `stop()` (ends open connections too),
    and a context manager. Subclasses set `host`/`port` and build the server."""

    host: str
    port: int
    _server: LoopbackServer | None = None
    _thread: threading.Thread | None = None

    def _make_server(self) -> LoopbackServer:
        raise NotImplementedError

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = self._make_server()
        self.port = server.server_port
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__.lower()}-{self.port}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop listening and end every open connection; the object's state remains."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        server.drop_connections()
        thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Stoppable(Protocol):
    port: int

    def stop(self) -> None: ...


def serve_until_signal(server: _Stoppable) -> int:
    """The `python -m` entry points: announce `READY <port>`, run until SIGTERM/SIGINT."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"READY {server.port}", flush=True)
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
    return 0
