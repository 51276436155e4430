"""`ObjectStore`, the one entry to the node's store: composes the pieces of this package;
its context managers are the only way to be "in use". Owns no state but the pieces; never
blocks the trio thread (each method says which context may call it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lmdb
import trio

from syncbit.diskspace import size_text
from syncbit.store.budget import Pins
from syncbit.store.commit import Committer
from syncbit.store.disk import DiskWatch
from syncbit.store.events import ChangeFeed, Signal
from syncbit.store.evict import Evictor, EvictResult
from syncbit.store.files import CacheDir, PWrite, pwrite_all
from syncbit.store.index import Index
from syncbit.store.load import load
from syncbit.store.objects import Hold, Keeping, ObjectTable, StoredObject
from syncbit.store.read import BackingFile, Hasher, ObjectReader, ReadBuffer
from syncbit.store.staging import BufferPool, ReadersRam, StagedChunk, Staging
from syncbit.store.verify import ChunkCheck, Verifier, VerifyRun
from syncbit.store.write import Writer

log = logging.getLogger("syncbit.store")


class ObjectStore:
    """The cache directory: objects, index, lock. Build with `ObjectStore.open()`."""

    def __init__(
        self, cache: CacheDir, index: Index, size: int, staged_chunks: int, pwrite: PWrite
    ) -> None:
        self.cache_dir = cache.root
        self._cache = cache
        self._index = index
        self._staging = Staging(staged_chunks)
        self.buffers = BufferPool()  # chunk buffers for the fetch layer
        self._table = ObjectTable(self._staging)
        self.changes = ChangeFeed()  # durable and removed chunks, for the reporter
        self.presence = self._table.presence  # objects whose chunks changed, for status
        self._changed = Signal()
        self.disk = DiskWatch(cache.root)
        self._committer = Committer(self._table, index, self.changes, self.disk, self._changed)
        self._evictor = Evictor(
            self._table,
            self._staging,
            index,
            cache,
            self._committer,
            self.changes,
            self._changed,
            size,
        )
        self._verifier = Verifier(
            self._table, self._staging, index, self._committer.lock, self.changes, self._changed
        )
        self._writer = Writer(
            self._table,
            self._staging,
            cache,
            self._evictor,
            self._committer,
            self.disk,
            self._changed,
            pwrite,
        )
        self._read_buffer = ReadBuffer()
        self._use_lock = self._table.use_lock
        self.clean_start = True  # the last run left the clean-shutdown marker

    # -- lifecycle (blocking: before the trio loop runs, or in a worker thread) --------------

    @classmethod
    def open(
        cls,
        cache_dir: Path,
        cache_size: int,
        staged_chunks: int = 32,
        pwrite: PWrite = pwrite_all,
    ) -> ObjectStore:
        """Lock `cache_dir` (CacheLockedError if another daemon has it) and load the index.
        Works on a 100% full filesystem once the cache dir exists; a new one that cannot
        be created for lack of space raises DiskFullError. `pwrite(fd, data, offset)`
        writes a chunk's bytes (injectable: tests make it fail like a full disk)."""
        cache = CacheDir.lock(cache_dir)
        try:
            clean = cache.clean_marker()
            index = Index.open(cache_dir / "index.lmdb")
        except BaseException:
            cache.release()
            raise
        store = cls(cache, index, cache_size, staged_chunks, pwrite)
        store.clean_start = clean
        try:
            load(store._table, cache, index, store.changes, clean, cache_size)
            if clean:
                cache.take_clean_marker()
        except BaseException:
            index.unclean = True  # never leave a marker for a run that did not run
            store.close()
            raise
        store._warn_if_disk_small()
        return store

    def _warn_if_disk_small(self) -> None:
        room = self._table.held + self._cache.free_bytes()
        if self._evictor.size > room:
            log.warning(
                "cache size %s exceeds what %s can hold (%s): a full disk will evict early",
                size_text(self._evictor.size),
                self.cache_dir,
                size_text(room),
            )

    def close(self) -> None:
        """Blocking: close files and the index, release the lock. Pending (non-durable)
        chunks are dropped: never marked present, nothing is lost but the transfer. One
        short txn for `last_used` of objects read since the last commit."""
        records = self._table.take_touched()
        try:
            if records:
                self._index.put_records(records)
        except (OSError, lmdb.Error) as exc:
            log.warning("could not record when cached objects were last used: %s", exc)
        for obj in self._table:
            obj.file.close()
        self._index.close()
        # Chunks still unverified since an unclean shutdown stay so for the next run.
        if not self._index.unclean and not self._table.unverified:
            self._cache.leave_clean_marker()
        self._cache.release()

    # -- objects (trio thread; `get` from any thread) --------------------------------------

    def object(self, object_id: str, size: int, chunk_size: int) -> StoredObject:
        """The stored object for an identity, created empty on first use."""
        obj = self._table.get(object_id)
        if obj is None:
            obj = self._table.create(object_id, size, chunk_size, self._cache.file(object_id, size))
        elif obj.size != size or obj.chunk_size != chunk_size:
            raise ValueError(f"object {object_id} known with another size or chunk size")
        self._table.touch(obj)
        return obj

    def get(self, object_id: str) -> StoredObject | None:
        return self._table.get(object_id)

    def objects(self) -> Iterator[StoredObject]:
        return iter(self._table)

    def touch(self, obj: StoredObject) -> None:
        """Mark an object used now (call it on every read). In memory only: written to the
        index with the next commit, eviction or `close`."""
        self._table.touch(obj)

    # -- in use: the only ways to hold an object ---------------------------------------------

    def reading(self, obj: StoredObject) -> ObjectReader:
        """`with store.reading(obj) as reader:` from a presence check to the end of the
        read (pread, sendfile): the object is not removed meanwhile, and its bytes are
        reached through `reader`. Any thread; two lock round trips."""
        return ObjectReader(self._use_lock, obj, self._staging, self._read_buffer)

    def keeping(self, obj: StoredObject) -> Keeping:
        """`with store.keeping(obj):` the object must stay while a read or prefetch waits
        for its chunks: never evicted meanwhile (a discard still takes it). Trio thread."""
        return Keeping(obj)

    def hold(self, obj: StoredObject) -> Hold:
        """A file opened through the mount: its object is evicted only when nothing else
        can go, so a file open across a dataset update keeps reading the old revision's
        bytes while there is room. `.release()` the hold when the file closes."""
        return Hold(obj)

    def backing(self, obj: StoredObject) -> BackingFile:
        """The capability to hand the kernel the object's file (FUSE passthrough)."""
        return BackingFile(self._use_lock, obj)

    def read(self, obj: StoredObject, offset: int, length: int) -> bytes:
        """Blocking (worker thread): held bytes of the object file."""
        with self.reading(obj) as reader:
            return reader.pread(offset, length)

    async def sha256(self, obj: StoredObject) -> str:
        """SHA-256 of the whole object file, in a worker thread (hashlib releases the GIL)."""
        with self.reading(obj) as reader:
            digest: str = await trio.to_thread.run_sync(reader.sha256)
            return digest

    async def hash_chunks(self, obj: StoredObject, h: Hasher, first: int, end: int) -> None:
        """Feed written chunks [first, end) to `h` in order, in a worker thread: from RAM
        where a chunk is still staged (the very bytes its digest was checked on and that
        were written; kept while hashed), else from the object file. A pull's whole-file
        SHA-256 then reads back from disk only what left RAM before its turn came."""
        cs = obj.chunk_size
        pinned: list[StagedChunk] = []
        parts: list[memoryview | range] = []
        try:
            for index in range(first, end):
                chunk = self._staging.pin(obj, index)
                if chunk is not None:
                    pinned.append(chunk)
                    parts.append(chunk.view)
                    continue
                stop = min(obj.size, (index + 1) * cs)
                last = parts[-1] if parts else None
                if isinstance(last, range) and last.stop == index * cs:
                    parts[-1] = range(last.start, stop)  # one read for a run of chunks
                else:
                    parts.append(range(index * cs, stop))
            with self.reading(obj) as reader:
                await trio.to_thread.run_sync(_feed, reader, h, parts)
        finally:
            for chunk in pinned:
                self._staging.unpin(chunk)

    # -- writes ------------------------------------------------------------------------------

    def stage(
        self,
        obj: StoredObject,
        index: int,
        data: memoryview,
        release: Callable[[], None],
        digest: str,
        wanted: bool = False,
    ) -> None:
        """Trio thread: make verified bytes (of this digest) readable from RAM now, pinned
        until written. Kept in RAM until read (`staging`) when a reader waits for them
        (`wanted`) or their file is open through the mount. `release()` gives the buffer
        back once the chunk leaves RAM."""
        self._staging.stage(obj, index, data, release, digest, wanted or obj.opened > 0)

    def readers_ram(self) -> ReadersRam:
        """The RAM kept for readers, now (see `ReadersRam`)."""
        staging = self._staging
        return ReadersRam(staging.wanted, staging.wanted_bytes, staging.taken, staging.freed)

    async def store_chunk(
        self, obj: StoredObject, index: int, data: memoryview, digest: str
    ) -> None:
        """See `Writer.store_chunk`."""
        await self._writer.store_chunk(obj, index, data, digest)

    def write_chunk(self, obj: StoredObject, index: int, data: memoryview) -> None:
        """Blocking (worker thread): see `Writer.write_chunk`; then `mark_written`."""
        self._writer.write_chunk(obj, index, data)

    def mark_written(self, obj: StoredObject, index: int, digest: str) -> None:
        self._writer.mark_written(obj, index, digest)

    async def keep_staged(self) -> int:
        return await self._writer.keep_staged()

    def pending_writes(self) -> int:
        """Chunks staged but not yet written, plus chunks written but not yet durable."""
        return len(self._staging.pending()) + self._committer.pending()

    async def commit_loop(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Group commit (see `syncbit.store.commit`); a failed commit is retried a second
        later, on a full disk after an LRU eviction. Run it in the node's nursery."""
        task_status.started()
        while True:
            await self._committer.wait_for_work()
            if not await self._committer.commit():
                if self._committer.enospc:
                    await self._evictor.evict_lru(1)
                await trio.sleep(1.0)  # the batch is pending again: the next turn retries

    async def flush(self) -> None:
        """Make every written chunk durable now. If the index cannot be written (logged),
        the chunks stay written-not-durable and the commit loop retries them."""
        await self._committer.commit()

    @property
    def written_event(self) -> trio.Event:
        """Set at the next chunk or object state change (written, durable, removed)."""
        return self._changed.event

    def notify(self) -> None:
        """Wake everyone waiting on `written_event`."""
        self._changed.fire()

    # -- budget and removal (trio thread) -------------------------------------------------------

    def set_pins(self, object_ids: Iterable[str], sizes: Mapping[str, int] | None = None) -> None:
        """See `budget.Pins`."""
        self._evictor.pins = Pins.of(object_ids, sizes)

    async def discard(self, obj: StoredObject) -> None:
        """See `Evictor.discard`."""
        await self._evictor.discard(obj)

    async def evict(self, object_ids: Iterable[str]) -> EvictResult:
        return await self._evictor.evict(object_ids)

    async def enforce(self) -> int:
        return await self._evictor.enforce()

    async def gc(self, referenced: set[str]) -> int:
        return await self._evictor.gc(referenced)

    def used_bytes(self) -> int:
        return self._evictor.used()

    def cached_bytes(self) -> int:
        """Bytes of durable chunks, in O(1)."""
        return self._table.durable_bytes

    # -- verification (trio thread) ---------------------------------------------------------

    def unverified_chunks(self) -> int:
        """Chunks not re-verified since an unclean shutdown, in O(1)."""
        return self._table.unverified

    async def verify(self, run: VerifyRun) -> None:
        await self._verifier.verify(run)

    async def verify_chunks(self, obj: StoredObject, indexes: Iterable[int]) -> None:
        await self._verifier.verify_chunks(obj, indexes)

    async def check_chunk(self, obj: StoredObject, index: int, direct: bool) -> ChunkCheck:
        return await self._verifier.check_chunk(obj, index, direct)

    # -- status (trio thread) -------------------------------------------------------------------

    def usage(self, pins: tuple[int, int] | None = None) -> dict[str, Any]:
        """Counters for status and metrics: bytes used against the budget, bytes held of
        pinned objects and the size they need, whether pinned data alone exceeds the
        budget, evictions so far, the filesystem's state (`DiskWatch.state`) and
        verification (chunks not yet re-verified, re-verified, dropped).

        `pins`: (held, size) of the pinned objects from a caller that keeps them up to
        date (the node's status); without, they are counted here, in O(pinned objects).
        """
        ev = self._evictor
        pinned, pinned_size = pins if pins is not None else ev.pins.usage(self._table.get)
        return {
            "used": ev.used(),
            "budget": ev.size,
            "reserved": ev.reserved,
            "pinned": pinned,
            "pinned_size": pinned_size,
            "pinned_over_budget": pinned_size > ev.size,
            "evicted_bytes": ev.evicted_bytes,
            "evictions": ev.evictions,
            **self.disk.state(),
            "unverified": self._table.unverified,
            "verified_chunks": self._verifier.verified_chunks,
            "dropped_chunks": self._verifier.dropped_chunks,
        }

    def listing(self) -> list[dict[str, Any]]:
        """What is cached (`cache ls`): per object holding bytes or pinned, most recently
        used first: id, size, held bytes, complete, pinned, in use, last used (epoch s)."""
        writing = self._staging.writing_objects()
        rows: list[dict[str, Any]] = []
        for obj in self._table:
            pinned = obj.id in self._evictor.pins
            if not obj.written and not pinned:
                continue
            rows.append(
                {
                    "id": obj.id,
                    "size": obj.size,
                    "held": obj.bytes_in(obj.written),
                    "complete": obj.complete,
                    "pinned": pinned,
                    "in_use": self._table.busy(obj, writing),
                    "last_used": obj.last_used,
                }
            )
        rows.sort(key=lambda r: r["last_used"], reverse=True)
        return rows

    # -- manifests known to this node (blocking: worker thread or start-up) -------------------

    def save_manifests(self, manifests: dict[str, str]) -> None:
        """Replace the stored manifest JSON documents (name -> JSON). Raises OSError
        (ENOSPC on a full disk) when they cannot be written."""
        self._index.save_manifests(manifests)

    def load_manifests(self) -> dict[str, str]:
        return self._index.load_manifests()

    # -- settings ---------------------------------------------------------------------------

    @property
    def cache_size(self) -> int:
        return self._evictor.size

    @property
    def busy_wait(self) -> float:
        """Seconds a write waits for in-use objects to become idle before CacheFullError."""
        return self._evictor.busy_wait

    @busy_wait.setter
    def busy_wait(self, seconds: float) -> None:
        self._evictor.busy_wait = seconds

    @property
    def touch_interval(self) -> float:
        """Seconds between commits of `last_used` alone."""
        return self._committer.touch_interval

    @touch_interval.setter
    def touch_interval(self, seconds: float) -> None:
        self._committer.touch_interval = seconds

    @property
    def disk_headroom(self) -> int:
        """Bytes of disk a chunk write leaves free for the index (0: none)."""
        return self._cache.headroom

    @disk_headroom.setter
    def disk_headroom(self, nbytes: int) -> None:
        self._cache.headroom = nbytes

    @property
    def evictions(self) -> int:
        return self._evictor.evictions


def _feed(reader: ObjectReader, h: Hasher, parts: list[memoryview | range]) -> None:
    """Blocking (worker thread): RAM views and file ranges to `h`, in order."""
    for part in parts:
        if isinstance(part, range):
            reader.hash_into(h, part.start, len(part))
        else:
            h.update(part)
