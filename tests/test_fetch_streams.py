"""`fetch.streams.Streams`: source reads admitted under each source's adaptive limit, most
urgent first, none while a Retry-After holds, and every end reported to the controller.
trio's autojump clock: no sleeps, no timed assertions."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from fakes import MemSource

from syncbit.errors import SourceChangedError, SourceThrottledError, SourceUnavailableError
from syncbit.fetch.streams import Streams, key_of
from syncbit.wire import Abort

MiB = 1 << 20


async def hold(
    streams: Streams, source: MemSource, prio: int, release: trio.Event, second: bool = False
) -> None:
    async with streams.read(source, prio, trio.current_time() + 1000, MiB, second):
        await release.wait()


@pytest.fixture
def streams() -> Streams:
    return Streams(cap=64)


@pytest.fixture
def source() -> MemSource:
    return MemSource(uri="mem://a/x")


async def proven(streams: Streams, *sources: MemSource) -> None:
    """One read of each source delivered: from now on it gets its whole limit at once."""
    for source in sources:
        async with streams.read(source, 0, trio.current_time() + 1000, MiB):
            await trio.sleep(0.01)


async def test_a_source_gets_one_read_at_a_time_until_one_delivered(
    autojump_clock: trio.testing.MockClock, streams: Streams, source: MemSource
) -> None:
    """A refusal that holds for every read (no Range support) costs one request. A second
    read of a first one that straggles (a hedge) is let through beside it: the first may
    be a stalled connection that would otherwise hold a prefetch until its timeout."""

    async def admitted_of_three(prio: int, second: bool = False) -> int:
        release = trio.Event()
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(hold, streams, source, prio, release, second and i > 0)
                await trio.testing.wait_all_tasks_blocked()  # in this order
            running = streams.stats(source).in_flight
            release.set()
        return running

    assert await admitted_of_three(2) == 1
    assert await admitted_of_three(2, second=True) == 3
    assert await admitted_of_three(0) == 3  # a reader's read never waits for a first one
    await proven(streams, source)
    assert await admitted_of_three(2) == 3


async def test_a_first_read_answered_with_its_body_opens_the_sources_limit(
    autojump_clock: trio.testing.MockClock, streams: Streams, source: MemSource
) -> None:
    """Background reads behind a source's first read start once its body arrives, not
    only at its end: waiting for the end held a pull of a 1 GiB object to one stream for
    its first 16 MiB. Until bytes arrive they still wait (a refusal costs one request)."""
    first = Abort()
    release = trio.Event()

    async def first_read() -> None:
        async with streams.read(source, 2, trio.current_time() + 1000, MiB, progress=first):
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_read)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):
            nursery.start_soon(hold, streams, source, 2, release)
        await trio.sleep(5)
        assert streams.stats(source).in_flight == 1  # answered with no body yet
        first.got(64 << 10)
        await trio.sleep(0.1)
        assert streams.stats(source).in_flight == 4
        release.set()
    # Proven now: a new burst needs no first read.
    assert streams.stats(source).stream_rate > 0


async def ended_by(streams: Streams, source: MemSource, exc: Exception) -> None:
    """One read admitted at once that ends with `exc` (raised again here)."""
    with pytest.raises(type(exc)):
        async with streams.read(source, 0, trio.current_time() + 1000, MiB):
            raise exc


async def test_reads_beyond_the_limit_wait_and_the_most_urgent_goes_first(
    autojump_clock: trio.testing.MockClock, streams: Streams, source: MemSource
) -> None:
    await proven(streams, source)
    limit = streams.limit(source)
    release = trio.Event()
    order: list[int] = []

    async def waiter(prio: int) -> None:
        async with streams.read(source, prio, trio.current_time() + 1000, MiB):
            order.append(prio)

    async with trio.open_nursery() as nursery:
        for _ in range(limit):
            nursery.start_soon(hold, streams, source, 2, release)
        await trio.testing.wait_all_tasks_blocked()
        assert streams.stats(source).in_flight == limit
        nursery.start_soon(waiter, 2)  # a prefetch, first in line
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, 0)  # then a reader
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # every slot is taken
        release.set()
    assert order == [0, 2]
    assert streams.stats(source).in_flight == 0


async def test_queued_reads_start_in_order_past_one_that_gave_up(
    autojump_clock: trio.testing.MockClock, streams: Streams, source: MemSource
) -> None:
    """Many reads queued behind a full limit start one after another as slots free, most
    urgent first, then in arrival order; one that gave up (its deadline passed) in the
    middle of the queue holds up nobody behind it."""
    await proven(streams, source)
    limit = streams.limit(source)
    release = trio.Event()
    order: list[tuple[int, int]] = []
    gave_up: list[int] = []

    async def waiter(prio: int, n: int, deadline: float) -> None:
        try:
            async with streams.read(source, prio, deadline, MiB):
                order.append((prio, n))
                await trio.sleep(1)
        except SourceThrottledError:
            gave_up.append(n)

    now = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(limit):
            nursery.start_soon(hold, streams, source, 2, release)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(3 * limit):
            prio = 0 if n % 5 == 0 else 2
            nursery.start_soon(waiter, prio, n, now + (5 if n == 7 else 1000))
            await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(10)  # n=7 gives up while every slot is still taken
        assert gave_up == [7] and order == []
        release.set()
    urgent = [(0, n) for n in range(3 * limit) if n % 5 == 0]
    rest = [(2, n) for n in range(3 * limit) if n % 5 and n != 7]
    assert order == urgent + rest
    assert streams.stats(source).in_flight == 0


async def test_a_throttle_cuts_the_limit_and_its_retry_after_holds_every_read(
    autojump_clock: trio.testing.MockClock, streams: Streams, source: MemSource
) -> None:
    assert streams.limit(source) == 4
    await ended_by(streams, source, SourceThrottledError("503 slow down", retry_after=7.0))
    assert streams.limit(source) == 3  # 4 x 0.7, rounded
    assert streams.stats(source).throttles == 1
    throttled_at = trio.current_time()
    async with streams.read(source, 0, trio.current_time() + 1000, MiB):
        admitted_at = trio.current_time()
    assert admitted_at - throttled_at >= 7.0  # the virtual clock: exactly the wait


async def test_a_read_not_admitted_by_its_deadline_fails_temporarily(
    autojump_clock: trio.testing.MockClock, streams: Streams, source: MemSource
) -> None:
    await ended_by(streams, source, SourceThrottledError("429", retry_after=60.0))
    with pytest.raises(SourceThrottledError, match=r"^429 \(not asked again for 55\.0s\)"):
        async with streams.read(source, 0, trio.current_time() + 5, MiB):
            raise AssertionError("admitted during a Retry-After")
    assert streams.stats(source).in_flight == 0


async def test_failures_shrink_the_limit_and_permanent_refusals_do_not(
    autojump_clock: trio.testing.MockClock, streams: Streams, source: MemSource
) -> None:
    before = streams.limit(source)
    await ended_by(streams, source, SourceChangedError("version gone"))
    assert streams.limit(source) == before  # says nothing about the origin's load
    await ended_by(streams, source, SourceUnavailableError("connection reset"))
    assert streams.limit(source) < before
    assert streams.stats(source).failures == 1


async def test_sources_are_keyed_by_origin(autojump_clock: trio.testing.MockClock) -> None:
    """Two datasets on one host share one limit; another host has its own."""
    streams = Streams(cap=8)
    a1 = MemSource(uri="http://h1:80/a/")
    a2 = MemSource(uri="http://h1:80/b/")
    b = MemSource(uri="http://h2/a/")
    assert key_of(a1) == key_of(a2) != key_of(b)
    await proven(streams, a1)
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(streams.limit(a1)):
            nursery.start_soon(hold, streams, a2, 1, release)
        await trio.testing.wait_all_tasks_blocked()
        assert streams.stats(a1).in_flight == streams.limit(a1)
        assert streams.lanes() == streams.limit(a1)
        async with streams.read(b, 1, trio.current_time() + 1, MiB):  # not held up
            assert streams.lanes() == streams.limit(a1) + streams.limit(b)
        release.set()
    assert streams.lanes() == streams.control.policy.initial


async def test_after_failures_background_reads_wait_and_a_readers_read_does_not(
    autojump_clock: trio.testing.MockClock, streams: Streams, source: MemSource
) -> None:
    """A source that refuses every read (503, no Retry-After) is asked at a bounded rate by
    the prefetch, however many chunks wait on it; a reader still gets its one request."""
    await proven(streams, source)
    asked: list[float] = []

    async def prefetch_read() -> None:
        with pytest.raises(SourceThrottledError):
            async with streams.read(source, 2, trio.current_time() + 30, MiB):
                asked.append(trio.current_time())
                raise SourceThrottledError("503")

    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(prefetch_read)
    # 200 reads within 30 s: one burst at the start, then one per growing backoff.
    assert len(asked) < 20, len(asked)
    assert trio.current_time() - began >= 29
    with pytest.raises(SourceThrottledError, match=r"^503 \(not asked again for"):
        async with streams.read(source, 2, trio.current_time() + 0.1, MiB):
            raise AssertionError("a background read admitted while backed off")
    async with streams.read(source, 0, trio.current_time() + 0.1, MiB):
        pass  # a reader's read is sent at once, and delivering ends the backoff
    async with streams.read(source, 2, trio.current_time() + 0.1, MiB):
        pass


async def test_a_request_asks_for_half_a_second_of_what_a_stream_delivers(
    autojump_clock: trio.testing.MockClock, streams: Streams
) -> None:
    """Whole chunks, at least one, at most the batch; the batch while nothing is known."""
    chunk, batch = 4 * MiB, 16 * MiB

    async def delivered(source: MemSource, nbytes: int, seconds: float) -> int:
        async with streams.read(source, 0, trio.current_time() + 1000, nbytes):
            await trio.sleep(seconds)
        return streams.request_bytes(source, chunk, batch)

    fast, mid, slow = (MemSource(uri=f"http://{n}/x") for n in ("fast", "mid", "slow"))
    assert streams.request_bytes(fast, chunk, batch) == batch
    assert await delivered(fast, 16 * MiB, 0.1) == batch  # 160 MiB/s: 80 MiB a half second
    assert await delivered(mid, 8 * MiB, 0.4) == 2 * chunk  # 20 MiB/s: 10 MiB
    assert await delivered(slow, 4 * MiB, 0.8) == chunk  # 5 MiB/s: 2.5 MiB, still a chunk
    assert streams.request_bytes(slow, chunk, chunk // 2) == chunk  # a batch under a chunk
