"""The kept chunk maps (`scheduler.chunkmaps`): the answer brought up to date from the
change log is the answer ranked afresh, for any requester, through reports, drops,
disputes, bad-peer reports, nodes going down and up; loads re-rank within `RERANK`; an
answer with nothing changed ranks nothing again."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakes import Clock
from test_scheduler_state import CHUNK, OBJ_A, OBJ_B, add, named

from syncbit.errors import NotFoundError
from syncbit.scheduler.chunkmaps import RERANK
from syncbit.scheduler.state import SchedulerState, open_lmdb_state

TIMEOUT = 10.0
CHUNKS = 40
SIZE = CHUNKS * CHUNK
NODES = [f"n{i}" for i in range(12)]


def digest(index: int) -> str:
    return f"{index:064x}"


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
async def state(tmp_path: Path, clock: Clock) -> AsyncIterator[SchedulerState]:
    async with open_lmdb_state(tmp_path / "state", TIMEOUT, clock=clock, peers_per_chunk=3) as st:
        yield st


async def beat(state: SchedulerState, name: str, load: int | None = None) -> None:
    # Distinct loads: the policy's order is then one order, with no random ties.
    index = NODES.index(name)
    await state.heartbeat(
        name, f"127.0.0.1:{index + 1}", {}, index if load is None else load, 0, 1000
    )


def fresh(state: SchedulerState, requester: str | None) -> dict[str, Any]:
    """The answer ranked afresh from the state, as every answer was before maps were kept."""
    chunks = state.chunks
    obj = state.facts.objects[OBJ_A]
    view = chunks.view(OBJ_A)
    assert view is not None
    rank = chunks.ranker(requester)
    disputed = sorted(i for o, i in state.facts.disputes if o == OBJ_A)
    peers: dict[int, list[dict[str, str]]] = {}
    for index in sorted(obj.digests):
        offers = view.offers(index, state.holders.group_of(requester))
        names = [] if index in disputed else rank(offers)
        if names:
            peers[index] = [{"node": n, "address": rank.named[n]} for n in names]
    return {
        "digests": {i: d.hex() for i, d in sorted(obj.digests.items())},
        "peers": peers,
        "disputed": disputed,
    }


def as_json(doc: dict[str, Any]) -> Any:
    return json.loads(json.dumps(doc))


async def test_kept_answers_equal_fresh_ones_through_changes(
    state: SchedulerState, clock: Clock
) -> None:
    rng = random.Random(5)
    await named(state, SIZE)
    for name in NODES:
        await beat(state, name)
    down: set[str] = set()
    for step in range(300):
        node = rng.choice(NODES)
        action = rng.random()
        if action < 0.45:
            start = rng.randrange(CHUNKS)
            chunks = [(i % CHUNKS, digest(i % CHUNKS)) for i in range(start, start + 6)]
            await add(state, node, OBJ_A, SIZE, CHUNK, chunks)
        elif action < 0.6:
            state.chunks.remove_chunks(node, OBJ_A, [rng.randrange(CHUNKS) for _ in range(3)])
        elif action < 0.7:
            peer = rng.choice(NODES)
            state.chunks.report_bad_peer(node, peer, OBJ_A, rng.randrange(CHUNKS), "slow")
        elif action < 0.78:
            index = rng.randrange(CHUNKS)
            if index in state.facts.objects[OBJ_A].digests:  # a conflicting report
                await add(state, node, OBJ_A, SIZE, CHUNK, [(index, "f" * 64)])
        elif action < 0.9:
            # Time passes: every node but those kept down beats again; one more stays away.
            clock.now += TIMEOUT / 2 + 1
            if rng.random() < 0.5:
                down.add(node)
            else:
                down.discard(node)
            for name in NODES:
                if name not in down:
                    await beat(state, name)
            state.tidy()
        for requester in (None, rng.choice(NODES)):
            kept = state.chunk_map(OBJ_A, requester)
            assert kept == fresh(state, requester), f"step {step}, requester {requester}"
            rendered = json.loads(state.chunks.chunk_map_json(OBJ_A, requester, {"x": 1}))
            assert rendered == {**as_json(kept), "x": 1}
    assert state.facts.disputes, "the run opened no dispute: it tested less than it says"
    assert any(state.chunk_map(OBJ_A, None)["peers"].values())


async def test_an_answer_with_nothing_changed_ranks_nothing_again(state: SchedulerState) -> None:
    await named(state, SIZE)
    for name in NODES[:4]:
        await beat(state, name)
        await add(state, name, OBJ_A, SIZE, CHUNK, [(i, digest(i)) for i in range(CHUNKS)])
    maps = state.chunks.maps
    for requester in NODES:  # one map per requesters' group (`Holders.group_of`)
        state.chunks.chunk_map_json(OBJ_A, requester, {})
    ranked = maps.ranked
    await add(state, "n5", OBJ_A, SIZE, CHUNK, [(0, digest(0))])  # one chunk changes
    state.chunks.remove_chunks("n1", OBJ_A, [1])  # and another
    rendered = json.loads(state.chunks.chunk_map_json(OBJ_A, "n0", {}))
    assert maps.ranked == ranked  # brought up to date, not ranked again
    assert "n1" not in [p["node"] for p in rendered["peers"]["1"]]


async def test_the_groups_of_an_object_asking_in_turn_never_drop_each_others_maps(
    state: SchedulerState,
) -> None:
    """One map is kept per (object, group); over the budget only other objects' maps go,
    or requesters of different groups asking in turn would each rank the object again."""
    await named(state, SIZE)
    for name in NODES:
        await beat(state, name)
        await add(state, name, OBJ_A, SIZE, CHUNK, [(i, digest(i)) for i in range(CHUNKS)])
    maps = state.chunks.maps
    maps.budget = CHUNKS  # one map's worth
    groups = {state.holders.group_of(n) for n in NODES}
    assert len(groups) > 1
    for requester in NODES:
        state.chunks.chunk_map_json(OBJ_A, requester, {})
    ranked = maps.ranked
    assert ranked == len(groups)
    for requester in reversed(NODES):
        state.chunks.chunk_map_json(OBJ_A, requester, {})
    assert maps.ranked == ranked
    await named(state, SIZE, OBJ_B)  # another object asked: the first one's maps go
    state.chunks.chunk_map_json(OBJ_B, NODES[0], {})
    assert {o for o, _ in maps.maps} == {OBJ_B}


async def test_loads_rerank_within_rerank_seconds(state: SchedulerState) -> None:
    now = [0.0]
    state.chunks.maps.clock = lambda: now[0]
    await named(state, SIZE)
    for name, load in (("n0", 0), ("n1", 5)):
        await beat(state, name, load)
        await add(state, name, OBJ_A, SIZE, CHUNK, [(0, digest(0))])
    order = [p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]]
    assert order == ["n0", "n1"]
    await beat(state, "n0", 9)  # now the busier one
    now[0] += RERANK
    order = [p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]]
    assert order == ["n1", "n0"]


async def test_loads_rerank_no_sooner_than_the_heartbeats_bring_them(
    state: SchedulerState,
) -> None:
    """Loads come with heartbeats: where the interval in force is longer than RERANK (a
    large cluster), a map ranks by loads that old, not every RERANK seconds."""
    now = [0.0]
    state.chunks.maps.clock = lambda: now[0]
    state.live.rate = 0.5  # 2 nodes at half a heartbeat a second: every 4 s
    await named(state, SIZE)
    for name, load in (("n0", 0), ("n1", 5)):
        await beat(state, name, load)
        await add(state, name, OBJ_A, SIZE, CHUNK, [(0, digest(0))])
    assert state.live.interval() == 4.0
    state.chunk_map(OBJ_A, None)
    await beat(state, "n0", 9)
    now[0] += 2 * RERANK
    assert [p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]] == ["n0", "n1"]
    now[0] += 4.0
    assert [p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]] == ["n1", "n0"]


async def test_updates_name_the_peers_of_the_kept_map_in_its_order(
    state: SchedulerState,
) -> None:
    """Updates read the changed chunks' peers from the kept map, not ranking them again
    per request (a fifth of the scheduler's CPU at 2,000 nodes): the same peers in the
    same order as the map, even among equally loaded holders (ranked afresh, each answer
    would turn the ties at random)."""
    await named(state, SIZE)
    for name in NODES:
        await beat(state, name, load=0)
        await add(state, name, OBJ_A, SIZE, CHUNK, [(i, digest(i)) for i in range(CHUNKS)])
    ranked = state.chunks.maps.ranked
    for requester in NODES[:4]:
        doc = state.chunk_map(OBJ_A, requester)
        page = state.chunks.updates(OBJ_A, requester, "", 4096)
        assert page["peers"] == {i: [p["node"] for p in ps] for i, ps in doc["peers"].items()}
        assert all(requester not in names for names in page["peers"].values())
        assert set(page["addresses"]) == {n for ns in page["peers"].values() for n in ns}
    groups = {state.holders.group_of(n) for n in NODES[:4]}
    assert state.chunks.maps.ranked - ranked == len(groups)  # once per group, not per answer


async def test_the_compact_map_says_what_the_full_one_says_in_less(
    state: SchedulerState,
) -> None:
    """`?peers=names`: the same digests and peers in the same order, by name, each named
    node's address once; never the requester, nor its address; several times smaller; and
    still so after the holders change (the kept renderings follow)."""
    await named(state, SIZE)
    for name in NODES:
        await beat(state, name)
        await add(state, name, OBJ_A, SIZE, CHUNK, [(i, digest(i)) for i in range(CHUNKS)])
    for change in range(2):
        if change:  # a holder drops every chunk: renderings that name it must go
            state.chunks.remove_chunks(NODES[1], OBJ_A, list(range(CHUNKS)))
        for requester in (None, NODES[0], "stranger"):
            full = json.loads(state.chunks.chunk_map_json(OBJ_A, requester, {"fetching": {}}))
            raw = state.chunks.chunk_map_json(OBJ_A, requester, {"fetching": {}}, names=True)
            compact = json.loads(raw)
            assert compact["digests"] == full["digests"] and compact["fetching"] == {}
            peers = {i: [p["node"] for p in ps] for i, ps in full["peers"].items()}
            assert compact["peers"] == peers
            where = {p["node"]: p["address"] for ps in full["peers"].values() for p in ps}
            assert compact["addresses"] == where
            assert requester not in compact["addresses"]
            assert len(raw) * 2 < len(json.dumps(full))
        if change:
            assert NODES[1] not in compact["addresses"]


async def test_a_node_going_down_is_never_named(state: SchedulerState, clock: Clock) -> None:
    await named(state, SIZE)
    for name in ("n0", "n1"):
        await beat(state, name)
        await add(state, name, OBJ_A, SIZE, CHUNK, [(0, digest(0))])
    assert len(state.chunk_map(OBJ_A, None)["peers"][0]) == 2
    clock.now += TIMEOUT / 2 + 1
    await beat(state, "n1")
    clock.now += TIMEOUT / 2 + 1  # n0 is down now; no tidy ran yet
    names = [p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]]
    assert names == ["n1"]
    assert b'"n0"' not in state.chunks.chunk_map_json(OBJ_A, None, {})


async def test_a_node_that_leaves_is_never_named_and_its_next_heartbeat_brings_it_back(
    state: SchedulerState, clock: Clock
) -> None:
    """A node stopping cleanly says so: down at once, not after the timeout; its record
    stays, and the heartbeat of its restart makes it a peer again."""
    await named(state, SIZE)
    for name in ("n0", "n1"):
        await beat(state, name)
        await add(state, name, OBJ_A, SIZE, CHUNK, [(0, digest(0))])
    assert not state.leave("n0").up
    assert [p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]] == ["n1"]
    assert [n.name for n in state.nodes() if n.up] == ["n1"]
    assert not state.leave("n0").up  # once more: nothing changes
    with pytest.raises(NotFoundError, match="no node named 'n7'"):
        state.leave("n7")
    clock.now += 1
    await beat(state, "n0")
    assert sorted(p["node"] for p in state.chunk_map(OBJ_A, None)["peers"][0]) == ["n0", "n1"]
