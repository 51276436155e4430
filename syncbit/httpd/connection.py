"""One HTTP/1.1 connection of syncbit's async servers, on h11: requests in, answers out.

Owns the framing rules every such server keeps. The application gets a request's head
only; the body is read when it asks (`Body.read(limit)`), after it authorized the request
and chose the limit from the route, so an `Expect: 100-continue` is granted then and never
before, and a body without a length or over the limit is refused unread. After a request
whose body was not read, a small body (`DRAIN` bytes, arriving within `DRAIN_WAIT`) is
read and dropped so the connection can go on; otherwise the answer closes it. A request
that cannot be parsed gets a JSON error and the connection closes. Each read and write
waits at most the idle timeout (`IdleWatch`, one per listener). It never interprets
paths, credentials or bodies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from typing import Protocol

import h11
import trio

from syncbit.looptrace import DOING
from syncbit.serving import BodyError, body_length

log = logging.getLogger("syncbit.httpd")

MAX_HEAD = 64 * 1024  # request line and headers, like the stdlib server's line limit
DRAIN = 64 * 1024  # a refused request's body up to this size is read and dropped
DRAIN_WAIT = 0.5  # seconds such a body may take to arrive
_RECV = 64 * 1024


@dataclass(frozen=True)
class Request:
    """A request's head: header names in lower case (a repeated header: its last value)."""

    method: str
    target: str
    headers: dict[str, str]
    client: str  # the peer's address
    tls: bool


class BodySender(Protocol):
    """A body the application sends itself after the head (a file range by sendfile, say):
    `length` bytes exactly. `close()` is called once whatever happened, sent or not."""

    length: int

    async def send(self, stream: trio.abc.Stream, idle: float) -> None:
        """Write the `length` bytes to `stream`; a client that takes nothing for `idle`
        seconds is dropped (ConnectionError or trio.TooSlowError)."""
        ...

    def close(self) -> None: ...


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    sender: BodySender | None = None  # the body instead of `body`, sent by its own means


