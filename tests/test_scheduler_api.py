"""A real SchedulerServer on 127.0.0.1 (port 0) driven by SchedulerClient: every endpoint,
error mapping at the client boundary, and a restart on the same state dir."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from fakes import Clock, MemSource
from schedulerfixtures import CHUNK, TIMEOUT, any_port

from syncbit.config import SchedulerConfig
from syncbit.errors import (
    NotFoundError,
    SchedulerError,
    SourceError,
    SourceUnavailableError,
    SyncbitError,
    UserError,
)
from syncbit.manifest import FileEntry, Manifest
from syncbit.scheduler import ChunkMap, Peer, SchedulerClient, SchedulerServer
from syncbit.scheduler.admission import Admission, Pacer
from syncbit.scheduler.client import ChunkReportResult
from syncbit.sources import Listing

OBJ_A = "a" * 64
OBJ_B = "b" * 64
D1 = "1" * 64
D2 = "2" * 64
D3 = "3" * 64


class _AnyText:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_TEXT: Any = _AnyText()


def listing(uri: str, files: dict[str, tuple[int, str]]) -> Listing:
    return Listing(
        files=[
            FileEntry(path=p, size=size, object=obj, locator=uri + p)
            for p, (size, obj) in files.items()
        ]
    )


@pytest.fixture(autouse=True)
def sources() -> Iterator[type[MemSource]]:
    one = listing("mem://one/", {"a.bin": (10, OBJ_A), "dir/b.bin": (8, OBJ_B)})
    with MemSource.serving({"mem://one/": one}):
        yield MemSource


@pytest.fixture
async def raw(server: SchedulerServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as c:
        yield c


async def heartbeat(client: SchedulerClient, node: str, port: int, load: int = 0) -> None:
    await client.heartbeat(
        node,
        address=f"127.0.0.1:{port}",
        labels={"zone": "a"},
        load=load,
        cache_bytes=1,
        cache_size=2,
    )


# -- round trips ------------------------------------------------------------------------------


def test_start_returns_the_bound_address(server: SchedulerServer) -> None:
    host, _, port = server.address.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert server.url == f"http://{server.address}"


async def test_health_and_nodes(client: SchedulerClient, clock: Clock) -> None:
    assert await client.health() is True
    assert await client.nodes() == []
    record = await client.heartbeat(
        "rack 1/n%1 ü",  # percent-encoded on the way, decoded by the server
        address="127.0.0.1:7901",
        labels={"zone": "a", "rack": "1"},
        load=2,
        cache_bytes=300,
        cache_size=4000,
        disk_full=True,
        disk_free=123,
    )
    expected = {
        "name": "rack 1/n%1 ü",
        "address": "127.0.0.1:7901",
        "labels": {"zone": "a", "rack": "1"},
        "up": True,
        "last_seen": clock.now,
        "load": 2,
        "cache_bytes": 300,
        "cache_size": 4000,
        "reports": 0,
        "label_overrides": {},
        "ready": {},
        "pinned_bytes": 0,
        "pinned_over_budget": False,
        "disk_full": True,
        "disk_free": 123,
        "quarantined": None,
    }
    # `epoch` names this scheduler instance: another one (a restart, a new leader) knows
    # no holders, and its nodes report what they hold again.
    # `heartbeat_interval`: seconds to wait before the next heartbeat, stretched with the
    # cluster's size (one node of the default 500 a second: no stretch worth the name).
    interval = record.pop("heartbeat_interval")
    assert 0 < interval <= 1.1 / 500
    # `lookup_interval`: between chunk-map lookups of parked prefetches, likewise (one node
    # of the default 500 lookups a second).
    assert record.pop("lookup_interval") == pytest.approx(1 / 500)
    assert record == {**expected, "plan": [], "rechecks": [], "discard": [], "epoch": ANY_TEXT}
    assert await client.nodes() == [expected]
    clock.now += TIMEOUT + 1
    (node,) = await client.nodes()
    assert node["up"] is False


async def test_dataset_add_list_manifest_remove(
    client: SchedulerClient, server: SchedulerServer
) -> None:
    result = await client.add_dataset("ds", "mem://one/", {"token": "t"})
    assert result["changed"] is True
    summary = result["dataset"]
    assert {k: summary[k] for k in ("name", "source", "files", "size")} == {
        "name": "ds",
        "source": "mem://one/",
        "files": 2,
        "size": 18,
    }
    assert isinstance(summary["revision"], str) and isinstance(summary["created"], float)
    assert MemSource.options_seen == [{"token": "t"}]
    assert MemSource.closed == ["mem://one/"]  # the source is closed after listing

    again = await client.add_dataset("ds", "mem://one/")
    assert again == {"dataset": summary, "changed": False, "warnings": []}

    listed = await client.datasets()
    assert listed == {"generation": 1, "datasets": [summary]}

    manifest = await client.manifest("ds")
    assert isinstance(manifest, Manifest)
    assert manifest.revision == summary["revision"]
    assert manifest.chunk_size == CHUNK  # from the scheduler's config
    assert [f.path for f in manifest.files] == ["a.bin", "dir/b.bin"]
    assert manifest.dirs == ["dir"]
    assert server.state is not None
    assert manifest == server.call(server.state.catalog.get_dataset, "ds")

    # a new revision of the same source replaces the old one
    MemSource.listings["mem://one/"] = listing("mem://one/", {"a.bin": (11, OBJ_B)})
    replaced = await client.add_dataset("ds", "mem://one/")
    assert replaced["changed"] is True
    assert replaced["dataset"]["revision"] != summary["revision"]
    assert (await client.datasets())["generation"] == 2

    await client.remove_dataset("ds")
    assert await client.datasets() == {"generation": 3, "datasets": []}
    with pytest.raises(NotFoundError, match="unknown dataset 'ds'"):
        await client.manifest("ds")
    with pytest.raises(NotFoundError, match="unknown dataset 'ds'"):
        await client.remove_dataset("ds")


async def test_chunks_chunk_map_reports_and_status(client: SchedulerClient, clock: Clock) -> None:
    await client.add_dataset("ds", "mem://one/")
    await heartbeat(client, "n1", 1, load=5)
    await heartbeat(client, "n2", 2, load=0)
    await heartbeat(client, "n3", 3)

    add_a = {"object": OBJ_A, "size": 10, "chunk_size": CHUNK}
    assert (await client.claim("n1", OBJ_A, [0, 1, 2], ttl=30)).granted == [0, 1, 2]
    answer = await client.report_chunks(
        "n1", add=[{**add_a, "chunks": [[0, D1], [1, D2], [2, D3]]}], remove=[]
    )
    assert answer == ChunkReportResult(conflicts=[], refused=[])
    answer = await client.report_chunks(
        "n2", add=[{**add_a, "chunks": [[0, D1], [1, D3]]}], remove=[]
    )
    assert answer == ChunkReportResult(conflicts=[(OBJ_A, 1)], refused=[])

    cmap = await client.chunk_map(OBJ_A, "n3")
    assert cmap == ChunkMap(
        digests={0: D1, 1: D2, 2: D3},
        peers={
            0: [Peer("n2", "127.0.0.1:2"), Peer("n1", "127.0.0.1:1")],  # least loaded first
            2: [Peer("n1", "127.0.0.1:1")],
        },
        disputed={1},  # no peer for it until a third node re-checked the source
    )
    # the requester never gets itself; no requester gets everyone
    assert Peer("n1", "127.0.0.1:1") not in (await client.chunk_map(OBJ_A, "n1")).peers[0]
    assert len((await client.chunk_map(OBJ_A)).peers[0]) == 2
    assert await client.chunk_map(OBJ_B, "n1") == ChunkMap()

    await client.report_bad_peer("n3", "n2", OBJ_A, 0, "digest mismatch")
    cmap = await client.chunk_map(OBJ_A, "n3")
    assert cmap.peers[0] == [Peer("n1", "127.0.0.1:1")]
    reports = {n["name"]: n["reports"] for n in await client.nodes()}
    assert reports == {"n1": 0, "n2": 1, "n3": 0}

    await client.report_chunks("n1", add=[], remove=[{"object": OBJ_A, "chunks": [2]}])
    assert 2 not in (await client.chunk_map(OBJ_A, "n3")).peers

    doc = await client.status()
    assert [n["name"] for n in doc["nodes"]] == ["n1", "n2", "n3"]
    (ds,) = doc["datasets"]
    assert ds["name"] == "ds" and ds["files"] == 2 and ds["size"] == 18
    assert ds["cached"] == {"n1": 8}  # chunks 0 and 1 of OBJ_A; n2's chunk 0 was reported

    clock.now += TIMEOUT + 1  # everyone down: no peers at all
    await heartbeat(client, "n3", 3)
    assert (await client.chunk_map(OBJ_A, "n3")).peers == {}


# -- errors -----------------------------------------------------------------------------------


async def test_dataset_errors_are_mapped(client: SchedulerClient, raw: httpx.AsyncClient) -> None:
    await client.add_dataset("ds", "mem://one/")
    MemSource.listings["mem://two/"] = listing("mem://two/", {"x": (1, OBJ_A)})
    with pytest.raises(UserError, match="ds already exists with source mem://one/"):
        await client.add_dataset("ds", "mem://two/")
    resp = await raw.post("/v1/datasets", json={"name": "ds", "source": "mem://two/"})
    assert resp.status_code == 409
    assert resp.json()["kind"] == "DatasetExistsError"
    # refused before listing: a source that does not even exist gets the same answer
    with pytest.raises(UserError, match="ds already exists"):
        await client.add_dataset("ds", "mem://missing/")

    with pytest.raises(UserError, match="nothing at mem://missing/"):
        await client.add_dataset("gone", "mem://missing/")
    with pytest.raises(UserError, match="unsupported source"):
        await client.add_dataset("gone", "gopher://x/")
    with pytest.raises(UserError, match="invalid dataset name"):
        await client.add_dataset("../up", "mem://one/")
    MemSource.listings["mem://evil/"] = listing("mem://evil/", {"../x": (1, OBJ_A)})
    with pytest.raises(UserError, match="unsafe file name"):
        await client.add_dataset("evil", "mem://evil/")

    MemSource.listings["mem://down/"] = SourceUnavailableError("origin refused: 503")
    with pytest.raises(SourceError, match="origin refused: 503"):
        await client.add_dataset("down", "mem://down/")
    resp = await raw.post("/v1/datasets", json={"name": "down", "source": "mem://down/"})
    assert resp.status_code == 502
    assert resp.json() == {"error": "origin refused: 503", "kind": "SourceUnavailableError"}
    assert [d["name"] for d in (await client.datasets())["datasets"]] == ["ds"]


async def test_malformed_bodies_name_the_field(
    client: SchedulerClient, raw: httpx.AsyncClient
) -> None:
    with pytest.raises(UserError, match="'address'"):
        await client.heartbeat("n1", address="")
    resp = await raw.put("/v1/nodes/n1", json={"labels": {}})
    assert resp.status_code == 400
    body = resp.json()
    assert body["kind"] == "UserError" and "'address'" in body["error"]
    resp = await raw.put("/v1/nodes/n1", json={"address": "h:1", "colour": "red"})
    assert resp.status_code == 400 and "'colour'" in resp.json()["error"]
    resp = await raw.put("/v1/nodes/n1", content=b"{not json")
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]
    resp = await raw.put("/v1/nodes/n1", json=[1, 2])
    assert resp.status_code == 400 and "JSON object" in resp.json()["error"]

    with pytest.raises(UserError, match=r"'add\.0\.chunks\.0\.1'"):
        await client.report_chunks(
            "n1",
            add=[{"object": OBJ_A, "size": 4, "chunk_size": CHUNK, "chunks": [[0, "zz"]]}],
            remove=[],
        )
    with pytest.raises(UserError, match=r"'chunk'"):
        await client.report_bad_peer("n1", "n2", OBJ_A, -1, "x")
    with pytest.raises(UserError, match="out of range"):
        await client.report_chunks(
            "n1",
            add=[{"object": OBJ_A, "size": 4, "chunk_size": CHUNK, "chunks": [[1, D1]]}],
            remove=[],
        )
    with pytest.raises(UserError, match="invalid object id"):
        await client.chunk_map("not-hex", "n1")


async def test_unknown_routes_and_methods(raw: httpx.AsyncClient) -> None:
    resp = await raw.get("/v1/nope")
    assert resp.status_code == 404 and resp.json()["kind"] == "NotFoundError"
    resp = await raw.delete("/v1/status")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET"
    assert (await raw.get("/healthz")).json() == {"ok": True}


async def test_internal_errors_send_no_traceback(
    config: SchedulerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(name: str, source: str, options: dict[str, Any], chunk_size: int) -> Manifest:
        raise RuntimeError("secret detail")

    with SchedulerServer(config, resolve=broken) as srv:
        async with SchedulerClient(srv.url) as client:
            with pytest.raises(SchedulerError) as info:
                await client.add_dataset("ds", "mem://one/")
    assert info.value.status == 500
    assert "secret detail" not in str(info.value) and "Traceback" not in str(info.value)
    assert "RuntimeError" in str(info.value)
    assert any("secret detail" in (r.exc_text or "") for r in caplog.records)


async def test_unreachable_scheduler(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on any more
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with SchedulerClient(f"http://127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(SchedulerError, match=f"127.0.0.1:{port} unreachable") as info:
            await client.datasets()
    assert not isinstance(info.value.__cause__, SchedulerError)
    assert info.value.status is None


async def test_transport_answers_are_mapped() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/status":
            return httpx.Response(503, json={"error": "stopping", "kind": "SchedulerError"})
        if path == "/v1/datasets":
            return httpx.Response(200, content=b"<html>a proxy</html>")
        if path == "/v1/nodes":
            return httpx.Response(200, json={"unexpected": 1})
        if path.endswith("/chunks"):
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(502, json={"error": "source down"})

    transport = httpx.MockTransport(answer)
    async with SchedulerClient("sched:7900", transport=transport) as client:
        with pytest.raises(SchedulerError, match="stopping") as info:
            await client.status()
        assert info.value.status == 503
        with pytest.raises(SchedulerError, match="not JSON"):
            await client.datasets()
        with pytest.raises(SchedulerError, match="malformed answer"):
            await client.nodes()
        with pytest.raises(SchedulerError, match="in time"):
            await client.chunk_map(OBJ_A, "n1")
        with pytest.raises(SourceError, match="source down"):
            await client.manifest("x")


async def test_a_malformed_plan_or_listing_is_the_schedulers_error_not_a_crash() -> None:
    """The node keeps plan entries and listings as they come and indexes them later (a
    missing key there ended its sync loop): every answer that brings one is checked in the
    client, the long poll's carried ones too, and a bad one is a SchedulerError."""
    share = {"index": 0, "count": 1}
    good_plan = [{"dataset": "d", "revision": "r", "members": [], "share": share}]
    bad_plans: list[Any] = [
        "d",
        [{"revision": "r"}],
        [{"dataset": "d", "revision": "r", "members": 5}],
        [{"dataset": "d", "revision": "r", "share": {"index": "x"}}],
        [{"dataset": ["d"], "revision": "r"}],  # the node keys its plan by it
        [{"dataset": "d", "revision": "r", "share": [0, 1]}],
    ]
    bad_listings: list[Any] = [
        {"generation": 3, "datasets": "d"},
        {"generation": "x", "datasets": []},
        {"generation": 3, "datasets": [{"name": "d"}]},
        {"generation": 3, "datasets": [{"name": 1, "revision": "r"}]},
    ]
    doc: list[Any] = [None]

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=doc[0])

    async with SchedulerClient("sched:7900", transport=httpx.MockTransport(answer)) as client:
        doc[0] = {"generation": 3, "plan": good_plan}
        assert (await client.plan("n1"))["plan"] == good_plan
        doc[0] = {"generation": 3, "datasets": [{"name": "d", "revision": "r"}], "plan": good_plan}
        assert (await client.wait_change(2, 1, "n1"))["plan"] == good_plan
        for plan in bad_plans:
            for doc[0], call in (
                ({"generation": 3, "plan": plan}, client.plan("n1")),
                ({"name": "n1", "plan": plan}, client.heartbeat("n1", address="127.0.0.1:1")),
                ({"generation": 3, "datasets": [], "plan": plan}, client.wait_change(2, 1, "n1")),
            ):
                with pytest.raises(SchedulerError, match="malformed answer"):
                    await call
        for listing in bad_listings:
            for doc[0], call in (
                (listing, client.datasets()),
                ({**listing, "plan": good_plan}, client.wait_change(2, 1, "n1")),
            ):
                with pytest.raises(SchedulerError, match="malformed answer"):
                    await call


