"""Blocking HTTP/1.1 range GETs straight into caller buffers: the bulk byte path.

Used for source bodies and peer chunks. Runs only in worker threads (never on the trio
loop). httpx tops out near 0.6 GB/s on loopback; `recv_into` a preallocated buffer over
keep-alive connections reaches the socket's speed. Control traffic uses httpx instead.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

# WireError is defined with the other errors; callers of the pool may take it from here.
from syncbit.errors import ConnectError as ConnectError
from syncbit.errors import WireError as WireError
from syncbit.redact import redact_url

_HEAD_LIMIT = 64 * 1024
_MAX_REDIRECTS = 5


class RedirectRules(Protocol):
    """What a caller allows of redirects and connections (`sources.fences.RedirectPolicy`)."""

    def next_hop(
        self, current: str, location: str, headers: dict[str, str]
    ) -> tuple[str, dict[str, str]]:
        """The next URL and the headers to send there; raises if the redirect is refused."""
        ...

    def check_address(self, url: str, address: str) -> None:
        """Raise if a connection for `url` may not go to the peer address `address`."""
        ...


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    url: str  # the URL that answered (after the redirects followed)
    body: bytes = b""  # a small error answer's body (an S3 error code), else empty
    sent: dict[str, str] = field(default_factory=dict)  # the headers sent to `url`


class Abort:
    """Ends transfers in progress from another thread: `fire()` shuts down the sockets they
    use (now, or as soon as they have one), so a blocking receive returns at once and each
    transfer fails with WireError. A connection is never pooled after a fire. One Abort may
    cover several transfers at once, each in its own thread (a read and its head sample).
    `received` counts the body bytes its transfers have received so far, and `quiet_for`
    how long they have received none (their progress, for whoever judges whether they
    straggle or stalled)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: dict[int, socket.socket] = {}  # by the thread that transfers on it
        self.fired = False
        self.received = 0
        self._last = time.monotonic()  # made, or the last body bytes received

    def got(self, nbytes: int) -> None:
        with self._lock:
            self.received += nbytes
            self._last = time.monotonic()

    def quiet_for(self) -> float:
        """Seconds since its transfers last received body bytes (since it was made, before
        the first)."""
        return time.monotonic() - self._last

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            socks = list(self._socks.values())
        for sock in socks:
            _shutdown(sock)

    def attach(self, sock: socket.socket | None) -> None:
        """The socket this thread's transfer uses from now on (None: it is over)."""
        me = threading.get_ident()
        with self._lock:
            if sock is None:
                self._socks.pop(me, None)
            else:
                self._socks[me] = sock
            fired = self.fired
        if fired and sock is not None:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    # Already closed, or never connected: nothing left to end.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@dataclass
class _Conn:
    sock: socket.socket
    key: tuple[str, str, int]
    pending: bytearray = field(default_factory=bytearray)
    reused: bool = False


