"""The bounded chunk lookup: at most K peers per chunk whatever the number of holders, and
updates since a cursor that are exact (nothing missed, nothing repeated), on `Holders`
alone, on a `SchedulerState` under concurrent reports, and through the real API."""

from __future__ import annotations

import random
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fakes import Clock, MemSource
from schedulerfixtures import CHUNK, TIMEOUT

from syncbit.manifest import FileEntry, build_manifest
from syncbit.node.directory import SchedulerDirectory
from syncbit.protocol import ChunkMap, ChunkUpdates
from syncbit.scheduler import SchedulerClient, SchedulerServer
from syncbit.scheduler.holders import Holders, ObjectHolders
from syncbit.scheduler.state import SchedulerState, open_lmdb_state
from syncbit.sources import Listing

K = 3
CHUNKS = 40
OBJ = "ab" * 32
D = "1" * 64


# -- Holders alone: a random history, checked against what was touched -----------------------


class Recording(Holders):
    """Holders that note, per requesters' group, every chunk whose state it logs as
    changed for that group (the test's model)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.touched: set[int] = set()  # for group 0
        self.for_group: dict[int, set[int]] = {g: set() for g in range(self.groups)}

    def _touch(self, obj: ObjectHolders, indexes: list[int]) -> None:
        self.touched.update(indexes)
        for seen in self.for_group.values():
            seen.update(indexes)
        super()._touch(obj, indexes)

    def _offer_changed(self, obj: ObjectHolders, index: int, at: int) -> None:
        width = len(obj.lasts.get(index, [0]))
        for group, seen in self.for_group.items():
            if group & (width - 1) == at:
                seen.add(index)
        if at == 0:
            self.touched.add(index)
        super()._offer_changed(obj, index, at)


def _pages(
    holders: Holders, view: ObjectHolders, seq: int, limit: int, group: int = 0
) -> Iterable[list[int]]:
    """One sweep: pages until no more changes; yields each page's chunks."""
    while True:
        chunks, seq, more = holders.since(view, seq, limit, group)
        yield chunks
        if not more:
            return


def _places(*views: ObjectHolders) -> dict[str, int]:
    """How many offer lists name each node, counted afresh."""
    counted: dict[str, int] = {}
    for view in views:
        for slots in view.slots.values():
            for node in slots:
                if node is not None:
                    counted[node] = counted.get(node, 0) + 1
    return counted


class NoDraw(random.Random):
    """Reservoir draws that never pick the newcomer: what changes is the spread rule's."""

    def random(self) -> float:
        return 0.999999


@pytest.mark.parametrize(("seed", "groups"), [(s, g) for s in range(12) for g in (1, 4)])
def test_since_a_cursor_nothing_is_missed_or_repeated(seed: int, groups: int) -> None:
    """Random adds, removes, nodes down and up, touches; a follower per requesters' group
    folds pages since its cursor: each page brings exactly the chunks changed for its group
    since (nothing missed, nothing repeated, nothing of another group's lists), and what
    it folded is what its group is offered."""
    rng = random.Random(seed)
    nodes = [f"n{i}" for i in range(14)]
    down: set[str] = set()
    holders = Recording(
        K, lambda n: n not in down, lambda names, n: sorted(names)[:n], groups=groups
    )
    view = holders.view(OBJ, CHUNKS * CHUNK, CHUNK, CHUNKS)
    offered: dict[int, dict[int, list[str]]] = {g: {} for g in range(groups)}
    seqs = dict.fromkeys(range(groups), 0)
    for step in range(401):
        op = rng.random() if step < 400 else 1.0  # the last step only asks
        node = rng.choice(nodes)
        some = rng.sample(range(CHUNKS), rng.randint(1, 6))
        if op < 0.5:
            holders.add(node, view, some)
        elif op < 0.7:
            holders.remove(node, view, some)
        elif op < 0.8 and node not in down:
            down.add(node)
            holders.ineligible(node)
        elif op < 0.9 and node in down:
            down.discard(node)
            holders.eligible_again(node)
        elif step < 400:
            holders.touch(OBJ, some)
        for group in range(groups):
            if step < 400 and rng.random() >= 0.3:
                continue  # this follower asks now and then, a few chunks a page
            changed, holders.for_group[group] = holders.for_group[group], set()
            seen: list[int] = []
            for chunks in _pages(holders, view, seqs[group], rng.randint(1, 8), group):
                seen += chunks
            seqs[group] = holders.since(view, seqs[group], CHUNKS + 1, group)[1]
            assert len(seen) == len(set(seen))  # nothing repeated
            assert set(seen) == changed  # each change for this group, none missed
            for index in seen:
                offered[group][index] = view.offers(index, group)
        assert holders.places == _places(view)  # kept exact by every change
    for group in range(groups):
        for index in range(CHUNKS):
            assert offered[group].get(index, []) == view.offers(index, group)
            assert len(view.offers(index, group)) <= K
        assert next(iter(_pages(holders, view, seqs[group], 5, group))) == []
    if groups > 1:
        assert max(view.lists(i) for i in range(CHUNKS)) > 1, "no chunk had several lists"
    logged = len(view.log.seqs) + sum(len(log.seqs) for log in view.logs.values())
    assert logged < view.seq // 2, "dead entries were kept: the logs were not compacted"
    holders.drop(OBJ)
    assert holders.places == {}