async def test_the_client_reads_the_compact_chunk_map_and_the_full_one() -> None:
    """The client asks for peers by name (each address once); a scheduler from before that
    form answers the full one, read the same; a name without an address is malformed."""
    answers = {
        "compact": {
            "digests": {"0": "aa"},
            "peers": {"0": ["n2", "n3"]},
            "addresses": {"n2": "10.0.0.2:7000", "n3": "10.0.0.3:7000"},
            "cursor": "v.4",
        },
        "full": {
            "digests": {"0": "aa"},
            "peers": {
                "0": [
                    {"node": "n2", "address": "10.0.0.2:7000"},
                    {"node": "n3", "address": "10.0.0.3:7000"},
                ]
            },
            "cursor": "v.4",
        },
        "broken": {"digests": {}, "peers": {"0": ["n9"]}, "addresses": {}},
    }
    form = ["compact"]
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.params.get("peers", ""))
        return httpx.Response(200, json=answers[form[0]])

    async with SchedulerClient("sched:7900", transport=httpx.MockTransport(answer)) as client:
        maps = []
        for form[0] in ("compact", "full"):
            maps.append(await client.chunk_map(OBJ_A, "n1"))
        form[0] = "broken"
        with pytest.raises(SchedulerError, match="malformed answer"):
            await client.chunk_map(OBJ_A, "n1")
    assert asked == ["names"] * 3
    assert maps[0] == maps[1]
    assert maps[0].peers[0] == [Peer("n2", "10.0.0.2:7000"), Peer("n3", "10.0.0.3:7000")]


