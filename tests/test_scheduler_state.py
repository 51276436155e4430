"""SchedulerState on a temporary LMDB: nodes and liveness, datasets, digests, holders,
bad-peer reports, chunk maps, status and persistence across a reopen."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import Clock

from syncbit.errors import NotFoundError, SchedulerError, UserError
from syncbit.manifest import FileEntry, Manifest, build_manifest
from syncbit.scheduler.policy import LeastLoaded
from syncbit.scheduler.state import DatasetExistsError, NodeInfo, SchedulerState, held_bytes

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
def state(tmp_path: Path, clock: Clock) -> Iterator[SchedulerState]:
    with SchedulerState(tmp_path / "state", TIMEOUT, clock=clock) as st:
        yield st


def manifest(name: str, source: str, files: dict[str, tuple[int, str]]) -> Manifest:
    entries = [
        FileEntry(path=p, size=size, object=obj, locator=f"{source}{p}")
        for p, (size, obj) in files.items()
    ]
    return build_manifest(name, source, entries, chunk_size=CHUNK)


def add(
    state: SchedulerState, node: str, obj: str, size: int, cs: int, chunks: list[tuple[int, str]]
) -> list[int]:
    """A chunk report from the node granted the source read of every chunk in it (the
    provenance rules have tests of their own, below); its conflicts."""
    granted = frozenset(i for i, _ in chunks)
    return state.add_chunks(node, obj, size, cs, chunks, establish=granted).conflicts


def named(state: SchedulerState, size: int, obj: str = OBJ_A) -> None:
    """A dataset names `obj` with `size` bytes: only then are its chunks recorded."""
    state.put_dataset(manifest(f"named-{obj[:4]}", f"memtest://{obj[:4]}/", {"f": (size, obj)}))


def beat(state: SchedulerState, name: str, load: int = 0, port: int = 1) -> NodeInfo:
    return state.heartbeat(name, f"127.0.0.1:{port}", {"zone": "a"}, load, 100, 1000)


# -- nodes ------------------------------------------------------------------------------------


def test_heartbeat_registers_and_updates(state: SchedulerState, clock: Clock) -> None:
    info = state.heartbeat("n1", "127.0.0.1:7901", {"zone": "a"}, 3, 123, 4567)
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
    state.heartbeat("n1", "127.0.0.1:7999", {"zone": "b"}, 0, 9, 10)
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


def test_bad_node_input_is_a_user_error(state: SchedulerState) -> None:
    with pytest.raises(UserError, match="invalid node name"):
        state.heartbeat("", "127.0.0.1:1")
    with pytest.raises(UserError, match="empty address"):
        state.heartbeat("n1", "")


def test_liveness_follows_the_injected_clock(
    state: SchedulerState, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="syncbit.scheduler")
    beat(state, "n1")
    beat(state, "n2")
    clock.now += TIMEOUT  # exactly the timeout: still up
    assert [n.up for n in state.nodes()] == [True, True]
    assert state.check_liveness() == []
    beat(state, "n2")
    clock.now += 0.5
    up = {n.name: n.up for n in state.nodes()}
    assert up == {"n1": False, "n2": True}
    changed = state.check_liveness()
    assert [(n.name, n.up) for n in changed] == [("n1", False)]
    assert state.check_liveness() == []  # a transition is reported once
    beat(state, "n1")
    assert all(n.up for n in state.nodes())
    messages = [r.getMessage() for r in caplog.records]
    assert any("n1 registered" in m for m in messages)
    assert any("n1 is down" in m for m in messages)
    assert any("n1 is up" in m for m in messages)


# -- datasets ---------------------------------------------------------------------------------


def test_dataset_put_replace_conflict_remove_and_generation(state: SchedulerState) -> None:
    assert state.generation() == 0
    assert state.datasets() == []
    v1 = manifest("ds", "memtest://one/", {"a.bin": (10, OBJ_A)})
    summary, changed = state.put_dataset(v1)
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
    assert state.get_dataset("ds") == v1
    assert state.datasets() == [summary]
    assert state.summary("ds") == summary

    # the same revision again (even resolved later) changes nothing
    again = manifest("ds", "memtest://one/", {"a.bin": (10, OBJ_A)})
    assert again.revision == v1.revision
    summary2, changed = state.put_dataset(again)
    assert not changed and summary2 == summary
    assert state.generation() == 1

    # a new revision of the same source replaces the old one
    v2 = manifest("ds", "memtest://one/", {"a.bin": (10, OBJ_A), "b.bin": (3, OBJ_B)})
    summary3, changed = state.put_dataset(v2)
    assert changed and summary3["revision"] == v2.revision != v1.revision
    assert state.generation() == 2
    assert state.get_dataset("ds") == v2

    # another source under the same name is refused, nothing changes
    other = manifest("ds", "memtest://two/", {"a.bin": (10, OBJ_A)})
    with pytest.raises(DatasetExistsError, match=r"ds already exists with source memtest://one/"):
        state.put_dataset(other)
    assert state.generation() == 2
    assert state.get_dataset("ds") == v2

    state.remove_dataset("ds")
    assert state.generation() == 3
    assert state.datasets() == []
    with pytest.raises(NotFoundError):
        state.get_dataset("ds")
    with pytest.raises(NotFoundError):
        state.remove_dataset("ds")
    with pytest.raises(NotFoundError):
        state.summary("ds")
    # once removed, the name is free for another source
    assert state.put_dataset(other)[1]
    assert state.generation() == 4


def test_datasets_are_listed_by_name(state: SchedulerState) -> None:
    for name in ("zeta", "alpha", "mid"):
        state.put_dataset(manifest(name, f"memtest://{name}/", {"f": (1, OBJ_A)}))
    assert [d["name"] for d in state.datasets()] == ["alpha", "mid", "zeta"]


# -- chunks -----------------------------------------------------------------------------------


def test_first_digest_wins_and_conflicts_are_not_held(state: SchedulerState) -> None:
    beat(state, "n1")
    beat(state, "n2")
    named(state, 10)
    assert add(state, "n1", OBJ_A, 10, CHUNK, [(0, D1), (1, D2)]) == []
    # n2 agrees on chunk 0, disagrees on chunk 1, brings chunk 2 first
    assert add(state, "n2", OBJ_A, 10, CHUNK, [(0, D1), (1, D3), (2, D3)]) == [1]
    cmap = state.chunk_map(OBJ_A, None)
    assert cmap["digests"] == {0: D1, 1: D2, 2: D3}
    # The conflict opened a dispute (a dataset names the object, so a third node can
    # re-read it): chunk 1 is offered by nobody until it is settled.
    assert cmap["disputed"] == [1]
    holders = {i: sorted(p["node"] for p in ps) for i, ps in cmap["peers"].items()}
    assert holders == {0: ["n1", "n2"], 2: ["n2"]}


def test_chunk_input_is_validated(state: SchedulerState) -> None:
    named(state, 10)
    with pytest.raises(UserError, match="out of range"):
        add(state, "n1", OBJ_A, 10, CHUNK, [(3, D1)])
    with pytest.raises(UserError, match="invalid object id"):
        add(state, "n1", "xyz", 10, CHUNK, [(0, D1)])
    with pytest.raises(UserError, match="invalid digest"):
        add(state, "n1", OBJ_A, 10, CHUNK, [(0, "00")])
    add(state, "n1", OBJ_A, 10, CHUNK, [(0, D1)])
    with pytest.raises(UserError, match="chunk size"):
        add(state, "n1", OBJ_A, 10, 8, [(0, D1)])


def test_an_object_no_dataset_names_is_reportable_once_registered(
    state: SchedulerState,
) -> None:
    """A registry blob a node's mirror serves: unknown until registered, then claimable
    and reportable like a dataset's object; the first geometry recorded stands."""
    with pytest.raises(NotFoundError, match="no dataset names it"):
        add(state, "n1", OBJ_B, 10, CHUNK, [(0, D1)])
    assert state.register_object(OBJ_B, 10, CHUNK) == (10, CHUNK)
    assert state.register_object(OBJ_B, 99, 8) == (10, CHUNK)  # recorded: it stands
    assert add(state, "n1", OBJ_B, 10, CHUNK, [(0, D1)]) == []
    assert state.chunk_map(OBJ_B)["digests"] == {0: D1}
    named(state, 10)  # a dataset's own object: its geometry is the manifest's
    assert state.register_object(OBJ_A, 12, CHUNK) == (10, CHUNK)
    with pytest.raises(UserError, match="invalid size"):
        state.register_object("c" * 64, 0, CHUNK)
    with pytest.raises(UserError, match="invalid object id"):
        state.register_object("xyz", 10, CHUNK)


