"""Coordination: one source read per chunk across the cluster (claims, parking, the
prefetch plan and its lanes, takeover of unread chunks, busy holders) (no network)."""

from __future__ import annotations

import threading

import pytest
import trio
from fakes import Directory, MemSource, Peers
from fetchfixtures import (
    CS,
    DATA,
    ENTRY,
    chunk_of,
    deliver,
    prefetch_evens,
    prefetch_in_background,
    started,
)

from syncbit.chunks import digest
from syncbit.errors import ReadDeadlineError, SchedulerError, SyncbitError
from syncbit.fetch import Fetcher, Jobs, Priority, RoundRobin
from syncbit.manifest import FileEntry, Manifest
from syncbit.protocol import ChunkMap, ClaimResult, Peer
from syncbit.store import ObjectStore


async def test_chunk_another_node_is_reading_is_waited_for_and_taken_from_it(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    directory.info = ChunkMap(fetching={0: "n2"})
    fetcher = Fetcher(store, directory, peers, readahead_chunks=0, park_poll=0.01)
    await started(fetcher, nursery)
    got: list[bytes] = []

    async def read() -> None:
        got.append(bytes(await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 100)))

    nursery.start_soon(read)
    await trio.sleep(0.2)
    assert got == [] and source.reads == 0  # waiting for n2, not reading the source
    assert fetcher.stats["parked"] >= 1
    deliver(directory, 0)
    with trio.fail_after(5):
        while not got:
            await trio.sleep(0.01)
    assert got == [DATA[:100]]
    assert source.reads == 0 and peers.calls == ["good"]


async def test_lapsed_claim_lets_this_node_read_the_source(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), Directory()
    directory.info = ChunkMap(fetching={0: "n2"})
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0, park_poll=0.01)
    await started(fetcher, nursery)

    async def n2_gives_up() -> None:
        await trio.sleep(0.2)
        directory.info.fetching.clear()  # n2 went down or released its claim

    nursery.start_soon(n2_gives_up)
    assert await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 100) == DATA[:100]
    assert source.reads == 1
    assert directory.claims[-1][0] == 0


async def test_prefetch_chunks_back_from_parking_each_get_a_deadline_to_run(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """Two prefetch chunks parked past the read deadline (n2 was reading them, then gave
    up) come back at once to a source that takes one read at a time: the second waits its
    turn. Before, both ran with their deadlines gone, and the second failed at once ("no
    source read admitted in time"), failing the prefetch."""
    source, directory = MemSource(data=DATA), Directory()
    directory.info = ChunkMap(fetching={0: "n2", 1: "n2"})
    fetcher = Fetcher(
        store,
        directory,
        Peers(DATA),
        readahead_chunks=0,
        park_poll=0.01,
        read_deadline=1.0,
        source_batch=CS,
        source_concurrency=1,
    )
    await started(fetcher, nursery)

    async def n2_gives_up() -> None:
        await trio.sleep(1.5)  # past the read deadline
        directory.info.fetching.clear()

    nursery.start_soon(n2_gives_up)
    two = FileEntry(path="two.bin", size=2 * CS, object="cd" * 32, locator="two.bin")
    with trio.fail_after(10):
        await fetcher.ensure(two, CS, source, Priority.PREFETCH)
    assert source.reads == 2
    assert store.read(store.get(two.object), 0, 2 * CS) == DATA[: 2 * CS]  # type: ignore[arg-type]


async def test_waiting_reader_fails_at_its_deadline_naming_the_node(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), Directory()
    directory.info = ChunkMap(fetching={0: "n2"})
    fetcher = Fetcher(
        store, directory, Peers(DATA), readahead_chunks=0, park_poll=0.01, read_deadline=0.3
    )
    await started(fetcher, nursery)
    # The reader's deadline and the parked flight's are the same moment: either says so.
    with pytest.raises(ReadDeadlineError, match=r"timed out|n2 was reading it"):
        await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 100)
    # The parked flight itself fails too, with the cause, and keeps that failure for a
    # moment: a read that comes meanwhile meets it at once.
    with trio.fail_after(5):
        while True:
            with pytest.raises(ReadDeadlineError) as failed:
                await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 100)
            if "n2 was reading it from the source" in str(failed.value):
                break
    assert source.reads == 0


