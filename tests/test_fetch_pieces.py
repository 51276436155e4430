"""The fetch layer's pieces on their own: the flight state machine and single-flight table,
the queue's order and limits, readahead windows, the source plan and its limits, the
bandwidth cap (no network, no workers)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from fakes import MemSource
from fetchfixtures import CS, DATA, ENTRY

from syncbit.errors import ReadDeadlineError, SyncbitError
from syncbit.fetch import Job, JobKind, JobState, Priority, RoundRobin
from syncbit.fetch.flight import Flight, FlightTable, Joined, State
from syncbit.fetch.limiter import Bandwidth
from syncbit.fetch.plan import Plans, source_limit, takeover
from syncbit.fetch.queue import FlightQueue
from syncbit.fetch.readahead import Readahead
from syncbit.manifest import Manifest
from syncbit.protocol import ChunkMap, Peer
from syncbit.store import ObjectStore

SOURCE = MemSource(data=DATA)


def table(read_deadline: float = 10.0, failure_ttl: float = 1.0) -> FlightTable:
    return FlightTable(read_deadline, failure_ttl)


def join(
    flights: FlightTable, store: ObjectStore, index: int, prio: Priority = Priority.FOREGROUND
) -> tuple[Flight, Joined]:
    obj = store.object(ENTRY.object, ENTRY.size, CS)
    return flights.join(obj, ENTRY, SOURCE, index, prio)


# -- flights --------------------------------------------------------------------------------


async def test_one_flight_per_chunk_until_it_ends(store: ObjectStore) -> None:
    flights = table()
    first, how = join(flights, store, 0)
    assert how is Joined.NEW and first.state is State.QUEUED
    again, how = join(flights, store, 0)
    assert again is first and how is Joined.JOINED
    first.move(State.RUNNING)
    flights.finish(first)
    assert first.final and first.error is None and first.done.is_set()
    fresh, how = join(flights, store, 0)
    assert fresh is not first and how is Joined.NEW


async def test_a_more_urgent_reader_raises_a_waiting_flight_not_a_running_one(
    store: ObjectStore,
) -> None:
    flights = table()
    flight, _ = join(flights, store, 1, Priority.PREFETCH)
    flight.may_source = lambda: False
    _, how = join(flights, store, 1, Priority.FOREGROUND)
    assert how is Joined.RAISED and flight.priority is Priority.FOREGROUND
    assert flight.may_source is None  # a reader needs it now: no waiting for a plan
    other, _ = join(flights, store, 2, Priority.PREFETCH)
    other.move(State.RUNNING)
    _, how = join(flights, store, 2, Priority.FOREGROUND)
    assert how is Joined.JOINED and other.priority is Priority.PREFETCH


async def test_an_open_file_raises_queued_prefetch_but_keeps_its_plan(
    store: ObjectStore,
) -> None:
    """A file a process holds open is fetched ahead of a dataset's prefetch, and a chunk
    the plan gives another node still waits for that node (the origin's bytes once)."""
    flights = table()
    flight, _ = join(flights, store, 1, Priority.PREFETCH)
    flight.may_source = lambda: False
    _, how = join(flights, store, 1, Priority.OPENED)
    assert how is Joined.RAISED and flight.priority is Priority.OPENED
    assert flight.may_source is not None and not flight.may_source()
    _, how = join(flights, store, 1, Priority.PREFETCH)  # the prefetch asks again: no change
    assert how is Joined.JOINED and flight.priority is Priority.OPENED


async def test_a_kept_failure_gives_the_next_flight_one_attempt(store: ObjectStore) -> None:
    flights = table(failure_ttl=5.0)
    flight, _ = join(flights, store, 0)
    flight.move(State.RUNNING)
    flight.error = ReadDeadlineError("down")
    flights.keep_failure(flight)
    assert flight.state is State.FAILED
    retry, how = join(flights, store, 0)
    assert how is Joined.NEW and retry.one_shot  # the kernel's retry fails fast


async def test_impossible_moves_are_refused(store: ObjectStore) -> None:
    flights = table()
    flight, _ = join(flights, store, 0)
    flight.move(State.RUNNING)
    flights.finish(flight)
    for to in (State.QUEUED, State.PARKED, State.RUNNING, State.FAILED):
        with pytest.raises(AssertionError, match="DONE"):
            flight.move(to)
    failed, _ = join(flights, store, 1)
    failed.error = SyncbitError("abandoned")
    flights.finish(failed)
    failed.end()  # a carried chunk failed again later: still FAILED
    with pytest.raises(AssertionError):
        failed.move(State.QUEUED)


# -- the queue ----------------------------------------------------------------------------------


async def test_reads_go_first_then_each_lane_within_its_limit(store: ObjectStore) -> None:
    flights = table()
    queue = FlightQueue(peer_limit=1, source_limit=lambda: 1)
    prefetch = [join(flights, store, i, Priority.PREFETCH)[0] for i in range(4)]
    for f in prefetch[:2]:
        assert queue.push(f)
    for f in prefetch[2:]:
        assert queue.push(f, peer_ready=True)
    read, _ = join(flights, store, 5, Priority.READAHEAD)
    queue.push(read)
    assert queue.take() is read
    taken = [queue.take(), queue.take()]
    assert queue.take() is None  # both lanes at their limit
    assert {f.lane for f in taken if f is not None} == {"peer", "source"}
    assert all(f is not None and f.state is State.RUNNING for f in taken)
    assert not queue.source_lane_idle()
    source_one = next(f for f in taken if f is not None and f.lane == "source")
    queue.done_running(source_one)
    nxt = queue.take()
    assert nxt is not None and nxt.lane == "source"


async def test_a_flight_planned_elsewhere_is_not_queued_and_stale_entries_are_skipped(
    store: ObjectStore,
) -> None:
    flights = table()
    queue = FlightQueue(peer_limit=4, source_limit=lambda: 4)
    elsewhere, _ = join(flights, store, 0, Priority.PREFETCH)
    elsewhere.may_source = lambda: False
    assert not queue.push(elsewhere)  # the caller parks it
    queue.park(elsewhere, "n2")
    assert queue.parked(ENTRY.object) == {0: elsewhere}
    assert queue.push(elsewhere, peer_ready=True)  # a holder has it now
    assert queue.parked(ENTRY.object) == {}
    twice, _ = join(flights, store, 1, Priority.PREFETCH)
    queue.push(twice)
    queue.push(twice)  # queued again: one heap entry too many
    taken = {queue.take(), queue.take()}
    assert taken == {elsewhere, twice}
    assert queue.take() is None  # the stale entry of a running flight is skipped


async def test_open_files_go_before_queued_prefetch_in_the_lane_they_waited_in(
    store: ObjectStore,
) -> None:
    flights = table()
    queue = FlightQueue(peer_limit=1, source_limit=lambda: 1)
    prefetch = [join(flights, store, i, Priority.PREFETCH)[0] for i in range(3)]
    for f in prefetch:
        assert queue.push(f)
    peer = join(flights, store, 3, Priority.PREFETCH)[0]
    waiting = join(flights, store, 4, Priority.PREFETCH)[0]
    for f in (peer, waiting):
        assert queue.push(f, peer_ready=True)
    # An open's fetch joins the last queued flight of each lane: each goes first in it.
    for f in (prefetch[2], waiting):
        _, how = flights.join(f.obj, f.entry, f.source, f.index, Priority.OPENED)
        assert how is Joined.RAISED
        assert queue.push(f, peer_ready=f.peer_ready)
    taken = [queue.take(), queue.take()]
    assert queue.take() is None  # both lanes at their limit
    assert {(f.index, f.lane) for f in taken if f is not None} == {(2, "source"), (4, "peer")}
    for t in taken:
        assert t is not None
        queue.done_running(t)
    # Then the prefetch in its order; the raised flights' older entries are skipped.
    order = []
    while (nxt := queue.take()) is not None:
        order.append(nxt.index)
        queue.done_running(nxt)
    assert sorted(order) == [0, 1, 3] and [i for i in order if i != 3] == [0, 1]


# -- readahead --------------------------------------------------------------------------------


def test_readahead_tops_up_half_a_window_at_a_time() -> None:
    ra = Readahead()
    assert ra.sequential(0, 100)
    assert ra.window(1, 8, 100) == range(1, 9)
    assert ra.sequential(100, 100) and not ra.sequential(500, 10)
    assert ra.window(2, 8, 100) == range(0)  # 7 of 8 still ahead
    assert ra.window(5, 8, 100) == range(9, 13)  # half consumed: the rest of the window
    assert ra.window(98, 8, 100) == range(98, 100)  # never past the file


def test_readahead_starts_small_and_doubles_while_the_reader_goes_on() -> None:
    ra = Readahead()
    assert ra.grown(1, 64, after=1) == 1  # a header read costs one chunk of readahead
    assert ra.grown(1, 64, after=1) == 1  # more reads inside the same chunk: no growth
    assert [ra.grown(1, 64, after=a) for a in range(2, 10)] == [2, 4, 8, 16, 32, 64, 64, 64]
    assert ra.sequential(0, 10) and not ra.sequential(50, 10)
    assert ra.size == 0 and ra.grown(1, 64, after=3) == 1  # a jump starts over


# -- the plan ---------------------------------------------------------------------------------


def test_round_robin_gives_each_chunk_one_member() -> None:
    plan = RoundRobin("b", ["a", "b", "c"])
    assert [plan.may_source(k) for k in range(6)] == [False, True, False] * 2
    assert plan.sharers == 3
    assert RoundRobin("x", ["a", "b"]).may_source(0)  # not a member: reads anything
    assert RoundRobin("x").may_source(0) and RoundRobin("x").sharers == 1


def test_a_share_splits_the_reads_without_naming_the_members() -> None:
    """Beyond MAX_PLAN_MEMBERS the scheduler sends (index, count) and no names: the split
    is the same as by names, so every chunk still has exactly one reader."""
    names = [f"n{i:04d}" for i in range(1000)]
    by_share = [RoundRobin(n, [], share=(i, len(names))) for i, n in enumerate(names)]
    readers = [[p.node for p in by_share if p.may_source(k)] for k in range(3000)]
    assert all(len(r) == 1 for r in readers)
    assert [r[0] for r in readers[:1000]] == names
    assert by_share[0].sharers == 1000
    assert [RoundRobin("b", ["a", "b", "c"], share=(1, 3)).may_source(k) for k in range(3)] == [
        False,
        True,
        False,
    ]


def test_a_plan_entry_share_is_taken_only_when_valid() -> None:
    from syncbit.node.sync import share_of

    assert share_of({"share": {"index": 2, "count": 5}}) == (2, 5)
    for bad in (
        {},
        {"share": None},
        {"share": {"index": 5, "count": 5}},
        {"share": {"index": -1, "count": 5}},
        {"share": {"index": "1", "count": 5}},
        {"share": {"index": True, "count": 5}},
        {"share": [1, 5]},
    ):
        assert share_of(bad) is None, bad


def test_source_reads_at_once_shrink_with_the_largest_running_plan() -> None:
    plans = Plans()
    assert plans.sharers() == 1
    big, small = RoundRobin("a", ["a", "b", "c", "d"]), RoundRobin("a", ["a", "b"])
    plans.add(big)
    plans.add(small)
    assert plans.sharers() == 4
    plans.discard(big)
    assert plans.sharers() == 2
    assert [source_limit(6, n) for n in (1, 2, 3, 8)] == [3, 2, 1, 1]
    assert source_limit(1, 1) == 1


async def test_takeover_picks_the_last_chunk_nobody_holds_or_reads(store: ObjectStore) -> None:
    flights = table()
    queue = FlightQueue(peer_limit=1, source_limit=lambda: 1)
    for i in range(1, 6):
        f, _ = join(flights, store, i, Priority.PREFETCH)
        f.may_source = lambda: False
        queue.park(f, "n2")
    parked = queue.parked(ENTRY.object)
    info = ChunkMap(peers={5: [Peer("n2", "a")]}, fetching={4: "n2"})
    spare = takeover(parked, info)
    assert spare is not None and spare.index == 3
    assert takeover({}, info) is None


# -- limits -------------------------------------------------------------------------------------


async def test_bandwidth_cap_spaces_transfers_by_their_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = Bandwidth(1000)
    start = trio.current_time()
    for _ in range(3):
        await cap.take(500)
    assert trio.current_time() - start == pytest.approx(1.0)  # the third waits for two
    unlimited = Bandwidth(0)
    before = trio.current_time()
    await unlimited.take(10**9)
    assert trio.current_time() == before


# -- jobs ---------------------------------------------------------------------------------------


def test_a_job_ends_once_and_a_cancelled_one_stays_cancelled() -> None:
    manifest = Manifest(dataset="d", source="mem://", revision="r1", chunk_size=CS, files=[ENTRY])
    job = Job(manifest, JobKind.PULL, RoundRobin("me"))
    assert not job.done and job.state is JobState.RUNNING
    job.end(JobState.CANCELLED)
    job.end(JobState.COMPLETE)  # the flush after a cancel finished anyway
    assert job.done and job.cancelled and job.state is JobState.CANCELLED
    assert JobKind("prefetch") is JobKind.PREFETCH and job.kind == "pull"
