"""SchedulerState on a temporary LMDB: nodes and liveness, datasets, digests, holders,
bad-peer reports, chunk maps, status, and what survives a reopen (the durable facts)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from fakes import Clock

from syncbit.errors import NotFoundError, SchedulerError, UserError
from syncbit.manifest import FileEntry, Manifest, build_manifest
from syncbit.scheduler.api import Api
from syncbit.scheduler.chunkapi import Call
from syncbit.scheduler.live import LAG_FLOOR, LAG_TURNS
from syncbit.scheduler.policy import LeastLoaded
from syncbit.scheduler.records import held_bytes
from syncbit.scheduler.server import SchedulerServer
from syncbit.scheduler.state import (
    TURN,
    DatasetExistsError,
    NodeInfo,
    SchedulerState,
    open_lmdb_state,
)

TIMEOUT = 10.0
OBJ_A = "a" * 64
OBJ_B = "b" * 64
D1 = "1" * 64
D2 = "2" * 64
D3 = "3" * 64
CHUNK = 4


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
async def state(tmp_path: Path, clock: Clock) -> AsyncIterator[SchedulerState]:
    async with open_lmdb_state(tmp_path / "state", TIMEOUT, clock=clock) as st:
        yield st


def manifest(name: str, source: str, files: dict[str, tuple[int, str]]) -> Manifest:
    entries = [
        FileEntry(path=p, size=size, object=obj, locator=f"{source}{p}")
        for p, (size, obj) in files.items()
    ]
    return build_manifest(name, source, entries, chunk_size=CHUNK)


async def add(
    state: SchedulerState, node: str, obj: str, size: int, cs: int, chunks: list[tuple[int, str]]
) -> list[int]:
    """A chunk report from the node granted the source read of every chunk in it (the
    provenance rules have tests of their own, in test_scheduler_trust); its conflicts."""
    granted = frozenset(i for i, _ in chunks)
    return (await state.chunks.add_chunks(node, obj, size, cs, chunks, establish=granted)).conflicts


async def named(state: SchedulerState, size: int, obj: str = OBJ_A) -> None:
    """A dataset names `obj` with `size` bytes: only then are its chunks recorded."""
    ds = manifest(f"named-{obj[:4]}", f"memtest://{obj[:4]}/", {"f": (size, obj)})
    await state.catalog.put_dataset(ds)


async def beat(state: SchedulerState, name: str, load: int = 0, port: int = 1) -> NodeInfo:
    return await state.heartbeat(name, f"127.0.0.1:{port}", {"zone": "a"}, load, 100, 1000)


# -- nodes ------------------------------------------------------------------------------------


async def test_heartbeat_registers_and_updates(state: SchedulerState, clock: Clock) -> None:
    info = await state.heartbeat("n1", "127.0.0.1:7901", {"zone": "a"}, 3, 123, 4567)
    assert info == NodeInfo(
        name="n1",
        address="127.0.0.1:7901",
        labels={"zone": "a"},
        last_seen=clock.now,
        load=3,
        cache_bytes=123,
        cache_size=4567,
        reports=0,
        up=True,
    )
    clock.now += 5
    await state.heartbeat("n1", "127.0.0.1:7999", {"zone": "b"}, 0, 9, 10)
    (node,) = state.nodes()
    assert (node.address, node.labels, node.last_seen, node.load) == (
        "127.0.0.1:7999",
        {"zone": "b"},
        clock.now,
        0,
    )
    assert node.to_json().keys() == {
        "name",
        "address",
        "labels",
        "up",
        "last_seen",
        "load",
        "cache_bytes",
        "cache_size",
        "reports",
        "label_overrides",
        "ready",
        "pinned_bytes",
        "pinned_over_budget",
        "disk_full",
        "disk_free",
        "quarantined",
    }


async def test_the_node_listing_lets_heartbeats_in_while_it_is_built(
    state: SchedulerState,
) -> None:
    """GET /v1/nodes is O(nodes): built a slice at a time, with the loop free between
    slices (in one piece, 5,000 nodes held it, and every heartbeat, for up to 0.7 s)."""
    count = 4 * TURN + 1
    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(beat, state, f"n{i:04d}")
    api = Api(state, CHUNK, resolve=lambda *_: pytest.fail("no listing of sources here"))
    started = finished = False
    answer = b""
    meanwhile = 0  # turns another task had while the listing was being built

    async def listing() -> None:
        nonlocal started, finished, answer
        started = True
        answer = await api.call("nodes", Call("GET", ["v1", "nodes"], {}, b"", None))
        finished = True

    async def other() -> None:
        nonlocal meanwhile
        while not finished:
            meanwhile += started
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        nursery.start_soon(listing)
    # A turn between every two slices (trio runs the other task just before or just after
    # each one: the last may see the listing done). In one piece: none.
    assert meanwhile >= count // TURN - 1
    listed = json.loads(answer)["nodes"]
    assert [n["name"] for n in listed] == [f"n{i:04d}" for i in range(count)]
    assert listed == [n.to_json() for n in state.nodes()]


async def test_bad_node_input_is_a_user_error(state: SchedulerState) -> None:
    with pytest.raises(UserError, match="invalid node name"):
        await state.heartbeat("", "127.0.0.1:1")
    with pytest.raises(UserError, match="empty address"):
        await state.heartbeat("n1", "")


async def test_liveness_follows_the_injected_clock(
    state: SchedulerState, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="syncbit.scheduler")
    await beat(state, "n1")
    await beat(state, "n2")
    clock.now += TIMEOUT  # exactly the timeout: still up
    assert [n.up for n in state.nodes()] == [True, True]
    assert state.check_liveness() == []
    await beat(state, "n2")
    clock.now += 0.5
    up = {n.name: n.up for n in state.nodes()}
    assert up == {"n1": False, "n2": True}
    changed = state.check_liveness()
    assert [(n.name, n.up) for n in changed] == [("n1", False)]
    assert state.check_liveness() == []  # a transition is reported once
    await beat(state, "n1")
    assert all(n.up for n in state.nodes())
    messages = [r.getMessage() for r in caplog.records]
    assert any("n1 registered" in m for m in messages)
    assert any("n1 is down" in m for m in messages)
    assert any("n1 is up" in m for m in messages)


async def test_a_scheduler_behind_its_work_marks_no_node_down_for_it(
    state: SchedulerState, clock: Clock
) -> None:
    await beat(state, "n1")
    state.live.note_lag(0.5)  # a busy machine: no grace
    assert state.live.grace == 0.0
    assert state.live.lag() == 0.5  # but it shows (syncbit_scheduler_loop_lag_seconds)
    state.live.note_lag(4.0)  # the loop ran a task 4 s late: heartbeats wait as long
    clock.now += TIMEOUT + LAG_TURNS * 4.0 - 1
    state.tidy()
    assert state.live.is_up("n1") and [n.up for n in state.nodes()] == [True]
    clock.now += 2  # beyond even that: down
    state.tidy()
    assert [n.up for n in state.nodes()] == [False]
    await beat(state, "n1")
    clock.now += TIMEOUT / 2
    state.live.note_lag(0.0)  # caught up, and the late turn is a timeout ago
    clock.now += TIMEOUT / 2 + 1
    state.live.note_lag(0.0)
    assert state.live.grace == 0.0 and state.live.lag() == 0.0
    state.tidy()
    assert [n.up for n in state.nodes()] == [False]


def test_the_server_notes_how_far_behind_its_loop_runs(server: SchedulerServer) -> None:
    state = server.state
    assert state is not None
    for _ in range(3):  # the first block may come before the tending task first ran
        server.call(time.sleep, LAG_FLOOR + 1.5)  # the loop is stuck: its tending runs late
        time.sleep(1.5)  # a turn of the tending task after it
        if server.call(lambda: state.live.grace) > 0:
            break
    assert server.call(lambda: state.live.grace) >= LAG_TURNS * 0.5


# -- datasets ---------------------------------------------------------------------------------


async def test_dataset_put_replace_conflict_remove_and_generation(state: SchedulerState) -> None:
    assert state.generation() == 0
    assert state.catalog.datasets() == []
    v1 = manifest("ds", "memtest://one/", {"a.bin": (10, OBJ_A)})
    summary, changed = await state.catalog.put_dataset(v1)
    assert changed
    assert summary == {
        "name": "ds",
        "source": "memtest://one/",
        "revision": v1.revision,
        "files": 1,
        "size": 10,
        "created": v1.created,
    }
    assert state.generation() == 1
    assert state.catalog.get_dataset("ds") == v1
    assert state.catalog.datasets() == [summary]
    assert state.catalog.summary("ds") == summary

    # the same revision again (even resolved later) changes nothing
    again = manifest("ds", "memtest://one/", {"a.bin": (10, OBJ_A)})
    assert again.revision == v1.revision
    summary2, changed = await state.catalog.put_dataset(again)
    assert not changed and summary2 == summary
    assert state.generation() == 1

    # a new revision of the same source replaces the old one
    v2 = manifest("ds", "memtest://one/", {"a.bin": (10, OBJ_A), "b.bin": (3, OBJ_B)})
    summary3, changed = await state.catalog.put_dataset(v2)
    assert changed and summary3["revision"] == v2.revision != v1.revision
    assert state.generation() == 2
    assert state.catalog.get_dataset("ds") == v2

    # another source under the same name is refused, nothing changes
    other = manifest("ds", "memtest://two/", {"a.bin": (10, OBJ_A)})
    with pytest.raises(DatasetExistsError, match=r"ds already exists with source memtest://one/"):
        await state.catalog.put_dataset(other)
    assert state.generation() == 2
    assert state.catalog.get_dataset("ds") == v2

    await state.catalog.remove_dataset("ds")
    assert state.generation() == 3
    assert state.catalog.datasets() == []
    with pytest.raises(NotFoundError):
        state.catalog.get_dataset("ds")
    with pytest.raises(NotFoundError):
        await state.catalog.remove_dataset("ds")
    with pytest.raises(NotFoundError):
        state.catalog.summary("ds")
    # once removed, the name is free for another source
    assert (await state.catalog.put_dataset(other))[1]
    assert state.generation() == 4


async def test_datasets_are_listed_by_name(state: SchedulerState) -> None:
    for name in ("zeta", "alpha", "mid"):
        await state.catalog.put_dataset(manifest(name, f"memtest://{name}/", {"f": (1, OBJ_A)}))
    assert [d["name"] for d in state.catalog.datasets()] == ["alpha", "mid", "zeta"]


# -- chunks -----------------------------------------------------------------------------------


async def test_first_digest_wins_and_conflicts_are_not_held(state: SchedulerState) -> None:
    await beat(state, "n1")
    await beat(state, "n2")
    await named(state, 10)
    assert await add(state, "n1", OBJ_A, 10, CHUNK, [(0, D1), (1, D2)]) == []
    # n2 agrees on chunk 0, disagrees on chunk 1, brings chunk 2 first
    assert await add(state, "n2", OBJ_A, 10, CHUNK, [(0, D1), (1, D3), (2, D3)]) == [1]
    cmap = state.chunk_map(OBJ_A, None)
    assert cmap["digests"] == {0: D1, 1: D2, 2: D3}
    # The conflict opened a dispute (a dataset names the object, so a third node can
    # re-read it): chunk 1 is offered by nobody until it is settled.
    assert cmap["disputed"] == [1]
    holders = {i: sorted(p["node"] for p in ps) for i, ps in cmap["peers"].items()}
    assert holders == {0: ["n1", "n2"], 2: ["n2"]}


async def test_chunk_input_is_validated(state: SchedulerState) -> None:
    await named(state, 10)
    with pytest.raises(UserError, match="out of range"):
        await add(state, "n1", OBJ_A, 10, CHUNK, [(3, D1)])
    with pytest.raises(UserError, match="invalid object id"):
        await add(state, "n1", "xyz", 10, CHUNK, [(0, D1)])
    with pytest.raises(UserError, match="invalid digest"):
        await add(state, "n1", OBJ_A, 10, CHUNK, [(0, "00")])
    await add(state, "n1", OBJ_A, 10, CHUNK, [(0, D1)])
    with pytest.raises(UserError, match="chunk size"):
        await add(state, "n1", OBJ_A, 10, 8, [(0, D1)])


async def test_an_object_no_dataset_names_is_reportable_once_registered(
    tmp_path: Path, clock: Clock
) -> None:
    """A registry blob a node's mirror serves: unknown until registered, then claimable
    and reportable like a dataset's object; the first geometry recorded stands, a
    manifest's wins, and the registration is durable."""
    async with open_lmdb_state(tmp_path / "s", TIMEOUT, clock=clock) as state:
        with pytest.raises(NotFoundError, match="no dataset names it"):
            await add(state, "n1", OBJ_B, 10, CHUNK, [(0, D1)])
        assert await state.catalog.register_object(OBJ_B, 10, CHUNK) == (10, CHUNK)
        assert await state.catalog.register_object(OBJ_B, 99, 8) == (10, CHUNK)  # it stands
        assert await add(state, "n1", OBJ_B, 10, CHUNK, [(0, D1)]) == []
        assert state.chunk_map(OBJ_B)["digests"] == {0: D1}
        await named(state, 10)  # a dataset's own object: its geometry is the manifest's
        assert await state.catalog.register_object(OBJ_A, 12, CHUNK) == (10, CHUNK)
        with pytest.raises(UserError, match="invalid size"):
            await state.catalog.register_object("c" * 64, 0, CHUNK)
        with pytest.raises(UserError, match="invalid object id"):
            await state.catalog.register_object("xyz", 10, CHUNK)
    async with open_lmdb_state(tmp_path / "s", TIMEOUT, clock=clock) as state:
        assert await state.catalog.register_object(OBJ_B, 99, 8) == (10, CHUNK)
        assert state.chunk_map(OBJ_B)["digests"] == {0: D1}