# -- concurrency and lifecycle ----------------------------------------------------------------


async def test_concurrent_clients(server: SchedulerServer) -> None:
    MemSource.listings["mem://sixteen/"] = listing("mem://sixteen/", {"a": (64, OBJ_A)})
    async with SchedulerClient(server.url) as c:
        await c.add_dataset("sixteen", "mem://sixteen/")  # names OBJ_A: 64 bytes

    async def one_node(i: int) -> None:
        async with SchedulerClient(server.url) as c:
            for _ in range(5):
                await heartbeat(c, f"n{i}", 1000 + i)
            assert (await c.claim(f"n{i}", OBJ_A, [i], ttl=30)).granted == [i]
            await c.report_chunks(
                f"n{i}",
                add=[{"object": OBJ_A, "size": 64, "chunk_size": CHUNK, "chunks": [[i, D1]]}],
                remove=[],
            )

    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(one_node, i)
    async with SchedulerClient(server.url) as c:
        assert len(await c.nodes()) == 16
        assert sorted((await c.chunk_map(OBJ_A)).peers) == list(range(16))


async def test_restart_keeps_durable_facts_and_relearns_the_soft_state(
    config: SchedulerConfig, clock: Clock
) -> None:
    """Datasets, manifests, registrations and digests survive a restart; who holds what
    and who is up are soft state: a new epoch in the heartbeat answer asks every node to
    report its chunks again, and the answers are as before once it has."""
    report = {"object": OBJ_A, "size": 10, "chunk_size": CHUNK, "chunks": [[0, D1]]}
    first = SchedulerServer(config, clock=clock)
    first.start()
    try:
        async with SchedulerClient(first.url) as client:
            await client.add_dataset("ds", "mem://one/")
            await heartbeat(client, "n1", 1)
            epoch = (await client.heartbeat("n2", address="127.0.0.1:2"))["epoch"]
            await client.claim("n1", OBJ_A, [0], ttl=30)
            await client.report_chunks("n1", add=[report], remove=[])
            await client.report_bad_peer("n2", "n1", OBJ_B, 0, "refused")
            before = (
                await client.datasets(),
                await client.manifest("ds"),
                await client.nodes(),
                await client.chunk_map(OBJ_A, "n2"),
                await client.status(),
            )
            # an idle keep-alive connection stays open across the stop below
            began = time.monotonic()
            first.stop()
            assert time.monotonic() - began < 5
            with pytest.raises(SchedulerError, match="unreachable"):
                await client.status()
    finally:
        first.stop()

    second = SchedulerServer(config, clock=clock)
    second.start()
    try:
        async with SchedulerClient(second.url) as client:
            assert await client.datasets() == before[0]
            assert await client.manifest("ds") == before[1]
            nodes = await client.nodes()  # registered, down until they heartbeat
            assert [(n["name"], n["address"], n["up"]) for n in nodes] == [
                ("n1", "127.0.0.1:1", False),
                ("n2", "127.0.0.1:2", False),
            ]
            known = await client.chunk_map(OBJ_A, "n2")
            assert (known.digests, known.peers) == (before[3].digests, {})
            assert (await client.add_dataset("ds", "mem://one/"))["changed"] is False
            # The nodes come back, see a new epoch and report what they hold.
            assert (await client.heartbeat("n2", address="127.0.0.1:2"))["epoch"] != epoch
            await heartbeat(client, "n1", 1)
            answer = await client.report_chunks("n1", add=[report], remove=[])
            assert answer == ChunkReportResult()  # the digest was kept: no grant needed
            after = await client.chunk_map(OBJ_A, "n2")
            assert after == before[3]
            assert after.peers == {0: [Peer("n1", "127.0.0.1:1")]}
            status = await client.status()
            assert status["datasets"] == before[4]["datasets"]
    finally:
        second.stop()


