"""Chunk writes: verified bytes from RAM to the object file within the budget (a full disk:
LRU eviction and one retry), then to the commit. Trio thread, the write in a worker thread;
never marks a chunk written before its bytes are in the file, nor a discarded one.
"""

from __future__ import annotations

import logging

import trio

from syncbit.diskspace import is_enospc, size_text
from syncbit.errors import CacheFullError, DiskFullError
from syncbit.store.commit import Committer
from syncbit.store.disk import DiskWatch
from syncbit.store.events import Signal
from syncbit.store.evict import Evictor
from syncbit.store.files import CacheDir, PWrite
from syncbit.store.objects import ObjectTable, StoredObject
from syncbit.store.staging import Staging

log = logging.getLogger("syncbit.store")


class Writer:
    """The chunk write path, from `store_chunk` to `mark_written`."""

    def __init__(
        self,
        table: ObjectTable,
        staging: Staging,
        cache: CacheDir,
        evictor: Evictor,
        committer: Committer,
        disk: DiskWatch,
        changed: Signal,
        pwrite: PWrite,
    ) -> None:
        self._table = table
        self._staging = staging
        self._cache = cache
        self._evictor = evictor
        self._committer = committer
        self._disk = disk
        self._changed = changed
        self._pwrite = pwrite
        self._disk_limited_told = False

    async def store_chunk(
        self, obj: StoredObject, index: int, data: memoryview, digest: str
    ) -> None:
        """Write a verified chunk within the budget and mark it written: room first, the
        write in a thread, on ENOSPC an LRU eviction and one retry, then `mark_written`.
        A chunk whose object was discarded since it was staged (or that was staged again
        since, with other bytes) is dropped unwritten.

        On failure the chunk is unstaged (simply missing again; `obj.unstored[index]` says
        why) and the error raised: CacheFullError (budget full of what may not be
        evicted), DiskFullError (the filesystem, likewise), or OSError (another write error).
        """
        discards = obj.discards

        def current() -> bool:  # not discarded since, nor staged again with other bytes
            return obj.discards == discards and self._staging.current(obj, index, data)

        self._table.begin_write(obj)  # in use until written or failed
        try:
            if not current():
                return
            async with self._evictor.room(len(data), obj):
                if current():
                    await self._write_retrying(obj, index, data)
                if current():  # else the file may have lost these bytes
                    self.mark_written(obj, index, digest)
        except (CacheFullError, OSError) as exc:
            self.unstage(obj, index, cause=str(exc), view=data)
            raise
        finally:
            self._table.end_write(obj)
            if not current():
                self._staging.unstage(obj, index, data)  # missing again, if still ours

    async def _write_retrying(self, obj: StoredObject, index: int, data: memoryview) -> None:
        try:
            await trio.to_thread.run_sync(self.write_chunk, obj, index, data)
            return
        except OSError as exc:
            if not is_enospc(exc):
                raise
            first = exc
        # The disk filled before the budget did (a budget above the disk, or other files
        # on it): free twice the chunk by LRU eviction and try once more.
        freed = await self._evictor.evict_lru(2 * len(data), keep=obj)
        if not freed and self._evictor.freeing:
            freed = await self._evictor.wait_freeing()
        if not freed:
            raise self._disk_full(
                f"disk full under {self._cache.root} and nothing left to evict: {first}", first
            ) from first
        if not self._disk_limited_told:  # the normal state of a budget above the disk
            self._disk_limited_told = True
            log.info(
                "the disk under %s fills before the cache budget of %s: least recently used "
                "data is evicted to make room (the free space is the effective budget)",
                self._cache.root,
                size_text(self._evictor.size),
            )
        log.debug(
            "disk full writing chunk %d of %s: evicted %s", index, obj.id[:12], size_text(freed)
        )
        try:
            await trio.to_thread.run_sync(self.write_chunk, obj, index, data)
        except OSError as exc:
            if not is_enospc(exc):
                raise
            raise self._disk_full(
                f"disk full under {self._cache.root} even after evicting {size_text(freed)}: {exc}",
                exc,
            ) from exc

    def _disk_full(self, message: str, cause: OSError) -> DiskFullError:
        """A chunk write refused for lack of space, with nothing left to evict: the
        disk-full episode (logged once) and the error for this chunk."""
        self._disk.refused("a chunk", cause)
        return DiskFullError(message)

    def write_chunk(self, obj: StoredObject, index: int, data: memoryview) -> None:
        """Blocking (worker thread): write a chunk's bytes at its place in the object
        file, keeping the disk's headroom (see `CacheDir.room_for`)."""
        fd = obj.file.fd(create=not obj.written)
        with self._cache.room_for(fd, len(data)):
            obj.file.write(data, index * obj.chunk_size, self._pwrite)

    def mark_written(self, obj: StoredObject, index: int, digest: str) -> None:
        """Record a verified, written chunk; it becomes durable at the next commit."""
        self._table.add_written(obj, index, digest)
        self._staging.written(obj, index)
        self._committer.add(obj, index, digest)
        self._changed.fire()

    def unstage(
        self, obj: StoredObject, index: int, cause: str = "", view: memoryview | None = None
    ) -> None:
        """Drop a staged chunk (its write failed: it is simply missing again; with `view`,
        only if staged with these bytes). `cause`, if given, is kept in `obj.unstored` for
        a reader that then finds the chunk missing."""
        self._staging.unstage(obj, index, view)
        if cause:
            self._table.unstored(obj, index, cause)
            self._changed.fire()  # whoever waits for the chunk to be written learns it won't be

    async def keep_staged(self) -> int:
        """At shutdown: write the verified chunks still only in RAM (their writes never
        ran, or were cut short), so a restarted daemon need not fetch them again; a flush
        then makes them durable. Returns how many were written."""
        kept, failed = 0, 0
        for obj, index, chunk in self._staging.pending():
            if index in obj.written:
                continue
            try:
                await self.store_chunk(obj, index, chunk.view, chunk.digest)
            except (CacheFullError, OSError) as exc:
                if not failed:  # one line, not one per chunk (a full disk fails them all)
                    log.warning("verified chunks in RAM not kept: %s", exc)
                failed += 1
                continue
            kept += 1
        return kept
