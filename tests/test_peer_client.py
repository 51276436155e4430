"""The peer client over an injected transport: statuses and ranges become the peer errors
the fetch layer acts on (try another holder), whatever the peer sends."""

from __future__ import annotations

import socket

import pytest

from syncbit.errors import PeerBusyError, PeerError, PeerUnreachableError, WireError
from syncbit.peer import PRIORITY_HEADER, PeerClient
from syncbit.wire import Abort, Response

OID = "ab" * 32


class Scripted:
    """A transport that answers every GET with one scripted response."""

    def __init__(
        self, status: int, headers: dict[str, str], data: bytes = b"", fail: bool = False
    ) -> None:
        self.answer = Response(status, headers, "")
        self.data = data
        self.fail = fail
        self.asked: list[tuple[str, int, dict[str, str]]] = []
        self.closed = False

    def get_into(
        self,
        url: str,
        offset: int,
        buf: memoryview,
        headers: dict[str, str] | None = None,
        *,
        abort: Abort | None = None,
    ) -> Response:
        self.asked.append((url, offset, dict(headers or {})))
        if self.fail:
            raise WireError("connection refused")
        buf[: len(self.data)] = self.data
        return self.answer

    def close(self) -> None:
        self.closed = True


def test_a_range_is_fetched_through_the_transport() -> None:
    transport = Scripted(206, {"content-range": "bytes 4-7/10"}, b"wxyz")
    client = PeerClient(token="t0k", transport=transport)
    buf = bytearray(4)
    client.get_into("10.0.0.2:7901", OID, 4, memoryview(buf), prefetch=True)
    assert bytes(buf) == b"wxyz"
    url, offset, headers = transport.asked[0]
    assert url == f"http://10.0.0.2:7901/v1/objects/{OID}/data" and offset == 4
    assert headers["Authorization"] == "Bearer t0k" and headers[PRIORITY_HEADER] == "prefetch"
    client.close()
    assert transport.closed


@pytest.mark.parametrize(
    ("status", "headers", "error", "message"),
    [
        (503, {}, PeerBusyError, "is busy"),
        (404, {}, PeerError, "answered HTTP 404"),
        (206, {"content-range": "bytes 0-3/10"}, PeerError, "wrong range"),
        (206, {"content-range": "pages 4-7/10"}, PeerError, "bad Content-Range"),
        (206, {}, PeerError, "bad Content-Range"),
    ],
)
def test_what_a_peer_answers_becomes_a_peer_error(
    status: int, headers: dict[str, str], error: type[PeerError], message: str
) -> None:
    client = PeerClient(transport=Scripted(status, headers))
    with pytest.raises(error, match=message) as caught:
        client.get_into("10.0.0.2:7901", OID, 4, memoryview(bytearray(4)))
    assert type(caught.value) is error


def test_a_connection_failure_is_a_peer_error() -> None:
    transport = Scripted(206, {}, fail=True)
    with pytest.raises(PeerError, match=r"10\.0\.0\.2:7901: connection refused"):
        PeerClient(transport=transport).get_into("10.0.0.2:7901", OID, 0, memoryview(bytearray(4)))


def test_a_peer_nobody_listens_for_is_unreachable() -> None:
    """A real connect to a closed loopback port: PeerUnreachableError (the fetch layer
    leaves such a peer out for a while), not just any PeerError."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        client = PeerClient(timeout=5)
        try:
            with pytest.raises(PeerUnreachableError, match=r"connect to 127\.0\.0\.1"):
                client.get_into(f"127.0.0.1:{port}", "ab" * 32, 0, memoryview(bytearray(8)))
        finally:
            client.close()