async def test_prefetch_plan_reads_own_chunks_and_takes_the_rest_from_peers(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    fetcher = Fetcher(store, directory, peers, park_poll=0.01, source_batch=CS)
    await started(fetcher, nursery)
    mine = {0, 2, 4}
    directory.info.fetching.update({1: "n2", 3: "n2", 5: "n2"})  # the other member's reads
    done = prefetch_in_background(fetcher, source, nursery, may_source=lambda i: i in mine)
    await trio.sleep(0.3)
    assert not done.is_set()
    assert source.bytes == 3 * CS  # only the chunks planned for this node
    deliver(directory, 1, 3, 5)  # the other member read them
    with trio.fail_after(5):
        await done.wait()
    assert sorted(peers.calls) == ["good"] * 3
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


async def test_node_done_with_its_share_takes_over_unread_chunks_from_the_end(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """The other member has not got to chunks 3 and 5 yet (nobody holds or reads them):
    once this node's own share is in, it reads them itself, the last one first (owners
    read from the front), one at a time, each under a claim."""
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    fetcher = Fetcher(store, directory, peers, park_poll=0.01, source_batch=CS)
    fetcher.plans.add(RoundRobin("me", ["me", "other"]))  # two nodes share the source
    await started(fetcher, nursery)
    deliver(directory, 1)  # the other member's first chunk is in
    with trio.fail_after(5):
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH, lambda i: i % 2 == 0)
    assert source.bytes == len(DATA) - CS  # its own three, then 5 and 3; chunk 1 from the peer
    assert directory.claims[3:] == [[5], [3]]
    assert peers.calls == ["good"]
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


async def test_planned_owner_gone_means_this_node_reads_it(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), Directory()
    fetcher = Fetcher(store, directory, Peers(DATA), park_poll=0.01)
    await started(fetcher, nursery)
    members = ["me", "other"]

    def may_source(i: int) -> bool:
        return members[i % len(members)] == "me"

    async def other_goes_down() -> None:
        await trio.sleep(0.2)
        members.remove("other")  # the plan no longer has it

    nursery.start_soon(other_goes_down)
    with trio.fail_after(5):
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH, may_source)
    assert source.bytes == len(DATA)


