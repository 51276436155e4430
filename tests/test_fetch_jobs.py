"""Pull and prefetch jobs against failing sources: a permanent error ends the job at once,
temporary ones are retried at a bounded rate, and a stopped or cancelled job leaves no
transfer asking the source on its behalf (a reader's own transfer is left alone). No
network: the shared fakes, a jumping clock for the backoffs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing
from fakes import Directory, MemSource, Peers
from fetchfixtures import CS, DATA

from syncbit.errors import SourcePermanentError
from syncbit.fetch import Fetcher, Jobs
from syncbit.manifest import FileEntry, Manifest
from syncbit.store import ObjectStore


def dataset(name: str, files: int, first: int = 0) -> Manifest:
    """`files` files of DATA's size (6 chunks each), each its own content object."""
    entries = [
        FileEntry(path=f"f{i}.bin", size=len(DATA), object=f"{i:064x}", locator=f"f{i}.bin")
        for i in range(first, first + files)
    ]
    return Manifest(dataset=name, source="mem://", revision="r1", chunk_size=CS, files=entries)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead once nothing ran for 10 ms of real time: backoffs of
    minutes pass at once, while a source read in a worker thread still finishes before
    time moves on (a threshold of 0 would jump past its deadline meanwhile)."""
    return trio.testing.MockClock(autojump_threshold=0.01)


async def start(
    store: ObjectStore,
    source: MemSource,
    nursery: trio.Nursery,
    read_deadline: float = 2.0,
    source_batch: int = 16 << 20,
) -> tuple[Fetcher, Jobs]:
    fetcher = Fetcher(
        store,
        Directory(),
        Peers(DATA),
        read_deadline=read_deadline,
        readahead_chunks=0,
        source_batch=source_batch,
    )
    await nursery.start(fetcher.run)

    async def flush() -> None:
        await store.flush()

    jobs = Jobs("me", fetcher, lambda m: source, lambda m: False, flush)
    jobs.bind(nursery)
    return fetcher, jobs


async def within(seconds: int, done: Callable[[], bool]) -> None:
    """Until `done()`, at most `seconds` of virtual time, a second at a time: a far
    deadline would let the clock jump there while a worker thread (a read, an fsync)
    is still running in real time."""
    for _ in range(seconds):
        if done():
            return
        await trio.sleep(1)
    assert done(), f"not done after {seconds} s"


async def settled_reads(source: MemSource, seconds: float = 600) -> int:
    """Reads once `seconds` more (virtual) passed: what keeps asking shows up here."""
    await trio.sleep(seconds)
    return source.reads


@pytest.mark.parametrize("kind", ["pull", "prefetch"])
async def test_a_source_that_refuses_for_good_ends_the_job_at_once(
    store: ObjectStore, nursery: trio.Nursery, clock: trio.testing.MockClock, kind: str
) -> None:
    source = MemSource(data=DATA)  # a server that ignores Range: every read fails for good
    source.error = SourcePermanentError("cannot read: the server ignores Range requests")
    _, jobs = await start(store, source, nursery)
    members = ["me"] if kind == "prefetch" else None
    job = jobs.start(dataset("ds", files=8), kind, members)
    await within(60, job.finished.is_set)
    assert job.done and job.permanent
    assert job.error is not None and "ignores Range" in job.error
    # At most one read per file, and later only those already under way (one per
    # source-lane slot): no retry, no second round.
    first = source.reads
    assert 1 <= first <= 8
    settled = await settled_reads(source)
    assert settled <= first + 3
    if kind == "prefetch":  # the plan, with every heartbeat, does not start it again
        assert jobs.start(dataset("ds", files=8), kind, members) is job
    assert await settled_reads(source) == settled


async def test_temporary_failures_are_retried_at_a_bounded_rate_until_stopped(
    store: ObjectStore, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    source = MemSource(data=DATA)
    source.down = True  # 503s, for ever
    _, jobs = await start(store, source, nursery, read_deadline=2.0)
    job = jobs.start(dataset("ds", files=4), "prefetch", ["me"])
    window = 1200.0
    await trio.sleep(window)
    assert not job.done, job.error  # still assigned: it keeps trying
    # A round ends at the first chunk out of its deadline (each of the three source reads
    # at once retrying about once a second by then), then backs off for up to a minute:
    # under one read a second on average, whatever the number of chunks.
    assert source.reads / window < 1.0, source.reads
    jobs.stop("ds")  # unassigned (or removed): it stops, and so do its transfers
    stopped = source.reads
    settled = await settled_reads(source)
    assert settled <= stopped + 3, (stopped, settled)  # at most the reads in flight
    assert source.reads == await settled_reads(source)


async def test_a_cancelled_pull_stops_its_transfers_but_not_a_readers(
    store: ObjectStore, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    source = MemSource(data=DATA)
    source.down = True
    fetcher, jobs = await start(store, source, nursery, read_deadline=3600.0)
    manifest = dataset("ds", files=4)
    job = jobs.start(manifest, "pull")
    entry = manifest.files[0]
    got: list[bytes] = []

    async def reader() -> None:  # someone reads the file through the mount meanwhile
        got.append(bytes(await fetcher.read(fetcher.open(entry, CS, source), 0, 10)))

    nursery.start_soon(reader)
    await trio.sleep(30)
    assert not job.done and source.reads > 0
    jobs.cancel("ds", "cancelled by `syncbit pull --cancel ds`")
    assert job.done and job.cancelled and job.error == "cancelled by `syncbit pull --cancel ds`"
    await trio.sleep(30)
    calls = len(source.asked)
    await trio.sleep(60)
    # Only the reader's own flight still retries.
    assert {asked for asked in source.asked[calls:]} == {("f0.bin", 0)}
    source.down = False
    await within(60, lambda: bool(got))
    assert got == [DATA[:10]]
    await trio.sleep(60)
    calls = source.reads
    assert await settled_reads(source) == calls  # nothing else asks any more


async def test_stopping_one_dataset_leaves_content_another_still_needs(
    store: ObjectStore, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    source = MemSource(data=DATA)
    source.down = True
    _, jobs = await start(store, source, nursery, read_deadline=3600.0)
    shared = dataset("a", files=2)  # objects 0 and 1
    other = dataset("b", files=2, first=1)  # objects 1 and 2: object 1 in both
    job_a = jobs.start(shared, "pull")
    job_b = jobs.start(other, "pull")
    await trio.sleep(10)
    jobs.cancel("a", "dataset a was removed", forget=True)
    assert "a" not in jobs.jobs and job_a.done
    source.down = False  # the source is back: b completes, object 1 included
    await within(600, job_b.finished.is_set)
    assert job_b.error is None
    assert store.get(f"{1:064x}") is not None and store.get(f"{1:064x}").complete  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["pull", "prefetch"])
async def test_without_a_trace_files_come_in_manifest_order(
    store: ObjectStore, nursery: trio.Nursery, kind: str
) -> None:
    """A few files at a time, each queued whole: in manifest order, run after run (it
    was a coin flip of trio's which of them queued first)."""
    source = MemSource(data=DATA)
    _, jobs = await start(store, source, nursery, source_batch=CS)  # a read per chunk
    manifest = dataset("ds", files=4)
    job = jobs.start(manifest, kind)
    with trio.fail_after(30):
        await job.finished.wait()
    # Each file's reads, by their average place in the source's log: the reads of the
    # chunks in flight at once start in any order, the files do not.
    places: dict[str, list[int]] = {}
    for n, (path, _) in enumerate(source.asked):
        places.setdefault(path, []).append(n)
    order = sorted(places, key=lambda path: sum(places[path]) / len(places[path]))
    assert order == [f.path for f in manifest.files], source.asked