async def test_registered_objects_are_bounded(
    state: SchedulerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("syncbit.scheduler.catalog.MAX_REGISTERED_OBJECTS", 2)
    await state.catalog.register_object("c" * 64, 10, CHUNK)
    await state.catalog.register_object("d" * 64, 10, CHUNK)
    await state.catalog.register_object("c" * 64, 10, CHUNK)  # known already: no new entry
    with pytest.raises(UserError, match="the limit"):
        await state.catalog.register_object("e" * 64, 10, CHUNK)


async def test_holder_bits_add_and_remove(state: SchedulerState) -> None:
    await beat(state, "n1")
    await named(state, 100)
    await add(state, "n1", OBJ_A, 100, CHUNK, [(i, D1) for i in range(25)])
    state.chunks.remove_chunks("n1", OBJ_A, [0, 7, 24, 99])
    cmap = state.chunk_map(OBJ_A, None)
    assert sorted(cmap["peers"]) == [i for i in range(25) if i not in (0, 7, 24)]
    assert sorted(cmap["digests"]) == list(range(25))  # digests stay: content facts
    state.chunks.remove_chunks("n1", OBJ_A, list(range(25)))
    assert state.chunk_map(OBJ_A, None)["peers"] == {}
    state.chunks.remove_chunks("n9", OBJ_B, [1])  # unknown holder: nothing to do


async def test_bad_peer_report_removes_the_holder_and_counts(state: SchedulerState) -> None:
    await beat(state, "n1")
    await beat(state, "n2")
    await named(state, 8)
    await add(state, "n1", OBJ_A, 8, CHUNK, [(0, D1), (1, D2)])
    await add(state, "n2", OBJ_A, 8, CHUNK, [(0, D1), (1, D2)])
    state.chunks.report_bad_peer("n2", "n1", OBJ_A, 1, "digest mismatch")
    cmap = state.chunk_map(OBJ_A, None)
    assert [p["node"] for p in cmap["peers"][1]] == ["n2"]
    assert sorted(p["node"] for p in cmap["peers"][0]) == ["n1", "n2"]
    reports = {n.name: n.reports for n in state.nodes()}
    assert reports == {"n1": 1, "n2": 0}
    await beat(state, "n1")  # heartbeats keep the count
    assert {n.name: n.reports for n in state.nodes()}["n1"] == 1
    # the reported peer ranks after an equally loaded clean one
    for _ in range(20):
        order = [p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]]
        assert order == ["n2", "n1"]
    state.chunks.report_bad_peer("n1", "ghost", OBJ_A, 0, "refused")  # unknown peer: harmless