class Body:
    """The body of the request being served: read on demand, within a limit."""

    def __init__(self, conn: _Connection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self.consumed = False

    async def read(self, limit: int) -> bytes:
        """At most `limit` bytes, judged from the headers before any is read. Raises
        BodyError (411 chunked, 400 malformed length, 413 over the limit): unread."""
        framing = Message()
        for name in ("content-length", "transfer-encoding"):
            if name in self._request.headers:
                framing[name] = self._request.headers[name]
        length = body_length(framing, limit)
        raw = await self._conn.read_body(expect=length > 0)
        self.consumed = True
        if len(raw) != length:
            raise ConnectionError(f"client sent {len(raw)} of {length} body bytes")
        return raw


App = Callable[[Request, Body], Awaitable[Response]]
ErrorBody = Callable[[int, str], bytes]
_CONNECTION_KINDS = {503: "TooManyConnections", 500: "ServerError"}


def connection_error(status: int, message: str) -> bytes:
    """The JSON body (`{"error", "kind"}`, as `syncbit.errors` words every error) of an
    answer the connection layer gives by itself: a malformed request, too many
    connections, an application that failed."""
    kind = _CONNECTION_KINDS.get(status, "BadRequest")
    return json.dumps({"error": message, "kind": kind}, separators=(",", ":")).encode()


def bulk(stream: trio.abc.Stream) -> None:
    """Let the socket under `stream` queue as much unsent data as the kernel allows, as a
    plain socket does, for a body a `BodySender` streams: trio caps it at 16 KiB
    (TCP_NOTSENT_LOWAT, for latency), which made a 4 MiB chunk ~250 sends and wake-ups,
    and cost the daemons of bench/swarm.py ~15% more CPU than a thread-per-connection
    server. Small answers keep trio's cap."""
    sock = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(sock, trio.SocketStream):
        with contextlib.suppress(OSError, AttributeError):  # not TCP, or not Linux
            # 0: the kernel's own limit (net.ipv4.tcp_notsent_lowat, none by default)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 0)


class IdleWatch:
    """The idle timeout of every read and write of a server's connections, kept by one
    task (`run`): a wait longer than `timeout` is cancelled (up to a quarter of it late),
    and its connection ends. One sweep now and then instead of a deadline per read and
    write: each such deadline is an entry in trio's deadline heap, and at thousands of
    requests a second those entries cost the server a tenth of its CPU."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.waits: dict[trio.CancelScope, float] = {}  # a wait -> when it began

    async def run(self) -> None:
        period = min(1.0, self.timeout / 4)
        while True:
            await trio.sleep(period)
            for scope in self.expired(trio.current_time() - self.timeout):
                scope.cancel()

    def expired(self, limit: float) -> list[trio.CancelScope]:
        """The waits begun at `limit` or before. A wait is added when it begins, so the
        dict is in order of beginning: the sweep stops at the first younger one, and costs
        what expired, not every connection's wait (12,000 at 5,000 nodes: a tenth of the
        scheduler's CPU when each sweep copied them all)."""
        found = []
        for scope, began in self.waits.items():
            if began > limit:
                break
            found.append(scope)
        return found


class _Connection:
    def __init__(self, stream: trio.abc.Stream, watch: IdleWatch) -> None:
        self.stream = stream
        self.idle = watch.timeout
        self.waits = watch.waits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.keep_alive = True  # the client's word, from the request being served
        self.answered = False  # the answer to it is written (`respond`)

    async def _receive(self) -> bytes | None:
        """The next bytes from the client (b"": it closed); None when it waited too long."""
        scope = trio.CancelScope()
        self.waits[scope] = trio.current_time()
        try:
            with scope:
                data: bytes = await self.stream.receive_some(_RECV)
                return data
        finally:
            del self.waits[scope]
        return None  # cancelled: the wait was too long

    async def _send(self, data: bytes) -> None:
        """Send it all; TooSlowError when the client does not take it within the timeout."""
        scope = trio.CancelScope()
        self.waits[scope] = trio.current_time()
        try:
            with scope:
                await self.stream.send_all(data)
        finally:
            del self.waits[scope]
        if scope.cancelled_caught:
            raise trio.TooSlowError

    async def next_event(self, timeout: float | None = None) -> h11.Event | None:
        """The next event, or None when the client is gone or idle too long."""
        while True:
            event = self.h11.next_event()
            if event is h11.PAUSED:
                return None  # only between requests, which the caller never asks for
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]  # NEED_DATA and PAUSED are out
            try:
                if timeout is None:
                    data = await self._receive()
                else:
                    data = None
                    with trio.move_on_after(timeout):
                        data = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if data is None:
                return None
            self.h11.receive_data(data)  # b"": the client closed; h11 says what that means

    async def read_body(self, expect: bool) -> bytes:
        if expect and self.h11.they_are_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise ConnectionError("the client stopped sending its body")

    async def drain(self, request: Request) -> bool:
        """Read and drop an unread small body; whether the connection may go on."""
        if self.h11.their_state is h11.DONE:
            return True
        headers = request.headers
        if headers.get("transfer-encoding") or headers.get("expect", "").lower() == "100-continue":
            return False  # chunked: unsized; 100-continue: the client waits, sends nothing
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            return False
        if length > DRAIN:
            return False
        with trio.move_on_after(DRAIN_WAIT):
            while self.h11.their_state is h11.SEND_BODY:
                event = await self.next_event(DRAIN_WAIT)
                if event is None or not isinstance(event, h11.Data | h11.EndOfMessage):
                    return False
            return True
        return False

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            await self._send(data)

    def start(self, event: h11.Request) -> None:
        """A request begins: whether its client lets the connection go on after it (h11's
        rule: not after `Connection: close`, nor after an HTTP/1.0 request)."""
        connection = b",".join(v for k, v in event.headers if k == b"connection").lower()
        closing = b"close" in (t.strip() for t in connection.split(b","))
        self.keep_alive = not closing and event.http_version >= b"1.1"

    async def respond(self, response: Response, close: bool, head: bool) -> None:
        """The answer, written here rather than through h11's state machine (a fresh one
        parses the next request, `next_cycle`): h11's writing costs the scheduler ~8% of a
        heartbeat, for a head that is always the same few lines."""
        reason = _REASONS.get(response.status, "")
        given = [
            f"content-type: {response.content_type}",
            *(f"{name}: {value}" for name, value in response.headers.items()),
        ]
        if any("\r" in line or "\n" in line for line in given):  # never split a head
            given = [line.replace("\r", " ").replace("\n", " ") for line in given]
        sender = response.sender
        length = len(response.body) if sender is None else sender.length
        lines = [f"HTTP/1.1 {response.status} {reason}", *given, f"content-length: {length}"]
        if close or not self.keep_alive:
            lines.append("connection: close")
        text = "\r\n".join(lines)
        # One write per answer: head and body in two would cost a syscall and a wake-up of
        # the client each, and these answers are small and many.
        data = (text + "\r\n\r\n").encode("latin-1")
        if head:
            await self._send(data)
        elif sender is None:
            await self._send(data + response.body)
        else:
            await self._send(data)
            bulk(self.stream)
            await sender.send(self.stream, self.idle)
        self.answered = True

    def next_cycle(self) -> bool:
        """Ready for the client's next request, with the bytes it sent already; False if
        the connection cannot go on (the request was not read to its end)."""
        if not self.answered or not self.keep_alive or self.h11.their_state is not h11.DONE:
            return False
        data, closed = self.h11.trailing_data
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if data:
            self.h11.receive_data(bytes(data))
        if closed:
            self.h11.receive_data(b"")  # b"" tells h11 the client closed
        self.answered = False
        return True


