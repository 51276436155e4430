"""The node's local API on a real port (loopback): a probe or scrape that fails answers
500 with an error document and keeps the connection, like a failing control request."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from httpraw import connect, read_answer, request_bytes

from syncbit.node.http import LocalApi
from syncbit.peer import PeerServer
from syncbit.store import ObjectStore


async def _broken_readiness() -> tuple[bool, str]:
    raise RuntimeError("a bug in readiness")


async def _broken_metrics() -> tuple[bytes, str]:
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


def test_a_starting_node_is_alive_but_neither_ready_nor_serving(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path / "cache", 1 << 20)
    server = PeerServer(store, "127.0.0.1:0")
    server.add_routes(LocalApi())  # what the node does before its loops run
    server.start()
    port = int(server.address.rpartition(":")[2])
    try:
        with connect(port) as sock:
            for path, status in [
                ("/healthz", 200),
                ("/readyz", 503),
                ("/v1/local/datasets", 503),
                ("/metrics", 404),
            ]:
                sock.sendall(request_bytes("GET", path))
                answer = read_answer(sock)
                assert answer.status == status, path
                if status == 503:
                    assert b"daemon starting" in answer.body
    finally:
        server.stop()
        store.close()


def test_long_polls_and_idle_connections_cost_no_thread(tmp_path: Path) -> None:
    """Issue 14: a long poll costs a coroutine and a socket, not a thread. 200 clients
    hold `syncbit wait`'s long poll open on the port (and as many sit idle between
    requests) while the process's thread count stays where it was; every one is then
    answered."""
    release = threading.Event()
    asked: list[str] = []

    async def control(method: str, target: str, body: dict[str, Any]) -> dict[str, Any]:
        asked.append(target)
        while not release.is_set():  # a long poll: answered when the dataset is ready
            await trio.sleep(0.2)
        return {"dataset": "d", "complete": True}

    store = ObjectStore.open(tmp_path / "cache", 1 << 20)
    server = PeerServer(store, "127.0.0.1:0")
    api = LocalApi()
    api.set_control(control)
    server.add_routes(api)
    server.start()
    port = int(server.address.rpartition(":")[2])
    polls: list[socket.socket] = []
    idle: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(200):
            sock = connect(port, source="127.0.0.2")  # 200 a client: under its cap
            sock.sendall(request_bytes("GET", "/v1/local/datasets/d?wait=30"))
            polls.append(sock)
            idle.append(connect(port, source="127.0.0.3"))
        deadline = time.monotonic() + 30
        while len(asked) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(asked) == 200  # every poll is in the handler, waiting
        assert threading.active_count() <= before + 2, threading.enumerate()
        release.set()
        for sock in polls:
            answer = read_answer(sock)
            assert answer.status == 200 and answer.json()["complete"] is True
    finally:
        release.set()
        for sock in polls + idle:
            sock.close()
        server.stop()
        store.close()
