"""A client of scheduler replicas (`--scheduler URL1,URL2,URL3`, what daemons and the CLI
use): it asks the replica that answered last first, fails over past one that cannot be
reached or cannot answer now (503), never past an answer that is an error of the request,
and says in one line why when none answered."""

from __future__ import annotations

import httpx
import pytest

from syncbit.errors import (
    NotFoundError,
    NotLeaderError,
    SchedulerError,
    StateUnavailableError,
    UserError,
)
from syncbit.scheduler import SchedulerClient
from syncbit.scheduler.endpoints import parse_urls

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
        return httpx.Response(200, json={"datasets": [{"name": host}]})


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
