"""Object store: "in use" by construction (reading sections, keeps, holds, writes) for
eviction and discard alike, the change feed the reporter consumes, the passthrough
capability, and the trio thread never opening, truncating or deleting a file itself."""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from storefixtures import content, fill, oid, opened

from syncbit.chunks import digest
from syncbit.errors import CacheFullError
from syncbit.store import ObjectStore, StoredObject

CS = 4096
OBJ = 2 * CS


_oid = oid


def _bytes(n: int) -> bytes:
    return content(n, OBJ)


async def _fill(store: ObjectStore, n: int, flush: bool = True) -> StoredObject:
    return await fill(store, n, OBJ, CS, flush)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    with opened(tmp_path, 3 * OBJ) as s:
        yield s


# -- discard honours reads in progress, like eviction -------------------------------------


async def test_a_discard_waits_for_reads_in_progress_before_it_frees_the_file(
    store: ObjectStore,
) -> None:
    a = await _fill(store, 1)
    entered, go_on = threading.Event(), threading.Event()
    got: list[bytes] = []

    def peer_read() -> None:  # the peer service: presence checked, then sendfile/pread
        with store.reading(a) as reader:
            assert a.has_range(0, OBJ)
            entered.set()
            go_on.wait(10)
            got.append(reader.pread(0, OBJ))

    thread = threading.Thread(target=peer_read)
    thread.start()
    try:
        await trio.to_thread.run_sync(entered.wait, 10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.discard, a)
            await trio.sleep(0.1)
            # Gone for everyone who looks now, but the reader inside keeps its bytes.
            assert not a.has(0) and not a.has_range(0, OBJ) and a.discards == 1
            go_on.set()
    finally:
        go_on.set()
        thread.join()
    assert got == [_bytes(1)]  # not zeros: the file was freed only after the read
    assert store.used_bytes() == 0 and store.cached_bytes() == 0
    assert (a, [0, 1]) in store.changes.take().removed


async def test_eviction_skips_an_object_being_read_and_a_discard_does_not(
    store: ObjectStore,
) -> None:
    a = await _fill(store, 1)
    with store.reading(a):
        assert (await store.evict([a.id])).skipped == [a.id]
    assert a.complete
    with store.keeping(a):  # a read waiting for chunks: not evicted either
        assert (await store.evict([a.id])).skipped == [a.id]
        await store.discard(a)  # failed verification: taken all the same
    assert not a.written and not a.path.stat().st_blocks


async def test_a_chunk_staged_before_a_discard_is_never_written(store: ObjectStore) -> None:
    obj = store.object(_oid(1), OBJ, CS)
    data = _bytes(1)
    released: list[int] = []
    views = [memoryview(data[i * CS : (i + 1) * CS]) for i in range(2)]
    for i, view in enumerate(views):
        store.stage(obj, i, view, functools.partial(released.append, i), digest(view))
    assert obj.has(0) and store.pending_writes() == 2
    await store.discard(obj)  # both writes still pending (the fetcher's write slots)
    assert not obj.has(0) and not obj.has(1)
    assert released == []  # their buffers stay with the pending writes
    for i, view in enumerate(views):
        await store.store_chunk(obj, i, view, digest(view))
    assert not obj.written and sorted(released) == [0, 1]  # dropped, buffers back once
    await store.flush()
    assert not obj.durable and store.pending_writes() == 0 and store.used_bytes() == 0


async def test_a_chunk_staged_again_is_written_with_its_latest_bytes(
    store: ObjectStore,
) -> None:
    obj = store.object(_oid(1), OBJ, CS)
    data = _bytes(1)
    first, second = memoryview(bytearray(data[:CS])), memoryview(bytearray(data[:CS]))
    store.stage(obj, 0, first, lambda: None, digest(first))
    store.stage(obj, 0, second, lambda: None, digest(second))
    await store.store_chunk(obj, 0, first, digest(first))  # superseded: skipped
    assert not obj.written and obj.has(0)
    await store.store_chunk(obj, 0, second, digest(second))
    assert obj.written == {0} and store.read(obj, 0, CS) == data[:CS]


# -- holds (files open through the mount) -------------------------------------------------


