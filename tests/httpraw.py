"""Raw HTTP/1.1 exchanges over loopback sockets for the request-parsing tests: bytes the
stdlib clients refuse to send (odd request lines, lying lengths), from a chosen source
address, with the answer parsed and whether the server then closed the connection."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after answering

    def json(self) -> Any:
        return json.loads(self.body)


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A connection to 127.0.0.1:port from `source` (any 127.0.0.0/8 address)."""
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request_bytes(
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> bytes:
    """A request as bytes; Content-Length is set from `body` unless given in `headers`."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    given = {k.lower() for k in (headers or {})}
    if body is not None and "content-length" not in given:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + (body or b"")


class _Unbuffered:
    """`sock` for http.client, read without read-ahead: a buffered reader would swallow
    the start of the next answer on the connection (pipelined requests)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def makefile(self, mode: str) -> Any:
        assert mode == "rb"  # all http.client asks of it
        return self.sock.makefile("rb", buffering=0)


def read_answer(sock: socket.socket, head_only: bool = False) -> Answer:
    """Parse one answer from `sock`, then look whether the server closed it (the socket's
    timeout is left as it was: the next answer may take longer than the look)."""
    resp = http.client.HTTPResponse(
        _Unbuffered(sock),  # type: ignore[arg-type]
        method="HEAD" if head_only else "GET",
    )
    resp.begin()
    body = resp.read()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    closed = False
    if resp.will_close or headers.get("connection", "").lower() == "close":
        closed = True
    else:
        timeout = sock.gettimeout()
        sock.settimeout(0.05)
        try:
            with contextlib.suppress(TimeoutError, BlockingIOError):
                closed = sock.recv(1, socket.MSG_PEEK) == b""
        finally:
            sock.settimeout(timeout)
    return Answer(resp.status, headers, body, closed)


def exchange(port: int, raw: bytes, source: str = "127.0.0.1", head_only: bool = False) -> Answer:
    """Send `raw` on a new connection and read the answer."""
    with connect(port, source) as sock:
        sock.sendall(raw)
        return read_answer(sock, head_only)


def send_head_only(
    port: int, method: str, target: str, headers: dict[str, str], body: bytes
) -> Answer:
    """Announce `body` (its real length) but send only the head, then read the answer: how a
    server that refuses a body unread is seen without racing its close."""
    with connect(port) as sock:
        sock.sendall(request_bytes(method, target, {**headers, "Content-Length": str(len(body))}))
        return read_answer(sock)


def count_closed(socks: list[socket.socket], settle: float = 0.5, timeout: float = 10.0) -> int:
    """How many of `socks` the server closed, once that number held for `settle` seconds."""
    closed: set[int] = set()
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, sock in enumerate(socks):
            if i in closed:
                continue
            sock.setblocking(False)
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        closed.add(i)
                        break
            except BlockingIOError:
                pass
            except OSError:
                closed.add(i)
        if len(closed) != last:
            last, stable_since = len(closed), time.monotonic()
        elif time.monotonic() - stable_since >= settle:
            break
        time.sleep(0.05)
    return len(closed)


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the server closes `sock` (reads until EOF or `timeout`; data is skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True  # reset
    return True