def test_listen_failure_is_a_scheduler_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        cfg = SchedulerConfig(
            listen=f"127.0.0.1:{port}", state_dir=tmp_path / "s", node_timeout=TIMEOUT
        )
        with pytest.raises(SchedulerError, match="cannot listen"):
            SchedulerServer(cfg).start()
    # the state was closed again: a second server can open it
    with SchedulerServer(any_port(SchedulerConfig(state_dir=tmp_path / "s", node_timeout=1))):
        pass


async def test_generation_long_poll_answers_on_change_or_timeout(
    client: SchedulerClient, server: SchedulerServer, raw: httpx.AsyncClient
) -> None:
    start = (await raw.get("/v1/generation")).json()["generation"]
    # Nothing changes: the poll waits its timeout and answers the same generation.
    began = time.monotonic()
    assert await client.wait_generation(start, timeout=0.3) == start
    assert time.monotonic() - began >= 0.3
    # A change answers a waiting poll at once, long before its timeout.
    got: list[int] = []

    async def poll() -> None:
        got.append(await client.wait_generation(start, timeout=20))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await trio.sleep(0.2)
            assert not got  # still waiting
            await client.add_dataset("ds", "mem://one/")
    assert got == [start + 1]
    # A poll behind the current generation answers at once.
    with trio.fail_after(2):
        assert await client.wait_generation(start, timeout=20) == start + 1
    for bad in ("after=x", "after=1&timeout=nan", "after=1&timeout=soon"):
        resp = await raw.get(f"/v1/generation?{bad}")
        assert resp.status_code == 400 and "after must be an integer" in resp.json()["error"]


