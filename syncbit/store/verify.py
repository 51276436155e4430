"""Re-verification: stored chunks re-read against their digests, on request and after an
unclean shutdown; a bad one is dropped (missing again, reported as removed). Trio thread,
reads in worker threads; never repairs a chunk itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import lmdb
import trio

from syncbit.chunks import chunk_length, digest
from syncbit.store.events import ChangeFeed, Signal
from syncbit.store.index import Index
from syncbit.store.objects import ObjectTable, Reading, StoredObject
from syncbit.store.staging import Staging

log = logging.getLogger("syncbit.store")


class ChunkCheck(Enum):
    """What re-reading one stored chunk found."""

    GOOD = "good"  # its bytes match its digest
    DROPPED = "dropped"  # they did not: dropped from the index and from memory
    GONE = "gone"  # no longer held (evicted or discarded meanwhile)


@dataclass
class VerifyRun:
    """One pass of `ObjectStore.verify`: what it covers and what it found so far."""

    reason: str  # why it runs, for logs and `cache verify`
    only_unverified: bool  # only chunks not re-verified since an unclean shutdown
    started: float = field(default_factory=time.time)
    finished: float | None = None
    total: int = 0  # chunks to check (known once the pass starts)
    checked: int = 0
    checked_bytes: int = 0
    objects: int = 0
    dropped: list[tuple[str, int]] = field(default_factory=list)  # (object id, chunk)
    done: trio.Event = field(default_factory=trio.Event)


class Verifier:
    """Chunk checks, one at a time per chunk, and the counters of what they found. `lock`
    is the committer's: a drop never runs between a commit's batch and its txn."""

    def __init__(
        self,
        table: ObjectTable,
        staging: Staging,
        index: Index,
        lock: trio.Lock,
        feed: ChangeFeed,
        changed: Signal,
    ) -> None:
        self._table = table
        self._staging = staging
        self._index = index
        self._lock = lock
        self._feed = feed
        self._changed = changed
        self._checking: dict[tuple[StoredObject, int], trio.Event] = {}
        self.verified_chunks = 0
        self.dropped_chunks = 0

    async def verify_chunks(self, obj: StoredObject, indexes: Iterable[int]) -> None:
        """Re-verify those of `indexes` still unverified since an unclean shutdown, now (a
        read waits for this before it uses them); a bad one is dropped."""
        for index in indexes:
            if index in obj.unverified:
                await self.check_chunk(obj, index, direct=False)

    async def verify(self, run: VerifyRun) -> None:
        """Re-read every durable chunk (or, with `run.only_unverified`, those not yet
        re-verified since an unclean shutdown), most recently used objects first, and
        drop the ones whose bytes do not match their digest. One chunk at a time in a
        worker thread: reads and writes go on meanwhile. Progress and findings in `run`;
        `run.done` is set at the end (also if cancelled)."""
        try:
            objs = sorted(self._table, key=lambda o: o.last_used, reverse=True)
            work = [
                (obj, sorted(obj.unverified if run.only_unverified else obj.durable))
                for obj in objs
            ]
            work = [(obj, indexes) for obj, indexes in work if indexes]
            run.total = sum(len(indexes) for _, indexes in work)
            for obj, indexes in work:
                run.objects += 1
                for index in indexes:
                    if run.only_unverified and index not in obj.unverified:
                        continue  # a read checked it first
                    found = await self.check_chunk(obj, index, direct=True)
                    if found is ChunkCheck.GONE:
                        continue
                    run.checked += 1
                    run.checked_bytes += chunk_length(obj.size, obj.chunk_size, index)
                    if found is ChunkCheck.DROPPED:
                        run.dropped.append((obj.id, index))
        finally:
            run.finished = time.time()
            run.done.set()

    async def check_chunk(self, obj: StoredObject, index: int, direct: bool) -> ChunkCheck:
        """Re-read one durable chunk and compare it with its digest; drop it if it does
        not match. `direct`: read the disk with O_DIRECT where the filesystem allows (a
        sweep: no page-cache pollution, the bytes the disk holds), else through the page
        cache (a reader about to read the same bytes)."""
        key = (obj, index)
        while (other := self._checking.get(key)) is not None:
            await other.wait()  # one check per chunk at a time
        expected = obj.digests.get(index)
        if index not in obj.durable or expected is None:
            return ChunkCheck.GONE
        done = self._checking[key] = trio.Event()
        try:
            with Reading(self._table.use_lock, obj):  # not removed under the read
                good = await trio.to_thread.run_sync(_matches, obj, index, expected, direct)
        finally:
            del self._checking[key]
            done.set()
        if index not in obj.durable or obj.digests.get(index) != expected:
            return ChunkCheck.GONE  # evicted or discarded meanwhile
        if good:
            self._table.verified(obj, index)
            self.verified_chunks += 1
            return ChunkCheck.GOOD
        await self._drop(obj, index)
        return ChunkCheck.DROPPED

    async def _drop(self, obj: StoredObject, index: int) -> None:
        """A durable chunk whose bytes on disk do not match its digest: out of memory at
        once, out of the index in a worker thread; reported as removed."""
        async with self._lock:
            if index not in obj.durable:
                return
            self._table.forget(obj, index)
            self._staging.unstage(obj, index)  # a RAM copy kept after the write
            self.dropped_chunks += 1
            log.error(
                "chunk %d of object %s does not match its digest on disk: dropped (fetched "
                "again when needed)",
                index,
                obj.id[:12],
            )
            try:
                await trio.to_thread.run_sync(self._index.delete_chunk, obj.id, index)
            except (OSError, lmdb.Error) as exc:
                log.error("cannot remove the bad chunk from the cache index: %s", exc)
                self._index.unclean = True  # the next start re-verifies it
        self._feed.removed(obj, [index])
        self._changed.fire()


def _matches(obj: StoredObject, index: int, expected: str, direct: bool) -> bool:
    """Blocking: whether the object file holds the chunk's bytes (a read error or a short
    file is a mismatch)."""
    length = chunk_length(obj.size, obj.chunk_size, index)
    offset = index * obj.chunk_size
    try:
        read = obj.file.read_from_disk if direct else obj.file.pread
        data = read(offset, length)
    except OSError as exc:
        log.error("cannot re-read chunk %d of object %s: %s", index, obj.id[:12], exc)
        return False
    return len(data) == length and digest(data) == expected
