"""The durable store on LMDB (`kv.DurableStore`): the single-node scheduler's default.

Owns one LMDB environment, `<directory>/kv.lmdb`, and the in-memory log of recent commits
its watches read. Every LMDB call runs in a worker thread (a commit fsyncs; that must not
block the trio loop) as one short transaction. One trio run and one process own a store:
commits are serialised by a trio lock, so the log is in revision order.

Layout (named databases):

    data   key (UTF-8)                  -> revision of its last write (u64 BE) + value
    meta   b"revision", b"generation"   -> u64 BE
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import lmdb
import trio

from syncbit.diskspace import IndexReserve, open_env
from syncbit.errors import ConfigError, SchedulerError
from syncbit.scheduler.kv import (
    DEFAULT_PAGE,
    Change,
    Check,
    Commit,
    Delete,
    DurableStore,
    Entry,
    Page,
    Put,
    Resync,
    check_key,
    check_limit,
    check_prefix,
    check_writes,
)

T = TypeVar("T")
_U64 = struct.Struct(">Q")
_MAP_SIZE = 64 * 2**30  # virtual: LMDB grows the file only as data arrives
_REVISION = b"revision"
_GENERATION = b"generation"
HISTORY = 10_000  # commits the watch log keeps; an older `since` gets a Resync


def _u64(raw: bytes | None) -> int:
    return _U64.unpack(raw)[0] if raw else 0


class LmdbStore(DurableStore):
    """A `DurableStore` in `directory`; open it with `await LmdbStore.open(directory)`."""

    def __init__(
        self, env: lmdb.Environment, history: int, reserve: IndexReserve | None = None
    ) -> None:
        """Blocking (opens databases, reads the revision): `open` calls it in a thread."""
        self._env = env
        self._reserve = reserve  # room kept on the filesystem for the next commits
        self._data = env.open_db(b"data")
        self._meta = env.open_db(b"meta")
        with env.begin() as txn:
            self._revision = _u64(txn.get(_REVISION, db=self._meta))
        self._floor = self._revision  # the log holds every commit after this revision
        self._log: deque[tuple[int, list[Change]]] = deque()
        self._history = history
        self._appended = trio.Event()
        self._write_lock = trio.Lock()
        self._inflight = 0
        self._idle = trio.Event()
        self._closed = False

    @classmethod
    async def open(cls, directory: Path, *, history: int = HISTORY) -> LmdbStore:
        """Open (or create) the store in `directory`; ConfigError if that cannot be done."""

        def open_store() -> LmdbStore:
            # Survives a full filesystem: an embedded scheduler's state sits in the cache
            # dir, and a daemon starts on a full one.
            env, reserve = open_env(
                Path(directory) / "kv.lmdb", max_dbs=4, map_size=_MAP_SIZE, metasync=False
            )
            return cls(env, history, reserve)

        try:
            store: LmdbStore = await trio.to_thread.run_sync(open_store)
        except (OSError, lmdb.Error) as exc:
            raise ConfigError(f"cannot open scheduler state in {directory}: {exc}") from exc
        return store

    async def _run(self, fn: Callable[[], T]) -> T:
        """`fn` in a worker thread, counted so that `aclose` never closes under it."""
        if self._closed:
            raise SchedulerError("scheduler state is closed")
        self._inflight += 1
        try:
            result: T = await trio.to_thread.run_sync(fn)
        except lmdb.Error as exc:
            raise SchedulerError(f"scheduler state (LMDB): {exc}") from exc
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
                self._idle = trio.Event()
        return result

    # -- reads -------------------------------------------------------------------------------

    async def get(self, key: str, *, stale_ok: bool = False) -> Entry | None:
        raw_key = check_key(key)

        def read() -> Entry | None:
            with self._env.begin() as txn:
                raw = txn.get(raw_key, db=self._data)
            return None if raw is None else Entry(key, bytes(raw[8:]), _u64(raw[:8]))

        return await self._run(read)

    async def list_prefix(
        self,
        prefix: str,
        *,
        after: str | None = None,
        limit: int = DEFAULT_PAGE,
        revision: int = 0,
        stale_ok: bool = False,
    ) -> Page:
        raw_prefix = check_prefix(prefix)
        check_limit(limit)
        start = raw_prefix if after is None else after.encode() + b"\x00"

        def read() -> Page:
            entries: list[Entry] = []
            more = False
            with self._env.begin() as txn:
                now = _u64(txn.get(_REVISION, db=self._meta))
                cursor = txn.cursor(db=self._data)
                if cursor.set_range(start):
                    for key, raw in cursor:
                        if not key.startswith(raw_prefix):
                            break
                        if len(entries) == limit:
                            more = True
                            break
                        entries.append(Entry(key.decode(), bytes(raw[8:]), _u64(raw[:8])))
            return Page(entries, entries[-1].key if more else None, now)

        return await self._run(read)

    async def generation(self, *, stale_ok: bool = False) -> int:
        def read() -> int:
            with self._env.begin() as txn:
                return _u64(txn.get(_GENERATION, db=self._meta))

        return await self._run(read)

    # -- writes ------------------------------------------------------------------------------

    async def commit(
        self, writes: Sequence[Put | Delete], *, checks: Sequence[Check] = (), bump: bool = False
    ) -> Commit:
        check_writes(writes, checks)

        def write() -> tuple[Commit, list[Change]]:
            with self._env.begin(write=True) as txn:
                current = _u64(txn.get(_REVISION, db=self._meta))
                for check in checks:
                    raw = txn.get(check.key.encode(), db=self._data)
                    if _u64(raw[:8] if raw else None) != check.revision:
                        return Commit(False, current), []
                revision = current + 1
                changes: list[Change] = []
                deleted = 0
                for op in writes:
                    key = op.key.encode()
                    if isinstance(op, Put):
                        txn.put(key, _U64.pack(revision) + op.value, db=self._data)
                        changes.append(Change(op.key, op.value, revision))
                    elif txn.delete(key, db=self._data):
                        deleted += 1
                        changes.append(Change(op.key, None, revision))
                if not changes and not bump:
                    return Commit(True, current), []  # nothing changed: no new revision
                txn.put(_REVISION, _U64.pack(revision), db=self._meta)
                if bump:
                    txn.put(_GENERATION, _U64.pack(revision), db=self._meta)
                return Commit(True, revision, deleted), changes

        def write_and_keep_room() -> tuple[Commit, list[Change]]:
            done = write()
            if self._reserve is not None:
                self._reserve.top_up()
            return done

        async with self._write_lock:
            result, changes = await self._run(write_and_keep_room)
            if result.ok and result.revision > self._revision:
                self._append(result.revision, changes)
        return result

    def _append(self, revision: int, changes: list[Change]) -> None:
        self._revision = revision
        if len(self._log) >= self._history:
            self._floor = self._log.popleft()[0]
        self._log.append((revision, changes))
        self._appended.set()
        self._appended = trio.Event()

    # -- watches -----------------------------------------------------------------------------

    def watch(self, prefix: str, since: int) -> _LmdbChanges:
        check_prefix(prefix)
        return _LmdbChanges(self, prefix, since)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._appended.set()  # watches end
        while self._inflight:
            await self._idle.wait()
        self._env.close()


class _LmdbChanges:
    """A watch on an `LmdbStore`: reads the store's commit log; ends when the store closes."""

    def __init__(self, store: LmdbStore, prefix: str, since: int) -> None:
        self._store = store
        self._prefix = prefix
        self._since = since
        self._pending: deque[Change | Resync] = deque()

    async def __aenter__(self) -> _LmdbChanges:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> _LmdbChanges:
        return self

    async def __anext__(self) -> Change | Resync:
        store = self._store
        while not self._pending:
            if store._closed:
                raise StopAsyncIteration
            appended = store._appended
            if self._since < store._floor:  # older than the log: the watcher re-reads
                self._since = store._revision
                return Resync(store._revision)
            new: list[tuple[int, list[Change]]] = []
            for revision, changes in reversed(store._log):
                if revision <= self._since:
                    break
                new.append((revision, changes))
            for revision, changes in reversed(new):
                self._pending.extend(c for c in changes if c.key.startswith(self._prefix))
                self._since = revision
            if not self._pending:
                await appended.wait()
        return self._pending.popleft()