def test_registered_objects_are_bounded(
    state: SchedulerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("syncbit.scheduler.state.MAX_REGISTERED_OBJECTS", 2)
    state.register_object("c" * 64, 10, CHUNK)
    state.register_object("d" * 64, 10, CHUNK)
    state.register_object("c" * 64, 10, CHUNK)  # known already: no new entry
    with pytest.raises(UserError, match="the limit"):
        state.register_object("e" * 64, 10, CHUNK)


def test_holder_bits_add_and_remove(state: SchedulerState) -> None:
    beat(state, "n1")
    named(state, 100)
    add(state, "n1", OBJ_A, 100, CHUNK, [(i, D1) for i in range(25)])
    state.remove_chunks("n1", OBJ_A, [0, 7, 24, 99])
    cmap = state.chunk_map(OBJ_A, None)
    assert sorted(cmap["peers"]) == [i for i in range(25) if i not in (0, 7, 24)]
    assert sorted(cmap["digests"]) == list(range(25))  # digests stay: content facts
    state.remove_chunks("n1", OBJ_A, list(range(25)))
    assert state.chunk_map(OBJ_A, None)["peers"] == {}
    state.remove_chunks("n9", OBJ_B, [1])  # unknown holder: nothing to do


def test_bad_peer_report_removes_the_holder_and_counts(state: SchedulerState) -> None:
    beat(state, "n1")
    beat(state, "n2")
    named(state, 8)
    add(state, "n1", OBJ_A, 8, CHUNK, [(0, D1), (1, D2)])
    add(state, "n2", OBJ_A, 8, CHUNK, [(0, D1), (1, D2)])
    state.report_bad_peer("n2", "n1", OBJ_A, 1, "digest mismatch")
    cmap = state.chunk_map(OBJ_A, None)
    assert [p["node"] for p in cmap["peers"][1]] == ["n2"]
    assert sorted(p["node"] for p in cmap["peers"][0]) == ["n1", "n2"]
    reports = {n.name: n.reports for n in state.nodes()}
    assert reports == {"n1": 1, "n2": 0}
    beat(state, "n1")  # heartbeats keep the count
    assert {n.name: n.reports for n in state.nodes()}["n1"] == 1
    # the reported peer ranks after an equally loaded clean one
    for _ in range(20):
        order = [p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]]
        assert order == ["n2", "n1"]
    state.report_bad_peer("n1", "ghost", OBJ_A, 0, "refused")  # unknown peer: harmless