async def test_chunk_map_excludes_down_nodes_and_the_requester(
    state: SchedulerState, clock: Clock
) -> None:
    await beat(state, "old")
    clock.now += TIMEOUT + 1
    await beat(state, "n1")
    await beat(state, "n2")
    await named(state, 8)
    for node in ("old", "n1", "n2"):
        await add(state, node, OBJ_A, 8, CHUNK, [(0, D1), (1, D2)])
    # a node that reports chunks before its first heartbeat is not handed out
    await add(state, "unregistered", OBJ_A, 8, CHUNK, [(0, D1)])
    cmap = state.chunk_map(OBJ_A, "n1")
    assert cmap["digests"] == {0: D1, 1: D2}
    assert cmap["peers"] == {
        0: [{"node": "n2", "address": "127.0.0.1:1"}],
        1: [{"node": "n2", "address": "127.0.0.1:1"}],
    }
    assert state.chunk_map(OBJ_B, "n1") == {"digests": {}, "peers": {}, "disputed": []}


async def test_chunk_map_orders_by_load(state: SchedulerState) -> None:
    await named(state, 4)
    for name, load in (("busy", 9), ("idle", 0), ("some", 3)):
        await beat(state, name, load=load)
        await add(state, name, OBJ_A, 4, CHUNK, [(0, D1)])
    order = [p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]]
    assert order == ["idle", "some", "busy"]


