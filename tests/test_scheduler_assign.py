"""Assignments, operator labels, prefetch plans and source-fetch claims, through a real
SchedulerServer on loopback driven by SchedulerClient."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import Clock, MemSource
from schedulerfixtures import CHUNK, TIMEOUT

from syncbit.config import SchedulerConfig
from syncbit.errors import NotFoundError, UnauthorizedError, UserError
from syncbit.manifest import FileEntry
from syncbit.scheduler import SchedulerClient, SchedulerServer
from syncbit.scheduler.claims import Claims
from syncbit.sources import Listing

OBJ_A = "a" * 64
D1 = "1" * 64
D2 = "2" * 64


@pytest.fixture(autouse=True)
def _listed() -> Iterator[None]:
    one = FileEntry(path="a.bin", size=10, object=OBJ_A, locator="a.bin")
    with MemSource.serving({"mem://one/": Listing(files=[one])}):
        yield


async def beat(client: SchedulerClient, node: str, **labels: str) -> dict[str, object]:
    return await client.heartbeat(node, address=f"127.0.0.1:1{len(node)}", labels=labels)


async def test_assignment_by_selector_and_node_name(client: SchedulerClient) -> None:
    await client.add_dataset("one", "mem://one/")
    await beat(client, "n1", gpu="h100")
    await beat(client, "n2", gpu="a10")
    await beat(client, "n3", gpu="h100")
    before = (await client.datasets())["generation"]
    targets = await client.assign("one", [{"selector": {"gpu": "h100"}}, {"node": "n2"}])
    assert targets == [{"selector": {"gpu": "h100"}}, {"node": "n2"}]
    assert (await client.datasets())["generation"] > before  # nodes notice at once

    plan = (await client.plan("n1"))["plan"]
    assert [(p["dataset"], p["members"]) for p in plan] == [("one", ["n1", "n2", "n3"])]
    status = await client.status()
    (ds,) = status["datasets"]
    assert ds["assigned"] == ["n1", "n2", "n3"]
    assert ds["ready"] == []

    # A node registering later that matches the selector is assigned too.
    record = await beat(client, "n4", gpu="h100")
    assert [p["dataset"] for p in record["plan"]] == ["one"]  # type: ignore[attr-defined]
    await beat(client, "n5", gpu="t4")
    assert (await client.plan("n5"))["plan"] == []

    assert await client.unassign("one", [{"node": "n2"}]) == [{"selector": {"gpu": "h100"}}]
    assert (await client.plan("n2"))["plan"] == []
    with pytest.raises(NotFoundError, match="not assigned to node n2"):
        await client.unassign("one", [{"node": "n2"}])
    assert await client.unassign("one", None) == []
    assert (await client.plan("n1"))["plan"] == []


async def test_assignment_errors(client: SchedulerClient) -> None:
    with pytest.raises(NotFoundError, match="unknown dataset 'nope'"):
        await client.assign("nope", [{"node": "n1"}])
    await client.add_dataset("one", "mem://one/")
    with pytest.raises(UserError, match="either"):
        await client.assign("one", [{"node": "n1", "selector": {"a": "b"}}])
    # No target at all means every node.
    assert await client.assign("one", []) == [{"selector": {}}]
    await beat(client, "anything")
    assert [p["dataset"] for p in (await client.plan("anything"))["plan"]] == ["one"]


async def test_plan_members_are_up_nodes_only(client: SchedulerClient, clock: Clock) -> None:
    await client.add_dataset("one", "mem://one/")
    await client.assign("one", [{"selector": {"role": "gpu"}}])
    await beat(client, "a", role="gpu")
    await beat(client, "b", role="gpu")
    clock.now += TIMEOUT + 1  # both go quiet; only a comes back
    await beat(client, "a", role="gpu")
    assert (await client.plan("a"))["plan"][0]["members"] == ["a"]


async def test_labels_edits_survive_heartbeats_and_restart(
    client: SchedulerClient, server: SchedulerServer, config: SchedulerConfig, clock: Clock
) -> None:
    await client.add_dataset("one", "mem://one/")
    await client.assign("one", [{"selector": {"gpu": "h100"}}])
    await beat(client, "n1", zone="a")
    assert (await client.plan("n1"))["plan"] == []
    before = (await client.datasets())["generation"]
    record = await client.edit_labels("n1", {"gpu": "h100"}, ["zone"])
    assert record["labels"] == {"gpu": "h100"}
    assert (await client.datasets())["generation"] > before
    await beat(client, "n1", zone="a")  # the daemon's own labels do not undo the edit
    (node,) = await client.nodes()
    assert node["labels"] == {"gpu": "h100"}
    assert [p["dataset"] for p in (await client.plan("n1"))["plan"]] == ["one"]
    with pytest.raises(NotFoundError, match="unknown node"):
        await client.edit_labels("ghost", {"a": "b"}, [])
    with pytest.raises(UserError, match="invalid label key"):
        await client.edit_labels("n1", {"a=b": "c"}, [])

    server.stop()
    again = SchedulerServer(config, clock=clock)
    again.start()
    try:
        async with SchedulerClient(again.url) as fresh:
            (node,) = await fresh.nodes()
            assert node["labels"] == {"gpu": "h100"}
            assert await fresh.assignments() == {"one": [{"selector": {"gpu": "h100"}}]}
    finally:
        again.stop()


async def test_removing_a_dataset_drops_its_assignments(client: SchedulerClient) -> None:
    await client.add_dataset("one", "mem://one/")
    await client.assign("one", [{"node": "n1"}])
    await client.remove_dataset("one")
    assert await client.assignments() == {}
    await client.add_dataset("one", "mem://one/")
    assert await client.assignments() == {}


async def test_ready_reported_by_heartbeat_shows_in_status(client: SchedulerClient) -> None:
    summary = (await client.add_dataset("one", "mem://one/"))["dataset"]
    await client.heartbeat("n1", address="127.0.0.1:1", ready={"one": summary["revision"]})
    await client.heartbeat("n2", address="127.0.0.1:2", ready={"one": "an-old-revision"})
    (ds,) = (await client.status())["datasets"]
    assert ds["ready"] == ["n1"]


async def test_claims_give_each_chunk_to_one_fetcher(client: SchedulerClient) -> None:
    await client.add_dataset("one", "mem://one/")  # names OBJ_A: 10 bytes, 3 chunks
    await beat(client, "a")
    await beat(client, "b")
    first = await client.claim("a", OBJ_A, [0, 1, 2], ttl=30)
    assert (first.granted, first.busy) == ([0, 1, 2], {})
    await client.release("a", OBJ_A, [0])
    second = await client.claim("b", OBJ_A, [0, 1, 2], ttl=30)
    assert (second.granted, second.busy) == ([0], {1: "a", 2: "a"})
    assert (await client.chunk_map(OBJ_A, "b")).fetching == {1: "a", 2: "a"}
    assert (await client.chunk_map(OBJ_A, "a")).fetching == {0: "b"}

    # Reporting a chunk ends its claim; the chunk is then held, not claimable.
    await client.report_chunks(
        "a",
        add=[{"object": OBJ_A, "size": 10, "chunk_size": CHUNK, "chunks": [[1, D1]]}],
        remove=[],
    )
    third = await client.claim("b", OBJ_A, [1], ttl=30)
    assert (third.granted, third.busy, third.held) == ([], {}, [1])

    # A failed fetch releases its claim for someone else.
    await client.release("a", OBJ_A, [2])
    assert (await client.claim("b", OBJ_A, [2], ttl=30)).granted == [2]


async def test_claims_of_a_down_node_do_not_block(client: SchedulerClient, clock: Clock) -> None:
    await client.add_dataset("one", "mem://one/")
    await beat(client, "a")
    assert (await client.claim("a", OBJ_A, [0], ttl=300)).granted == [0]
    clock.now += TIMEOUT + 1  # a stops heartbeating while holding a claim
    await beat(client, "b")
    assert (await client.claim("b", OBJ_A, [0], ttl=30)).granted == [0]
    # And the digest-conflict path of reports is unchanged by claims.
    await client.report_chunks(
        "b",
        add=[{"object": OBJ_A, "size": 10, "chunk_size": CHUNK, "chunks": [[0, D2]]}],
        remove=[],
    )


def test_claims_expire() -> None:
    now = [100.0]
    claims = Claims(clock=lambda: now[0])
    assert claims.claim("a", OBJ_A, [0], ttl=5, up={"a", "b"}) == ([0], {})
    assert claims.claim("b", OBJ_A, [0], ttl=5, up={"a", "b"}) == ([], {0: "a"})
    now[0] += 6
    assert claims.fetching(OBJ_A, {"a", "b"}, "b") == {}
    assert claims.claim("b", OBJ_A, [0], ttl=5, up={"a", "b"}) == ([0], {})


async def test_health_readiness_and_metrics(
    client: SchedulerClient, server: SchedulerServer
) -> None:
    import httpx

    summary = (await client.add_dataset("one", "mem://one/"))["dataset"]
    await client.assign("one", [{"selector": {}}])
    await client.heartbeat("n1", address="127.0.0.1:1", ready={"one": summary["revision"]})
    await client.heartbeat("n2", address="127.0.0.1:2")
    await client.claim("n2", OBJ_A, [0, 1], ttl=30)
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as raw:
        assert (await raw.get("/healthz")).json()["ok"] is True
        ready = await raw.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ok"] is True
        resp = await raw.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert 'syncbit_scheduler_nodes{state="up"} 2.0' in text
    assert "syncbit_scheduler_datasets 1.0" in text
    assert 'syncbit_scheduler_dataset_assigned_nodes{dataset="one"} 2.0' in text
    assert 'syncbit_scheduler_dataset_ready_nodes{dataset="one"} 1.0' in text
    assert "syncbit_scheduler_claims 2.0" in text
    assert 'syncbit_scheduler_requests_total{method="PUT",route="heartbeat"} 2.0' in text
    # How long requests took, by route (a heartbeat well within the histogram's range),
    # and how far behind the loop ran: what an operator of a large cluster watches.
    assert 'syncbit_scheduler_request_seconds_count{route="heartbeat"} 2.0' in text
    assert 'syncbit_scheduler_request_seconds_bucket{le="60.0",route="heartbeat"} 2.0' in text
    assert 'syncbit_scheduler_request_seconds_count{route="claim"} 1.0' in text
    lag = [ln for ln in text.splitlines() if ln.startswith("syncbit_scheduler_loop_lag_seconds ")]
    assert len(lag) == 1 and float(lag[0].split()[1]) >= 0.0


async def test_a_scrape_builds_no_overview(
    client: SchedulerClient, server: SchedulerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics counts; it never builds `status` or every node's record (O(nodes x
    datasets): at 5,000 nodes a scrape held the loop, and every heartbeat, for 0.3-0.75 s)."""
    import httpx

    await client.add_dataset("one", "mem://one/")
    await client.heartbeat("n1", address="127.0.0.1:1")
    state = server.state
    assert state is not None

    def overview(*_: object) -> None:
        raise AssertionError("a scrape built the overview")

    monkeypatch.setattr(state, "status_json", overview)
    monkeypatch.setattr(state, "nodes", overview)
    monkeypatch.setattr(state, "nodes_json", overview)
    monkeypatch.setattr(state, "node", overview)
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as raw:
        resp = await raw.get("/metrics")
    assert resp.status_code == 200
    assert 'syncbit_scheduler_nodes{state="up"} 1.0' in resp.text
    assert 'syncbit_scheduler_dataset_ready_nodes{dataset="one"} 0.0' in resp.text


