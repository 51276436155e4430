"""Chunks in RAM (`syncbit.store.staging`): pinned while written, kept for a reader until
it reads them (within a budget), then a small LRU."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncbit.chunks import digest
from syncbit.store import ObjectStore
from syncbit.store.objects import StoredObject
from syncbit.store.staging import Staging

CS = 4096


def _chunk(index: int) -> memoryview:
    return memoryview(bytes([index % 256]) * CS)


class Ram:
    """A Staging and what it gave back."""

    def __init__(self, keep: int, wanted_bytes: int) -> None:
        self.staging = Staging(keep, wanted_bytes)
        self.released: list[int] = []

    def stage(self, obj: StoredObject, index: int, wanted: bool) -> None:
        data = _chunk(index)
        self.staging.stage(obj, index, data, lambda: self.released.append(index), "d", wanted)
        self.staging.written(obj, index)

    def kept(self, obj: StoredObject) -> list[int]:
        return sorted(self.staging.indexes(obj))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    s = ObjectStore.open(tmp_path / "cache", 1 << 30, staged_chunks=1)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def obj(store: ObjectStore) -> StoredObject:
    return store.object("ab" * 32, 64 * CS, CS)


def test_chunks_for_a_reader_stay_until_read_then_join_the_lru(obj: StoredObject) -> None:
    ram = Ram(keep=2, wanted_bytes=8 * CS)
    for index in range(6):
        ram.stage(obj, index, wanted=True)
    assert ram.kept(obj) == [0, 1, 2, 3, 4, 5] and ram.released == []
    assert ram.staging.wanted == 6 * CS
    for index in range(4):  # the reader reaches them: now the LRU's, two kept
        assert bytes(ram.staging.view(obj, index) or b"") == bytes(_chunk(index))
    ram.stage(obj, 6, wanted=False)  # a prefetch's chunk: LRU only
    assert ram.kept(obj) == [3, 4, 5, 6] and sorted(ram.released) == [0, 1, 2]
    assert ram.staging.wanted == 2 * CS


@pytest.mark.parametrize(
    ("wanted", "budget", "kept"),
    [
        (False, 8, [4, 5]),  # nobody reads them: the LRU keeps two
        (True, 3, [0, 1, 2, 5]),  # the first three for the reader (it needs them first)
    ],
)
def test_the_lru_keeps_the_rest(
    obj: StoredObject, wanted: bool, budget: int, kept: list[int]
) -> None:
    ram = Ram(keep=2 if not wanted else 1, wanted_bytes=budget * CS)
    for index in range(6):
        ram.stage(obj, index, wanted=wanted)
    assert ram.kept(obj) == kept
    assert sorted(ram.released) == sorted(set(range(6)) - set(kept))
    assert ram.staging.wanted == (min(budget, 6) * CS if wanted else 0)


def test_unwant_and_removal_give_the_budget_back(store: ObjectStore, obj: StoredObject) -> None:
    other = store.object("cd" * 32, 64 * CS, CS)
    ram = Ram(keep=1, wanted_bytes=8 * CS)
    for index in range(3):
        ram.stage(obj, index, wanted=True)
        ram.stage(other, index, wanted=True)
    ram.staging.unwant(obj)  # its file was closed: the LRU's (one kept), oldest first
    assert ram.kept(obj) == [2] and ram.kept(other) == [0, 1, 2]
    assert ram.staging.wanted == 3 * CS
    ram.staging.unstage(other, 0)
    ram.staging.drop(other)
    assert ram.staging.wanted == 0 and ram.kept(other) == []
    assert sorted(ram.released) == [0, 0, 1, 1, 2]


def test_an_open_file_keeps_its_chunks_until_closed(store: ObjectStore, obj: StoredObject) -> None:
    # The whole-file fetch an open starts runs at prefetch priority: its chunks are for
    # the reader all the same, until the file is closed everywhere (the store keeps 1).
    first, second = store.hold(obj), store.hold(obj)
    released: list[int] = []
    for index in range(4):
        data = _chunk(index)
        store.stage(obj, index, data, functools.partial(released.append, index), digest(data))
        store.write_chunk(obj, index, data)
        store.mark_written(obj, index, digest(data))  # no longer pinned for its write
    assert released == [] and obj.has(3) and store.readers_ram().kept == 4 * CS
    first.release()
    assert released == []  # still open once
    second.release()
    assert sorted(released) == [0, 1, 2] and store.readers_ram().kept == 0


def test_a_pinned_chunk_is_given_back_only_after_its_reader_is_done(obj: StoredObject) -> None:
    # The whole-file hash reads staged chunks in a worker thread: a chunk that leaves RAM
    # meanwhile (trimmed, dropped) keeps its buffer until unpinned, or the pool would hand
    # the bytes under the hash to the next chunk.
    ram = Ram(keep=1, wanted_bytes=0)
    ram.stage(obj, 0, wanted=False)
    chunk = ram.staging.pin(obj, 0)
    assert chunk is not None and bytes(chunk.view) == bytes(_chunk(0))
    ram.stage(obj, 1, wanted=False)  # the LRU keeps one: chunk 0 leaves RAM...
    assert ram.kept(obj) == [1] and ram.released == []  # ...but its buffer stays
    ram.staging.unpin(chunk)
    assert ram.released == [0]
    again = ram.staging.pin(obj, 1)
    assert again is not None
    ram.staging.drop(obj)
    assert ram.released == [0]
    ram.staging.unpin(again)
    assert ram.released == [0, 1]
    assert ram.staging.pin(obj, 1) is None  # gone from RAM: the file has it


def test_chunk_buffers_are_private_page_aligned_and_reused() -> None:
    """Chunk buffers are private anonymous memory (a shared mapping is shmem, slower to
    fault in), page-aligned for O_DIRECT, and a freed one is taken again before a new one
    is made."""
    import ctypes
    import mmap
    import os

    from syncbit.store.staging import BufferPool

    pool = BufferPool()
    buf = pool.take(3 * CS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert address % mmap.PAGESIZE == 0 and len(buf) == 3 * CS
    buf[:5] = b"mine!"
    child = os.fork()
    if child == 0:  # a private mapping: the child's write is its own copy
        buf[:5] = b"child"
        os._exit(0)
    os.waitpid(child, 0)
    assert buf[:5] == b"mine!"
    pool.give(buf)
    assert pool.take(2 * CS) is buf  # the free one that fits, not a new one
