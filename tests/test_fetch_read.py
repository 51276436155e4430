"""Reads through the fetch layer: single flight, peers verified against digests, fallback
to the source, deadlines, priorities, batching and readahead (no network)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import trio
from fakes import Directory, MemSource, Peers
from fetchfixtures import (
    CS,
    DATA,
    ENTRY,
    prefetch_in_background,
    started,
)

from syncbit.chunks import digest
from syncbit.errors import ReadDeadlineError, SourceChangedError
from syncbit.fetch import Fetcher, Priority
from syncbit.manifest import FileEntry
from syncbit.protocol import ChunkMap, ClaimResult, Peer
from syncbit.store import ObjectStore
from syncbit.store.files import ObjectFile
from syncbit.wire import Abort


async def test_single_flight_ten_readers_one_transfer(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    source.gate = threading.Event()
    fetcher = Fetcher(store, Directory(), Peers(DATA), readahead_chunks=0)
    await started(fetcher, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    results: list[bytes] = []

    async def reader(off: int) -> None:
        results.append(bytes(await fetcher.read(fetcher.open(ENTRY, CS, source), off, 1000)))

    async with trio.open_nursery() as readers:
        for i in range(10):
            readers.start_soon(reader, CS + i * 1000)
        await trio.sleep(0.2)
        source.gate.set()
    assert source.reads == 1
    assert sorted(results) == sorted(DATA[CS + i * 1000 : CS + i * 1000 + 1000] for i in range(10))
    assert await fetcher.read(handle, CS, 10) == DATA[CS : CS + 10]
    assert source.reads == 1  # now cached


async def test_whole_file_through_reads_across_chunks(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    fetcher = Fetcher(store, Directory(), Peers(DATA), readahead_chunks=2)
    await started(fetcher, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    out = bytearray()
    while len(out) < len(DATA):
        out += await fetcher.read(handle, len(out), 50_000)
    assert bytes(out) == DATA
    assert await fetcher.read(handle, len(DATA), 10) == b""
    assert source.bytes == len(DATA)  # each byte once, readahead included
    obj = store.get(ENTRY.object)
    assert obj is not None
    with trio.fail_after(5):
        while len(obj.written) < 6:  # staged chunks reach the object file in the background
            await trio.sleep(0.01)
    await store.flush()
    assert store.get(ENTRY.object).durable == set(range(6))  # type: ignore[union-attr]


async def test_bad_peer_detected_reported_and_reader_gets_right_bytes(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    directory.info = ChunkMap(
        digests={0: digest(DATA[:CS])},
        peers={
            0: [
                Peer("bad", "evil"),
                Peer("gone", "dead"),
                Peer("bad2", "evil"),
                Peer("ok", "good"),
            ]
        },
    )
    fetcher = Fetcher(store, directory, peers, readahead_chunks=0)
    await started(fetcher, nursery)
    assert await fetcher.read(fetcher.open(ENTRY, CS, source), 0, CS) == DATA[:CS]
    # The best three are tried in random order (load spreading), then the rest in rank.
    assert sorted(directory.reports) == [("bad", 0), ("bad2", 0)]
    assert sorted(peers.calls[:3]) == ["dead", "evil", "evil"] and peers.calls[3:] == ["good"]
    assert source.reads == 0
    assert fetcher.stats["peer"] == CS


async def test_peer_chunk_without_known_digest_is_never_used(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    directory.info = ChunkMap(digests={}, peers={0: [Peer("ok", "good")]})
    fetcher = Fetcher(store, directory, peers, readahead_chunks=0)
    await started(fetcher, nursery)
    assert await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 10) == DATA[:10]
    assert peers.calls == []
    assert source.reads == 1


async def test_only_bad_peers_falls_back_to_source(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    directory.info = ChunkMap(
        digests={1: digest(DATA[CS : 2 * CS])}, peers={1: [Peer("bad", "evil")]}
    )
    fetcher = Fetcher(store, directory, peers, readahead_chunks=0)
    await started(fetcher, nursery)
    with trio.fail_after(2):  # at once: the only holder failed, nobody else reads it
        got = await fetcher.read(fetcher.open(ENTRY, CS, source), CS, CS)
    assert got == DATA[CS : 2 * CS]
    assert source.reads == 1 and directory.reports == [("bad", 1)]
    assert fetcher.stats["parked"] == 0


async def test_deadline_gives_read_error_with_cause_then_recovers(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    source.down = True
    deadline = 2.0
    fetcher = Fetcher(store, Directory(), Peers(DATA), read_deadline=deadline, readahead_chunks=0)
    await started(fetcher, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    began = time.monotonic()
    with pytest.raises(ReadDeadlineError, match="connection refused"):
        await fetcher.read(handle, 0, 10)
    assert time.monotonic() - began < 2 * deadline + 3
    assert source.reads >= 2  # retried with backoff before giving up
    # The kernel retries a failed page at once: that read makes one attempt and fails
    # fast, without a new deadline's worth of waiting (half of one: slack for a loaded
    # machine, which a 0.2 s bound against a 0.5 s deadline did not leave).
    reads = source.reads
    began = time.monotonic()
    with pytest.raises(ReadDeadlineError):
        await fetcher.read(handle, 0, 10)
    assert source.reads == reads + 1
    assert time.monotonic() - began < deadline / 2
    source.down = False  # the source is back: the very next read succeeds
    assert await fetcher.read(handle, 0, 10) == DATA[:10]


async def test_changed_source_fails_without_retry(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    source.changed = True
    fetcher = Fetcher(store, Directory(), Peers(DATA), readahead_chunks=0)
    await started(fetcher, nursery)
    with pytest.raises(SourceChangedError):
        await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 10)
    assert source.reads == 1
    assert not store.get(ENTRY.object).has(0)  # type: ignore[union-attr]


async def test_foreground_goes_before_prefetch(store: ObjectStore, nursery: trio.Nursery) -> None:
    source = MemSource(data=DATA)
    order: list[int] = []
    original = source.read_into

    def recording(
        entry: FileEntry, offset: int, buf: memoryview, abort: Abort | None = None
    ) -> None:
        order.append(offset // CS)
        original(entry, offset, buf, abort)

    source.read_into = recording  # type: ignore[method-assign]
    fetcher = Fetcher(store, Directory(), Peers(DATA), workers=1, readahead_chunks=0)
    handle = fetcher.open(ENTRY, CS, source)
    # Queue prefetch of everything, then a foreground read of the last chunk, before any
    # worker runs: the foreground chunk must be transferred first.
    nursery.start_soon(fetcher.ensure, ENTRY, CS, source, Priority.PREFETCH)
    await trio.sleep(0)
    reader = trio.Event()

    async def read_last() -> None:
        await fetcher.read(handle, 5 * CS, 10)
        reader.set()

    nursery.start_soon(read_last)
    await trio.sleep(0)
    await started(fetcher, nursery)
    await reader.wait()
    assert order[0] == 5


async def test_source_reads_coalesce_queued_neighbours(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    fetcher = Fetcher(store, Directory(), Peers(DATA), source_batch=3 * CS)
    await started(fetcher, nursery)
    await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    assert source.reads == 2  # 6 chunks, 3 per request
    assert source.bytes == len(DATA)
    handle = fetcher.open(ENTRY, CS, source)
    assert await fetcher.read(handle, 0, len(DATA)) == DATA


async def test_sequential_readahead_goes_out_in_batches(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """A sequential reader's readahead is topped up half a window at a time, so the chunks
    go to the source (and to the scheduler for claims) a batch per request, not one each."""
    chunks = 24
    big = bytes(i % 251 for i in range(chunks * CS))
    entry = FileEntry(path="big.bin", size=len(big), object="ab" * 32, locator="big.bin")

    source = MemSource(data=big)
    directory = Directory()
    fetcher = Fetcher(
        store,
        directory,
        Peers(DATA),
        readahead_chunks=8,
        source_batch=4 * CS,
    )
    await started(fetcher, nursery)
    handle = fetcher.open(entry, CS, source)
    out = bytearray()
    while len(out) < len(big):
        out += await fetcher.read(handle, len(out), CS // 4)
        await trio.sleep(0.002)  # a reader slower than the source: the window stays full
    assert bytes(out) == big
    assert source.bytes == len(big)
    # One chunk per request would be 24; in batches of up to 4 it is about a quarter.
    assert source.reads <= 9, source.reads
    assert len(directory.claims) == source.reads


async def test_failed_batch_puts_neighbours_back_on_their_own(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    source.down = True
    fetcher = Fetcher(store, Directory(), Peers(DATA), source_batch=6 * CS, read_deadline=0.3)
    await started(fetcher, nursery)
    with pytest.raises(ReadDeadlineError):
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    source.down = False
    await trio.sleep(fetcher.failure_ttl)
    await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


async def test_access_errors_are_not_retried(store: ObjectStore, nursery: trio.Nursery) -> None:
    from syncbit.errors import InvalidSourceError

    source = MemSource(data=DATA)
    source.error = InvalidSourceError("gated repo: set HF_TOKEN")
    fetcher = Fetcher(store, Directory(), Peers(DATA), readahead_chunks=0)
    await started(fetcher, nursery)
    with pytest.raises(SourceChangedError, match="HF_TOKEN"):
        await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 10)
    assert source.reads == 1


async def test_foreground_read_is_not_starved_by_slow_prefetch(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    slow = MemSource(data=DATA)
    slow.gate = threading.Event()  # prefetch source reads hang until set
    other = ENTRY.model_copy(update={"object": "ef" * 32})
    fetcher = Fetcher(
        store, Directory(), Peers(DATA), workers=4, prefetch_concurrency=2, readahead_chunks=0
    )
    await started(fetcher, nursery)
    nursery.start_soon(fetcher.ensure, ENTRY, CS, slow, Priority.PREFETCH)
    await trio.sleep(0.1)
    try:
        with trio.fail_after(5):
            got = await fetcher.read(fetcher.open(other, CS, MemSource(data=DATA)), 0, 100)
        assert got == DATA[:100]
    finally:
        slow.gate.set()


async def test_prefetch_bandwidth_cap(
    store: ObjectStore, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = MemSource(data=DATA)
    rate = CS * 10  # bytes per (virtual) second
    fetcher = Fetcher(store, Directory(), Peers(DATA), prefetch_bandwidth=rate, source_batch=CS)
    await started(fetcher, nursery)
    # A first file of 10 bytes from the same source: it has delivered, so the prefetch's
    # reads are admitted together, none waiting on the virtual clock (which jumps while
    # a thread reads) for a first read to deliver.
    tiny = ENTRY.model_copy(update={"object": "ef" * 32, "size": 10})
    await fetcher.ensure(tiny, CS, source, Priority.PREFETCH)
    start = trio.current_time()
    await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    elapsed = trio.current_time() - start
    # Every read waits for the bytes before it: all but the last read's (whichever that
    # is; the file's short last chunk may go at any point).
    assert elapsed >= (len(DATA) - CS) / rate
    assert source.bytes == 10 + len(DATA)


async def test_a_peer_that_cannot_be_reached_is_left_out_of_the_next_reads(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """A holder that refuses connections (stopped; the scheduler offers it until it misses
    its heartbeats) costs one attempt, not one per chunk."""
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    directory.info = ChunkMap(
        digests={i: digest(DATA[i * CS : (i + 1) * CS]) for i in range(6)},
        peers={
            0: [Peer("gone", "refused")],
            **{i: [Peer("gone", "refused"), Peer("ok", "good")] for i in range(1, 6)},
        },
    )
    fetcher = Fetcher(store, directory, peers, readahead_chunks=0)
    await started(fetcher, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    for i in range(6):
        assert await fetcher.read(handle, i * CS, CS) == DATA[i * CS : (i + 1) * CS]
    assert peers.calls == ["refused"] + ["good"] * 5
    assert source.reads == 1  # chunk 0: its only holder is gone
    assert fetcher.stats["unreachable"] == 1 and fetcher.stats["peer"] == len(DATA) - CS


async def test_readahead_chunks_are_read_from_ram_not_back_from_disk(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks a reader's readahead fetched stay in RAM until it reads them, however far
    the window runs past the LRU (two chunks here): read back from the object file they
    were just written to, they cost a disk read each (bench/origin.py: 0.70x of aria2c)."""
    chunks = 16
    big = bytes(i % 251 for i in range(chunks * CS))
    entry = FileEntry(path="big.bin", size=len(big), object="ab" * 32, locator="big.bin")
    from_file: list[int] = []
    real_nowait = ObjectFile.read_nowait

    def read_nowait(self: ObjectFile, view: memoryview, offset: int) -> bool:
        from_file.append(offset // CS)
        return real_nowait(self, view, offset)

    monkeypatch.setattr(ObjectFile, "read_nowait", read_nowait)
    store = ObjectStore.open(tmp_path / "cache", 1 << 30, staged_chunks=2)
    try:
        fetcher = Fetcher(store, Directory(), Peers(big), readahead_chunks=chunks)
        await started(fetcher, nursery)
        handle = fetcher.open(entry, CS, MemSource(data=big))
        fetcher.hold(handle)  # open through the mount
        out = bytearray(await fetcher.read(handle, 0, CS))
        obj = store.get(entry.object)
        assert obj is not None
        with trio.fail_after(5):
            while len(obj.written) < chunks:  # the whole window fetched and written
                await trio.sleep(0.01)
        while len(out) < len(big):
            out += await fetcher.read(handle, len(out), CS // 2)
        assert bytes(out) == big
        assert from_file == []
        assert store.readers_ram().kept == 0  # each was read once: the LRU's now
        fetcher.release(handle)
    finally:
        store.close()


class HungDirectory(Directory):
    """A scheduler that takes requests and answers none while `hung` (a wedged process):
    each map and claim asked is counted, then waits until it answers again."""

    def __init__(self) -> None:
        super().__init__()
        self.hung = True
        self.answering = trio.Event()
        self.asked = 0

    async def _wait(self) -> None:
        self.asked += 1
        if self.hung:
            await self.answering.wait()

    def answer(self) -> None:
        self.hung = False
        self.answering.set()

    async def chunk_info(self, object_id: str, max_age: float = 1.0) -> ChunkMap:
        await self._wait()
        return await super().chunk_info(object_id, max_age)

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult:
        await self._wait()
        return await super().claim(object_id, indexes, ttl)


async def _hung(
    store: ObjectStore, nursery: trio.Nursery
) -> tuple[HungDirectory, MemSource, Fetcher]:
    """A running fetcher (3 s read deadline, 0.3 s patience) whose scheduler hangs."""
    directory = HungDirectory()
    fetcher = Fetcher(
        store, directory, Peers(), read_deadline=3.0, readahead_chunks=0, reader_patience=0.3
    )
    return directory, MemSource(data=DATA), await started(fetcher, nursery)


async def test_a_scheduler_that_never_answers_costs_a_read_its_patience_not_its_deadline(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    directory, source, fetcher = await _hung(store, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    # Without a bound, the chunk waited for its map until its deadline: ReadDeadlineError.
    assert bytes(await fetcher.read(handle, 0, CS)) == DATA[:CS]
    assert directory.asked == 1
    assert bytes(await fetcher.read(handle, CS, len(DATA) - CS)) == DATA[CS:]
    assert directory.asked == 1  # not even its patience: it did not ask
    assert source.reads == 2  # chunk 0, then 1-5 in one request: no map, no claim
    # Counted for /metrics: the map request given up on, the claims and maps not asked.
    assert fetcher.stats["scheduler_abandoned"] == 1
    assert fetcher.stats["scheduler_skipped"] >= 2


async def test_background_chunks_wait_for_a_hung_scheduler_and_readers_ask_again_after_it(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    directory, source, fetcher = await _hung(store, nursery)
    done = prefetch_in_background(fetcher, source, nursery)
    await trio.sleep(1.0)
    # A prefetch does not read what another node may be reading: it waits for its claim.
    assert source.reads == 0 and not done.is_set()
    handle = fetcher.open(ENTRY, CS, source)
    assert bytes(await fetcher.read(handle, 0, CS)) == DATA[:CS]  # a reader does not wait
    directory.answer()
    with trio.fail_after(5):
        await done.wait()
    # Answered again: a reader's chunk asks for its map and claim as before.
    before = directory.asked
    other = ENTRY.model_copy(update={"object": "ef" * 32})
    assert bytes(await fetcher.read(fetcher.open(other, CS, source), CS, 10)) == DATA[CS : CS + 10]
    assert directory.asked > before