async def test_cluster_token_guards_every_route_but_the_probes(
    tmp_path: Path, config: SchedulerConfig
) -> None:
    import httpx

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    server = SchedulerServer(config.model_copy(update={"token_file": token_file}))
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, trust_env=False) as raw:
            assert (await raw.get("/healthz")).status_code == 200
            assert (await raw.get("/readyz")).status_code == 200
            denied = await raw.get("/v1/status")
            assert denied.status_code == 401
            assert "token" in denied.json()["error"]
            assert (
                await raw.get("/v1/status", headers={"Authorization": "Bearer wrong"})
            ).status_code == 401
        async with SchedulerClient(server.url, token="wrong") as bad:
            with pytest.raises(UnauthorizedError, match="missing or wrong cluster token"):
                await bad.status()
        async with SchedulerClient(server.url, token="s3cret-token") as good:
            await good.heartbeat("n1", address="127.0.0.1:1")
            assert [n["name"] for n in await good.nodes()] == ["n1"]
    finally:
        server.stop()


async def test_chunk_maps_and_heartbeats_do_not_reread_every_node(
    client: SchedulerClient, server: SchedulerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a thousand nodes, a node list per chunk-map poll or heartbeat would dominate the
    scheduler: up nodes and plans are computed once and reused briefly."""
    await client.add_dataset("one", "mem://one/")
    await client.assign("one", [{"selector": {}}])
    for i in range(5):
        await beat(client, f"n{i}")
    assert server.state is not None
    reads = [0]
    nodes = server.state.nodes

    def counted() -> list[Any]:
        reads[0] += 1
        return nodes()

    monkeypatch.setattr(server.state, "nodes", counted)
    for _ in range(20):
        await client.chunk_map(OBJ_A, "n1")
        await client.heartbeat("n1", address="127.0.0.1:12", labels={})
    assert reads[0] <= 6  # 20 of each, with the clock standing still
    assert [p["members"] for p in (await client.plan("n3"))["plan"]] == [
        ["n0", "n1", "n2", "n3", "n4"]
    ]