async def test_an_object_open_through_the_mount_is_evicted_last(store: ObjectStore) -> None:
    a, b, c = [await _fill(store, n) for n in (1, 2, 3)]
    a.last_used, b.last_used, c.last_used = 100.0, 200.0, 300.0
    hold = store.hold(a)  # the oldest, but open
    assert a.opened == 1
    await _fill(store, 4)
    assert a.complete and not b.written
    hold.release()
    hold.release()  # once only
    assert a.opened == 0
    await _fill(store, 5)
    assert not a.written  # the oldest and closed: next


async def test_everything_held_or_pinned_is_a_clear_cache_full(store: ObjectStore) -> None:
    a, b, c = [await _fill(store, n) for n in (1, 2, 3)]
    store.set_pins({a.id, b.id})
    with (
        store.keeping(c),
        pytest.raises(CacheFullError, match=r"16\.0 KiB pinned.*8\.0 KiB in use"),
    ):
        await _fill(store, 4)


# -- the change feed -------------------------------------------------------------------------


async def test_the_change_feed_hands_each_change_to_its_consumer_once(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    got: list[Any] = []

    async def consumer() -> None:
        got.append(await store.changes.next())

    nursery.start_soon(consumer)
    await trio.sleep(0.01)
    assert not got  # nothing changed yet: it waits
    a = await _fill(store, 1)
    await trio.sleep(0.01)
    assert [(o, i) for o, i, _ in got[0].durable] == [(a, 0), (a, 1)]
    assert got[0].durable[0][2] == a.digests[0]
    assert not store.changes.take()  # taken: gone from the feed
    await store.evict([a.id])
    changes = store.changes.take()
    assert changes.removed == [(a, [0, 1])] and not changes.durable


# -- passthrough ------------------------------------------------------------------------------


async def test_the_backing_file_is_offered_only_when_whole_and_verified(
    store: ObjectStore,
) -> None:
    a = await _fill(store, 1, flush=False)
    backing = store.backing(a)
    fd = await backing.fd()
    assert fd is not None
    assert os.pread(fd, OBJ, 0) == _bytes(1)
    assert await store.backing(store.object(_oid(2), OBJ, CS)).fd() is None  # nothing yet
    await store.discard(a)
    assert await backing.fd() is None


# -- the trio thread never blocks on a file ----------------------------------------------

_BLOCKING = {"open", "os.remove", "os.rename", "os.truncate", "os.mkdir"}
_calls: list[tuple[str, int, str]] | None = None  # recording, while a test wants it


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _calls is not None and event in _BLOCKING:
        _calls.append((event, threading.get_ident(), str(args[0]) if args else ""))


sys.addaudithook(_audit)  # hooks cannot be removed: idle unless `_calls` is set


async def test_the_trio_thread_never_opens_truncates_or_deletes_a_file(tmp_path: Path) -> None:
    global _calls
    store = ObjectStore.open(tmp_path, 3 * OBJ)
    try:
        for n in (1, 2, 3):
            await _fill(store, n)
    finally:
        store.close()
    store = ObjectStore.open(tmp_path, 3 * OBJ)  # files not open yet in this run
    trio_thread = threading.get_ident()
    _calls = []
    try:
        a, b, c = (store.get(_oid(n)) for n in (1, 2, 3))
        assert a is not None and b is not None and c is not None
        with store.reading(a) as reader:
            parts = reader.parts(0, OBJ)  # not open: the caller preads in a thread
            assert parts == [range(0, OBJ)]
            got = await trio.to_thread.run_sync(reader.pread, 0, OBJ)
        assert got == _bytes(1)
        assert await store.backing(b).fd() is not None
        assert await store.sha256(c)
        await _fill(store, 4)  # a new file, and an eviction to make room
        await store.discard(b)
        await store.evict([c.id])
        assert await store.gc(referenced=set()) > 0
        calls = list(_calls)
    finally:
        _calls = None
        store.close()
    assert not [c for c in calls if c[1] == trio_thread], "blocking calls on the trio thread"
    events = {event for event, _, _ in calls}
    assert {"open", "os.rename", "os.remove", "os.truncate"} <= events  # seen, elsewhere
