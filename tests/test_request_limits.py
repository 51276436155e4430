"""Requests are bounded before they cost anything: a real SchedulerServer and PeerServer on
loopback, driven with raw HTTP. Bodies are authorized and sized from their headers before
a byte is read; indexes, claims, labels and JSON depth are capped; connections are capped
in all and per client address and dropped when idle."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from httpraw import (
    closed_by_server,
    connect,
    count_closed,
    exchange,
    read_answer,
    request_bytes,
    send_head_only,
)
from schedulerfixtures import CHUNK, TIMEOUT, any_port

from syncbit.config import SchedulerConfig
from syncbit.httpd.connection import Body, IdleWatch, Request, Response, serve_connection
from syncbit.manifest import FileEntry, Manifest, build_manifest
from syncbit.node.http import LocalApi
from syncbit.peer import PeerServer
from syncbit.scheduler import SchedulerServer
from syncbit.serving import Limits, body_length, json_depth_ok, loads_bounded
from syncbit.store import ObjectStore

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OBJ = "ab" * 32
SIZE = 10 * CHUNK  # the object the dataset names: 10 chunks
D1 = "1" * 64


def resolve(name: str, source: str, options: dict[str, Any], chunk_size: int) -> Manifest:
    """Every source lists one file of SIZE bytes whose content object is OBJ."""
    entry = FileEntry(path="f.bin", size=SIZE, object=OBJ, locator="f.bin")
    return build_manifest(name, source, [entry], chunk_size=chunk_size)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SchedulerServer]:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    config = any_port(
        SchedulerConfig(
            state_dir=tmp_path / "state", node_timeout=TIMEOUT, chunk_size=CHUNK, token_file=token
        )
    )
    with SchedulerServer(
        config, resolve=resolve, limits=Limits(max_connections=64, max_per_client=16)
    ) as srv:
        yield srv


def port_of(server: SchedulerServer) -> int:
    return int(server.address.rpartition(":")[2])


def call(server: SchedulerServer, method: str, path: str, doc: Any = None, **headers: str) -> Any:
    body = None if doc is None else json.dumps(doc).encode()
    return exchange(port_of(server), request_bytes(method, path, {**AUTH, **headers}, body))


# -- bodies: authorized and sized before they are read ----------------------------------------


def test_unauthenticated_huge_body_is_refused_before_it_is_read(server: SchedulerServer) -> None:
    """The headers alone get a 401; the connection closes with the body unread (a client
    that goes on sending is cut off), and nothing is held for it."""
    with connect(port_of(server)) as sock:
        sock.sendall(
            request_bytes("PUT", "/v1/nodes/n1", {"Content-Length": str(256 * 2**20)}, None)
        )
        answer = read_answer(sock)
        assert answer.status == 401 and answer.json()["kind"] == "UnauthorizedError"
        assert answer.closed
        assert closed_by_server(sock)


def test_expect_continue_is_not_granted_to_an_unauthorized_client(
    server: SchedulerServer,
) -> None:
    head = {"Content-Length": "100", "Expect": "100-continue"}
    with connect(port_of(server)) as sock:
        sock.sendall(request_bytes("PUT", "/v1/nodes/n1", head, None))
        answer = read_answer(sock)  # a 100 Continue would come first and be parsed here
        assert answer.status == 401


def test_authorized_body_over_the_route_limit_is_413_unread(server: SchedulerServer) -> None:
    for method, path, length in (
        ("PUT", "/v1/nodes/n1", 3 * 2**20),  # heartbeat: 2 MiB
        ("POST", "/v1/datasets", 2**20),  # dataset add: 64 KiB
        ("POST", f"/v1/objects/{OBJ}/claims", 2**20),
        ("POST", "/v1/nodes/n1/chunks", 5 * 2**20),  # chunk report: 4 MiB
        ("GET", "/v1/status", 1),  # takes no body at all
    ):
        with connect(port_of(server)) as sock:
            sock.sendall(request_bytes(method, path, {**AUTH, "Content-Length": str(length)}))
            answer = read_answer(sock)
            assert answer.status == 413, (method, path, answer)
            assert answer.json()["kind"] == "PayloadTooLargeError"
            assert answer.closed


def test_bodies_without_a_usable_length_are_refused(server: SchedulerServer) -> None:
    port = port_of(server)
    chunked = request_bytes("PUT", "/v1/nodes/n1", {**AUTH, "Transfer-Encoding": "chunked"})
    answer = exchange(port, chunked + b"5\r\nhello\r\n0\r\n\r\n")
    assert answer.status == 411 and answer.closed
    for bad in ("-1", "1e3", "12abc", "0x10", "9" * 40):
        answer = exchange(
            port, request_bytes("PUT", "/v1/nodes/n1", {**AUTH, "Content-Length": bad})
        )
        assert answer.status == 400 and "Content-Length" in answer.json()["error"], bad


def test_refused_requests_with_a_large_body_close_but_others_keep_alive(
    server: SchedulerServer,
) -> None:
    port = port_of(server)
    with connect(port) as sock:
        sock.sendall(request_bytes("GET", "/v1/nope", AUTH))
        assert read_answer(sock).status == 404
        sock.sendall(request_bytes("GET", "/healthz"))  # the same connection goes on
        answer = read_answer(sock)
        assert answer.status == 200 and not answer.closed
    # A refused request's small body is read and dropped (closing on unread bytes would
    # reset the connection, and the client could lose the answer): the connection goes on.
    with connect(port) as sock:
        sock.sendall(request_bytes("POST", "/v1/nope", AUTH, b'{"a": 1}'))
        answer = read_answer(sock)
        assert answer.status == 404 and not answer.closed
    # A larger one is never read: the connection ends with the answer.
    big = b"x" * (128 * 2**10)
    answer = send_head_only(port, "POST", "/v1/nope", AUTH, big)
    assert answer.status == 404 and answer.closed


def test_keep_alive_follows_the_client(server: SchedulerServer) -> None:
    port = port_of(server)
    with connect(port) as sock:  # two requests sent at once: two answers, in order
        sock.sendall(request_bytes("GET", "/v1/nope", AUTH) + request_bytes("GET", "/healthz"))
        assert read_answer(sock).status == 404
        answer = read_answer(sock)
        assert answer.status == 200 and not answer.closed
    with connect(port) as sock:  # the client says it closes
        sock.sendall(request_bytes("GET", "/healthz", {"Connection": "keep-alive, close"}))
        assert read_answer(sock).closed
        assert closed_by_server(sock)
    with connect(port) as sock:  # an HTTP/1.0 client gets one answer
        sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        answer = read_answer(sock)
        assert answer.status == 200 and answer.closed
        assert closed_by_server(sock)


async def test_an_answer_header_never_splits_the_head() -> None:
    async def app(request: Request, body: Body) -> Response:
        return Response(200, b"{}", headers={"X-Note": "a\r\nSet-Cookie: evil=1"})

    client, served = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, served, "c", False, app, IdleWatch(5), _no_body)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"{}"):
            answer += await client.receive_some(4096)
        nursery.cancel_scope.cancel()
    lines = answer.split(b"\r\n")
    assert b"X-Note: a  Set-Cookie: evil=1" in lines
    assert not any(line.lower().startswith(b"set-cookie") for line in lines)


def _no_body(status: int, message: str) -> bytes:
    return b"{}"


def test_deeply_nested_json_is_a_400_not_a_500(server: SchedulerServer) -> None:
    for depth in (33, 5000, 60_000):
        body = b'{"address": ' + b"[" * depth + b"]" * depth + b"}"
        answer = exchange(port_of(server), request_bytes("PUT", "/v1/nodes/n1", AUTH, body))
        assert answer.status == 400, depth
        assert "nested deeper" in answer.json()["error"]
    doc = {"address": "h:1", "labels": {"a": "b"}}  # shallow documents pass
    assert call(server, "PUT", "/v1/nodes/n1", doc).status == 200


# -- indexes, claims and labels: bounded by the object and by caps ----------------------------


def add_dataset(server: SchedulerServer) -> None:
    answer = call(server, "POST", "/v1/datasets", {"name": "ds", "source": "mem://x/"})
    assert answer.status == 200, answer


def chunk_report(index: int, obj: str = OBJ, size: int = SIZE) -> dict[str, Any]:
    return {"add": [{"object": obj, "size": size, "chunk_size": CHUNK, "chunks": [[index, D1]]}]}


def test_chunk_indexes_are_bounded_by_the_object_a_manifest_names(
    server: SchedulerServer,
) -> None:
    add_dataset(server)
    assert call(server, "PUT", "/v1/nodes/n1", {"address": "127.0.0.1:1"}).status == 200
    # Beyond the object, or beyond any chunk key: refused, nothing allocated or stored.
    for index in (10, 400_000_000, 2**32 - 1, 2**32, 10**30):
        answer = call(server, "POST", "/v1/nodes/n1/chunks", chunk_report(index))
        assert answer.status == 400, (index, answer)
    # A size/chunk size other than the manifest's is refused: it would move the bound.
    answer = call(server, "POST", "/v1/nodes/n1/chunks", chunk_report(5, size=2**60))
    assert answer.status == 400 and "known with size" in answer.json()["error"]
    # An object no manifest names is not recorded at all, whatever it claims to be.
    other = "cd" * 32
    answer = call(server, "POST", "/v1/nodes/n1/chunks", chunk_report(4 * 10**8, other, 2**62))
    assert answer.status == 200 and answer.json()["unknown"] == [other]
    assert call(server, "GET", f"/v1/objects/{other}/chunks").json()["digests"] == {}
    # Within the object, from the node granted its source read: recorded.
    claim = call(server, "POST", f"/v1/objects/{OBJ}/claims", {"node": "n1", "chunks": [9]})
    assert claim.json()["granted"] == [9]
    assert call(server, "POST", "/v1/nodes/n1/chunks", chunk_report(9)).status == 200
    assert call(server, "GET", f"/v1/objects/{OBJ}/chunks").json()["digests"] == {"9": D1}
    # A removal far beyond the holder bitmap costs nothing and changes nothing.
    removal = {"remove": [{"object": OBJ, "chunks": [4 * 10**8, 2**32 - 1]}]}
    assert call(server, "POST", "/v1/nodes/n1/chunks", removal).status == 200
    assert call(server, "GET", f"/v1/objects/{OBJ}/chunks?node=x").json()["peers"] == {
        "9": [{"node": "n1", "address": "127.0.0.1:1"}]
    }


def test_claims_are_capped_and_bounded_by_the_object(server: SchedulerServer) -> None:
    add_dataset(server)
    claims = f"/v1/objects/{OBJ}/claims"
    # Two million chunks: over the route's body limit, refused unread.
    many = json.dumps({"node": "n1", "chunks": list(range(2_000_000))}).encode()
    assert send_head_only(port_of(server), "POST", claims, AUTH, many).status == 413
    # Within the body limit but over the count cap.
    answer = call(server, "POST", claims, {"node": "n1", "chunks": [0] * 4097})
    assert answer.status == 400 and "'chunks'" in answer.json()["error"]
    answer = call(server, "POST", claims, {"node": "n1", "chunks": [0, 400_000_000]})
    assert answer.status == 400 and "out of range" in answer.json()["error"]
    answer = call(server, "POST", f"/v1/objects/{'ef' * 32}/claims", {"node": "n1", "chunks": [0]})
    assert answer.status == 404  # no dataset names it
    answer = call(server, "POST", claims, {"node": "n1", "chunks": [0, 9]})
    assert answer.status == 200 and answer.json()["granted"] == [0, 9]


def test_label_counts_and_sizes_are_capped(server: SchedulerServer) -> None:
    many = {f"k{i}": "v" for i in range(1025)}
    for doc in (
        {"address": "h:1", "labels": many},
        {"address": "h:1", "labels": {"k": "v" * 1025}},
        {"address": "h:1", "labels": {"k" * 256: "v"}},
        {"address": "h" * 1025},
        {"address": "h:1", "load": 2**64},
        {"address": "h:1", "ready": {f"d{i}": "r" for i in range(10_001)}},
    ):
        answer = call(server, "PUT", "/v1/nodes/n1", doc)
        assert answer.status in (400, 413), (list(doc), answer.status)
    assert call(server, "PUT", "/v1/nodes/n1", {"address": "h:1"}).status == 200
    answer = call(server, "POST", "/v1/nodes/n1/labels", {"set": many})
    assert answer.status == 400
    assert call(server, "POST", "/v1/nodes/n1/labels", {"set": {"gpu": "a10"}}).status == 200


# -- connections: capped in all and per client, dropped when idle ------------------------------


def test_a_flood_of_idle_connections_gets_no_threads(server: SchedulerServer) -> None:
    """Over the per-client cap (16 here) a client's connections are answered 503 and closed
    by the accepting thread: no thread each. Another client address is still served."""
    port = port_of(server)
    threads_before = threading.active_count()
    flood = [connect(port) for _ in range(200)]
    try:
        assert count_closed(flood) == 200 - 16
        assert threading.active_count() - threads_before <= 16 + 2
        answer = exchange(port, request_bytes("GET", "/healthz"))
        assert answer.status == 503 and answer.json()["kind"] == "TooManyConnections"
        other = exchange(port, request_bytes("GET", "/healthz"), source="127.0.0.2")
        assert other.status == 200
    finally:
        for sock in flood:
            sock.close()


_LOW_FD_SCHEDULER = """
import resource, sys
from pathlib import Path
from syncbit.config import SchedulerConfig
from syncbit.scheduler import SchedulerServer
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 400))
config = SchedulerConfig(state_dir=Path(sys.argv[1]), node_timeout=10.0)
server = SchedulerServer(config.model_copy(update={"listen": "127.0.0.1:0"}))
server.start()
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], server.address.rpartition(":")[2])
print(server.listener.limits.max_connections if server.listener else 0, flush=True)
sys.stdin.read()
server.stop()
"""


def test_a_scheduler_holds_as_many_connections_as_it_has_descriptors_for(
    tmp_path: Path,
) -> None:
    """Started with a soft limit of 64 open files (hard 400), the scheduler raises it to
    400 and caps its connections below it (what it has open, and a quarter kept for its
    own files): connections past the cap are answered 503 at once, not left unaccepted
    (EMFILE) in the backlog."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOW_FD_SCHEDULER, str(tmp_path / "state")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    flood: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        soft, port = (int(x) for x in proc.stdout.readline().split())
        cap = int(proc.stdout.readline())
        assert soft == 400 and 200 <= cap <= 300
        for i in range(cap + 20):  # from several addresses: no per-client cap in play
            flood.append(connect(port, source=f"127.0.0.{2 + i % 8}"))
        assert count_closed(flood) == 20
        answer = exchange(port, request_bytes("GET", "/healthz"), source="127.0.0.11")
        assert answer.status == 503 and answer.json()["kind"] == "TooManyConnections"
    finally:
        for sock in flood:
            sock.close()
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.close()
        proc.wait(timeout=30)
        errors = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert "Too many open files" not in errors


