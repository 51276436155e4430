"""Every removal from the cache: reservations for writes, LRU eviction, eviction on
request, gc and discard, all through one claim (presence gone at once, index and file in a
worker thread). Evicts only idle objects; a discard waits for reads in progress.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import trio

from syncbit.diskspace import size_text
from syncbit.errors import CacheFullError
from syncbit.store import budget
from syncbit.store.budget import Pins
from syncbit.store.commit import Committer
from syncbit.store.events import ChangeFeed, Signal
from syncbit.store.files import CacheDir
from syncbit.store.index import Index, ObjectRecord
from syncbit.store.objects import ObjectTable, StoredObject, Taken
from syncbit.store.staging import Staging

log = logging.getLogger("syncbit.store")


@dataclass
class EvictResult:
    """What `ObjectStore.evict` did: bytes freed, objects evicted, objects in use (kept)."""

    freed: int = 0
    evicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Room:
    """A reservation of budget for one chunk write (see `Evictor.room`)."""

    __slots__ = ("_evictor", "_nbytes", "_obj")

    def __init__(self, evictor: Evictor, nbytes: int, obj: StoredObject) -> None:
        self._evictor = evictor
        self._nbytes = nbytes
        self._obj = obj

    async def __aenter__(self) -> None:
        await self._evictor.make_room(self._nbytes, self._obj)

    async def __aexit__(self, *exc: object) -> None:
        self._evictor.reserved -= self._nbytes
        assert self._evictor.reserved >= 0, "released more than was reserved"


class Evictor:
    """The budget's counters besides `held` (bytes reserved for writes in progress, bytes
    of evicted files still being deleted) and every removal."""

    def __init__(
        self,
        table: ObjectTable,
        staging: Staging,
        index: Index,
        cache: CacheDir,
        committer: Committer,
        feed: ChangeFeed,
        changed: Signal,
        size: int,
    ) -> None:
        self._table = table
        self._staging = staging
        self._index = index
        self._cache = cache
        self._committer = committer
        self._feed = feed
        self._changed = changed
        self.size = size  # the budget, bytes
        self.pins = Pins()
        self.reserved = 0
        self.freeing = 0
        self.busy_wait = 5.0  # how long make_room waits for in-use objects to become idle
        self.evictions = 0
        self.evicted_bytes = 0

    def used(self) -> int:
        """Bytes the cache holds against the budget, in O(1): written chunks, space
        reserved for chunk writes in progress, evicted files still being deleted."""
        return self._table.held + self.reserved + self.freeing

    def _busy(self) -> Callable[[StoredObject], bool]:
        writing = self._staging.writing_objects()
        return lambda obj: self._table.busy(obj, writing)

    def _victim(self, keep: StoredObject | None) -> StoredObject | None:
        return budget.lru_victim(self._table, self.pins, keep, self._busy())

    def full_message(self, nbytes: int) -> str:
        pinned, pinned_size = self.pins.usage(self._table.get)
        return budget.full_message(nbytes, self.size, self._table.held, pinned, pinned_size)

    # -- room for writes --------------------------------------------------------------------

    def room(self, nbytes: int, obj: StoredObject) -> Room:
        """`async with evictor.room(n, obj):` around a chunk write: `make_room`, and the
        reservation given back however the block ends."""
        return Room(self, nbytes, obj)

    async def make_room(self, nbytes: int, obj: StoredObject | None = None) -> None:
        """Reserve `nbytes`, evicting least recently used unpinned idle objects until
        used + nbytes <= the budget. `obj`, the object about to be written, is never
        evicted here, and its removal, if one runs, is waited for. Objects busy only for
        a moment are waited for up to `busy_wait` seconds.

        Raises:
            CacheFullError: what is left is pinned or in use (the message says how much
                is pinned against the budget), or one chunk exceeds the whole budget.
        """
        while obj is not None and (running := self._table.removing(obj)) is not None:
            await running.wait()
        why = budget.too_large(nbytes, self.size)
        if why is not None:
            raise CacheFullError(why)
        give_up = trio.current_time() + self.busy_wait
        while self.used() + nbytes > self.size:
            if self._table.held + self.reserved + nbytes <= self.size:
                await self._wait_change(1.0)  # evictions under way free enough: wait
                continue
            busy = self._busy()
            victim = budget.lru_victim(self._table, self.pins, obj, busy)
            if victim is not None:
                await self._remove([victim], "least recently used, making room")
                continue
            waitable = budget.waitable(self._table, self.pins, obj, busy)
            if (self.freeing or waitable) and trio.current_time() < give_up:
                await self._wait_change(0.05)
                continue
            raise CacheFullError(self.full_message(nbytes))
        self.reserved += nbytes

    async def _wait_change(self, timeout: float) -> None:
        """Wait for a chunk or object state change (readers in other threads don't signal:
        hence the timeout)."""
        with trio.move_on_after(timeout):
            await self._changed.wait()

    async def wait_freeing(self) -> int:
        """Another write's eviction is freeing space: wait (up to `busy_wait`) for it to
        finish; the bytes it was freeing."""
        freed = self.freeing
        with trio.move_on_after(self.busy_wait):
            while self.freeing:
                await self._wait_change(1.0)
        return freed

    # -- eviction ------------------------------------------------------------------------------

    async def evict_lru(self, nbytes: int, keep: StoredObject | None = None) -> int:
        """Evict least recently used unpinned idle objects (never `keep`) until `nbytes`
        are freed or none is left, whatever the budget (a full disk). Bytes freed."""
        freed = 0
        while freed < nbytes:
            victim = self._victim(keep)
            if victim is None:
                break
            got, _ = await self._remove([victim], "least recently used, disk full")
            freed += got
        return freed

    async def enforce(self) -> int:
        """Evict least recently used unpinned idle objects until the cache is within its
        budget (after the budget was lowered across a restart, or pins changed). Logs
        when pinned or in-use data alone is over budget. Bytes freed."""
        freed = 0
        while self.used() > self.size:
            victim = self._victim(None)
            if victim is None:
                log.warning("%s", self.full_message(0))
                break
            got, _ = await self._remove([victim], "over the cache budget")
            freed += got
        return freed

    async def evict(self, object_ids: Iterable[str]) -> EvictResult:
        """Evict these objects now, pinned or not (the caller decides policy): their index
        entries and files go, readers fetch them anew. Objects in use are skipped."""
        result = EvictResult()
        for oid in object_ids:
            obj = self._table.get(oid)
            if obj is None:
                continue
            freed, removed = await self._remove([obj], "on request")
            if removed:
                result.freed += freed
                result.evicted.append(oid)
            else:
                result.skipped.append(oid)
        return result

    async def gc(self, referenced: set[str]) -> int:
        """Remove what nothing needs: objects that no known manifest references and that
        are not pinned, files of objects holding nothing, files under objects/ that the
        index does not know (a crash between eviction's txn and its unlink) and index
        entries of unknown objects. Objects in use are left alone. Bytes freed."""
        unreferenced, empty = [], []
        for obj in self._table:
            if obj.written and obj.id not in referenced and obj.id not in self.pins:
                unreferenced.append(obj)
            elif not obj.written and not self._staging.indexes(obj):
                empty.append(obj)
        freed, _ = await self._remove(unreferenced, "not referenced by any dataset")
        if empty:
            await self._remove(empty, "holds nothing")
        files: int = await trio.to_thread.run_sync(self._gc_blocking)
        return freed + files

    def _gc_blocking(self) -> int:
        def known(path: Path) -> bool:
            obj = self._table.get(path.name)
            return obj is not None and obj.path == path

        freed = self._cache.remove_strays(known)
        orphans = self._index.delete_orphan_chunks()
        if orphans:
            log.info("gc: removed %d index entries of unknown objects", orphans)
        return freed

    async def _remove(self, objs: list[StoredObject], why: str) -> tuple[int, list[StoredObject]]:
        """Evict the idle ones of `objs`: one txn plus file deletions in a worker thread.
        Returns (bytes freed, objects evicted); objects in use are left alone."""
        writing = self._staging.writing_objects()
        claimed: list[tuple[StoredObject, Taken]] = []
        for obj in objs:
            taken = self._table.claim(obj, writing)
            if taken is not None:
                claimed.append((obj, taken))
        if not claimed:
            return 0, []
        records = self._table.take_touched()
        freeing = sum(taken.held for _, taken in claimed)
        self.freeing += freeing
        removed = [obj for obj, _ in claimed]
        ok = False
        try:
            await trio.to_thread.run_sync(self._remove_blocking, removed, records)
            ok = True
        except (OSError, lmdb.Error) as exc:
            # Index untouched or file left behind: both safe (absent here, refetched on use;
            # gc or the next eviction removes the file).
            log.error("eviction of %d objects failed: %s", len(claimed), exc)
        finally:
            self.freeing -= freeing
            for obj, taken in claimed:
                self._table.release(obj)
                if taken.durable:
                    self._feed.removed(obj, taken.durable)
                if taken.held and ok:
                    self.evictions += 1
                    self.evicted_bytes += taken.held
                    log.info("evicted object %s (%s): %s", obj.id[:12], size_text(taken.held), why)
            self._changed.fire()
        return (freeing if ok else 0), removed

    def _remove_blocking(self, objs: list[StoredObject], records: list[ObjectRecord]) -> None:
        """Index first, then files: a crash in between leaves only orphan files."""
        self._index.delete_objects([o.id for o in objs], records)
        for obj in objs:
            obj.file.unlink()

    # -- discard -------------------------------------------------------------------------------

    async def discard(self, obj: StoredObject) -> None:
        """Forget every chunk of an object and free its space, in use or not: its presence
        goes at once (readers fetch it anew), reads already in progress finish first on
        the old bytes, then the index entries and the file's blocks go."""
        async with self._committer.lock:  # not between a commit's batch and its txn
            while (running := self._table.removing(obj)) is not None:
                await running.wait()
            taken = self._table.claim(obj, None)
            assert taken is not None, "a discard takes any object"
            self._committer.forget(obj)
            try:
                while self._table.readers(obj):  # readers in other threads don't signal
                    await trio.sleep(0.01)
                await trio.to_thread.run_sync(self._discard_blocking, obj)
            except (OSError, lmdb.Error) as exc:
                # Gone from memory all the same; the index may still list the chunks, so
                # no clean-shutdown marker: the next start re-verifies them.
                log.error("cannot remove object %s from the cache index: %s", obj.id[:12], exc)
                self._index.unclean = True
            finally:
                self._table.release(obj)
        self._feed.removed(obj, taken.chunks)
        self._changed.fire()

    def _discard_blocking(self, obj: StoredObject) -> None:
        self._index.delete_chunks([obj.id])
        obj.file.punch()