async def test_a_nodes_poll_that_saw_a_change_carries_the_listing_and_its_plan(
    client: SchedulerClient, raw: httpx.AsyncClient
) -> None:
    """Each woken node asked next for the listing and its plan: the poll answers both, as
    of its generation and equal to what those routes say; a poll that saw no change, or
    one without a node, answers the generation alone."""
    await heartbeat(client, "n1", 7001)
    start = await client.wait_generation(-1, timeout=0)
    quiet = await client.wait_change(start, 0.2, "n1")
    assert quiet == {"generation": start}
    await client.add_dataset("ds", "mem://one/")
    await client.assign("ds", [{"node": "n1"}])
    answer = await client.wait_change(start, 20, "n1")
    listing = await client.datasets()
    assert answer["generation"] == listing["generation"] > start
    assert answer["datasets"] == listing["datasets"]
    assert answer["plan"] == (await client.plan("n1"))["plan"]
    assert [e["dataset"] for e in answer["plan"]] == ["ds"]
    bare = (await raw.get(f"/v1/generation?after={start}&timeout=1")).json()
    assert bare == {"generation": listing["generation"]}
    for bad in ("a\x01b", "n" * 300):
        resp = await raw.get("/v1/generation", params={"after": start, "node": bad})
        assert resp.status_code == 400, resp.text


