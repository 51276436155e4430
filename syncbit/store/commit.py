"""Group commit: chunks written since the last commit are fdatasync'ed and then indexed in
one txn (with `last_used` of objects only read), and emitted as durable. Trio thread, the
I/O in a worker thread; never indexes bytes that were not synced first.
"""

from __future__ import annotations

import logging

import lmdb
import trio

from syncbit.diskspace import is_enospc
from syncbit.store.disk import DiskWatch
from syncbit.store.events import ChangeFeed, Durable, Signal
from syncbit.store.index import Index, ObjectRecord
from syncbit.store.objects import ObjectTable, StoredObject

log = logging.getLogger("syncbit.store")


class Committer:
    """The pending batch and the commits that drain it. `lock` is held from taking a
    batch to applying its result: a removal of the same chunks never runs in between."""

    def __init__(
        self, table: ObjectTable, index: Index, feed: ChangeFeed, disk: DiskWatch, changed: Signal
    ) -> None:
        self._table = table
        self._index = index
        self._feed = feed
        self._disk = disk
        self._changed = changed
        self.lock = trio.Lock()
        self.touch_interval = 30.0  # seconds between commits of last_used alone
        self._pending: list[Durable] = []
        self._wake = trio.Event()
        self._failures = 0
        self.enospc = False  # the last commit failed on a full disk

    def add(self, obj: StoredObject, index: int, digest: str) -> None:
        """A chunk was written: durable at the next commit."""
        self._pending.append((obj, index, digest))
        self._wake.set()

    def forget(self, obj: StoredObject) -> None:
        """The object's content is gone (discarded): none of its chunks gets indexed."""
        self._pending = [p for p in self._pending if p[0] is not obj]

    def pending(self) -> int:
        return len(self._pending)

    async def wait_for_work(self) -> None:
        """Until a chunk is pending, or `touch_interval` seconds passed."""
        with trio.move_on_after(self.touch_interval):
            # Only this wait replaces the event, and only when nothing is pending: a
            # `commit()` elsewhere that took the batch can never leave it waiting on an
            # event no one sets any more (chunks written but not durable for 30 s).
            while not self._pending:
                self._wake = trio.Event()
                await self._wake.wait()

    async def commit(self) -> bool:
        """One group commit; False if it failed (the batch is pending again)."""
        async with self.lock:
            batch, self._pending = self._pending, []
            records = self._table.take_touched({obj for obj, _, _ in batch})
            if not batch and not records:
                return True
            try:
                lost = await trio.to_thread.run_sync(self._commit_blocking, batch, records)
            except (OSError, lmdb.Error) as exc:
                self._failed(batch, exc)
                return False
            if self._failures:
                log.info("cache index commits work again")
            self.enospc = False
            self._failures = 0
            done = []
            for item in batch:
                obj, index, _digest = item
                if obj in lost:
                    self._table.forget(obj, index)
                elif index in obj.written:
                    self._table.add_durable(obj, index)
                    done.append(item)
        if batch:
            self._feed.durable(done)
            self._changed.fire()
        return True

    def _failed(self, batch: list[Durable], exc: Exception) -> None:
        self.enospc = is_enospc(exc)
        if self.enospc:
            self._disk.refused("the cache index", exc)
        elif self._failures % 60 == 0:  # once a minute while it lasts
            log.error("cannot commit %d chunks to the cache index: %s", len(batch), exc)
        self._failures += 1
        self._pending[:0] = batch

    def _commit_blocking(
        self, batch: list[Durable], records: list[ObjectRecord]
    ) -> set[StoredObject]:
        """fdatasync, then one txn. Returns the objects whose fdatasync failed: their chunks
        of the batch are not indexed (writeback errors are reported once, so a later sync
        would succeed over lost bytes)."""
        lost: set[StoredObject] = set()
        for obj in {obj for obj, _, _ in batch}:
            try:
                obj.file.sync()
            except OSError as exc:
                log.error(
                    "fdatasync of object %s failed, its new chunks are dropped: %s",
                    obj.id[:12],
                    exc,
                )
                lost.add(obj)
        gone = {obj.id for obj in lost}
        self._index.commit(
            [(obj.id, index, digest) for obj, index, digest in batch if obj not in lost],
            [r for r in records if r.id not in gone],
        )
        return lost
