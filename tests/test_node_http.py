"""The node's local API on a real port (loopback): a probe or scrape that fails answers
500 with an error document and keeps the connection, like a failing control request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from httpraw import connect, read_answer, request_bytes

from syncbit.node.http import LocalApi
from syncbit.peer import PeerServer
from syncbit.store import ObjectStore


def _broken_readiness() -> tuple[bool, str]:
    raise RuntimeError("a bug in readiness")


def _broken_metrics() -> tuple[bytes, str]:
    raise RuntimeError("a bug in a collector")


@pytest.fixture
def port(tmp_path: Path) -> Iterator[int]:
    store = ObjectStore.open(tmp_path / "cache", 1 << 20)
    server = PeerServer(store, "127.0.0.1:0")
    api = LocalApi()
    api.set_probes(_broken_readiness, _broken_metrics)
    server.add_routes(api)
    server.start()
    try:
        yield int(server.address.rpartition(":")[2])
    finally:
        server.stop()
        store.close()


@pytest.mark.parametrize("path", ["/metrics", "/readyz"])
def test_a_failing_probe_answers_500_with_an_error_doc(port: int, path: str) -> None:
    with connect(port) as sock:
        sock.sendall(request_bytes("GET", path))
        answer = read_answer(sock)
        assert answer.status == 500 and not answer.closed
        assert answer.json() == {
            "error": "internal daemon error; see the daemon log",
            "kind": "RuntimeError",
        }
        sock.sendall(request_bytes("GET", "/healthz"))  # the same connection still serves
        assert read_answer(sock).status == 200


def test_control_is_503_until_the_node_serves_it(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request_bytes("GET", "/v1/local/datasets"))
        answer = read_answer(sock)
    assert answer.status == 503 and answer.json()["error"] == "daemon starting"