def test_requesters_of_different_groups_are_offered_different_holders() -> None:
    """Past K holders, a chunk's lists double and new holders go to one group's list: the
    requesters' groups are offered different holders, K at most each; holders of every
    list are offered (a chunk's uploaders grow with its holders)."""
    holders = Holders(K, lambda n: True, lambda names, n: sorted(names)[:n], groups=4)
    view = holders.view(OBJ, CHUNKS * CHUNK, CHUNK, CHUNKS)
    a, b = "reader-a", "reader-b"
    ga, gb = holders.group_of(a), holders.group_of(b)
    assert ga != gb
    for i in range(K):
        holders.add(f"n{i}", view, [0])
        assert view.lists(0) == 1  # K holders or fewer: one list, the same for everyone
        assert all(view.offers(0, g) == [f"n{j}" for j in range(i + 1)] for g in range(4))
    holders.add(f"n{K}", view, [0])
    assert view.lists(0) == 2
    assert view.offers(0, ga) != view.offers(0, gb) or ga & 1 == gb & 1
    for i in range(K + 1, 4 * K):
        holders.add(f"n{i}", view, [0])
    assert view.lists(0) == 4
    offers = [view.offers(0, g) for g in range(4)]
    assert all(len(o) == K for o in offers)
    assert offers[ga] != offers[gb]
    assert len({n for o in offers for n in o}) == 4 * K  # every holder offered, once
    assert holders.group_of(a) == holders.group_of(a) == zlib.crc32(a.encode()) & 3
    # A long poll waits for its group's news: another group's list changing is none.
    before = {g: holders.last_change(view, g) for g in range(4)}
    holders.remove(offers[ga][0], view, [0])
    assert holders.last_change(view, ga) > before[ga]
    others = [g for g in range(4) if offers[ga][0] not in offers[g]]
    assert others and all(holders.last_change(view, g) == before[g] for g in others)


def test_one_group_while_the_chunk_has_at_most_k_holders() -> None:
    holders = Holders(K, lambda n: True, lambda names, n: sorted(names)[:n], groups=16)
    view = holders.view(OBJ, CHUNKS * CHUNK, CHUNK, CHUNKS)
    for i in range(K):
        holders.add(f"n{i}", view, range(CHUNKS))
    assert {view.lists(i) for i in range(CHUNKS)} == {1}
    assert {tuple(view.offers(i, g)) for i in range(CHUNKS) for g in range(16)} == {
        tuple(f"n{j}" for j in range(K))
    }
    assert all(len(view.lasts[i]) == 1 for i in range(CHUNKS))  # nothing kept per group
    with pytest.raises(ValueError, match="power of two"):
        Holders(K, lambda n: True, lambda names, n: names[:n], groups=3)