def test_chunk_map_excludes_down_nodes_and_the_requester(
    state: SchedulerState, clock: Clock
) -> None:
    beat(state, "old")
    clock.now += TIMEOUT + 1
    beat(state, "n1")
    beat(state, "n2")
    named(state, 8)
    for node in ("old", "n1", "n2"):
        add(state, node, OBJ_A, 8, CHUNK, [(0, D1), (1, D2)])
    # a node that reports chunks before its first heartbeat is not handed out
    add(state, "unregistered", OBJ_A, 8, CHUNK, [(0, D1)])
    cmap = state.chunk_map(OBJ_A, "n1")
    assert cmap["digests"] == {0: D1, 1: D2}
    assert cmap["peers"] == {
        0: [{"node": "n2", "address": "127.0.0.1:1"}],
        1: [{"node": "n2", "address": "127.0.0.1:1"}],
    }
    assert state.chunk_map(OBJ_B, "n1") == {"digests": {}, "peers": {}, "disputed": []}


def test_chunk_map_orders_by_load(state: SchedulerState) -> None:
    named(state, 4)
    for name, load in (("busy", 9), ("idle", 0), ("some", 3)):
        beat(state, name, load=load)
        add(state, name, OBJ_A, 4, CHUNK, [(0, D1)])
    order = [p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]]
    assert order == ["idle", "some", "busy"]


def test_least_loaded_breaks_ties_at_random() -> None:
    nodes = [NodeInfo(name=f"n{i}", address="a:1", up=True) for i in range(3)]
    policy = LeastLoaded(random.Random(1))
    firsts = {policy.rank(nodes)[0].name for _ in range(200)}
    assert firsts == {"n0", "n1", "n2"}
    assert policy.rank(nodes[:1]) == nodes[:1]
    assert policy.rank([]) == []


def test_ties_spread_chunks_of_one_object_over_peers(state: SchedulerState) -> None:
    beat(state, "n1")
    beat(state, "n2")
    named(state, 64 * CHUNK)
    for node in ("n1", "n2"):
        add(state, node, OBJ_A, 64 * CHUNK, CHUNK, [(i, D1) for i in range(64)])
    cmap = state.chunk_map(OBJ_A, None, LeastLoaded(random.Random(7)))
    firsts = [ps[0]["node"] for ps in cmap["peers"].values()]
    assert 10 < firsts.count("n1") < 54


# -- status and persistence -------------------------------------------------------------------


