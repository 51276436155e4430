"""A minimal HTTP/1.1 client on trio sockets for bench/scale.py: keep-alive connections from
a chosen loopback source address, timed requests, per-route counts. Not part of the product.

It exists because thousands of simulated nodes on a 2-core machine cannot each carry an
httpx client: here a request costs one send and a few receives, and an answer is read in
full (its size counted) but parsed only by the caller that needs it.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

try:
    import orjson

    def loads(raw: bytes) -> Any:
        return orjson.loads(raw)

    def dumps(doc: Any) -> bytes:
        return orjson.dumps(doc)

except ImportError:  # stdlib fallback: slower on large chunk maps (bench extra has orjson)
    import json

    def loads(raw: bytes) -> Any:
        return json.loads(raw)

    def dumps(doc: Any) -> bytes:
        return json.dumps(doc, separators=(",", ":")).encode()


class RequestFailed(Exception):
    """A request that got no 2xx answer: `kind` says how (timeout, closed, refused, http-NNN)."""

    def __init__(self, kind: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.retry_after = retry_after  # the answer's Retry-After, seconds


@dataclass
class RouteStats:
    """Requests of one route that started inside the measurement window (max_bytes: the
    whole run)."""

    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    errors_all: Counter[str] = field(default_factory=Counter)  # the whole run, ramp too
    latencies: list[float] = field(default_factory=list)  # answered ones, seconds
    starts: list[float] = field(default_factory=list)  # when each of those was sent (epoch s)
    max_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(self.errors),
            "errors_all": dict(self.errors_all),
            "latencies": [round(x, 5) for x in self.latencies],
            "starts": [round(x, 3) for x in self.starts],
            "max_bytes": self.max_bytes,
        }


class Stats:
    """Per-route figures of one worker process, counted only inside [w0, w1) (epoch s)."""

    def __init__(self, w0: float, w1: float) -> None:
        self.w0, self.w1 = w0, w1
        self.routes: dict[str, RouteStats] = {}
        self.samples: dict[str, str] = {}  # first error message per kind

    def route(self, name: str) -> RouteStats:
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats()
        return stats

    def in_window(self, t: float) -> bool:
        return self.w0 <= t < self.w1


class Conn:
    """One keep-alive HTTP/1.1 connection on a raw non-blocking socket (trio only waits
    for readiness: no stream wrappers, one cancel scope per request)."""

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.buf = bytearray()
        self._scope: trio.CancelScope | None = None
        self._timeout = 0.0
        self.idle_since = 0.0  # trio time the last answer was read
        self.retry_after: float | None = None  # of the last answer

    @classmethod
    async def open(cls, host: str, port: int, source: str, timeout: float) -> Conn:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.bind((source, 0))
            code = raw.connect_ex((host, port))
            if code == errno.EINPROGRESS:
                with trio.move_on_after(timeout) as scope:
                    await trio.lowlevel.wait_writable(raw)
                if scope.cancelled_caught:
                    raise RequestFailed("timeout", "connect")
                code = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                kind = "refused" if code in (errno.ECONNREFUSED, errno.ECONNRESET) else "oserror"
                raise RequestFailed(kind, f"connect: {errno.errorcode.get(code, code)}")
        except OSError as exc:
            raw.close()
            raise RequestFailed("oserror", f"connect: {exc}") from None
        except BaseException:
            raw.close()
            raise
        return cls(raw)

    def usable(self) -> bool:
        """Not closed by the server while idle (nothing may be readable between requests).
        Looked at only after a second idle: no server closes a keep-alive sooner, and the
        look is a system call per request."""
        if trio.current_time() - self.idle_since < 1.0:
            return True
        try:
            self.raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # closed (b"") or bytes nobody asked for: either way, not reusable

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.raw)
        self.raw.close()

    async def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.raw.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.raw)
                continue
            except OSError as exc:
                raise RequestFailed("closed", f"send: {exc}") from None
            view = view[sent:]

    async def _fill(self, first: bool = False) -> None:
        """More of the answer; every read that brings bytes restarts the read timeout.
        `first`: just after the request went out, where nothing can be there yet."""
        if first:
            await trio.lowlevel.wait_readable(self.raw)
        while True:
            try:
                data = self.raw.recv(1 << 20)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.raw)
            except OSError as exc:
                raise RequestFailed("closed", str(exc)) from None
        if not data:
            raise RequestFailed("closed", "server closed the connection")
        self.buf += data
        if self._scope is not None:
            self._scope.deadline = trio.current_time() + self._timeout

    async def request(self, data: bytes, timeout: float) -> tuple[int, bytes, bool]:
        """Send one request (bytes, head and body); (status, body, keep-alive). `timeout`
        bounds each wait for more of the answer, as httpx's read timeout does, not the
        whole answer."""
        self._timeout = timeout
        with trio.move_on_after(timeout) as scope:
            self._scope = scope
            try:
                return await self._exchange(data)
            finally:
                self._scope = None
        raise RequestFailed("timeout", "read")

    async def _exchange(self, data: bytes) -> tuple[int, bytes, bool]:
        await self._send(data)
        buf = self.buf
        first = True
        while (end := buf.find(b"\r\n\r\n")) < 0:
            await self._fill(first)
            first = False
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        try:
            status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise RequestFailed("bad-answer", head[0][:80]) from None
        length = -1
        chunked = False
        keep = True
        self.retry_after = None
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                keep = value.strip().lower() != "close"
            elif name == "retry-after":
                with contextlib.suppress(ValueError):
                    self.retry_after = float(value)
        if chunked:
            body = await self._chunked()
        elif length >= 0:
            while len(buf) < length:
                await self._fill()
            body = bytes(buf[:length])
            del buf[:length]
        else:  # no length: until the server closes
            keep = False
            while True:
                try:
                    await self._fill()
                except RequestFailed as exc:
                    if exc.kind != "closed":
                        raise
                    break
            body = bytes(buf)
            buf.clear()
        return status, body, keep

    async def _chunked(self) -> bytes:
        buf = self.buf
        out = bytearray()
        while True:
            while (end := buf.find(b"\r\n")) < 0:
                await self._fill()
            size = int(bytes(buf[:end]).split(b";")[0], 16)
            del buf[: end + 2]
            while len(buf) < size + 2:
                await self._fill()
            out += buf[:size]
            del buf[: size + 2]
            if size == 0:
                return bytes(out)


class Pool:
    """A node's connections to the scheduler: `call` borrows an idle one or opens one (at
    most `limit` at once per lane); a lane keeps its own connections, so a heartbeat never
    waits behind the node's other requests for a connection."""

    def __init__(
        self,
        host: str,
        port: int,
        source: str,
        token: str | None,
        stats: Stats,
        limit: int,
    ) -> None:
        self.host, self.port, self.source = host, port, source
        self.stats = stats
        self.limit = limit
        self._auth = b""
        self.set_token(token)
        self._idle: dict[str, list[Conn]] = {}
        self._slots: dict[str, trio.Semaphore] = {}
        self._host = f"Host: {host}:{port}\r\n".encode()

    def set_token(self, token: str | None) -> None:
        self._auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def call(
        self,
        method: str,
        path: str,
        route: str,
        body: Any = None,
        timeout: float = 10.0,
        lane: str = "other",
        token: str | None = None,
    ) -> bytes:
        """The answer's body of a 2xx; RequestFailed otherwise. Counted under `route`."""
        payload = b"" if body is None else dumps(body)
        auth = f"Authorization: Bearer {token}\r\n".encode() if token else self._auth
        head = b"%s %s HTTP/1.1\r\n%s%s" % (method.encode(), path.encode(), self._host, auth)
        if body is not None or method in ("POST", "PUT"):
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(payload)
        data = head + b"\r\n" + payload
        slots = self._slots.get(lane)
        if slots is None:
            slots = self._slots[lane] = trio.Semaphore(self.limit if lane == "other" else 1)
        stats = self.stats.route(route)
        async with slots:
            began = time.time()
            counted = self.stats.in_window(began)
            if counted:
                stats.sent += 1
            conn: Conn | None = None
            try:
                idle = self._idle.setdefault(lane, [])
                while idle:
                    candidate = idle.pop()
                    if candidate.usable():
                        conn = candidate
                        break
                    candidate.close()
                if conn is None:
                    conn = await Conn.open(self.host, self.port, self.source, timeout)
                status, answer, keep = await conn.request(data, timeout)
            except RequestFailed as exc:
                if conn is not None:
                    conn.close()
                if counted:
                    stats.errors[exc.kind] += 1
                stats.errors_all[exc.kind] += 1
                self.stats.samples.setdefault(f"{route} {exc.kind}", str(exc)[:300])
                raise
            except BaseException:
                if conn is not None:
                    conn.close()  # cancelled mid-request: the stream is out of step
                raise
            elapsed = time.time() - began
            if keep:
                conn.idle_since = trio.current_time()
                idle.append(conn)
            else:
                conn.close()
        stats.max_bytes = max(stats.max_bytes, len(answer))
        if status // 100 != 2:
            kind = f"http-{status}"
            if counted:
                stats.errors[kind] += 1
            stats.errors_all[kind] += 1
            self.stats.samples.setdefault(f"{route} {kind}", answer[:300].decode("latin-1"))
            told = conn.retry_after if conn is not None else None
            raise RequestFailed(kind, answer[:200].decode("latin-1"), told)
        if counted:
            stats.ok += 1
            stats.latencies.append(elapsed)
            stats.starts.append(began)
        return answer


__all__ = ["Conn", "Pool", "RequestFailed", "RouteStats", "Stats", "dumps", "loads"]
