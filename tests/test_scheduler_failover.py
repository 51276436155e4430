"""A client of scheduler replicas (`--scheduler URL1,URL2,URL3`, what daemons and the CLI
use): it asks the replica that answered last first, fails over past one that cannot be
reached or cannot answer now (503), never past an answer that is an error of the request,
and says in one line why when none answered."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from syncbit.errors import (
    NotFoundError,
    NotLeaderError,
    SchedulerBusyError,
    SchedulerError,
    StateUnavailableError,
    UserError,
)
from syncbit.scheduler import SchedulerClient
from syncbit.scheduler.endpoints import parse_urls, run_blocking

A, B, C = "http://sched-a:7900", "http://sched-b:7900", "http://sched-c:7900"


class Replicas:
    """Three replicas behind a MockTransport: each is up, down (refuses connections),
    or 'no leader' (503 NotLeaderError); every request is recorded by host."""

    def __init__(self) -> None:
        self.mode = {"sched-a": "up", "sched-b": "up", "sched-c": "up"}
        self.asked: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.asked.append(host)
        mode = self.mode[host]
        if mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if mode == "no-leader":
            doc = {"error": "no scheduler leads now", "kind": "NotLeaderError"}
            return httpx.Response(503, json=doc)
        if request.url.path == "/v1/datasets/missing":
            return httpx.Response(404, json={"error": "unknown dataset", "kind": "NotFoundError"})
        listing = {"generation": 1, "datasets": [{"name": host, "revision": "r1"}]}
        return httpx.Response(200, json=listing)


async def names(c: SchedulerClient) -> list[str]:
    return [d["name"] for d in (await c.datasets())["datasets"]]


def client(replicas: Replicas, urls: str = f"{A},{B},{C}") -> SchedulerClient:
    return SchedulerClient(urls, transport=httpx.MockTransport(replicas))


async def test_a_replica_that_is_down_is_passed_and_the_next_one_kept() -> None:
    replicas = Replicas()
    replicas.mode["sched-a"] = "down"
    async with client(replicas) as c:
        assert await names(c) == ["sched-b"]
        assert c.base_url == B
        replicas.asked.clear()
        await c.datasets()
        assert replicas.asked == ["sched-b"]  # the one that answered is asked first
        replicas.mode["sched-b"] = "down"
        assert await names(c) == ["sched-c"]
        replicas.mode["sched-a"] = "up"
        replicas.mode["sched-c"] = "down"
        assert await names(c) == ["sched-a"]  # round the list


async def test_a_replica_without_a_leader_hands_on_and_its_reason_is_kept() -> None:
    replicas = Replicas()
    replicas.mode["sched-a"] = "no-leader"
    async with client(replicas) as c:
        assert await names(c) == ["sched-b"]
        replicas.mode.update({"sched-a": "down", "sched-b": "no-leader", "sched-c": "down"})
        with pytest.raises(NotLeaderError, match="no scheduler leads now"):
            await c.datasets()
        assert replicas.asked[-3:] == ["sched-b", "sched-c", "sched-a"]


async def test_an_error_of_the_request_is_not_failed_over() -> None:
    replicas = Replicas()
    async with client(replicas) as c:
        with pytest.raises(NotFoundError, match="unknown dataset"):
            await c.manifest("missing")
        assert replicas.asked == ["sched-a"]


async def test_none_reachable_is_one_line_naming_each() -> None:
    replicas = Replicas()
    replicas.mode.update(dict.fromkeys(replicas.mode, "down"))
    async with client(replicas) as c:
        with pytest.raises(SchedulerError) as info:
            await c.datasets()
    message = str(info.value)
    assert "\n" not in message
    assert all(url in message for url in (A, B, C)) and "connection refused" in message
    assert sorted(replicas.asked) == ["sched-a", "sched-b", "sched-c"]  # each once


async def test_one_url_behaves_as_before() -> None:
    replicas = Replicas()
    replicas.mode["sched-a"] = "no-leader"
    async with client(replicas, A) as c:
        with pytest.raises(NotLeaderError):
            await c.datasets()
        replicas.mode["sched-a"] = "down"
        with pytest.raises(SchedulerError, match=f"scheduler at {A} unreachable"):
            await c.datasets()


async def test_a_state_store_outage_answered_by_every_replica_is_said_once() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        doc = {"error": "etcd has no quorum", "kind": "StateUnavailableError"}
        return httpx.Response(503, json=doc)

    async with SchedulerClient(f"{A},{B}", transport=httpx.MockTransport(answer)) as c:
        with pytest.raises(StateUnavailableError, match=r"^etcd has no quorum$"):
            await c.add_dataset("ds", "mem://x/")


def test_urls_are_parsed_or_refused_clearly() -> None:
    assert parse_urls(" 10.0.0.1:7900 , https://s2:7900/ ,") == [
        "http://10.0.0.1:7900",
        "https://s2:7900",
    ]
    assert parse_urls(["http://a:1", "b:2"]) == ["http://a:1", "http://b:2"]
    for bad in ("", " , ", "ftp://a:1", "http://"):
        with pytest.raises(UserError, match="scheduler URL"):
            parse_urls(bad)


# -- the CLI's blocking client: the same failover over real sockets ---------------------------


class LoopbackReplica:
    """A replica on a loopback port of its own, answering as `Replicas` does (its mode:
    "up", "no-leader", "busy" or "down": nothing listens); requests counted."""

    def __init__(self, name: str) -> None:
        self.name, self.mode, self.asked = name, "up", 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        replica = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if replica.mode == "down":  # a kept-alive connection outlives the listener
                    self.close_connection = True
                    return
                replica.asked += 1
                doc: dict[str, Any]
                if replica.mode == "no-leader":
                    doc, status = {"error": "no leader here", "kind": "NotLeaderError"}, 503
                elif replica.mode == "busy":
                    doc, status = {"error": "busy", "kind": "SchedulerBusyError"}, 429
                elif self.path == "/v1/datasets/missing":
                    doc, status = {"error": "unknown dataset", "kind": "NotFoundError"}, 404
                else:
                    doc = {
                        "generation": 1,
                        "datasets": [{"name": replica.name, "revision": "r1"}],
                        "auth": self.headers["Authorization"],
                    }
                    status = 200
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 429:
                    self.send_header("Retry-After", "7")
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def down(self) -> None:
        if self.mode != "down":
            self.mode = "down"
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=10)


@pytest.fixture
def loopback_replicas() -> Iterator[list[LoopbackReplica]]:
    replicas = [LoopbackReplica(name) for name in ("a", "b", "c")]
    try:
        yield replicas
    finally:
        for replica in replicas:
            replica.down()


def blocking(replicas: list[LoopbackReplica], token: str | None = None) -> SchedulerClient:
    urls = ",".join(r.url for r in replicas)
    return SchedulerClient(urls, token=token, timeout=5, blocking=True)


def blocking_names(c: SchedulerClient) -> list[str]:
    return [d["name"] for d in run_blocking(c.datasets())["datasets"]]


def test_the_blocking_client_fails_over_as_the_async_one(
    loopback_replicas: list[LoopbackReplica],
) -> None:
    a, b, c = loopback_replicas
    client = blocking(loopback_replicas, token="secret")
    try:
        a.down()
        assert blocking_names(client) == ["b"]
        assert client.base_url == b.url
        b.mode = "no-leader"
        assert blocking_names(client) == ["c"]  # the 503 handed on, the next one kept
        doc = run_blocking(client.datasets())
        assert doc["auth"] == "Bearer secret"
        asked = (b.asked, c.asked)
        with pytest.raises(NotFoundError, match="unknown dataset"):
            run_blocking(client.manifest("missing"))
        assert (b.asked, c.asked) == (asked[0], asked[1] + 1)  # an error of the request stays
        c.mode = "busy"
        with pytest.raises(SchedulerBusyError) as busy:
            run_blocking(client.datasets())
        assert busy.value.retry_after == 7.0
        c.down()
        with pytest.raises(NotLeaderError, match="no leader here"):
            run_blocking(client.datasets())  # the reason of the one that said why
        b.down()
        with pytest.raises(SchedulerError) as none:
            run_blocking(client.datasets())
        message = str(none.value)
        assert "\n" not in message and all(r.url in message for r in loopback_replicas)
    finally:
        run_blocking(client.aclose())


def test_a_blocking_call_that_would_suspend_is_refused() -> None:
    async def suspends() -> None:
        await trio.sleep(0)

    with pytest.raises(RuntimeError, match="suspended"):
        run_blocking(suspends())


def test_the_clis_scheduler_commands_load_neither_trio_nor_httpx(
    loopback_replicas: list[LoopbackReplica],
) -> None:
    """`syncbit dataset ls` (any command that asks the scheduler) starts ~0.15 s sooner
    without them; its answer is the scheduler's."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['syncbit', 'dataset', 'ls', '--json', '--scheduler', sys.argv[1]]\n"
        "try:\n"
        "    runpy.run_module('syncbit.cli', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "loaded = sorted({'trio', 'httpx', 'huggingface_hub'} & set(sys.modules))\n"
        "print('loaded', loaded, file=sys.stderr)\n"
        "sys.exit(3 if loaded else 0)\n"
    )
    urls = f"{loopback_replicas[0].url},{loopback_replicas[1].url}"
    loopback_replicas[0].down()
    out = subprocess.run(
        [sys.executable, "-c", code, urls], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["name"] == "b"
