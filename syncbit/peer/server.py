"""The node's chunk server: `GET /v1/objects/<object>/data` + `Range` -> 206 and the bytes,
by `sendfile` from the object file in a worker thread (the file may be read from disk),
on the node's port (`peer.port`: async, its own loop). Never serves a byte that is not
durable and indexed here, and nothing but chunk data (other routes plug in).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import ssl

import trio

from syncbit.credentials import Role, Verifier
from syncbit.errors import SyncbitError
from syncbit.httpd import Response
from syncbit.peer.port import PortRequest, PortServer, Route, plain
from syncbit.serving import Limits
from syncbit.store import ObjectReader, ObjectStore

PRIORITY_HEADER = "X-Syncbit-Priority"
_TLS_BLOCK = 1 << 20  # bytes per write of chunk data over TLS
_DATA_PATH = re.compile(r"^/v1/objects/([0-9a-f]{64})/data$")
# One range, offsets of at most 19 digits (a longer number is no file offset, and parsing
# thousands of digits costs CPU and raises ValueError).
_RANGE = re.compile(r"bytes=(\d{1,19})-(\d{1,19})")

# A node's readers and prefetch, every other node's fetchers and the pods' `syncbit wait`s;
# one address may hold a quarter.
LIMITS = Limits(max_connections=1024, max_per_client=256)


class _Slots:
    """Upload slots: prefetch transfers served at once (0: any number), and counters.
    Entered and left in the port's loop; read from the node's (`load`)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.active = 0
        self.refused = 0  # prefetch transfers answered 503 (busy)
        self.bytes_served = 0

    def enter(self, prefetch: bool) -> bool:
        """Take an upload slot; a prefetch transfer gets none when all are taken."""
        if prefetch and self.slots and self.active >= self.slots:
            self.refused += 1
            return False
        self.active += 1
        return True

    def leave(self, sent: int) -> None:
        self.active -= 1
        self.bytes_served += sent


class ChunkRoute:
    """`GET /v1/objects/<object>/data`: durable chunks of this node's objects.

    404 if any covered chunk is not held. A prefetch transfer says so (`X-Syncbit-Priority:
    prefetch`) and gets 503 when every upload slot is taken: the asker tries another
    holder, so uploads spread over the holders of a chunk instead of piling onto one. A
    reader's transfer is never refused. Needs a node (or admin) credential when the daemon
    has a token_file; with TLS, plain HTTP only if `peer_data_tls` is off (`plain_data`).
    Connections are capped and dropped when idle (`syncbit.httpd`); a Range names at
    most 19-digit offsets.
    """

    def __init__(self, store: ObjectStore, slots: _Slots, plain_data: bool) -> None:
        self.store = store
        self.slots = slots
        self.plain_data = plain_data
        # Sends running at once: each may hold a worker thread while the disk reads.
        self.threads = trio.CapacityLimiter(64)

    async def handle(self, request: PortRequest) -> Response | None:
        match = _DATA_PATH.match(request.path) if request.method == "GET" else None
        if match is None:
            return None
        request.secure(plain_ok=self.plain_data)
        request.authorize(Role.NODE)
        obj = self.store.get(match.group(1))
        span = _RANGE.fullmatch(request.headers.get("range", "").strip())
        if obj is None or not span:
            return plain(404, "not held\n") if obj is None else plain(416, "range\n")
        first, last = int(span.group(1)), int(span.group(2))
        length = last - first + 1
        # In use from the presence check to the last byte sent: the cache does not evict
        # the object meanwhile (a hole punched under sendfile would send zeros).
        held = contextlib.ExitStack()
        reader = held.enter_context(self.store.reading(obj))
        if last >= obj.size or length <= 0 or not obj.has_range(first, length):
            held.close()
            return plain(404, "not held\n")
        prefetch = request.headers.get(PRIORITY_HEADER.lower(), "") == "prefetch"
        if not self.slots.enter(prefetch):
            held.close()
            return plain(503, "busy: every upload slot is taken\n")
        sender = _ChunkSender(reader, first, length, held, self.slots, self.threads)
        headers = {"Content-Range": f"bytes {first}-{last}/{obj.size}"}
        return Response(
            206, content_type="application/octet-stream", headers=headers, sender=sender
        )