def test_offers_stay_a_sample_of_every_holder_and_change_rarely() -> None:
    """Holders arrive in the same order for every chunk (a swarm: the seeds first). The
    offers must not stay with the first K (they would serve the whole cluster), yet a
    chunk's offers change about K*ln(N/K) times over N holders, not N times."""
    holders = Recording(
        K, lambda n: True, lambda names, n: sorted(names)[:n], rng=random.Random(7), groups=1
    )
    view = holders.view(OBJ, CHUNKS * CHUNK, CHUNK, CHUNKS)
    nodes = [f"n{i}" for i in range(200)]
    changes = {index: 0 for index in range(CHUNKS)}
    for node in nodes:
        before = {i: list(view.offers(i)) for i in range(CHUNKS)}
        holders.add(node, view, range(CHUNKS))
        for i in range(CHUNKS):
            changes[i] += view.offers(i) != before[i]
            assert len(view.offers(i)) <= K and len(set(view.offers(i))) == len(view.offers(i))
    offered = [n for i in range(CHUNKS) for n in view.offers(i)]
    seeds = sum(n in ("n0", "n1", "n2") for n in offered)
    assert seeds <= len(offered) // 10  # not the first K everywhere
    assert len(set(offered)) >= 50  # spread over the swarm
    # Expected about K + K*ln(200/K) ~ 15 changes per chunk; N would be 200.
    assert max(changes.values()) <= 40 and sum(changes.values()) / CHUNKS <= 25
    holders.touched.clear()
    gone = view.offers(0)[0]
    holders.remove(gone, view, [0])  # an offered holder goes: another takes its place
    assert holders.touched == {0} and len(view.offers(0)) == K and gone not in view.offers(0)


def test_a_holder_offered_nowhere_takes_the_place_of_one_offered_for_several() -> None:
    """Requesters ask only the offered holders: a node offered for no chunk would upload
    nothing while the first holders serve every chunk in demand at once."""
    holders = Recording(
        2, lambda n: True, lambda names, n: sorted(names)[:n], rng=NoDraw(3), groups=1
    )
    view = holders.view(OBJ, CHUNKS * CHUNK, CHUNK, CHUNKS)
    other = holders.view("cd" * 32, CHUNKS * CHUNK, CHUNK, CHUNKS)
    for node in ("a", "b"):
        holders.add(node, view, range(4))
    holders.add("b", other, [0])
    assert holders.places == {"a": 4, "b": 5}  # every object's places count
    holders.touched.clear()
    holders.add("c", view, [2])
    assert view.offers(2) == ["a", "c"]  # b is offered for the most chunks: c takes its place
    assert holders.places == {"a": 4, "b": 4, "c": 1} == _places(view, other)
    assert holders.touched == {2}  # the change is logged: followers learn it
    holders.add("c", view, [0, 1, 3])  # offered somewhere now: no more by the spread rule
    assert [view.offers(i) for i in (0, 1, 3)] == [["a", "b"]] * 3
    assert holders.touched == {2}
    holders.add("d", view, [2])  # a has 4 places, d none
    assert view.offers(2) == ["d", "c"]
    holders.add("e", other, [0])  # a free place first
    holders.add("f", other, [0])  # b: 4 places
    holders.add("g", other, [0])  # every offered one has a single place: nothing to spread
    assert other.offers(0) == ["f", "e"]
    assert holders.places == {"a": 3, "b": 3, "c": 1, "d": 1, "e": 1, "f": 1}
    assert holders.places == _places(view, other)


def test_the_spread_rule_changes_offers_at_most_once_per_new_holder() -> None:
    """With no reservoir draw, every change is the spread rule's: at most one per node that
    becomes a holder, however many chunks it reports at once."""
    holders = Recording(
        K, lambda n: True, lambda names, n: sorted(names)[:n], rng=NoDraw(5), groups=1
    )
    view = holders.view(OBJ, CHUNKS * CHUNK, CHUNK, CHUNKS)
    changes = 0
    for i in range(200):
        holders.touched.clear()
        holders.add(f"n{i}", view, range(CHUNKS))
        changes += len(holders.touched) if i >= K else 0
        assert all(len(view.offers(c)) == min(K, i + 1) for c in range(CHUNKS))
    assert changes <= 200 - K
    assert len(_places(view)) == CHUNKS * K  # every offered place a different node
    assert max(_places(view).values()) == 1


# -- a SchedulerState: K peers per chunk, and exact updates under concurrent reports --------


@pytest.fixture
async def state(tmp_path: Path, clock: Clock) -> AsyncIterator[SchedulerState]:
    async with open_lmdb_state(tmp_path / "s", TIMEOUT, clock=clock, peers_per_chunk=K) as st:
        entry = FileEntry(path="f", size=CHUNKS * CHUNK, object=OBJ, locator="f")
        await st.catalog.put_dataset(build_manifest("ds", "mem://x/", [entry], chunk_size=CHUNK))
        yield st