async def test_a_change_answers_the_waiting_long_polls_at_the_wake_rate(
    tmp_path: Path,
) -> None:
    """A dataset added wakes every node's long poll: the answers are spread at
    `wake_rate` a second (each woken node asks for the listing, a manifest and its plan;
    5,000 at once held heartbeats seconds behind them), all with the new generation."""
    config = SchedulerConfig(state_dir=tmp_path / "s", chunk_size=CHUNK, wake_rate=20)
    answered: list[tuple[float, int]] = []
    with (
        MemSource.serving({"mem://one/": Listing(files=[])}),
        SchedulerServer(any_port(config)) as server,
    ):
        async with SchedulerClient(server.url) as client:
            start = await client.wait_generation(-1, timeout=0)

            async def poll() -> None:
                generation = await client.wait_generation(start, timeout=20)
                answered.append((trio.current_time(), generation))

            with trio.fail_after(15):
                async with trio.open_nursery() as nursery:
                    for _ in range(10):
                        nursery.start_soon(poll)
                    await trio.sleep(0.3)
                    assert not answered
                    changed = trio.current_time()
                    await client.add_dataset("ds", "mem://one/")
    assert [g for _, g in answered] == [start + 1] * 10
    times = sorted(t - changed for t, _ in answered)
    # One every 50 ms: the tenth ~0.45 s after the first (unpaced, all within a few ms).
    assert times[-1] - times[0] >= 0.35, times