_REASONS = {s.value: s.phrase for s in HTTPStatus}


async def serve_connection(
    stream: trio.abc.Stream,
    client: str,
    tls: bool,
    app: App,
    watch: IdleWatch,
    error_body: ErrorBody,
) -> None:
    """Serve requests on `stream` until the client closes it, idles (`watch`), or a
    request ends it."""
    conn = _Connection(stream, watch)
    while True:
        try:
            event = await conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
            await _refuse(stream, status, f"malformed request: {exc}", error_body, conn.idle)
            return
        if not isinstance(event, h11.Request):
            return  # gone, idle, or closed
        conn.start(event)
        request = Request(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("latin-1"),
            headers={k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers},
            client=client,
            tls=tls,
        )
        if not await _one(conn, request, app, error_body) or not conn.next_cycle():
            return


async def _one(conn: _Connection, request: Request, app: App, error_body: ErrorBody) -> bool:
    """Serve one request; whether the connection goes on."""
    DOING.set(f"{request.method} {request.target[:120]}")  # named by the stall log
    body = Body(conn, request)
    try:
        response = await app(request, body)
    except (ConnectionError, h11.RemoteProtocolError, trio.TooSlowError) as exc:
        log.debug("request from %s dropped: %s", request.client, exc)
        return False
    except Exception:
        log.exception("%s %s failed", request.method, request.target[:200])
        response = Response(500, error_body(500, "internal server error; see the server log"))
    try:
        keep = body.consumed or await conn.drain(request)
        await conn.respond(response, close=not keep, head=request.method == "HEAD")
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        # Gone, stalled past the idle timeout (a sender's own wait: TimeoutError), reset.
        log.debug("answer to %s dropped: %s", request.client, exc)
        return False
    except Exception:  # a sender's bug ends its connection, never the server
        log.exception("answer to %s %s failed", request.method, request.target[:200])
        return False
    finally:
        if response.sender is not None:
            response.sender.close()
    return keep


async def _refuse(
    stream: trio.abc.Stream, status: int, message: str, error_body: ErrorBody, idle: float
) -> None:
    """Answer a request h11 could not parse, outside its state machine, and end."""
    body = error_body(status, message)
    reason = _REASONS.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with (
        trio.move_on_after(idle),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(head + body)


__all__ = [
    "DRAIN",
    "DRAIN_WAIT",
    "MAX_HEAD",
    "App",
    "Body",
    "BodyError",
    "BodySender",
    "IdleWatch",
    "Request",
    "Response",
    "connection_error",
    "serve_connection",
]