class _ChunkSender:
    """The bytes of one range of an object file (`httpd.BodySender`): sendfile on a plain
    connection, read and written through the TLS session otherwise. Holds the object in
    use and its upload slot until `close`."""

    def __init__(
        self,
        reader: ObjectReader,
        offset: int,
        length: int,
        held: contextlib.ExitStack,
        slots: _Slots,
        threads: trio.CapacityLimiter,
    ) -> None:
        self.reader, self.offset, self.length = reader, offset, length
        self._held, self._slots, self._threads = held, slots, threads
        self._sent = 0

    async def send(self, stream: trio.abc.Stream, idle: float) -> None:
        if isinstance(stream, trio.SocketStream):
            out = stream.socket.fileno()
            end = self.offset + self.length
            await trio.to_thread.run_sync(
                _sendfile, out, self.reader, self.offset, end, idle, limiter=self._threads
            )
        else:
            await self._send_tls(stream, idle)
        self._sent = self.length

    async def _send_tls(self, stream: trio.abc.Stream, idle: float) -> None:
        """No sendfile through TLS (the kernel cannot encrypt for Python's ssl): read a
        block in a worker thread (the disk may be read), write it through the session."""
        buf = bytearray(min(self.length, _TLS_BLOCK))
        view = memoryview(buf)
        offset, end = self.offset, self.offset + self.length
        while offset < end:
            part = view[: min(len(buf), end - offset)]
            n = await trio.to_thread.run_sync(
                _pread, self.reader, part, offset, limiter=self._threads
            )
            if n <= 0:
                raise ConnectionError("object file shorter than its index says")
            with trio.fail_after(idle):  # TooSlowError: a peer that stopped reading
                await stream.send_all(view[:n])
            offset += n

    def close(self) -> None:
        self._slots.leave(self._sent)
        self._held.close()


def _pread(reader: ObjectReader, into: memoryview, offset: int) -> int:
    """Blocking (worker thread): bytes of the object file from `offset` into `into`."""
    return os.preadv(reader.fd(), [into], offset)


def _sendfile(out: int, reader: ObjectReader, offset: int, end: int, idle: float) -> None:
    """Blocking (worker thread): bytes [offset, end) of the object file (opened here on
    its first use) to the socket `out`, which the port's loop made non-blocking: wait for
    room, at most `idle` for a peer that stopped reading."""
    fd = reader.fd()
    writable = select.poll()
    writable.register(out, select.POLLOUT)
    while offset < end:
        try:
            sent = os.sendfile(out, fd, offset, end - offset)
        except BlockingIOError:
            if not writable.poll(idle * 1000):
                raise TimeoutError("peer stopped reading") from None
            continue
        if sent == 0:
            raise ConnectionError("peer closed the connection")
        offset += sent


class PeerServer:
    """The node's port on `listen` ("host:port"), served by its own loop in a thread of
    its own: chunk data, and whatever routes `add_routes` plugs in (the node's local API),
    tried after it.

    Args:
        upload_slots: prefetch transfers served at once (0: any number).
        limits: connection caps and the idle timeout.
        auth_required: every route that asks needs a credential (the daemon has a
            token_file); they are checked once `set_verifier` gave the cluster's key.
        tls_context: serve TLS (plain HTTP stays for loopback, and routes that allow it).
        plain_data: with TLS, also serve chunk data over plain HTTP (`peer_data_tls: false`).
    """

    def __init__(
        self,
        store: ObjectStore,
        listen: str,
        upload_slots: int = 0,
        *,
        limits: Limits = LIMITS,
        auth_required: bool = False,
        tls_context: ssl.SSLContext | None = None,
        plain_data: bool = False,
    ) -> None:
        host, _, port = listen.rpartition(":")
        try:
            self._server = PortServer(
                (host.strip("[]"), int(port)), limits, auth_required, tls_context
            )
        except OSError as exc:  # address in use, not ours to bind: one line, no traceback
            raise SyncbitError(
                f"the daemon cannot listen on {listen}: {exc.strerror or exc}"
            ) from exc
        self._slots = _Slots(upload_slots)
        self._server.port.routes.append(ChunkRoute(store, self._slots, plain_data))

    def add_routes(self, route: Route) -> None:
        """Serve `route`'s endpoints on this port too (before `start`)."""
        self._server.port.routes.append(route)

    def set_verifier(self, verifier: Verifier) -> None:
        """Check credentials with `verifier` (the cluster's public key) from now on."""
        self._server.port.verifier = verifier

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    @property
    def load(self) -> int:
        """Transfers in progress: what the scheduler's peer policy balances on."""
        return self._slots.active

    @property
    def bytes_served(self) -> int:
        return self._slots.bytes_served

    @property
    def refused(self) -> int:
        """Prefetch transfers turned away because every upload slot was taken."""
        return self._slots.refused

    def start(self) -> None:
        self._server.start("syncbit-peer")

    def stop(self) -> None:
        self._server.stop()