def test_least_loaded_breaks_ties_at_random() -> None:
    nodes = [NodeInfo(name=f"n{i}", address="a:1", up=True) for i in range(3)]
    policy = LeastLoaded(random.Random(1))
    firsts = {policy.rank(nodes)[0].name for _ in range(200)}
    assert firsts == {"n0", "n1", "n2"}
    assert policy.rank(nodes[:1]) == nodes[:1]
    assert policy.rank([]) == []


async def test_ties_spread_chunks_of_one_object_over_peers(tmp_path: Path, clock: Clock) -> None:
    async with open_lmdb_state(
        tmp_path / "s", TIMEOUT, clock=clock, policy=LeastLoaded(random.Random(7))
    ) as state:
        await beat(state, "n1")
        await beat(state, "n2")
        await named(state, 64 * CHUNK)
        for node in ("n1", "n2"):
            await add(state, node, OBJ_A, 64 * CHUNK, CHUNK, [(i, D1) for i in range(64)])
        cmap = state.chunk_map(OBJ_A, None)
    firsts = [ps[0]["node"] for ps in cmap["peers"].values()]
    assert 10 < firsts.count("n1") < 54


# -- status and persistence -------------------------------------------------------------------


def test_held_bytes_counts_the_short_last_chunk() -> None:
    assert held_bytes(0b111, 10, 4) == 10
    assert held_bytes(0b100, 10, 4) == 2
    assert held_bytes(0b011, 10, 4) == 8
    assert held_bytes(0b1111100, 10, 4) == 2  # bits beyond the object are ignored
    assert held_bytes(0, 0, 4) == 0


