"""The accepting side of syncbit's async HTTP servers: a bound socket, connection caps, TLS
and plain HTTP on one port, and a coroutine per connection.

Owns how many connections may be open (`serving.Limits`): at most `max_connections` in
all and `max_per_client` from one client address; one over a cap is answered 503 and
closed at once, before anything of it is read. With a TLS context, the first byte of a
connection decides (`syncbit.tls`: a handshake record is served over TLS, anything else
as plain HTTP, which the application admits only for probes, metrics and loopback); the
peek and the handshake wait at most HANDSHAKE_TIMEOUT. A stalled client costs its own
coroutine only. It never parses HTTP (`connection` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import socket
import ssl
from collections import Counter

import trio

from syncbit.httpd.connection import App, ErrorBody, IdleWatch, serve_connection
from syncbit.serving import Limits

log = logging.getLogger("syncbit.httpd")

HANDSHAKE_TIMEOUT = 10.0  # seconds a client may take to send its first byte / handshake
_HANDSHAKE = 0x16  # the first byte of every TLS record that opens a connection
_BACKLOG = 4096  # many clients connect at once (every node at start-up)
_ACCEPT_BATCH = 256  # connections accepted per wake-up of the accepting task


def bind(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """A listening socket on host:port (port 0: any); OSError when it cannot be had."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit, as Go's runtime
    does for every program: a server of thousands of connections needs a descriptor for
    each, and the usual soft limit (1,024 under systemd) is a relic of select(). Returns
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))  # the hard one stays
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def descriptor_budget() -> int:
    """Connections this process can hold: its soft limit of open files less what it has
    open now and a reserve for what it opens later (state, logs, its own outgoing
    connections, the one a refused connection takes until it is closed)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    return max(16, soft - open_now - min(1024, soft // 4))


class Listener:
    """Serves `app` on a bound socket until cancelled (`serve` in a nursery). It holds at
    most `limits.max_connections`, and never more than the process has descriptors for
    (`descriptor_budget`): past that, accept() would fail with EMFILE, and a connection
    refused with 503 tells its client more than one left in the backlog."""

    def __init__(
        self,
        sock: socket.socket,
        app: App,
        limits: Limits,
        error_body: ErrorBody,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.sock = sock
        self.app = app
        budget = descriptor_budget()
        if budget < limits.max_connections:
            log.info(
                "this process may open %d files: at most %d connections (not %d)",
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                budget,
                limits.max_connections,
            )
            limits = dataclasses.replace(limits, max_connections=budget)
        self.limits = limits
        self.error_body = error_body
        self.tls = tls_context
        self.open = 0
        self.refused = 0  # connections over a cap, since start
        self._per_client: Counter[str] = Counter()
        self.idle = IdleWatch(limits.idle_timeout)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(self.idle.run)
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: wait for a descriptor
                    log.warning("accepting a connection failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._connection, stream)
                for queued in self._queued():
                    nursery.start_soon(self._connection, queued)

    def _queued(self) -> list[trio.SocketStream]:
        """The connections already waiting to be accepted, up to _ACCEPT_BATCH, without
        waiting: one accept per pass of the trio loop admits only a few connections a
        second while thousands of tasks are runnable (a cluster's nodes starting at
        once), and those then time out in the backlog."""
        found: list[trio.SocketStream] = []
        while len(found) < _ACCEPT_BATCH:
            try:
                conn, _ = self.sock.accept()  # non-blocking: trio set it so
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE and friends: the next accept() waits
                log.warning("accepting a connection failed: %s", exc)
                break
            found.append(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
        return found

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            host = str(stream.socket.getpeername()[0])
        except OSError:
            await stream.aclose()
            return
        limits = self.limits
        if self.open >= limits.max_connections or self._per_client[host] >= limits.max_per_client:
            self.refused += 1
            await self._refuse(stream)
            return
        self.open += 1
        self._per_client[host] += 1
        try:
            served, tls = await self._secure(stream)
            if served is not None:
                await serve_connection(served, host, tls, self.app, self.idle, self.error_body)
        finally:
            self.open -= 1
            self._per_client[host] -= 1
            if self._per_client[host] <= 0:
                del self._per_client[host]
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _secure(self, stream: trio.SocketStream) -> tuple[trio.abc.Stream | None, bool]:
        """The stream to serve: the TLS session when the client opens one, else itself."""
        if self.tls is None:
            return stream, False
        first = b""
        with trio.move_on_after(min(HANDSHAKE_TIMEOUT, self.limits.idle_timeout)):
            with contextlib.suppress(OSError):
                first = await stream.socket.recv(1, socket.MSG_PEEK)
        if not first:
            return None, False  # gone, or silent
        if first[0] != _HANDSHAKE:
            return stream, False
        tls = trio.SSLStream(stream, self.tls, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            log.debug("TLS handshake failed: %s", exc)
            return None, False
        return tls, True

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Answer 503 and close, without reading anything of the connection."""
        body = self.error_body(503, "too many connections")
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        ).encode()
        with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.send_all(head + body)
            await stream.send_eof()
            # What the client sent meanwhile is read and dropped: closing on unread bytes
            # resets the connection, and the client could lose the answer.
            with trio.move_on_after(0.2):
                while await stream.receive_some(65536):
                    pass
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()


__all__ = [
    "HANDSHAKE_TIMEOUT",
    "Listener",
    "bind",
    "descriptor_budget",
    "raise_descriptor_limit",
]