async def _report(state: SchedulerState, node: str, chunks: list[int]) -> None:
    pairs = [(i, D) for i in chunks]
    report = await state.chunks.add_chunks(node, OBJ, CHUNKS * CHUNK, CHUNK, pairs, set(chunks))
    assert report.conflicts == report.refused == []


def _peer_counts(doc: dict[str, Any]) -> list[int]:
    return [len(peers) for peers in doc["peers"].values()]


async def test_no_answer_names_more_than_k_peers(state: SchedulerState, clock: Clock) -> None:
    names = [f"n{i:02d}" for i in range(20)]
    for name in names:
        await state.heartbeat(name, f"127.0.0.1:{100 + int(name[1:])}")
        await _report(state, name, list(range(CHUNKS)))
    full = state.chunk_map(OBJ, "reader")
    assert sorted(full["peers"]) == list(range(CHUNKS))
    assert set(_peer_counts(full)) == {K}
    page = state.chunks.updates(OBJ, "reader", "", 1000)
    assert sorted(page["changed"]) == list(range(CHUNKS))
    assert all(len(peers) == K for peers in page["peers"].values())
    # The offered ones go away in every way they can: others take their places.
    offered = {p["node"] for p in full["peers"][0]}
    gone = sorted(offered)
    state.chunks.remove_chunks(gone[0], OBJ, [0])
    state.chunks.report_bad_peer("reader", gone[1], OBJ, 0, "bad bytes")
    await state.trust.quarantine(gone[2], "by hand")
    clock.now += TIMEOUT / 2
    for name in names[10:]:
        await state.heartbeat(name, f"127.0.0.1:{100 + int(name[1:])}")
    clock.now += TIMEOUT / 2 + 1  # the first ten go down
    state.tidy()
    after = state.chunk_map(OBJ, names[15])
    assert max(_peer_counts(after)) == K  # K - 1 where the asking node is one of the K
    assert min(_peer_counts(after)) >= K - 1
    for peers in after["peers"].values():
        named = {p["node"] for p in peers}
        assert named <= set(names[10:]) - {gone[2], names[15]}
    assert not {p["node"] for p in after["peers"][0]} & set(gone)


async def test_requesters_of_different_groups_are_named_different_peers(
    state: SchedulerState,
) -> None:
    """Past K holders, requesters of different groups are named different peers (K at
    most each); each requester's updates say what its chunk map says."""
    for i in range(20):
        await state.heartbeat(f"n{i:02d}", f"127.0.0.1:{100 + i}")
        await _report(state, f"n{i:02d}", list(range(CHUNKS)))
    group = state.holders.group_of
    a = "reader"
    b = next(f"reader{i}" for i in range(100) if (group(f"reader{i}") ^ group(a)) & 1)
    maps = {r: state.chunk_map(OBJ, r) for r in (a, b)}
    for requester, doc in maps.items():
        assert set(_peer_counts(doc)) == {K}
        page = state.chunks.updates(OBJ, requester, "", 1000)
        assert {i: set(names) for i, names in page["peers"].items()} == {
            i: {p["node"] for p in peers} for i, peers in doc["peers"].items()
        }
    differ = [
        i
        for i in range(CHUNKS)
        if {p["node"] for p in maps[a]["peers"][i]} != {p["node"] for p in maps[b]["peers"][i]}
    ]
    assert len(differ) == CHUNKS