async def test_status_cached_bytes_over_distinct_objects(
    state: SchedulerState, clock: Clock
) -> None:
    await beat(state, "n1")
    await beat(state, "n2")
    # two files with the same content count once; OBJ_B is 10 bytes in 3 chunks
    ds = manifest("ds", "memtest://x/", {"a": (10, OBJ_B), "copy/a": (10, OBJ_B), "e": (0, D3)})
    await state.catalog.put_dataset(ds)
    await state.catalog.put_dataset(manifest("other", "memtest://y/", {"z": (8, OBJ_A)}))
    await add(state, "n1", OBJ_B, 10, CHUNK, [(0, D1), (1, D2), (2, D3)])
    await add(state, "n2", OBJ_B, 10, CHUNK, [(2, D3)])
    await add(state, "n2", OBJ_A, 8, CHUNK, [(0, D1)])
    clock.now += TIMEOUT + 1  # down nodes still hold what they hold
    doc = json.loads(await state.status_json())
    assert [n["name"] for n in doc["nodes"]] == ["n1", "n2"]
    assert all(n["up"] is False and n["cache_bytes"] == 100 for n in doc["nodes"])
    by_name = {d["name"]: d for d in doc["datasets"]}
    assert by_name["ds"]["cached"] == {"n1": 10, "n2": 2}
    assert by_name["ds"]["size"] == 20 and by_name["ds"]["files"] == 3
    assert by_name["other"]["cached"] == {"n2": 4}


async def test_status_lets_other_requests_run_while_it_is_built(
    state: SchedulerState, clock: Clock
) -> None:
    """An overview of many nodes and holders is built a turn at a time: a heartbeat
    arriving meanwhile is served between turns, not after the whole overview (which at
    5,000 nodes held the loop as long as it took)."""
    names = [f"n{i:03d}" for i in range(60)]
    for name in names:
        await beat(state, name)
    ds = manifest("ds", "memtest://x/", {"a": (10, OBJ_B)})
    await state.catalog.put_dataset(ds)
    for name in names:
        await add(state, name, OBJ_B, 10, CHUNK, [(0, D1), (1, D2), (2, D3)])
    turns: list[int] = []
    building = True

    async def heartbeats_meanwhile() -> None:
        while building:
            turns.append(len(turns))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeats_meanwhile)
        await trio.lowlevel.checkpoint()
        before = len(turns)
        doc = json.loads(await state.status_json(per_turn=10))
        building = False
    # 60 nodes, 10 a turn: the other task ran between the turns (4-6 times here: trio
    # runs the two tasks of a batch in either order, which moves a count at either end;
    # built in one go it would have run once at most).
    assert len(turns) - before >= 3
    assert [n["name"] for n in doc["nodes"]] == names
    assert doc["datasets"][0]["cached"] == dict.fromkeys(names, 10)
    whole = json.loads(await state.status_json())  # the default turn: the same overview
    assert whole["nodes"] == doc["nodes"] and whole["datasets"] == doc["datasets"]