class Pool:
    """Keep-alive connections per (scheme, host, port); safe to share between threads.

    https:// uses `ssl_context` (default: the system's CAs, made on first use) and checks
    certificates for `server_name` when given (peers share one name) else the URL's host.
    """

    def __init__(
        self,
        timeout: float = 30.0,
        max_idle: int = 16,
        verify: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._lock = threading.Lock()
        self._verify = verify
        self._ssl_context: ssl.SSLContext | None = ssl_context
        self._server_name = server_name

    def _ssl(self) -> ssl.SSLContext:
        """The TLS context, made on first use: loading the CA store costs tens of
        milliseconds, paid by the first open of a file otherwise, even for http://."""
        with self._lock:
            if self._ssl_context is None:
                context = ssl.create_default_context()
                if not self._verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                self._ssl_context = context
            return self._ssl_context

    def _get(
        self, key: tuple[str, str, int], url: str, rules: RedirectRules | None = None
    ) -> _Conn:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                conn = idle.pop()
                conn.reused = True
                return conn
        scheme, host, port = key
        if rules is not None:
            # A name that resolves to a refused address is refused before any connect.
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                raise ConnectError(f"cannot resolve {host}: {exc}") from exc
            for info in infos:
                rules.check_address(url, str(info[4][0]))
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            raise ConnectError(f"connect to {host}:{port} failed: {exc}") from exc
        if rules is not None:
            # And the address actually connected to: a DNS answer that changed since the
            # check above cannot lead anywhere else.
            try:
                rules.check_address(url, str(sock.getpeername()[0]))
            except BaseException:
                sock.close()
                raise
        try:
            if scheme == "https":
                sock = self._ssl().wrap_socket(sock, server_hostname=self._server_name or host)
        except OSError as exc:
            sock.close()
            raise WireError(f"connect to {host}:{port} failed: {exc}") from exc
        return _Conn(sock, key)

    def _put(self, conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.sock.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.sock.close()

    def get_into(
        self,
        url: str,
        offset: int,
        buf: memoryview,
        headers: dict[str, str] | None = None,
        redirects: RedirectRules | None = None,
        abort: Abort | None = None,
    ) -> Response:
        """GET bytes [offset, offset+len(buf)) of `url` into `buf`.

        With `redirects`, redirects are followed as those rules allow (they also vet every
        new connection's peer address); without, a redirect is returned like any other
        status. Returns the final response for the caller to check version headers.
        Statuses other than 206 (or 200 for a whole-body request) are returned with `buf`
        untouched, so the caller maps them to its own errors. `abort`: another thread may
        end the transfer with it (WireError here).
        """
        sent = dict(headers or {})
        for _ in range(_MAX_REDIRECTS + 1):
            resp = self._get_once(url, offset, buf, sent, redirects, abort)
            if (
                redirects is not None
                and resp.status in (301, 302, 303, 307, 308)
                and "location" in resp.headers
            ):
                url, sent = redirects.next_hop(url, resp.headers["location"], sent)
                continue
            resp.sent = sent
            return resp
        raise WireError(f"too many redirects for {redact_url(url)}")

    def _get_once(
        self,
        url: str,
        offset: int,
        buf: memoryview,
        headers: dict[str, str],
        rules: RedirectRules | None = None,
        abort: Abort | None = None,
    ) -> Response:
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        want = len(buf)
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}"]
        if want:
            lines.append(f"Range: bytes={offset}-{offset + want - 1}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append("Connection: keep-alive")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        while True:
            conn = self._get((scheme, host, port), url, rules)
            if abort is not None:
                abort.attach(conn.sock)
            try:
                conn.sock.sendall(request)
                status, resp_headers = _read_head(conn)
            except (OSError, WireError) as exc:
                conn.sock.close()
                if conn.reused:
                    continue  # the server closed an idle keep-alive connection: redial
                raise WireError(f"GET {redact_url(url)}: {exc}") from exc
            break
        resp = Response(status, resp_headers, url)
        try:
            length = _body_length(resp_headers)
            body_ok = status == 206 or (status == 200 and offset == 0 and length == want)
            if body_ok and length == want:
                _recv_exact(conn, buf, abort)
            elif length is not None and length <= _HEAD_LIMIT:
                small = bytearray(length)  # a small error body: read, so the connection stays
                _recv_exact(conn, memoryview(small))
                resp.body = bytes(small)
            else:
                conn.sock.close()  # unknown or large unwanted body: drop the connection
                return resp
        except (OSError, WireError) as exc:
            conn.sock.close()
            raise WireError(f"GET {redact_url(url)}: body: {exc}") from exc
        if abort is not None:
            abort.attach(None)
        if resp_headers.get("connection", "").lower() == "close" or (abort and abort.fired):
            conn.sock.close()
        else:
            self._put(conn)
        return resp


def _read_head(conn: _Conn) -> tuple[int, dict[str, str]]:
    data = conn.pending
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(data) > _HEAD_LIMIT:
            raise WireError("response head too large")
        chunk = conn.sock.recv(65536)
        if not chunk:
            raise WireError("connection closed before response head")
        data += chunk
    head = bytes(data[:end]).decode("latin-1")
    conn.pending = bytearray(data[end + 4 :])
    status_line, *header_lines = head.split("\r\n")
    try:
        version, code, *_ = status_line.split(" ", 2)
        status = int(code)
    except ValueError as exc:
        raise WireError(f"bad status line {status_line!r}") from exc
    if not version.startswith("HTTP/1."):
        raise WireError(f"bad status line {status_line!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def _body_length(headers: dict[str, str]) -> int | None:
    if "transfer-encoding" in headers:
        return None
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


def _recv_exact(conn: _Conn, buf: memoryview, progress: Abort | None = None) -> None:
    pos = min(len(conn.pending), len(buf))
    if pos:
        buf[:pos] = conn.pending[:pos]
        del conn.pending[:pos]
        if progress is not None:
            progress.got(pos)  # body bytes that came with the head
    total = len(buf)
    while pos < total:
        n = conn.sock.recv_into(buf[pos:], total - pos)
        if n == 0:
            raise WireError(f"connection closed after {pos} of {total} body bytes")
        pos += n
        if progress is not None:
            progress.got(n)


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """`bytes a-b/total` -> (a, b, total or None for `*`)."""
    unit, _, rest = value.partition(" ")
    span, _, total = rest.partition("/")
    first, _, last = span.partition("-")
    if unit != "bytes":
        raise WireError(f"bad Content-Range {value!r}")
    try:
        return int(first), int(last), None if total == "*" else int(total)
    except ValueError as exc:
        raise WireError(f"bad Content-Range {value!r}") from exc
