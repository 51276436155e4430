"""Peer service: serves durable chunks of this node's objects to other nodes, and the
client side that pulls them. Never serves a byte that is not durable and indexed here;
never returns a peer's bytes without the caller verifying them against a known digest.

Wire format: `GET /v1/objects/<object>/data` with `Range: bytes=a-b` -> 206 and the bytes,
sent with `sendfile` straight from the object file; 404 if any covered chunk is not held.
A prefetch transfer says so (`X-Syncbit-Priority: prefetch`) and gets 503 when the node
already serves `upload_slots` transfers: the asker tries another holder, so uploads spread
over the holders of a chunk instead of piling onto one. A reader's transfer is never
refused.
Connections are thread-per-connection outside the trio loop, so serving never blocks FUSE.
The same port answers node-local control requests (`/v1/local/...`) by handing them to
the daemon's `Control` callback: from loopback anything, from elsewhere only reading a
dataset's progress (what `syncbit wait` in a pod's initContainer asks).

Who may ask what, when the daemon has a `token_file` (`_authorized`): chunk data only a
node (or admin) credential, never a reader's or none; reading progress and the cache
listing a reader credential or better; anything that changes the node (pull, evict, gc)
admin. Credentials are checked with the cluster's public key, which this node learns when
it registers (it never needs the cluster secret). Probes (`/healthz`, `/readyz`) and
`/metrics` are open. With `tls_cert`, the port speaks TLS; plain HTTP is then admitted only
from loopback, for probes and metrics, and for chunk data if `peer_data_tls` is off.

Bounded: connections are capped in all and per client, and dropped when idle
(`syncbit.serving`); a control body is judged by its Content-Length, after the caller is
known to be allowed, and refused (413) unread over `_CONTROL_BODY`; a JSON body nests at
most a few levels; a Range names at most 19-digit offsets.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import select
import ssl
import threading
from collections.abc import Callable
from typing import Any

from syncbit import tls
from syncbit.auth import bearer, drain_refused
from syncbit.credentials import Role, Verifier
from syncbit.errors import (
    INTERNAL_ERROR,
    DaemonUnreachableError,
    ForbiddenError,
    MethodNotAllowedError,
    NotFoundError,
    PeerBusyError,
    PeerError,
    SyncbitError,
    UnauthorizedError,
    UserError,
    error_doc,
    http_status,
)
from syncbit.serving import (
    BodyError,
    BoundedHandler,
    BoundedServer,
    Limits,
    body_length,
    loads_bounded,
)
from syncbit.store import ObjectStore
from syncbit.wire import Pool, WireError, parse_content_range

log = logging.getLogger("syncbit.peer")

# (method, path, JSON body) -> the JSON answer; runs in a server thread. A SyncbitError it
# raises is answered with the status of `errors.HTTP_STATUS`, anything else with a 500.
Control = Callable[[str, str, dict[str, Any]], dict[str, Any]]

PRIORITY_HEADER = "X-Syncbit-Priority"
_TLS_BLOCK = 1 << 20  # bytes per write of chunk data over TLS
_DATA_PATH = re.compile(r"^/v1/objects/([0-9a-f]{64})/data$")
_PROGRESS_PATH = re.compile(r"^/v1/local/datasets/[^/?]+$")
# One range, offsets of at most 19 digits (a longer number is no file offset, and parsing
# thousands of digits costs CPU and raises ValueError).
_RANGE = re.compile(r"bytes=(\d{1,19})-(\d{1,19})")
_CONTROL_BODY = 64 * 2**10  # a control request body: {"dataset": name, "force": bool}


class _Handler(BoundedHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def parse_request(self) -> bool:
        self._body_done = False  # per request: whether its body was read
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue` is answered once the body is accepted (`_body`)."""
        return True

    def _close_if_body_unread(self) -> None:
        """A refusal leaves the request's body unread: it cannot be skipped safely, so the
        connection ends with this answer."""
        if self._body_done:
            return
        length = self.headers.get("Content-Length", "").strip()
        if length not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    def _plain(self, status: int, text: str) -> None:
        body = text.encode()
        self._close_if_body_unread()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict[str, Any] | None:
        """The JSON object of a control request, read only within `_CONTROL_BODY`; None
        once a refusal (400/411/413) has been sent."""
        try:
            length = body_length(self.headers, _CONTROL_BODY)
        except BodyError as exc:
            self._error(exc)
            return None
        if length and self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        raw = self.rfile.read(length) if length else b""
        if len(raw) != length:
            raise ConnectionError(f"client sent {len(raw)} of {length} body bytes")
        self._body_done = True
        try:
            body = loads_bounded(raw) if raw else {}
        except ValueError as exc:
            self._error(UserError(f"request body is not valid JSON: {exc}"))
            return None
        if not isinstance(body, dict):
            self._error(UserError("request body must be a JSON object"))
            return None
        return body

    def _error(self, exc: SyncbitError) -> None:
        """Answer `exc` with its status from the one error table, in JSON."""
        self._json(http_status(exc), error_doc(exc))

    def _refuse(self, exc: SyncbitError) -> None:
        """An error answer before the request's body was read: a small body is read and
        dropped (closing on unread bytes resets the connection, and the client may lose
        this answer); a larger one ends the connection instead."""
        if drain_refused(self):
            self._body_done = True
        self._error(exc)

    def _secure(self, data: bool = False) -> bool:
        """TLS, or no TLS needed: none configured, a client on this host, or chunk data
        with `peer_data_tls` off. Answers 403 itself when not."""
        server = self.server
        if server.tls is None or tls.is_tls(self.connection) or (data and server.plain_data):
            return True
        if ipaddress.ip_address(self.client_address[0]).is_loopback:
            return True
        self._refuse(ForbiddenError("this daemon requires TLS: use https://"))
        return False

    def _authorized(self, *roles: Role) -> bool:
        """Whether the request's credential has one of `roles` (admin has all); answers
        401, 403 or 503 itself when not. Open when the daemon has no token_file."""
        server = self.server
        if not server.auth_required:
            return True
        verifier = server.verifier
        if verifier is None:  # registered with no scheduler yet: nothing to check with
            self._refuse(
                DaemonUnreachableError("daemon starting: it does not know the cluster's key yet")
            )
            return False
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        try:
            if scheme.lower() != "bearer" or not value.strip():
                raise UnauthorizedError("missing or wrong cluster token (see token_file)")
            principal = verifier.verify(value.strip())
        except UnauthorizedError as exc:
            self._refuse(exc)
            return False
        if not principal.allows(*roles):
            need = " or ".join(r.value for r in roles) or "admin"
            self._refuse(
                ForbiddenError(
                    f"a {principal.role.value} credential may not do this (needs {need})"
                )
            )
            return False
        return True

    def _local(self, method: str) -> None:
        """Node-local control (pull, progress, cache): JSON both ways. Loopback clients may
        do anything; others may only read a dataset's progress."""
        control = self.server.control
        if control is None:
            # Listening already, not serving yet: the daemon is starting. 503 tells
            # `syncbit wait` (an initContainer racing the daemon) to try again.
            self._refuse(DaemonUnreachableError("daemon starting"))
            return
        loopback = ipaddress.ip_address(self.client_address[0]).is_loopback
        route = self.path.partition("?")[0]  # `syncbit wait` long-polls with ?wait=S
        progress = method == "GET" and bool(_PROGRESS_PATH.match(route))
        if not loopback and not progress:
            self._refuse(ForbiddenError("local control is for this host only"))
            return
        if not self._secure():
            return
        if progress or (method == "GET" and route in ("/v1/local/datasets", "/v1/local/cache")):
            roles: tuple[Role, ...] = (Role.READER,)
        else:
            roles = ()  # pull, cancel, evict, gc, verify: admin
        if not self._authorized(*roles):
            return
        body = self._body()  # only now: the caller may make this request
        if body is None:
            return
        try:
            status, doc = 200, control(method, self.path, body)
        except SyncbitError as exc:
            status, doc = http_status(exc), error_doc(exc)
            if status == INTERNAL_ERROR:
                log.warning("control request %s %s failed: %s", method, route, exc)
        except Exception as exc:  # one request's failure must not drop the connection
            log.exception("control request %s %s failed", method, route)
            status, doc = (
                INTERNAL_ERROR,
                error_doc(exc, "internal daemon error; see the daemon log"),
            )
        self._json(status, doc)

    def _json(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self._close_if_body_unread()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if self.path.startswith("/v1/local/"):
            self._local("POST")
        else:
            self._refuse(NotFoundError("no such endpoint"))

    def do_PUT(self) -> None:
        self._refuse(MethodNotAllowedError("method not allowed"))

    def do_DELETE(self) -> None:
        self._refuse(MethodNotAllowedError("method not allowed"))

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._plain(200, "ok\n")
            return
        if self.path == "/readyz":
            ready, why = self.server.readiness()
            self._plain(200 if ready else 503, f"{why}\n")
            return
        if self.path == "/metrics" and self.server.metrics is not None:
            body, content_type = self.server.metrics()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path.startswith("/v1/local/"):
            self._local("GET")
            return
        match = _DATA_PATH.match(self.path)
        if not match:
            self._refuse(NotFoundError("no such endpoint"))
            return
        if not self._secure(data=True) or not self._authorized(Role.NODE):
            return
        obj = self.server.store.get(match.group(1))
        rng = self.headers.get("Range", "")
        span = _RANGE.fullmatch(rng.strip())
        if obj is None or not span:
            self._plain(404 if obj is None else 416, "not held\n" if obj is None else "range\n")
            return
        first, last = int(span.group(1)), int(span.group(2))
        length = last - first + 1
        # In use from the presence check to the last byte sent: the cache does not evict
        # the object meanwhile (a hole punched under sendfile would send zeros).
        with self.server.store.reading(obj) as reader:
            if last >= obj.size or length <= 0 or not obj.has_range(first, length):
                self._plain(404, "not held\n")
                return
            prefetch = self.headers.get(PRIORITY_HEADER, "") == "prefetch"
            if not self.server.enter(prefetch):
                self._plain(503, "busy: every upload slot is taken\n")
                return
            try:
                self._send(reader.fd(), first, last, obj.size)
            finally:
                self.server.leave()

    def _send(self, fd: int, first: int, last: int, size: int) -> None:
        length = last - first + 1
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if tls.is_tls(self.connection):
            self._send_tls(fd, first, length)
        else:
            self._sendfile(fd, first, last + 1)
        self.server.bytes_served += length

    def _sendfile(self, fd: int, offset: int, end: int) -> None:
        out = self.connection.fileno()
        writable = select.poll()
        writable.register(out, select.POLLOUT)
        while offset < end:
            try:
                sent = os.sendfile(out, fd, offset, end - offset)
            except BlockingIOError:
                # The socket has a timeout (so it is non-blocking underneath): wait for room,
                # at most the idle timeout for a peer that stopped reading.
                if not writable.poll(self.server.limits.idle_timeout * 1000):
                    raise TimeoutError("peer stopped reading") from None
                continue
            if sent == 0:
                raise ConnectionError("peer closed the connection")
            offset += sent

    def _send_tls(self, fd: int, offset: int, length: int) -> None:
        """The bytes through the TLS session: no sendfile (the kernel cannot encrypt them
        for Python's ssl), so pread into one reused buffer and write."""
        self.wfile.flush()
        buf = bytearray(min(length, _TLS_BLOCK))
        view = memoryview(buf)
        end = offset + length
        while offset < end:
            n = os.preadv(fd, [view[: min(len(buf), end - offset)]], offset)
            if n <= 0:
                raise ConnectionError("object file shorter than its index says")
            self.connection.sendall(view[:n])
            offset += n


# A node's readers and prefetch, every other node's fetchers and the pods' `syncbit wait`s;
# one address may hold a quarter.
LIMITS = Limits(max_connections=1024, max_per_client=256)


class _Server(BoundedServer):
    def __init__(
        self,
        address: tuple[str, int],
        store: ObjectStore,
        upload_slots: int,
        limits: Limits,
        auth_required: bool,
        tls_context: ssl.SSLContext | None,
        plain_data: bool,
    ) -> None:
        self.store = store
        self.auth_required = auth_required
        self.verifier: Verifier | None = None
        self.tls = tls_context
        self.plain_data = plain_data
        self.upload_slots = upload_slots  # prefetch transfers served at once; 0: any number
        self.refused = 0  # prefetch transfers answered 503 (busy)
        self.control: Control | None = None
        self.readiness: Callable[[], tuple[bool, str]] = lambda: (True, "ok")
        self.metrics: Callable[[], tuple[bytes, str]] | None = None
        self.active = 0
        self.bytes_served = 0
        self._count_lock = threading.Lock()
        super().__init__(address, _Handler, limits)

    def enter(self, prefetch: bool) -> bool:
        """Take an upload slot; a prefetch transfer gets none when all are taken."""
        with self._count_lock:
            if prefetch and self.upload_slots and self.active >= self.upload_slots:
                self.refused += 1  # under the lock: handler threads refuse concurrently
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self._count_lock:
            self.active -= 1


class PeerServer:
    """The node's chunk server on `listen` ("host:port"), running in its own threads.

    Args:
        upload_slots: prefetch transfers served at once (0: any number).
        limits: connection caps and the idle timeout.
        auth_required: every route but the probes needs a credential (the daemon has a
            token_file); they are checked once `set_verifier` gave the cluster's key.
        tls_context: serve TLS (plain HTTP stays for probes, metrics and loopback).
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
            self._server = _Server(
                (host.strip("[]"), int(port)),
                store,
                upload_slots,
                limits,
                auth_required,
                tls_context,
                plain_data,
            )
        except OSError as exc:  # address in use, not ours to bind: one line, no traceback
            raise SyncbitError(
                f"the daemon cannot listen on {listen}: {exc.strerror or exc}"
            ) from exc
        self._thread: threading.Thread | None = None

    def set_verifier(self, verifier: Verifier) -> None:
        """Check credentials with `verifier` (the cluster's public key) from now on."""
        self._server.verifier = verifier

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def set_control(self, control: Control) -> None:
        """Serve node-local control requests (`/v1/local/...`) with `control`."""
        self._server.control = control

    def set_probes(
        self,
        readiness: Callable[[], tuple[bool, str]],
        metrics: Callable[[], tuple[bytes, str]],
    ) -> None:
        """`/readyz` answers `readiness()` (ready?, why); `/metrics` serves `metrics()`."""
        self._server.readiness = readiness
        self._server.metrics = metrics

    @property
    def load(self) -> int:
        """Transfers in progress: what the scheduler's peer policy balances on."""
        return self._server.active

    @property
    def bytes_served(self) -> int:
        return self._server.bytes_served

    @property
    def refused(self) -> int:
        """Prefetch transfers turned away because every upload slot was taken."""
        return self._server.refused

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="syncbit-peer", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class PeerClient:
    """Pulls byte ranges of objects from peers (blocking; worker threads only).

    Args:
        token: the node's peer credential (`set_token` replaces it when renewed).
        tls_context: dial peers over TLS, verifying their certificates with it.
        tls_name: the name peers' certificates carry (`peer_tls_name`); default: the
            address dialled.
    """

    def __init__(
        self,
        timeout: float = 10.0,
        token: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        tls_name: str | None = None,
    ) -> None:
        self._pool = Pool(timeout=timeout, ssl_context=tls_context, server_name=tls_name)
        self._scheme = "https" if tls_context is not None else "http"
        self._headers = bearer(token)

    def set_token(self, token: str | None) -> None:
        self._headers = bearer(token)

    def get_into(
        self, address: str, object_id: str, offset: int, buf: memoryview, prefetch: bool = False
    ) -> None:
        """Fill `buf` with the object's bytes at `offset` from the peer. A `prefetch`
        transfer may be refused (PeerBusyError) when the peer's upload slots are taken."""
        url = f"{self._scheme}://{address}/v1/objects/{object_id}/data"
        headers = {**self._headers, PRIORITY_HEADER: "prefetch"} if prefetch else self._headers
        try:
            resp = self._pool.get_into(url, offset, buf, headers)
        except WireError as exc:
            raise PeerError(f"peer {address}: {exc}") from exc
        if resp.status == 503:
            raise PeerBusyError(f"peer {address} is busy")
        if resp.status != 206:
            raise PeerError(f"peer {address} answered HTTP {resp.status} for {object_id[:12]}")
        first, last, _ = parse_content_range(resp.headers.get("content-range", ""))
        if first != offset or last != offset + len(buf) - 1:
            raise PeerError(f"peer {address} sent the wrong range")

    def close(self) -> None:
        self._pool.close()