def test_held_bytes_counts_the_short_last_chunk() -> None:
    assert held_bytes(0b111, 10, 4) == 10
    assert held_bytes(0b100, 10, 4) == 2
    assert held_bytes(0b011, 10, 4) == 8
    assert held_bytes(0b1111100, 10, 4) == 2  # bits beyond the object are ignored
    assert held_bytes(0, 0, 4) == 0


def test_status_cached_bytes_over_distinct_objects(state: SchedulerState, clock: Clock) -> None:
    beat(state, "n1")
    beat(state, "n2")
    # two files with the same content count once; OBJ_B is 10 bytes in 3 chunks
    ds = manifest("ds", "memtest://x/", {"a": (10, OBJ_B), "copy/a": (10, OBJ_B), "e": (0, D3)})
    state.put_dataset(ds)
    state.put_dataset(manifest("other", "memtest://y/", {"z": (8, OBJ_A)}))
    add(state, "n1", OBJ_B, 10, CHUNK, [(0, D1), (1, D2), (2, D3)])
    add(state, "n2", OBJ_B, 10, CHUNK, [(2, D3)])
    add(state, "n2", OBJ_A, 8, CHUNK, [(0, D1)])
    clock.now += TIMEOUT + 1  # down nodes still hold what they hold
    doc = state.status()
    assert [n["name"] for n in doc["nodes"]] == ["n1", "n2"]
    assert all(n["up"] is False and n["cache_bytes"] == 100 for n in doc["nodes"])
    by_name = {d["name"]: d for d in doc["datasets"]}
    assert by_name["ds"]["cached"] == {"n1": 10, "n2": 2}
    assert by_name["ds"]["size"] == 20 and by_name["ds"]["files"] == 3
    assert by_name["other"]["cached"] == {"n2": 4}


def test_everything_survives_a_reopen(tmp_path: Path, clock: Clock) -> None:
    ds = manifest("ds", "memtest://x/", {"a": (8, OBJ_A)})
    with SchedulerState(tmp_path / "s", TIMEOUT, clock=clock) as st:
        beat(st, "n1", load=2)
        beat(st, "n2")
        st.put_dataset(ds)
        add(st, "n1", OBJ_A, 8, CHUNK, [(0, D1), (1, D2)])
        st.report_bad_peer("n2", "n1", OBJ_A, 1, "bad")
        before = (st.status(), st.chunk_map(OBJ_A, None), st.generation(), st.nodes())
    with pytest.raises(SchedulerError, match="closed"):
        st.nodes()
    with SchedulerState(tmp_path / "s", TIMEOUT, clock=clock) as st:
        after = (st.status(), st.chunk_map(OBJ_A, None), st.generation(), st.nodes())
        assert after == before
        assert st.get_dataset("ds") == ds
        assert add(st, "n2", OBJ_A, 8, CHUNK, [(0, D2)]) == [0]  # digests persisted


def test_concurrent_writers_lose_nothing(state: SchedulerState) -> None:
    beat(state, "n1")
    count = 400
    named(state, count * CHUNK)

    def report(part: int) -> None:
        for i in range(part, count, 4):
            add(state, "n1", OBJ_A, count * CHUNK, CHUNK, [(i, D1)])
            beat(state, "n1")

    threads = [threading.Thread(target=report, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(state.chunk_map(OBJ_A, None)["peers"]) == list(range(count))


def test_wait_generation_wakes_on_a_bump_and_on_close(state: SchedulerState) -> None:
    """Only writes that bump the generation wake a waiter (a repeated heartbeat does not),
    and closing the state ends every wait at once instead of at its timeout."""
    beat(state, "n1")  # registering may bump the generation; a repeat does not
    start = state.generation()
    got: list[object] = []

    def wait(after: int) -> threading.Thread:
        def run() -> None:
            try:
                got.append(state.wait_generation(after, 30))
            except SchedulerError as exc:
                got.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    waiter = wait(start)
    beat(state, "n1")  # a write, but no new generation
    waiter.join(0.3)
    assert waiter.is_alive() and not got
    state.put_dataset(manifest("ds", "mem://a/", {"f": (10, "aa" * 32)}))
    waiter.join(5)
    assert got == [start + 1]

    behind = wait(start)  # the generation moved since: answers at once
    behind.join(5)
    assert got == [start + 1, start + 1]

    closing = wait(start + 1)
    closing.join(0.3)
    assert closing.is_alive()
    state.close()
    closing.join(5)
    assert not closing.is_alive() and len(got) == 3  # answered at once, not after 30 s
