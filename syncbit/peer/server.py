"""The node's chunk server: `GET /v1/objects/<object>/data` + `Range` -> 206 and the bytes,
by `sendfile` from the object file, in threads outside the trio loop. Never serves a byte
that is not durable and indexed here, and nothing but chunk data (other routes plug in).
"""

from __future__ import annotations

import os
import re
import select
import ssl
import threading

from syncbit import tls
from syncbit.credentials import Role, Verifier
from syncbit.errors import SyncbitError
from syncbit.peer.port import PortHandler, PortServer, Route
from syncbit.serving import Limits
from syncbit.store import ObjectStore

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
    """Upload slots: prefetch transfers served at once (0: any number), and counters."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.active = 0
        self.refused = 0  # prefetch transfers answered 503 (busy)
        self.bytes_served = 0
        self._lock = threading.Lock()  # handler threads enter and leave concurrently

    def enter(self, prefetch: bool) -> bool:
        """Take an upload slot; a prefetch transfer gets none when all are taken."""
        with self._lock:
            if prefetch and self.slots and self.active >= self.slots:
                self.refused += 1
                return False
            self.active += 1
            return True

    def leave(self, sent: int) -> None:
        with self._lock:
            self.active -= 1
            self.bytes_served += sent


class ChunkRoute:
    """`GET /v1/objects/<object>/data`: durable chunks of this node's objects.

    404 if any covered chunk is not held. A prefetch transfer says so (`X-Syncbit-Priority:
    prefetch`) and gets 503 when every upload slot is taken: the asker tries another
    holder, so uploads spread over the holders of a chunk instead of piling onto one. A
    reader's transfer is never refused. Needs a node (or admin) credential when the daemon
    has a token_file; with TLS, plain HTTP only if `peer_data_tls` is off (`plain_data`).
    Connections are capped and dropped when idle (`syncbit.serving`); a Range names at
    most 19-digit offsets.
    """

    def __init__(self, store: ObjectStore, slots: _Slots, plain_data: bool) -> None:
        self.store = store
        self.slots = slots
        self.plain_data = plain_data

    def handle(self, request: PortHandler, method: str) -> bool:
        match = _DATA_PATH.match(request.path) if method == "GET" else None
        if match is None:
            return False
        if not request.secure(plain_ok=self.plain_data) or not request.authorized(Role.NODE):
            return True
        obj = self.store.get(match.group(1))
        span = _RANGE.fullmatch(request.headers.get("Range", "").strip())
        if obj is None or not span:
            request.plain(404 if obj is None else 416, "not held\n" if obj is None else "range\n")
            return True
        first, last = int(span.group(1)), int(span.group(2))
        length = last - first + 1
        # In use from the presence check to the last byte sent: the cache does not evict
        # the object meanwhile (a hole punched under sendfile would send zeros).
        with self.store.reading(obj) as reader:
            if last >= obj.size or length <= 0 or not obj.has_range(first, length):
                request.plain(404, "not held\n")
                return True
            prefetch = request.headers.get(PRIORITY_HEADER, "") == "prefetch"
            if not self.slots.enter(prefetch):
                request.plain(503, "busy: every upload slot is taken\n")
                return True
            sent = 0
            try:
                _send(request, reader.fd(), first, last, obj.size)
                sent = length
            finally:
                self.slots.leave(sent)
        return True


def _send(request: PortHandler, fd: int, first: int, last: int, size: int) -> None:
    length = last - first + 1
    request.send_response(206)
    request.send_header("Content-Type", "application/octet-stream")
    request.send_header("Content-Length", str(length))
    request.send_header("Content-Range", f"bytes {first}-{last}/{size}")
    request.end_headers()
    if tls.is_tls(request.connection):
        _send_tls(request, fd, first, length)
    else:
        _sendfile(request, fd, first, last + 1)


def _sendfile(request: PortHandler, fd: int, offset: int, end: int) -> None:
    out = request.connection.fileno()
    writable = select.poll()
    writable.register(out, select.POLLOUT)
    while offset < end:
        try:
            sent = os.sendfile(out, fd, offset, end - offset)
        except BlockingIOError:
            # The socket has a timeout (so it is non-blocking underneath): wait for room,
            # at most the idle timeout for a peer that stopped reading.
            if not writable.poll(request.server.limits.idle_timeout * 1000):
                raise TimeoutError("peer stopped reading") from None
            continue
        if sent == 0:
            raise ConnectionError("peer closed the connection")
        offset += sent


def _send_tls(request: PortHandler, fd: int, offset: int, length: int) -> None:
    """The bytes through the TLS session: no sendfile (the kernel cannot encrypt them for
    Python's ssl), so pread into one reused buffer and write."""
    request.wfile.flush()
    buf = bytearray(min(length, _TLS_BLOCK))
    view = memoryview(buf)
    end = offset + length
    while offset < end:
        n = os.preadv(fd, [view[: min(len(buf), end - offset)]], offset)
        if n <= 0:
            raise ConnectionError("object file shorter than its index says")
        request.connection.sendall(view[:n])
        offset += n


class PeerServer:
    """The node's port on `listen` ("host:port"), running in its own threads: chunk data,
    and whatever routes `add_routes` plugs in (the node's local API), tried after it.

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
        self._server.routes.append(ChunkRoute(store, self._slots, plain_data))
        self._thread: threading.Thread | None = None

    def add_routes(self, route: Route) -> None:
        """Serve `route`'s endpoints on this port too (before `start`)."""
        self._server.routes.append(route)

    def set_verifier(self, verifier: Verifier) -> None:
        """Check credentials with `verifier` (the cluster's public key) from now on."""
        self._server.verifier = verifier

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
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="syncbit-peer", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