def test_the_pacer_spreads_a_burst_and_lets_a_lone_answer_go_at_once() -> None:
    pacer = Pacer(rate=100.0)
    assert [pacer.turn(5.0) for _ in range(3)] == pytest.approx([5.0, 5.01, 5.02])
    assert pacer.turn(9.0) == 9.0  # long after the burst: at once
    with pytest.raises(ValueError):
        Pacer(rate=0)


def test_a_paced_pacer_holds_turns_while_the_loop_is_behind() -> None:
    """Paced by the admission's loop, turns go out at the rate, in order, none while the
    loop is behind; an answer whose deadline comes first goes then, and is skipped."""
    pacer = Pacer(rate=50.0)  # one turn per 20 ms tick at most
    order: list[int] = []

    async def main() -> None:
        Admission().pace(pacer)
        t0 = trio.current_time()

        async def answer(i: int, deadline: float) -> None:
            await pacer.wait(deadline)
            order.append(i)

        async def tick(hold: bool = False) -> None:
            await trio.sleep(0.03)
            pacer.release(trio.current_time(), hold=hold)
            await trio.sleep(0.001)  # whatever was let go has run

        async with trio.open_nursery() as nursery:
            for i in range(4):  # arriving one after the other
                nursery.start_soon(answer, i, t0 + (0.5 if i == 3 else 100.0))
                await trio.sleep(0.001)
            pacer.release(trio.current_time(), hold=False)  # the first look: no tokens yet
            for _ in range(5):
                await tick(hold=True)  # behind: nothing goes
            assert order == [] and pacer.waiting == 4
            await tick()
            assert order == [0]
            await tick()
            assert order == [0, 1]  # one per tick, in order
            await trio.sleep(0.5)  # answer 3's deadline passes while it waits
            assert order == [0, 1, 3]
            await tick()
            await tick()
        assert order == [0, 1, 3, 2] and pacer.waiting == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_stopping_the_scheduler_ends_long_polls(server: SchedulerServer) -> None:
    async with SchedulerClient(server.url) as client:
        generation = await client.wait_generation(-1, timeout=0)
        failed: list[Exception] = []

        async def poll() -> None:
            try:
                await client.wait_generation(generation, timeout=50)
            except SyncbitError as exc:
                failed.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(0.2)
                await trio.to_thread.run_sync(server.stop)
        assert failed  # answered (or dropped) at once, not after 50 s