def test_idle_connections_are_dropped(tmp_path: Path) -> None:
    config = any_port(SchedulerConfig(state_dir=tmp_path / "s", node_timeout=TIMEOUT))
    limits = Limits(max_connections=8, max_per_client=8, idle_timeout=0.3)
    with SchedulerServer(config, limits=limits) as srv, connect(port_of(srv)) as idle:
        assert closed_by_server(idle, timeout=10)
        with connect(port_of(srv)) as busy:  # a request in time is answered as usual
            busy.sendall(request_bytes("GET", "/healthz"))
            assert read_answer(busy).status == 200
        with connect(port_of(srv)) as stalled:  # a body that stops halfway is not waited for
            head = request_bytes("PUT", "/v1/nodes/n1", {"Content-Length": "100"})
            stalled.sendall(head + b'{"address": ')
            assert closed_by_server(stalled, timeout=10)
        with connect(port_of(srv)) as partial:  # so is a head that stops halfway
            partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            assert closed_by_server(partial, timeout=10)


def test_the_idle_sweep_finds_exactly_the_waits_begun_too_long_ago() -> None:
    watch = IdleWatch(timeout=10.0)
    scopes = [trio.CancelScope() for _ in range(6)]
    for at, scope in enumerate(scopes):  # waits begin in time order, as the server adds them
        watch.waits[scope] = float(at)
    del watch.waits[scopes[1]]  # ended meanwhile
    assert watch.expired(3.0) == [scopes[0], scopes[2], scopes[3]]
    assert watch.expired(-1.0) == []
    assert watch.expired(99.0) == [scopes[i] for i in (0, 2, 3, 4, 5)]


