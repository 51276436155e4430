"""Chunks in RAM: verified bytes readable at once while their write is pending, chunks
fetched for a reader that it has not read yet, a small LRU of recent ones after them,
and the pool of page-aligned buffers they live in. Trio thread only; never writes a file,
never decides presence on disk.

A reader's readahead (and the whole-file fetch its open started) fetches ahead of it.
Such chunks stay in RAM until the reader reaches them, within `WANTED_BYTES` for all
readers together: let go after their write (the LRU keeps `keep` chunks), they would be
read back from the disk they were just written to with O_DIRECT. That read-back held a
cold 1 GiB read through the mount at 0.70x of aria2c (bench/origin.py: ~0.9 GiB read back
from disk, 3.1 CPU-s); kept, 0.9-1.0x and 2.1-2.5 CPU-s. A chunk is kept until its first
read, or until its file is closed everywhere; beyond the budget, newly staged chunks
join the LRU instead (the ones staged first are the ones a sequential reader needs first).
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import trio

from syncbit.store.files import page_buffer

if TYPE_CHECKING:
    from syncbit.store.objects import StoredObject

# RAM for chunks fetched ahead of readers and not read yet, all readers together.
WANTED_BYTES = 256 << 20


class ReadersRam(NamedTuple):
    """The RAM kept for readers at one moment (`ObjectStore.readers_ram`)."""

    kept: int  # bytes of chunks kept for readers that have not read them yet
    budget: int  # the most such bytes kept (`WANTED_BYTES`)
    taken: int  # such chunks read so far: grows while readers read from RAM
    freed: trio.Event  # set when a chunk next leaves the kept bytes (read, or let go)


@dataclass(eq=False, slots=True)
class StagedChunk:
    view: memoryview
    release: Callable[[], None]  # gives the buffer back once the chunk leaves RAM
    digest: str
    writing: bool = True  # its write has not finished: pinned in RAM
    stale: bool = False  # its object was discarded: unreadable, and never written
    wanted: bool = False  # kept for a reader that has not read it yet (see the module)
    pins: int = 0  # worker threads reading the buffer now (`pin`): not given back meanwhile
    gone: bool = False  # left RAM while pinned: the last `unpin` gives the buffer back


class Staging:
    """Every staged chunk, oldest first: the one record of what is in RAM, which chunks
    are pinned for their write, which are kept for a reader (`wanted_bytes` of them at
    most), and the LRU order of the rest (at most `keep` of them)."""

    def __init__(self, keep: int, wanted_bytes: int = WANTED_BYTES) -> None:
        self.keep = keep
        self.wanted_bytes = wanted_bytes
        self._chunks: OrderedDict[tuple[StoredObject, int], StagedChunk] = OrderedDict()
        self._wanted = 0  # chunks kept for a reader
        self._wanted_size = 0  # their bytes
        self.taken = 0  # such chunks read so far (grows while readers read from RAM)
        # Set, and replaced, whenever a chunk leaves the RAM kept for readers.
        self.freed = trio.Event()

    @property
    def wanted(self) -> int:
        """Bytes of the chunks kept for a reader that has not read them yet."""
        return self._wanted_size

    def stage(
        self,
        obj: StoredObject,
        index: int,
        view: memoryview,
        release: Callable[[], None],
        digest: str,
        wanted: bool = False,
    ) -> None:
        """Make verified bytes readable now, pinned until `written`; `wanted`: for a
        reader, kept until it reads them if the budget has room. A chunk staged again
        keeps the old buffer unreleased: its pending write may still read it."""
        key = (obj, index)
        chunks = self._chunks
        old = chunks.pop(key, None)  # to the end: the newest
        if old is not None:
            self._unwant(old)
        chunk = chunks[key] = StagedChunk(view, release, digest)
        if wanted and self._wanted_size + len(view) <= self.wanted_bytes:
            chunk.wanted = True
            self._wanted += 1
            self._wanted_size += len(view)
        if len(chunks) - self._wanted > self.keep:
            self._trim()

    def view(self, obj: StoredObject, index: int) -> memoryview | None:
        """The chunk's RAM bytes if staged (and marks it recently used, and read)."""
        key = (obj, index)
        chunk = self._chunks.get(key)
        if chunk is None or chunk.stale:
            return None
        if chunk.wanted:
            self.taken += 1
        self._unwant(chunk)
        self._chunks.move_to_end(key)
        return chunk.view

    def holds(self, obj: StoredObject, index: int) -> bool:
        chunk = self._chunks.get((obj, index))
        return chunk is not None and not chunk.stale

    def current(self, obj: StoredObject, index: int, view: memoryview) -> bool:
        """Whether these bytes of the chunk may be written: it is not staged (a caller
        with bytes of its own), or staged with this very buffer and not stale."""
        chunk = self._chunks.get((obj, index))
        return chunk is None or (chunk.view is view and not chunk.stale)

    def written(self, obj: StoredObject, index: int) -> None:
        """The chunk's write finished: no longer pinned, kept while the LRU has room."""
        chunk = self._chunks.get((obj, index))
        if chunk is not None:
            chunk.writing = False
            if len(self._chunks) - self._wanted > self.keep:
                self._trim()

    def unstage(self, obj: StoredObject, index: int, view: memoryview | None = None) -> None:
        """The chunk leaves RAM (with `view`: only if staged with this very buffer)."""
        key = (obj, index)
        chunk = self._chunks.get(key)
        if chunk is None or (view is not None and chunk.view is not view):
            return
        del self._chunks[key]
        self._unwant(chunk)
        self._free(chunk)

    def pin(self, obj: StoredObject, index: int) -> StagedChunk | None:
        """The staged chunk, its buffer kept for a worker thread to read until `unpin`
        (it may leave RAM meanwhile; the buffer is given back after), or None."""
        chunk = self._chunks.get((obj, index))
        if chunk is None or chunk.stale:
            return None
        chunk.pins += 1
        return chunk

    def unpin(self, chunk: StagedChunk) -> None:
        chunk.pins -= 1
        if chunk.pins == 0 and chunk.gone:
            chunk.release()

    def _free(self, chunk: StagedChunk) -> None:
        if chunk.pins:
            chunk.gone = True  # a worker thread reads it: the last unpin gives it back
        else:
            chunk.release()

    def unwant(self, obj: StoredObject) -> None:
        """No reader has the object's file open any more: its chunks kept for one join
        the LRU (oldest first, as they came)."""
        for (o, _), chunk in list(self._chunks.items()):
            if o is obj:
                self._unwant(chunk)
        if len(self._chunks) - self._wanted > self.keep:
            self._trim()

    def _unwant(self, chunk: StagedChunk) -> None:
        if chunk.wanted:
            chunk.wanted = False
            self._wanted -= 1
            self._wanted_size -= len(chunk.view)
            self.freed.set()
            self.freed = trio.Event()

    def drop(self, obj: StoredObject) -> None:
        """The object's content goes (evicted or discarded): its chunks leave RAM, except
        those whose write is pending, which turn stale (unreadable) until the write path
        drops them: their buffers are still in use until then."""
        for (o, index), chunk in list(self._chunks.items()):
            if o is not obj:
                continue
            if chunk.writing:
                chunk.stale = True
                self._unwant(chunk)
            else:
                self.unstage(obj, index)

    def pending(self) -> list[tuple[StoredObject, int, StagedChunk]]:
        """Chunks still to be written (not stale), oldest first."""
        return [(o, i, c) for (o, i), c in self._chunks.items() if c.writing and not c.stale]

    def writing(self, obj: StoredObject) -> bool:
        return any(o is obj and c.writing for (o, _), c in self._chunks.items())

    def writing_objects(self) -> set[StoredObject]:
        return {o for (o, _), c in self._chunks.items() if c.writing}

    def indexes(self, obj: StoredObject) -> list[int]:
        return [i for (o, i), c in self._chunks.items() if o is obj and not c.stale]

    def _trim(self) -> None:
        """Release the oldest chunks neither pinned for their write nor kept for a reader,
        down to `keep` besides those kept."""
        excess = len(self._chunks) - self._wanted - self.keep
        victims: list[tuple[tuple[StoredObject, int], StagedChunk]] = []
        for key, chunk in self._chunks.items():
            if len(victims) >= excess:
                break
            if not chunk.writing and not chunk.wanted:
                victims.append((key, chunk))
        for key, chunk in victims:
            del self._chunks[key]
            self._free(chunk)


class BufferPool:
    """Page-aligned chunk buffers (O_DIRECT needs alignment), reused when free: the
    smallest free one that fits, so a chunk does not take a batch-sized buffer. Trio
    thread only."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []

    def take(self, size: int) -> mmap.mmap:
        fits = [b for b in self._free if len(b) >= size]
        if fits:
            buf = min(fits, key=len)
            self._free.remove(buf)
            return buf
        return page_buffer(size)

    def give(self, buf: mmap.mmap) -> None:
        self._free.append(buf)