async def test_durable_facts_survive_a_reopen_and_soft_state_does_not(
    tmp_path: Path, clock: Clock
) -> None:
    """Datasets, registrations, operator labels and digests are durable; liveness, loads,
    report counts and holders are not (nodes tell them again within a heartbeat)."""
    ds = manifest("ds", "memtest://x/", {"a": (8, OBJ_A)})
    async with open_lmdb_state(tmp_path / "s", TIMEOUT, clock=clock) as st:
        await beat(st, "n1", load=2)
        await beat(st, "n2")
        await st.edit_labels("n2", {"gpu": "h100"}, [])
        await st.catalog.put_dataset(ds)
        await add(st, "n1", OBJ_A, 8, CHUNK, [(0, D1), (1, D2)])
        st.chunks.report_bad_peer("n2", "n1", OBJ_A, 1, "bad")
        generation = st.generation()
        digests = st.chunk_map(OBJ_A, None)["digests"]
    with pytest.raises(SchedulerError, match="closed"):
        await st.heartbeat("n1", "127.0.0.1:1")
    async with open_lmdb_state(tmp_path / "s", TIMEOUT, clock=clock) as st:
        assert st.generation() == generation
        assert st.catalog.get_dataset("ds") == ds
        assert [(n.name, n.address, n.labels, n.up) for n in st.nodes()] == [
            ("n1", "127.0.0.1:1", {"zone": "a"}, False),
            ("n2", "127.0.0.1:1", {"zone": "a", "gpu": "h100"}, False),
        ]
        assert st.chunk_map(OBJ_A, None) == {"digests": digests, "peers": {}, "disputed": []}
        assert await add(st, "n2", OBJ_A, 8, CHUNK, [(0, D2)]) == [0]  # digests persisted
        await beat(st, "n1")
        await add(st, "n1", OBJ_A, 8, CHUNK, [(1, D2)])  # the node reports again
        peers = st.chunk_map(OBJ_A, "n2")["peers"]  # (chunk 0 is disputed now)
        assert peers == {1: [{"node": "n1", "address": "127.0.0.1:1"}]}
        assert st.nodes()[0].reports == 0


async def test_concurrent_writers_lose_nothing(state: SchedulerState) -> None:
    await beat(state, "n1")
    count = 400
    await named(state, count * CHUNK)

    async def report(part: int) -> None:
        for i in range(part, count, 4):
            await add(state, "n1", OBJ_A, count * CHUNK, CHUNK, [(i, D1)])
            await beat(state, "n1")

    async with trio.open_nursery() as nursery:
        for part in range(4):
            nursery.start_soon(report, part)
    assert sorted(state.chunk_map(OBJ_A, None)["peers"]) == list(range(count))
    assert sorted(state.chunk_map(OBJ_A, None)["digests"]) == list(range(count))


async def test_wait_generation_wakes_on_a_bump_and_on_close(state: SchedulerState) -> None:
    """Only writes that move the generation wake a waiter (a heartbeat does not), and
    closing the state ends every wait at once instead of at its timeout."""
    await beat(state, "n1")
    start = state.generation()
    got: list[int] = []

    async def wait(after: int) -> None:
        got.append(await state.wait_generation(after, 30))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, start)
        await beat(state, "n1", port=2)  # a durable write (it moved), but no new generation
        await trio.sleep(0.3)
        assert not got
        await state.catalog.put_dataset(manifest("ds", "mem://a/", {"f": (10, "aa" * 32)}))
    assert got == [state.generation()] and got[0] > start
    with trio.fail_after(5):
        assert await state.wait_generation(start, 30) == got[0]  # behind: at once
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, got[0])
            await trio.sleep(0.3)
            assert len(got) == 1
            state.close()
    assert len(got) == 2  # answered at once, not after 30 s
