"""Prefetch on open: an open of a cold file fetches it whole behind the foreground reads,
one transfer per chunk, and a close before the end stops it without the object counting
as present (no network: an in-memory source)."""

from __future__ import annotations

import threading

import pytest
import trio
from fakes import Directory, MemSource, Peers
from fetchfixtures import CS, DATA, ENTRY, prefetch_in_background, started

from syncbit.fetch import Fetcher, OpenFile, OpenPrefetch, onopen
from syncbit.fetch.flight import State
from syncbit.manifest import FileEntry
from syncbit.store import ObjectStore
from syncbit.wire import Abort

CHUNKS = 6  # DATA is 5 chunks and a bit


async def _settled(fetcher: Fetcher) -> None:
    """Until no flight is left in the fetcher's table."""
    with trio.fail_after(10):
        while len(fetcher._runner.table):
            await trio.sleep(0.01)


async def _gated_open(
    store: ObjectStore, nursery: trio.Nursery
) -> tuple[MemSource, Fetcher, OpenPrefetch, OpenFile]:
    """ENTRY opened with prefetch on open, its source reads held at the source's gate, one
    chunk per source read and one prefetch transfer at a time."""
    source = MemSource(data=DATA)
    source.gate = threading.Event()
    fetcher = Fetcher(store, Directory(), Peers(DATA), source_batch=CS, prefetch_concurrency=1)
    await started(fetcher, nursery)
    prefetch = OpenPrefetch(fetcher)
    prefetch.bind(nursery)
    handle = fetcher.open(ENTRY, CS, source)
    assert prefetch.opened(handle, CS, "on")
    return source, fetcher, prefetch, handle


def _open_gate(source: MemSource) -> None:
    assert source.gate is not None
    source.gate.set()


def test_the_setting_decides_by_dataset_then_node_and_size() -> None:
    prefetch = OpenPrefetch(None, enabled=True, min_size=100)  # type: ignore[arg-type]
    assert prefetch.wants(100, None) and prefetch.wants(100, "auto")
    assert not prefetch.wants(99, None)
    assert prefetch.wants(1, "on") and not prefetch.wants(10**9, "off")
    assert not prefetch.wants(0, "on")  # an empty file has nothing to fetch
    prefetch.enabled = False
    assert not prefetch.wants(10**9, None) and prefetch.wants(10**9, "on")