async def test_source_reads_keep_flowing_while_peer_transfers_are_slow(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """The node's share of the origin's bytes is the cluster's bottleneck: peer transfers
    that hang must not hold it back (they run in a lane of their own)."""
    gate = threading.Event()

    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    peers.gate = gate
    fetcher = Fetcher(
        store, directory, peers, park_poll=0.01, source_batch=CS, prefetch_concurrency=2
    )
    await started(fetcher, nursery)
    deliver(directory, 1, 3, 5)  # the other member already holds its share
    done = prefetch_evens(fetcher, source, nursery)
    try:
        with trio.fail_after(5):
            while source.bytes < 3 * CS:  # chunks 0, 2, 4 from the source
                await trio.sleep(0.01)
        assert not done.is_set()  # the peer transfers are still hanging
    finally:
        gate.set()
    with trio.fail_after(5):
        await done.wait()
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


async def test_chunks_planned_elsewhere_come_from_peers_during_own_source_read(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """The other node's chunks do not queue behind this node's source read (one at a
    time with 2 sharers): they wait parked and go to the peer lane as soon as a holder
    has them, while the node's own read from the origin still runs."""
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    source.gate = threading.Event()  # this node's own source read hangs until set
    fetcher = Fetcher(store, directory, peers, park_poll=0.01, source_batch=CS)
    fetcher.plans.add(RoundRobin("me", ["me", "other"]))  # two nodes share the source
    await started(fetcher, nursery)
    deliver(directory, 1, 3)  # the other member's first chunks are in
    done = prefetch_evens(fetcher, source, nursery)
    try:
        with trio.fail_after(5):
            while len(peers.calls) < 2:
                await trio.sleep(0.01)
        assert source.reads == 0  # chunk 0's source read is still hanging
        assert fetcher.stats["parked"] >= 1  # chunk 5 waits for its holder, parked
    finally:
        source.gate.set()
    deliver(directory, 5)
    with trio.fail_after(5):
        await done.wait()
    assert sorted(peers.calls) == ["good"] * 3 and source.bytes == 3 * CS
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


async def test_an_open_file_still_waits_for_the_node_its_plan_names(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """A file opened during a prefetch goes ahead of the queued prefetch, but a chunk the
    plan gives the other node stays parked for it (the origin's bytes once), and comes
    from that node once it has it."""
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    fetcher = Fetcher(store, directory, peers, park_poll=0.01, source_batch=CS)
    fetcher.plans.add(RoundRobin("me", ["me", "other"]))
    await started(fetcher, nursery)
    directory.info.fetching.update({1: "other", 3: "other", 5: "other"})  # reading them
    done = prefetch_evens(fetcher, source, nursery)
    with trio.fail_after(5):
        while source.bytes < 3 * CS:  # chunks 0, 2, 4 from the source; 1, 3, 5 parked
            await trio.sleep(0.01)
    parked = fetcher.stats["parked"]
    opened = prefetch_in_background(fetcher, source, nursery, prio=Priority.OPENED)
    await trio.sleep(0.2)
    raised = [fetcher._runner.table.get(ENTRY.object, i) for i in (1, 3, 5)]
    assert all(f is not None and f.priority is Priority.OPENED for f in raised)
    assert source.bytes == 3 * CS and not peers.calls  # still waiting for the other node
    assert fetcher.stats["parked"] == parked  # left parked, not parked again
    deliver(directory, 1, 3, 5)
    with trio.fail_after(5):
        await done.wait()
        await opened.wait()
    assert sorted(peers.calls) == ["good"] * 3 and source.bytes == 3 * CS


@pytest.mark.parametrize(("sharers", "at_once"), [(1, 4), (2, 2), (8, 1)])
async def test_prefetch_source_reads_at_once_shrink_with_the_plan(
    store: ObjectStore, nursery: trio.Nursery, sharers: int, at_once: int
) -> None:
    """As many source reads as the source takes (4 at first for one not seen before; more
    than prefetch_concurrency/2) across the plan's nodes, at least one per node: with many
    nodes each reads its share one chunk at a time, so every chunk is complete (and can be
    forwarded) as soon as possible."""
    source = MemSource(data=DATA)
    gate = source.gate = threading.Event()
    fetcher = Fetcher(store, Directory(), Peers(DATA), source_batch=CS, prefetch_concurrency=6)
    fetcher.plans.add(RoundRobin("me", [f"n{i}" for i in range(sharers)]))
    await started(fetcher, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    gate.set()  # a first read delivered: the source's whole limit applies from now on
    assert await fetcher.read(handle, 5 * CS, 10) == DATA[5 * CS : 5 * CS + 10]
    gate.clear()
    nursery.start_soon(fetcher.ensure, ENTRY, CS, source, Priority.PREFETCH)
    with trio.fail_after(5):
        while source.active < at_once:
            await trio.sleep(0.01)
    await trio.sleep(0.2)  # room for more to start, if the limit let them
    assert source.peak == at_once
    gate.set()
    with trio.fail_after(5):
        assert await fetcher.read(handle, 0, len(DATA)) == DATA


async def test_prefetch_jobs_tell_the_fetcher_how_many_nodes_share_the_source(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    gate = source.gate = threading.Event()
    fetcher = Fetcher(store, Directory(), Peers(DATA))
    await started(fetcher, nursery)

    async def flush() -> None:
        await store.flush()

    jobs = Jobs("me", fetcher, lambda m: source, lambda m: False, flush)
    jobs.bind(nursery)
    manifest = Manifest(dataset="d", source="mem://", revision="r1", chunk_size=CS, files=[ENTRY])
    assert fetcher.plans.sharers() == 1
    job = jobs.start(manifest, "prefetch", ["a", "me", "z"])
    assert fetcher.plans.sharers() == 3
    jobs.start(manifest, "prefetch", ["a", "me"])  # the plan lost a member
    assert fetcher.plans.sharers() == 2
    jobs.start(manifest, "prefetch", ["me"])  # alone: it reads everything itself
    gate.set()
    with trio.fail_after(5):
        await job.finished.wait()
    assert fetcher.plans.sharers() == 1  # nothing running: a read has the whole budget


async def test_busy_holders_are_waited_for_not_blamed(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """A holder at its upload limit turns a prefetch transfer away: the fetcher asks the
    other holders, and when all are busy it waits and asks again (a busy peer is not a
    bad one). A reader's transfer is never turned away."""
    directory, peers = Directory(), Peers(DATA)
    peers.busy = {"a", "b"}
    for i in range(len(DATA) // CS + 1):
        directory.info.digests[i] = digest(chunk_of(DATA, i))
        directory.info.peers[i] = [Peer("na", "a"), Peer("nb", "b")]
    fetcher = Fetcher(store, directory, peers, park_poll=0.01, readahead_chunks=0)
    await started(fetcher, nursery)
    # A reader is served by a busy holder at once.
    with trio.fail_after(5):
        assert await fetcher.read(fetcher.open(ENTRY, CS, MemSource(data=DATA)), 0, 10) == DATA[:10]
    done = prefetch_in_background(fetcher, MemSource(data=DATA), nursery)
    await trio.sleep(0.3)
    assert not done.is_set() and fetcher.stats["busy"] > 0  # both holders busy: waiting
    peers.busy.discard("b")  # one holder frees a slot
    with trio.fail_after(5):
        await done.wait()
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]
    assert fetcher.stats["source"] == 0  # nothing from the source: busy is not gone


class _SchedulerDown(Directory):
    """The chunk directory while no scheduler answers (a failover): every call fails."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def chunk_info(self, object_id: str, max_age: float = 1.0) -> ChunkMap:
        if self.down:
            raise SchedulerError("no scheduler leads now")
        return await super().chunk_info(object_id, max_age)

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult:
        if self.down:
            raise SchedulerError("no scheduler leads now")
        return await super().claim(object_id, indexes, ttl)


async def test_without_a_scheduler_prefetch_waits_and_readers_read(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), _SchedulerDown()
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0, park_poll=0.01)
    await started(fetcher, nursery)
    done = prefetch_in_background(fetcher, source, nursery)
    await trio.sleep(0.3)
    # Another node may be reading the same chunks: the origin would send them twice.
    assert source.reads == 0 and not done.is_set()
    # A reader never waits for the scheduler: the source has the bytes.
    assert await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 100) == DATA[:100]
    assert source.reads == 1
    directory.down = False  # a new leader answers
    with trio.fail_after(10):
        await done.wait()
    assert source.bytes == len(DATA)  # each byte once


class _Counting(Directory):
    """The directory, counting the chunk-map lookups made of it."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    async def chunk_info(self, object_id: str, max_age: float = 1.0) -> ChunkMap:
        self.looks += 1
        return self.info


async def test_parked_prefetches_look_at_the_map_as_often_as_the_scheduler_asks(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """In a large cluster the scheduler's heartbeat answer stretches the lookups of parked
    prefetches (`lookup_interval`: nodes / lookup_rate); a reader that parks on the same
    object is not held to that: its watcher looks at once, and every park_poll after."""
    source, directory, peers = MemSource(data=DATA), _Counting(), Peers(DATA)
    fetcher = Fetcher(store, directory, peers, park_poll=0.01, source_batch=CS)
    fetcher.lookup_interval = 5.0
    await started(fetcher, nursery)
    mine = {0, 2, 4}
    directory.info.fetching.update({1: "n2", 3: "n2", 5: "n2"})
    nursery.start_soon(fetcher.ensure, ENTRY, CS, source, Priority.PREFETCH, lambda i: i in mine)
    await trio.sleep(0.3)
    assert source.bytes == 3 * CS and fetcher.stats["parked"] >= 1
    looks = directory.looks
    await trio.sleep(0.5)
    assert directory.looks - looks <= 1  # every park_poll (0.01 s) it would be ~50
    got: list[bytes] = []

    async def read() -> None:
        got.append(bytes(await fetcher.read(fetcher.open(ENTRY, CS, source), 3 * CS, 100)))

    nursery.start_soon(read)
    await trio.sleep(0.1)  # the reader waits for n2 too, parked
    assert got == [] and source.bytes == 3 * CS
    deliver(directory, 3)
    with trio.fail_after(2):  # well before the prefetch's next look (5 s)
        while not got:
            await trio.sleep(0.01)
    assert got == [DATA[3 * CS : 3 * CS + 100]]


class _Ages(Directory):
    """The directory, recording how old a chunk map each lookup would accept."""

    def __init__(self) -> None:
        super().__init__()
        self.ages: list[float] = []

    async def chunk_info(self, object_id: str, max_age: float = 1.0) -> ChunkMap:
        self.ages.append(max_age)
        return self.info


async def test_prefetch_transfers_reuse_a_chunk_map_for_the_lookup_interval(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """A prefetch's transfers act on a chunk map as old as the scheduler's lookup interval
    (in a large cluster every transferring node refreshed its maps every second whatever
    the scheduler asked); a reader's transfer still refreshes after a second."""
    source, directory = MemSource(data=DATA), _Ages()
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0, source_batch=CS)
    fetcher.lookup_interval = 4.0
    await started(fetcher, nursery)
    got = await fetcher.read(fetcher.open(ENTRY, CS, source), 2 * CS, 100)
    assert got == DATA[2 * CS : 2 * CS + 100]
    assert directory.ages and set(directory.ages) == {1.0}  # a reader: a second at most
    directory.ages.clear()
    await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    assert directory.ages and set(directory.ages) == {4.0}


BIG = bytes((i * 13 + i // 509) % 256 for i in range(24 * CS))
BIG_ENTRY = FileEntry(path="big.bin", size=len(BIG), object="cd" * 32, locator="big.bin")


async def prefetch_big(
    store: ObjectStore, nursery: trio.Nursery, directory: Directory, streams: int
) -> MemSource:
    """Prefetch BIG_ENTRY in source requests of 2 chunks, `streams` transfers at once;
    its bytes checked. The source, to count its reads."""
    source = MemSource(data=BIG)
    fetcher = Fetcher(
        store, directory, Peers(BIG), source_batch=2 * CS, prefetch_concurrency=streams
    )
    await started(fetcher, nursery)
    with trio.fail_after(10):
        await fetcher.ensure(BIG_ENTRY, CS, source, Priority.PREFETCH)
    assert store.read(store.get(BIG_ENTRY.object), 0, len(BIG)) == BIG  # type: ignore[arg-type]
    return source


async def test_prefetch_claims_the_chunks_of_its_next_requests_ahead(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """A prefetch (or pull) claims with each source request the queued chunks of the next
    two: fewer claims than requests, each chunk claimed once and read once."""
    directory = Directory()
    source = await prefetch_big(store, nursery, directory, streams=2)
    assert source.bytes == len(BIG)
    assert len(directory.claims) < source.reads / 2, (directory.claims, source.reads)
    assert sorted(i for claim in directory.claims for i in claim) == list(range(24))
    assert directory.released == []


async def test_abandoned_prefetch_releases_what_it_claimed_ahead(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """Chunks claimed ahead that will not be read now are released at once: other nodes
    need not wait for the leases to run out."""
    source, directory = MemSource(data=BIG), Directory()
    source.gate = threading.Event()  # the first source request hangs
    fetcher = Fetcher(store, directory, Peers(BIG), source_batch=2 * CS, prefetch_concurrency=2)
    await started(fetcher, nursery)
    stopped: list[SyncbitError] = []

    async def prefetch() -> None:
        try:
            await fetcher.ensure(BIG_ENTRY, CS, source, Priority.PREFETCH)
        except SyncbitError as exc:
            stopped.append(exc)

    nursery.start_soon(prefetch)
    with trio.fail_after(5):
        while not directory.claims:
            await trio.sleep(0.01)
    first = directory.claims[0]
    assert len(first) > 2  # the request's two chunks and the next requests' ahead
    fetcher.abandon({BIG_ENTRY.object}, "dataset removed")
    source.gate.set()
    with trio.fail_after(5):
        while not any(set(r) & set(first[2:]) for r in directory.released):
            await trio.sleep(0.01)
        while not stopped:
            await trio.sleep(0.01)
    assert "dataset removed" in str(stopped[0])
    released = {i for r in directory.released for i in r}
    assert set(first[2:]) <= released


async def test_a_job_stopping_after_the_fetcher_leaves_its_claims_to_lapse(
    store: ObjectStore,
) -> None:
    """At shutdown the fetcher's workers end before the jobs that abandon their transfers:
    the grants claimed ahead are then left to their leases, and nothing fails."""
    source, directory = MemSource(data=BIG), Directory()
    source.gate = threading.Event()
    fetcher = Fetcher(store, directory, Peers(BIG), source_batch=2 * CS, prefetch_concurrency=2)
    async with trio.open_nursery() as inner:
        await started(fetcher, inner)
        inner.start_soon(fetcher.ensure, BIG_ENTRY, CS, source, Priority.PREFETCH)
        with trio.fail_after(5):
            while not directory.claims:
                await trio.sleep(0.01)
        inner.cancel_scope.cancel()
        source.gate.set()
    assert len(directory.claims[0]) > 2  # chunks were claimed ahead
    assert fetcher.abandon({BIG_ENTRY.object}, "prefetch of big stopped") > 0


async def test_an_open_files_whole_fetch_claims_nothing_ahead(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """An open file's whole fetch keeps pace with its loader and ends at its close: each
    of its source requests claims its own chunks only."""
    source, directory = MemSource(data=BIG), Directory()
    fetcher = Fetcher(store, directory, Peers(BIG), source_batch=2 * CS, prefetch_concurrency=2)
    await started(fetcher, nursery)
    done = prefetch_in_background(fetcher, source, nursery, entry=BIG_ENTRY, prio=Priority.OPENED)
    with trio.fail_after(10):
        await done.wait()
    assert len(directory.claims) == source.reads


class SlowDirectory(Directory):
    """A directory whose claims take a while to answer, as a scheduler's do."""

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult:
        await trio.sleep(0.02)
        return await super().claim(object_id, indexes, ttl)


async def test_workers_wait_for_a_claim_asking_ahead_instead_of_asking_again(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """Several source streams start at once: a worker whose chunks another worker's claim
    is asking for ahead waits for that answer. Every chunk is asked for once."""
    directory = SlowDirectory()
    await prefetch_big(store, nursery, directory, streams=8)
    claimed = sorted(i for claim in directory.claims for i in claim)
    assert claimed == list(range(24)), directory.claims