async def test_updates_are_exact_under_concurrent_reports(
    state: SchedulerState, clock: Clock
) -> None:
    """A follower folds pages of updates (a few chunks each) while nodes report, drop
    chunks, claim and release: afterwards its map is the scheduler's, and a sweep with
    nothing new brings nothing."""
    rng = random.Random(7)
    names = [f"n{i}" for i in range(8)]
    for name in names:
        await state.heartbeat(name, f"127.0.0.1:{1 + int(name[1:])}")
    group = state.holders.group_of
    readers = [
        "reader",
        next(f"r{i}" for i in range(100) if (group(f"r{i}") ^ group("reader")) & 1),
    ]
    follows = {reader: ChunkMap() for reader in readers}
    done = trio.Event()

    async def follow(reader: str) -> None:
        known = follows[reader]
        while True:
            page = ChunkUpdates.from_json(state.chunks.updates(OBJ, reader, known.cursor, 7))
            assert len(page.chunks) <= 7
            known.apply(page)
            if done.is_set() and not page.more:
                return
            await trio.sleep(0 if page.more else 0.001)

    async def churn(name: str) -> None:
        for _ in range(40):
            chunks = rng.sample(range(CHUNKS), 3)
            if rng.random() < 0.6:
                await _report(state, name, chunks)
            elif rng.random() < 0.5:
                state.chunks.remove_chunks(name, OBJ, chunks)
            else:
                state.claims.claim(name, OBJ, chunks, 30, state.live.up)
                await trio.sleep(0)
                state.claims.release(name, OBJ, chunks[:2])
            await trio.sleep(rng.random() * 0.002)

    async with trio.open_nursery() as nursery:
        for reader in readers:
            nursery.start_soon(follow, reader)
        async with trio.open_nursery() as writers:
            for name in names:
                writers.start_soon(churn, name)
        done.set()
    assert max(state.holders.objects[OBJ].lists(i) for i in range(CHUNKS)) > 1
    for reader, known in follows.items():
        fresh = ChunkMap()
        fresh.apply(ChunkUpdates.from_json(state.chunks.updates(OBJ, reader, "", 4096)))
        # Nothing missed: the same facts (peers in any order: ties are ranked at random).
        assert (known.digests, known.fetching, known.disputed) == (
            fresh.digests,
            fresh.fetching,
            fresh.disputed,
        )
        assert _peer_sets(known) == _peer_sets(fresh)
        doc = state.chunk_map(OBJ, reader)
        assert {i: {p["node"] for p in ps} for i, ps in doc["peers"].items()} == _peer_sets(known)
        again = state.chunks.updates(OBJ, reader, known.cursor, 7)
        assert again["changed"] == [] and not again["reset"]  # nothing repeated


def _peer_sets(cmap: ChunkMap) -> dict[int, set[str]]:
    return {i: {p.node for p in ps} for i, ps in cmap.peers.items()}


# -- the route ---------------------------------------------------------------------------------


@pytest.fixture
def _listed() -> Iterator[None]:
    """A source that lists one file of CHUNKS chunks whose content is OBJ."""
    entry = FileEntry(path="f", size=CHUNKS * CHUNK, object=OBJ, locator="f")
    with MemSource.serving({"mem://x/": Listing(files=[entry])}):
        yield


@pytest.mark.usefixtures("_listed")
async def test_the_updates_route_pages_waits_and_resets(
    client: SchedulerClient, server: SchedulerServer
) -> None:
    await client.add_dataset("ds", "mem://x/")
    for i in range(13):  # n12 holds nothing: it asks
        await client.heartbeat(f"n{i}", address=f"127.0.0.1:{i + 1}")
    report = {"object": OBJ, "size": CHUNKS * CHUNK, "chunk_size": CHUNK}
    assert (await client.claim("n0", OBJ, [0, 1, 2], ttl=30)).granted == [0, 1, 2]
    for i in range(12):  # n0 establishes chunk 0, the others take it from a peer
        await client.report_chunks(f"n{i}", add=[{**report, "chunks": [[0, D]]}], remove=[])
    cmap = await client.chunk_map(OBJ, "n12")
    assert len(cmap.peers[0]) == 8 and cmap.cursor  # K of 12 holders, and where to go on
    assert cmap.fetching == {1: "n0", 2: "n0"}
    first = await client.updates(OBJ, "n12", limit=2)
    assert first.reset and first.more and len(first.chunks) == 2
    rest = await client.updates(OBJ, "n12", first.cursor, limit=100)
    assert not rest.reset and not rest.more
    assert sorted([*first.chunks, *rest.chunks]) == [0, 1, 2]
    followed = ChunkMap()
    followed.apply(first)
    followed.apply(rest)
    assert (followed.digests, followed.fetching) == (cmap.digests, cmap.fetching)
    assert _peer_sets(followed) == _peer_sets(cmap)
    # Waiting: answered when something changes, not at the timeout; a follower goes on
    # from each answer's cursor until it has the whole change (digest, holder, no reader).
    got: list[ChunkUpdates] = []

    async def wait() -> None:
        got.append(await client.updates(OBJ, "n12", rest.cursor, wait=20))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.sleep(0.3)
            assert not got
            await client.report_chunks("n0", add=[{**report, "chunks": [[1, D]]}], remove=[])
    (news,) = got
    assert sorted(news.chunks) == [1]
    followed.apply(news)
    with trio.fail_after(10):
        while followed.fetching.get(1) or not followed.peers.get(1):
            followed.apply(await client.updates(OBJ, "n12", followed.cursor, wait=5))
    assert [p.node for p in followed.peers[1]] == ["n0"] and followed.digests[1] == D
    # A cursor of another scheduler (or none) starts over.
    again = await client.updates(OBJ, "n12", "elsewhere.12", limit=100)
    assert again.reset and sorted(again.chunks) == [0, 1, 2]
    bad = await client.updates("cd" * 32, "n12")
    assert bad.reset and bad.chunks == {} and bad.cursor == ""