# -- the peer server ---------------------------------------------------------------------------


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[PeerServer, list[Any]]]:
    store = ObjectStore.open(tmp_path / "cache", 1 << 30)
    seen: list[Any] = []

    async def control(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        seen.append(body)
        if path == "/v1/local/boom":
            raise RuntimeError("a bug in the daemon")
        return {"ok": True}

    server = PeerServer(store, "127.0.0.1:0", limits=Limits(max_connections=32, max_per_client=8))
    api = LocalApi()
    api.set_control(control)
    server.add_routes(api)
    server.start()
    try:
        yield server, seen
    finally:
        server.stop()
        store.close()


def test_peer_control_bodies_are_bounded_and_must_be_objects(
    peer: tuple[PeerServer, list[Any]],
) -> None:
    server, seen = peer
    port = int(server.address.rpartition(":")[2])

    def post(body: bytes, **headers: str) -> Any:
        return exchange(port, request_bytes("POST", "/v1/local/pull", headers, body))

    with connect(port) as sock:
        sock.sendall(request_bytes("POST", "/v1/local/pull", {"Content-Length": str(2**30)}))
        answer = read_answer(sock)
        assert answer.status == 413 and answer.closed
    assert post(b"[1, 2]").status == 400
    assert post(b"{not json").status == 400
    deep = b"[" * 100_000 + b"]" * 100_000  # over 64 KiB anyway
    assert send_head_only(port, "POST", "/v1/local/pull", {}, deep).status == 413
    assert post(b'{"a":' * 40 + b"1" + b"}" * 40).status == 400  # nested too deep
    assert post(b"", **{"Content-Length": "abc"}).status == 400
    assert seen == []  # none of them reached the daemon
    assert post(b'{"dataset": "ds"}').status == 200 and seen == [{"dataset": "ds"}]
    answer = exchange(port, request_bytes("POST", "/v1/local/boom", {}, b"{}"))
    assert answer.status == 500 and "daemon log" in answer.json()["error"]


def test_peer_range_headers_with_huge_numbers_are_refused(
    peer: tuple[PeerServer, list[Any]],
) -> None:
    server, _ = peer
    port = int(server.address.rpartition(":")[2])
    path = f"/v1/objects/{OBJ}/data"
    for rng in ("bytes=" + "9" * 5000 + "-1", "bytes=0-" + "1" * 20, "bytes=-5", "items=0-1"):
        answer = exchange(port, request_bytes("GET", path, {"Range": rng}))
        assert answer.status in (404, 416), rng  # not held here, or not a range we serve


def test_peer_connections_are_capped(peer: tuple[PeerServer, list[Any]]) -> None:
    server, _ = peer
    port = int(server.address.rpartition(":")[2])
    flood = [connect(port) for _ in range(40)]
    try:
        assert count_closed(flood) == 40 - 8
        assert exchange(port, request_bytes("GET", "/healthz"), source="127.0.0.3").status == 200
    finally:
        for sock in flood:
            sock.close()


# -- the parsing helpers -----------------------------------------------------------------------


def test_body_length_and_depth_helpers() -> None:
    from email.message import Message

    def headers(**values: str) -> Message:
        msg = Message()
        for key, value in values.items():
            msg[key.replace("_", "-")] = value
        return msg

    assert body_length(headers(), 10) == 0
    assert body_length(headers(Content_Length="10"), 10) == 10
    with pytest.raises(Exception, match="at most 10 bytes"):
        body_length(headers(Content_Length="11"), 10)
    assert json_depth_ok([[[]]], 3) and not json_depth_ok([[[[]]]], 3)
    assert json_depth_ok({"a": [1, {"b": 2}]}, 3) and json_depth_ok("x", 0)
    with pytest.raises(ValueError, match="nested deeper"):
        loads_bounded(b"[" * 100_000 + b"]" * 100_000)