async def test_one_open_fetches_the_whole_file_once(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    fetcher = await started(Fetcher(store, Directory(), Peers(DATA)), nursery)
    prefetch = OpenPrefetch(fetcher, min_size=1)
    prefetch.bind(nursery)
    handle = fetcher.open(ENTRY, CS, source)
    assert prefetch.opened(handle, CS, None)
    assert prefetch.opened(fetcher.open(ENTRY, CS, source), CS, None)  # joins, no second
    assert prefetch.started == 1
    # A reader meanwhile: its reads and readahead share the prefetch's flights.
    out = bytearray()
    while len(out) < len(DATA):
        out += await fetcher.read(handle, len(out), 40_000)
    assert bytes(out) == DATA
    with trio.fail_after(10):
        while not handle.obj.complete:
            await trio.sleep(0.01)
    assert source.bytes == len(DATA)  # each byte once
    assert sorted(off for _, off in source.asked) == sorted(set(off for _, off in source.asked))
    # Complete: a later open starts nothing.
    prefetch.closed(handle)
    assert not prefetch.opened(fetcher.open(ENTRY, CS, source), CS, None)
    assert prefetch.started == 1


class _Entered(MemSource):
    """Records the offset of every read as it starts, before the gate holds it."""

    entered: list[int]

    def read_into(
        self, entry: FileEntry, offset: int, buf: memoryview, abort: Abort | None = None
    ) -> None:
        self.entered.append(offset)
        super().read_into(entry, offset, buf)


async def test_foreground_reads_go_before_the_whole_file_fetch(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = _Entered(data=DATA)
    source.entered = []
    source.gate = threading.Event()
    fetcher = Fetcher(
        store,
        Directory(),
        Peers(DATA),
        readahead_chunks=0,
        source_batch=CS,
        prefetch_concurrency=1,
    )
    await started(fetcher, nursery)
    prefetch = OpenPrefetch(fetcher)
    prefetch.bind(nursery)
    handle = fetcher.open(ENTRY, CS, source)
    assert prefetch.opened(handle, CS, "on")
    await trio.sleep(0.1)  # the first chunks run (held at the gate), the rest queue
    held = list(source.entered)
    assert 0 < len(held) < CHUNKS - 1 and 4 * CS not in held
    got: list[bytes] = []

    async def read_last() -> None:
        got.append(bytes(await fetcher.read(handle, 4 * CS, 100)))

    nursery.start_soon(read_last)
    with trio.fail_after(10):
        while len(source.entered) == len(held):
            await trio.sleep(0.01)
    # The read's chunk went out while the prefetch's transfers were still held, ahead
    # of the queued rest of the file.
    assert source.entered == [*held, 4 * CS]
    _open_gate(source)
    with trio.fail_after(10):
        while not handle.obj.complete:
            await trio.sleep(0.01)
    assert got == [DATA[4 * CS : 4 * CS + 100]]
    assert sorted(off for _, off in source.asked) == [i * CS for i in range(CHUNKS)]  # once


class _EnteredPaths(MemSource):
    """Records (path, offset) of every read as it starts, before the gate holds it."""

    entered: list[tuple[str, int]]

    def read_into(
        self, entry: FileEntry, offset: int, buf: memoryview, abort: Abort | None = None
    ) -> None:
        self.entered.append((entry.path, offset))
        super().read_into(entry, offset, buf)


async def test_an_open_file_is_fetched_before_the_datasets_queued_prefetch(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """A process waits on the file it opened; the dataset's prefetch of another file is
    for later: the open's whole-file fetch goes ahead of the prefetch's queued chunks."""
    other = ENTRY.model_copy(update={"path": "other.bin", "object": "ab" * 32})
    source = _EnteredPaths(data=DATA)
    source.entered = []
    source.gate = threading.Event()
    fetcher = Fetcher(
        store, Directory(), Peers(DATA), readahead_chunks=0, source_batch=CS, source_concurrency=1
    )
    await started(fetcher, nursery)
    warmed = prefetch_in_background(fetcher, source, nursery, other)  # the dataset's
    await trio.sleep(0.1)  # its first chunk is being read (at the gate), the rest queued
    held = len(source.entered)
    assert held and all(path == "other.bin" for path, _ in source.entered)
    # Still queued: not the read at the gate, nor those waiting for the source's stream.
    queued = {
        f.index * CS
        for f in fetcher._runner.table
        if f.obj.id == other.object and f.state is State.QUEUED
    }
    assert queued and len(queued) <= CHUNKS - held
    prefetch = OpenPrefetch(fetcher)
    prefetch.bind(nursery)
    handle = fetcher.open(ENTRY, CS, source)
    assert prefetch.opened(handle, CS, "on")
    await trio.sleep(0.1)
    _open_gate(source)
    with trio.fail_after(10):
        await warmed.wait()
        while not handle.obj.complete:
            await trio.sleep(0.01)
    # Every chunk of both once; the open's file before what the prefetch still had queued.
    assert sorted(source.entered) == sorted(
        [(p, i * CS) for p in ("f.bin", "other.bin") for i in range(CHUNKS)]
    )
    last_opened = max(n for n, (path, _) in enumerate(source.entered) if path == "f.bin")
    assert all(
        n > last_opened
        for n, read in enumerate(source.entered)
        if read[0] == "other.bin" and read[1] in queued
    ), source.entered


async def test_the_whole_file_fetch_keeps_pace_with_readers_in_ram(
    store: ObjectStore, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open's fetch runs no further ahead of its readers than the RAM kept for them
    (here two chunks): a loader reading along takes every chunk from RAM, none from the
    disk it would otherwise be written to first."""
    monkeypatch.setattr(onopen, "PIECE_CHUNKS", 1)
    monkeypatch.setattr(onopen, "IDLE", 30.0)
    store._staging.wanted_bytes = 2 * CS
    source = MemSource(data=DATA)
    fetcher = await started(
        Fetcher(store, Directory(), Peers(DATA), readahead_chunks=0, source_batch=CS), nursery
    )
    prefetch = OpenPrefetch(fetcher)
    prefetch.bind(nursery)
    handle = fetcher.open(ENTRY, CS, source)
    fetcher.hold(handle)  # open through the mount: its chunks are kept for its readers
    assert prefetch.opened(handle, CS, "on")
    await trio.sleep(0.3)
    assert source.reads == 2  # the RAM's worth, then it waits for the reader
    for index in range(CHUNKS):
        offset = index * CS
        got = await fetcher.read(handle, offset, min(CS, len(DATA) - offset))
        assert bytes(got) == DATA[offset : offset + CS]
        await trio.sleep(0.1)  # the fetch moves on as the reader takes chunks
        assert source.reads <= min(CHUNKS, index + 3)
    taken = fetcher.readers_ram().taken
    assert taken == CHUNKS  # every chunk read from RAM
    with trio.fail_after(10):
        while not handle.obj.complete:
            await trio.sleep(0.01)
    assert sorted(off for _, off in source.asked) == [i * CS for i in range(CHUNKS)]  # once


async def test_with_nobody_reading_the_file_still_arrives_whole(
    store: ObjectStore, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onopen, "PIECE_CHUNKS", 1)
    monkeypatch.setattr(onopen, "IDLE", 0.2)
    store._staging.wanted_bytes = 2 * CS
    source = MemSource(data=DATA)
    fetcher = await started(Fetcher(store, Directory(), Peers(DATA), source_batch=CS), nursery)
    prefetch = OpenPrefetch(fetcher)
    prefetch.bind(nursery)
    handle = fetcher.open(ENTRY, CS, source)
    fetcher.hold(handle)
    assert prefetch.opened(handle, CS, "on")  # held open, never read
    with trio.fail_after(10):
        while not handle.obj.complete:
            await trio.sleep(0.01)
    assert source.reads == CHUNKS


async def test_closing_before_the_end_stops_the_fetch_and_nothing_counts_as_present(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, fetcher, prefetch, handle = await _gated_open(store, nursery)
    await trio.sleep(0.1)  # chunk 0 is being read (at the gate); the rest queued
    prefetch.closed(handle)
    _open_gate(source)
    await _settled(fetcher)
    await trio.sleep(0.2)
    obj = handle.obj
    assert source.reads <= 1  # the one read under way when it closed, nothing after
    assert not obj.complete
    assert all(not obj.has(i) for i in range(1, CHUNKS))
    # Not complete: no passthrough for the next open; its reads fetch the rest correctly.
    again = fetcher.open(ENTRY, CS, source)
    assert await again.backing_fd() is None
    assert bytes(await fetcher.read(again, 0, len(DATA))) == DATA


async def test_closing_leaves_the_transfers_a_job_needs(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, fetcher, prefetch, handle = await _gated_open(store, nursery)
    prefetch.wanted = lambda object_id: object_id == ENTRY.object
    await trio.sleep(0.1)
    prefetch.closed(handle)
    before = len(fetcher._runner.table)
    assert before == CHUNKS  # still queued: a pull or prefetch job of the dataset wants them
    _open_gate(source)
    with trio.fail_after(10):
        while not handle.obj.complete:
            await trio.sleep(0.01)