def _same_answer(followed: ChunkMap, fresh: ChunkMap) -> bool:
    return (followed.digests, followed.fetching, followed.disputed, followed.broken) == (
        fresh.digests,
        fresh.fetching,
        fresh.disputed,
        fresh.broken,
    ) and _peer_sets(followed) == _peer_sets(fresh)


@pytest.mark.usefixtures("_listed")
async def test_a_node_asks_for_the_whole_map_once_then_follows_updates(
    client: SchedulerClient, server: SchedulerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's directory: a refresh asks only for the changes since its cursor (an
    answer bounded by what changed), and what it folds is what a whole map says now."""
    asked: list[tuple[str, str]] = []  # since the last clear
    total: Counter[str] = Counter()  # all along
    whole, follow = client.chunk_map, client.updates

    async def chunk_map(object_id: str, node: str | None = None) -> ChunkMap:
        asked.append(("map", ""))
        total["map"] += 1
        return await whole(object_id, node)

    async def updates(object_id: str, node: str | None = None, cursor: str = "") -> ChunkUpdates:
        page = await follow(object_id, node, cursor)
        asked.append(("updates", ",".join(map(str, sorted(page.chunks)))))
        total["updates"] += 1
        return page

    monkeypatch.setattr(client, "chunk_map", chunk_map)
    monkeypatch.setattr(client, "updates", updates)
    await client.add_dataset("ds", "mem://x/")
    for i in range(4):
        await client.heartbeat(f"n{i}", address=f"127.0.0.1:{i + 1}")
    await client.heartbeat("reader", address="127.0.0.1:9")
    report = {"object": OBJ, "size": CHUNKS * CHUNK, "chunk_size": CHUNK}
    assert (await client.claim("n0", OBJ, [0, 1, 2], ttl=30)).granted == [0, 1, 2]
    await client.report_chunks("n0", add=[{**report, "chunks": [[0, D]]}], remove=[])
    directory = SchedulerDirectory(client, "reader")
    known = await directory.chunk_info(OBJ)
    assert asked == [("map", "")] and known.fetching == {1: "n0", 2: "n0"}
    assert await directory.chunk_info(OBJ) is known and len(asked) == 1  # within its 1 s

    await client.report_chunks("n0", add=[{**report, "chunks": [[1, D]]}], remove=[])
    await client.report_chunks("n1", add=[{**report, "chunks": [[0, D]]}], remove=[])
    followed = await directory.chunk_info(OBJ, max_age=0)
    assert asked[1:] == [("updates", "0,1")]  # the two chunks that changed, nothing more
    asked.clear()
    assert _same_answer(followed, await whole(OBJ, "reader"))

    # A reported peer is replaced, and the next refresh follows that too.
    await directory.report_bad_peer("n0", OBJ, 1, "refused")
    followed = await directory.chunk_info(OBJ)
    assert [what for what, _ in asked] == ["updates"]
    assert _same_answer(followed, await whole(OBJ, "reader"))
    # A cursor this scheduler does not know (another process led before) starts over.
    followed.cursor = "elsewhere.3"
    asked.clear()
    followed = await directory.chunk_info(OBJ, max_age=0)
    assert [what for what, _ in asked] == ["updates"]
    assert _same_answer(followed, await whole(OBJ, "reader"))
    assert (total["map"], total["updates"]) == (1, 3)
