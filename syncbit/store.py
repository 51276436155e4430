"""The node's object store: one sparse file per content object plus an LMDB chunk index.

Owns the cache directory (exclusively, through a lock file), chunk presence and digests.
It never talks to the network and never decides where bytes come from.

Layout: `<cache>/objects/<id[:2]>/<id>` is an ordinary file of the object's full size,
filled chunk by chunk (sparse until complete), so a read is one `pread` and the peer
service can `sendfile` from it. `<cache>/index.lmdb` records, per chunk, its digest; a
chunk is in the index only once its bytes are durable.

Chunk states and concurrency rules:
- *staged*: verified bytes in a RAM buffer, readable by this process at once, while a
  worker thread writes them to the object file with O_DIRECT (no page-cache copy and no
  later writeback: on 2 cores that halves the kernel CPU per cold byte). A small LRU keeps
  recently staged chunks in RAM after the write, so a sequential reader just behind the
  fetch front never waits for the disk. Staged chunks still being written are pinned.
- *written*: the write finished; readers in this process may `pread` it. In memory only.
- *durable*: the commit task fdatasync'ed the object file and then committed the index
  entry. Only durable chunks are served to peers and reported to the scheduler. After a
  crash (`kill -9`) a written-but-not-durable chunk is simply absent and is fetched again;
  a chunk is never in the index with bytes that were not durable first.
- In-memory state is mutated only on the trio thread; worker threads only do the blocking
  I/O handed to them (pwrite, fdatasync, pread, LMDB commit, unlink) and peer-service
  threads only read `durable` membership, which is safe under the GIL, and count their
  reads in `readers` under the use lock. File descriptors are opened and closed under the
  I/O lock.
- LMDB write transactions are short, run in a worker thread, and never span an `await`.

Cache lifecycle (the budget is `cache_size`, a hard limit):
- `used_bytes()` counts written chunks, reservations of writes in progress and evictions
  still deleting their files: an O(1) counter. Every chunk write goes through
  `store_chunk`, which first reserves its bytes with `make_room`; that evicts whole
  objects, least recently used first, until the write fits, so disk use never exceeds the
  budget. A disk that fills before the budget does (ENOSPC) gets the same LRU eviction and
  one retry; a chunk that still cannot be stored is unstaged (missing again), never indexed.
- Pinned objects (`set_pins`: the datasets assigned to this node) are never evicted by the
  LRU. When they alone fill the budget `make_room` raises CacheFullError saying so, and
  `usage()` reports `pinned_over_budget`, instead of evicting and refetching in a loop.
- An object *in use* is never evicted: reads in progress (`in_use`, counted under a lock
  because peer-service threads take it too), chunks staged for writing or written but not
  yet durable, an eviction already running. A read holds `in_use` from its presence check
  to the end of its pread, so no hole is punched under it; a chunk evicted between two reads
  is simply missing and is fetched again.
- Evicting: claim the object under the use lock (its presence is cleared at once, so a peer
  thread that looks afterwards finds nothing), then, in a worker thread, delete its index
  entries in one txn and only then close and unlink its file. A crash in between leaves an
  orphan file for `gc`, never an index entry without bytes. Writes to an object wait in
  `make_room` until its eviction has finished.
- `last_used` is set in memory by `touch` (cheap: no txn per read) and written with the next
  commit (the commit loop also wakes every `touch_interval` seconds for touches alone), with
  evictions, and at `close`, so LRU order survives restarts.

A full filesystem (see `syncbit.diskspace`):
- The index keeps a reserve of allocated blocks past its data file, so the commits that
  record chunks and the ones that free space (evictions, drops) succeed on a 100% full
  filesystem; a chunk write leaves `disk_headroom` free besides (counting the writes in
  flight in other threads). A chunk write refused for lack of space evicts least recently
  used unpinned data and retries once (the free space is then the effective budget), else
  fails with DiskFullError: the chunk is unstaged (missing again), never indexed, and
  `disk` starts a disk-full episode (logged once, reported in `usage()`).
- Nothing at start-up needs a free block: a store whose files exist opens on a 100% full
  filesystem (the lock file's pid is best effort).

Verification (`verify`, `verify_chunks`): re-read durable chunks from their files and
check them against their digests; a chunk that does not match is dropped (index entry
deleted, reported through `newly_removed`) and fetched again when needed. `close` leaves a
clean-shutdown marker only when the index is known to match the files; a store opened
without one (a crash, a kill -9, a power loss) marks every chunk `unverified`: such a
chunk is served only after it was re-verified (a read checks it first, the daemon sweeps
the rest in the background), never to peers and never through passthrough before that.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import lmdb
import trio

from syncbit.chunks import chunk_count, chunk_length, digest
from syncbit.diskspace import DiskWatch, IndexReserve, is_enospc, open_env
from syncbit.diskspace import size_text as _size
from syncbit.errors import CacheFullError, CacheLockedError, DiskFullError

log = logging.getLogger("syncbit.store")

_MAP_SIZE = 1 << 36  # virtual; LMDB grows the file only as needed
_CLEAN = "clean-shutdown"  # marker file: the last `close` left index and files consistent


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _chunk_key(object_id: str, index: int) -> bytes:
    return bytes.fromhex(object_id) + index.to_bytes(4, "big")


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


@dataclass
class EvictResult:
    """What `ObjectStore.evict` did: bytes freed, objects evicted, objects in use (kept)."""

    freed: int = 0
    evicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(eq=False)
class StoredObject:
    """One content object: its file, and which of its chunks this node holds."""

    id: str
    size: int
    chunk_size: int
    path: Path
    fd: int = -1
    direct_fd: int = -1  # O_DIRECT descriptor for aligned chunk writes (-1: unsupported)
    staged: dict[int, memoryview] = field(default_factory=dict)  # in RAM, see docstring
    written: set[int] = field(default_factory=set)  # readable here (includes durable)
    durable: set[int] = field(default_factory=set)  # in the index; served to peers
    digests: dict[int, str] = field(default_factory=dict)
    last_used: float = 0.0  # epoch seconds; the LRU order
    discards: int = 0  # bumped when the content is thrown away (failed verification)
    # Cache lifecycle (see the module docstring): reads in progress (under the store's use
    # lock), staged chunks not yet written, the running eviction, and chunks fetched but
    # not stored (chunk -> why), for the reader that finds them missing.
    readers: int = 0
    opened: int = 0  # open through the mount (trio thread): evicted only as a last resort
    writing: int = 0
    evicting: trio.Event | None = None
    unstored: dict[int, str] = field(default_factory=dict)
    # Durable chunks not re-read since an unclean shutdown: checked before any use.
    unverified: set[int] = field(default_factory=set)

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def has(self, index: int) -> bool:
        """Readable by this process (staged in RAM or written to the object file)."""
        return index in self.written or index in self.staged

    def has_range(self, offset: int, length: int) -> bool:
        """True if every chunk covering [offset, offset+length) is durable and verified
        (peer service)."""
        if length <= 0:
            return True
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size
        durable, unverified = self.durable, self.unverified
        return all(i in durable and i not in unverified for i in range(first, last + 1))

    @property
    def complete(self) -> bool:
        return len(self.written) == self.chunks

    def bytes_in(self, indexes: set[int]) -> int:
        """Bytes covered by a set of this object's chunks, in O(1): every chunk is full
        but the last. Heartbeats and progress polls call this for every object."""
        if not indexes:
            return 0
        last = self.chunks - 1
        short = self.chunk_size - chunk_length(self.size, self.chunk_size, last)
        return len(indexes) * self.chunk_size - (short if last in indexes else 0)

    def held_bytes(self) -> int:
        return self.bytes_in(self.durable)


_ALIGN = 4096


class _InUse:
    """`with store.in_use(obj):` a read in progress; blocks eviction of the object."""

    __slots__ = ("_lock", "_obj")

    def __init__(self, lock: threading.Lock, obj: StoredObject) -> None:
        self._lock = lock
        self._obj = obj

    def __enter__(self) -> None:
        with self._lock:
            self._obj.readers += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._obj.readers -= 1


class ObjectStore:
    """The cache directory: objects, index, lock. Build with `ObjectStore.open()`."""

    def __init__(
        self,
        cache_dir: Path,
        cache_size: int,
        staged_chunks: int = 32,
        pwrite: Callable[[int, memoryview, int], None] = _pwrite_all,
    ) -> None:
        """`pwrite(fd, data, offset)` writes a chunk's bytes (injectable: tests make it
        fail like a full disk)."""
        self.cache_dir = cache_dir
        self.cache_size = cache_size
        self._objects: dict[str, StoredObject] = {}
        self._lock_fd = -1
        self._env: lmdb.Environment | None = None
        self._pending: list[tuple[StoredObject, int, str]] = []
        self._pending_event = trio.Event()
        self._read_buf = bytearray(1 << 20)
        # Recently staged chunks kept in RAM, oldest first; value: release callback.
        self._recent: OrderedDict[tuple[StoredObject, int], Callable[[], None]] = OrderedDict()
        # Staged chunks whose write has not finished, with their digests.
        self._writing: dict[tuple[StoredObject, int], str] = {}
        self.staged_chunks = staged_chunks
        self.direct_io = True
        self._io_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._dbs: dict[str, lmdb._Database] = {}  # serialises lazy fd opening across threads
        self.newly_durable: list[tuple[StoredObject, int, str]] = []  # for the reporter
        self.durable_event = trio.Event()
        self.written_event = trio.Event()  # set (and replaced) whenever a chunk is written
        self.newly_removed: list[tuple[StoredObject, list[int]]] = []  # for the reporter
        # Cache lifecycle: see the module docstring.
        self._pins: set[str] = set()
        self._pin_sizes: dict[str, int] = {}
        self._held = 0  # bytes of written chunks (durable ones included)
        self._reserved = 0  # bytes `make_room` reserved for writes in progress
        self._freeing = 0  # bytes of evicted objects whose files are still being deleted
        self._use_lock = threading.Lock()  # readers counts: trio and peer-service threads
        self._index_lock = trio.Lock()  # a commit vs. a discard of the same object
        self._touched: set[StoredObject] = set()  # last_used not yet written to the index
        self.touch_interval = 30.0  # seconds between commits of last_used alone
        self._commit_enospc = False  # the last commit failed on a full disk
        self.busy_wait = 5.0  # how long make_room waits for in-use objects to become idle
        self.disk_headroom = 1 << 20  # bytes of disk left free for the index (0: none)
        self._commit_failures = 0
        self.evicted_bytes = 0
        self.evictions = 0
        # A full filesystem: see the module docstring and `syncbit.diskspace`.
        self._pwrite = pwrite
        self.disk = DiskWatch(cache_dir)
        self._reserve = IndexReserve(cache_dir / "index.lmdb" / "data.mdb", 0)  # see open()
        self._space_lock = threading.Lock()
        self._inflight = 0  # bytes of chunk writes in progress (worker threads)
        self._disk_limited_told = False
        # Verification: the index may not match the files (a txn that removes chunks
        # failed): no clean-shutdown marker then, so the next start re-verifies everything.
        self._index_unclean = False
        self.clean_start = True  # the last run left the clean-shutdown marker
        self._checking: dict[tuple[StoredObject, int], trio.Event] = {}
        self.verified_chunks = 0
        self.dropped_chunks = 0

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        cache_dir: Path,
        cache_size: int,
        staged_chunks: int = 32,
        pwrite: Callable[[int, memoryview, int], None] = _pwrite_all,
    ) -> ObjectStore:
        """Lock `cache_dir` (CacheLockedError if another daemon has it) and load the index.
        Works on a 100% full filesystem once the cache dir exists; a new one that cannot
        be created for lack of space raises DiskFullError."""
        try:
            (cache_dir / "objects").mkdir(parents=True, exist_ok=True)
            # Cached bytes of a root-only source file are root-only here too: only the
            # daemon (passthrough hands the kernel its own descriptors) reads object files.
            os.chmod(cache_dir / "objects", 0o700)
            fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if is_enospc(exc):
                raise DiskFullError(f"no space left to create cache dir {cache_dir}") from exc
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CacheLockedError(
                f"cache dir {cache_dir} is in use by another syncbit daemon (pid {holder or '?'})"
            ) from None
        store = cls(cache_dir, cache_size, staged_chunks, pwrite)
        store._lock_fd = fd
        store._write_pid()
        try:
            store.clean_start = (cache_dir / _CLEAN).exists()
            store._env, store._reserve = open_env(
                cache_dir / "index.lmdb", max_dbs=4, map_size=_MAP_SIZE, metasync=False
            )
            for name in ("objects", "chunks", "manifests"):  # all handles before any thread
                store._db(name)
            store._load()
            if store.clean_start:
                store._take_clean_marker()
        except BaseException:
            store._index_unclean = True  # never leave a marker for a run that did not run
            store.close()
            raise
        disk = os.statvfs(cache_dir)
        room = store._held + disk.f_bavail * disk.f_frsize
        if cache_size > room:
            log.warning(
                "cache size %s exceeds what %s can hold (%s): a full disk will evict early",
                _size(cache_size),
                cache_dir,
                _size(room),
            )
        return store

    def _write_pid(self) -> None:
        """Who holds the lock, for the error of a second daemon: written over the old pid
        before truncating (no new block needed), and skipped on a full disk."""
        data = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(self._lock_fd, data, 0)
            os.ftruncate(self._lock_fd, len(data))
        except OSError as exc:
            log.debug("cannot record the pid in %s/lock: %s", self.cache_dir, exc)

    def _take_clean_marker(self) -> None:
        """Remove the clean-shutdown marker, durably: a crash of this run must never pass
        for a clean shutdown."""
        os.unlink(self.cache_dir / _CLEAN)
        dir_fd = os.open(self.cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _leave_clean_marker(self) -> None:
        """Blocking: record a clean shutdown (after the index was synced and closed). A
        failure only costs the next start a verification pass."""
        marker = self.cache_dir / _CLEAN
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dir_fd = os.open(self.cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            log.warning(
                "cannot record a clean shutdown in %s (%s): the next start re-verifies the cache",
                self.cache_dir,
                exc,
            )

    def _db(self, name: str) -> lmdb._Database:
        """A named database handle, opened once: `open_db` starts its own transaction and,
        racing a write transaction in another thread, deadlocked on the GIL."""
        db = self._dbs.get(name)
        if db is None:
            assert self._env is not None
            db = self._dbs[name] = self._env.open_db(name.encode())
        return db

    @contextlib.contextmanager
    def _write(self) -> Iterator[lmdb.Transaction]:
        """One writer at a time, queued in Python rather than inside LMDB."""
        assert self._env is not None
        with self._write_lock:
            with self._env.begin(write=True) as txn:
                yield txn
            self._reserve.top_up()  # the commit may have used part of the reserve

    def _load(self) -> None:
        assert self._env is not None
        objects_db, chunks_db = self._db("objects"), self._db("chunks")
        with self._env.begin() as txn:
            for key, value in txn.cursor(db=objects_db):
                meta = json.loads(value)
                oid = key.hex()
                self._objects[oid] = StoredObject(
                    oid,
                    meta["size"],
                    meta["chunk_size"],
                    self._path(oid),
                    last_used=meta.get("last_used", 0.0),
                )
            for key, value in txn.cursor(db=chunks_db):
                obj = self._objects.get(key[:-4].hex())
                if obj is None:
                    continue
                index = int.from_bytes(key[-4:], "big")
                obj.written.add(index)
                obj.durable.add(index)
                obj.digests[index] = value.hex()
        self._forget_lost_files()
        held = sum(len(o.durable) for o in self._objects.values())
        self._held = sum(o.bytes_in(o.written) for o in self._objects.values())
        if held and not self.clean_start:
            for obj in self._objects.values():
                obj.unverified = set(obj.durable)
            log.warning(
                "cache %s was not shut down cleanly: its %d chunks are re-read and checked "
                "against their digests before they are used",
                self.cache_dir,
                held,
            )
        log.info(
            "cache %s: %d objects, %d chunks present (%s of a %s budget)",
            self.cache_dir,
            len(self._objects),
            held,
            _size(self._held),
            _size(self.cache_size),
        )

    def _forget_lost_files(self) -> None:
        """Objects whose file is gone or shorter than the object (deleted by hand, lost in
        a filesystem repair) lose their chunks from the index: opened anew, such a file
        would read as zeros where the index promised verified bytes. They are fetched
        again when needed, and the next chunk report withdraws them from the scheduler."""
        lost = []
        for obj in self._objects.values():
            if not obj.durable:
                continue
            try:
                ok = obj.path.stat().st_size >= obj.size
            except FileNotFoundError:
                ok = False
            if not ok:
                log.warning(
                    "object %s: its file %s is missing or short; its %d chunks are fetched "
                    "again when needed",
                    obj.id[:12],
                    obj.path,
                    len(obj.durable),
                )
                lost.append(obj)
        if not lost:
            return
        try:
            with self._write() as txn:
                for obj in lost:
                    self._delete_chunks(txn, obj)
        except lmdb.Error as exc:  # forgotten here all the same; the next start looks again
            log.warning("cannot remove the lost chunks from the index: %s", exc)
            self._index_unclean = True
        for obj in lost:
            self.newly_removed.append((obj, sorted(obj.durable)))  # the scheduler hears it
            obj.written.clear()
            obj.durable.clear()
            obj.digests.clear()

    def close(self) -> None:
        """Close files and the index, release the lock. Pending (non-durable) chunks are
        dropped: they were never marked present, so nothing is lost but the transfer.
        Blocking (one short txn for `last_used` of objects read since the last commit)."""
        if self._env is not None:
            metas = self._touched_metas(set())
            try:
                if metas:
                    with self._write() as txn:
                        self._put_metas(txn, metas)
            except (OSError, lmdb.Error) as exc:
                log.warning("could not record when cached objects were last used: %s", exc)
        for obj in self._objects.values():
            for fd in (obj.fd, obj.direct_fd):
                if fd >= 0:
                    os.close(fd)
            obj.fd = obj.direct_fd = -1
        if self._env is not None:
            try:
                self._env.sync(True)
            except lmdb.Error as exc:
                log.warning("cannot sync the cache index: %s", exc)
                self._index_unclean = True
            self._env.close()
            self._env = None
            # Chunks still unverified since an unclean shutdown stay so for the next run.
            if not self._index_unclean and not self.unverified_chunks():
                self._leave_clean_marker()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- objects ------------------------------------------------------------------------

    def _path(self, object_id: str) -> Path:
        return self.cache_dir / "objects" / object_id[:2] / object_id

    def object(self, object_id: str, size: int, chunk_size: int) -> StoredObject:
        """The stored object for an identity, created empty on first use (trio thread)."""
        obj = self._objects.get(object_id)
        if obj is None:
            obj = StoredObject(object_id, size, chunk_size, self._path(object_id))
            self._objects[object_id] = obj
        elif obj.size != size or obj.chunk_size != chunk_size:
            raise ValueError(f"object {object_id} known with another size or chunk size")
        self.touch(obj)
        return obj

    def touch(self, obj: StoredObject) -> None:
        """Mark an object used now (trio thread; call it on every read). In memory only:
        written to the index with the next commit, eviction or `close`."""
        obj.last_used = time.time()
        self._touched.add(obj)

    def in_use(self, obj: StoredObject) -> _InUse:
        """`with store.in_use(obj):` around a read (presence check through pread or
        sendfile): the object is not evicted meanwhile. Any thread; two lock round trips."""
        return _InUse(self._use_lock, obj)

    def get(self, object_id: str) -> StoredObject | None:
        return self._objects.get(object_id)

    def objects(self) -> Iterator[StoredObject]:
        return iter(list(self._objects.values()))

    def cached_bytes(self) -> int:
        return sum(o.held_bytes() for o in self._objects.values())

    def used_bytes(self) -> int:
        """Bytes the cache holds on disk against the budget, in O(1): written chunks (durable
        ones included), space reserved for chunk writes in progress, and evicted objects
        whose files are still being deleted."""
        return self._held + self._reserved + self._freeing

    def fd(self, obj: StoredObject) -> int:
        """The object's file descriptor, opening (and sizing) the file on first use."""
        if obj.fd < 0:
            with self._io_lock:
                if obj.fd < 0:
                    obj.path.parent.mkdir(parents=True, exist_ok=True)
                    # An object with chunks must find its file: created anew it would read
                    # as zeros where the index promised verified bytes (FileNotFoundError
                    # instead: the read fails, a restart forgets the chunks).
                    create = 0 if obj.written else os.O_CREAT
                    try:
                        fd = os.open(obj.path, os.O_RDWR | create | os.O_CLOEXEC, 0o600)
                    except FileNotFoundError:
                        raise FileNotFoundError(
                            errno.ENOENT,
                            f"the file of cached object {obj.id[:12]} is gone (deleted under "
                            "the running daemon?); a restart fetches its chunks again",
                            str(obj.path),
                        ) from None
                    if os.fstat(fd).st_size != obj.size:
                        os.ftruncate(fd, obj.size)
                    if self.direct_io:
                        try:
                            flags = os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC
                            obj.direct_fd = os.open(obj.path, flags)
                        except OSError:  # tmpfs and some network filesystems
                            obj.direct_fd = -1
                    obj.fd = fd
        return obj.fd

    # -- chunk I/O (blocking parts run in worker threads) -------------------------------

    def write_chunk(self, obj: StoredObject, index: int, data: memoryview) -> None:
        """Blocking: write a verified chunk's bytes at its place in the object file.

        Page-aligned buffers of whole 4 KiB blocks (the fetcher's mmap buffers) go through
        O_DIRECT; anything else (a short last chunk) through the page cache. Raises ENOSPC
        without writing when the disk would keep less than `disk_headroom` free, counting
        the writes other threads have in flight: a disk filled to the last block leaves
        nothing for anything else on it (the index has its own reserve).
        """
        fd = self.fd(obj)
        offset = index * obj.chunk_size
        with self._space_lock:
            if self.disk_headroom:
                disk = os.fstatvfs(fd)
                free = disk.f_bavail * disk.f_frsize - self._inflight
                if free < len(data) + self.disk_headroom:
                    raise OSError(
                        errno.ENOSPC,
                        f"No space left under {self.cache_dir} (keeping "
                        f"{_size(self.disk_headroom)} free)",
                    )
            self._inflight += len(data)
        try:
            if obj.direct_fd >= 0 and len(data) % _ALIGN == 0 and offset % _ALIGN == 0:
                try:
                    self._pwrite(obj.direct_fd, data, offset)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: buffer not aligned after all
                        raise
            self._pwrite(fd, data, offset)
        finally:
            with self._space_lock:
                self._inflight -= len(data)

    def read_nowait(self, obj: StoredObject, offset: int, length: int) -> bytes | None:
        """Non-blocking read of page-cached bytes, or None if it would touch the disk.

        Trio thread only: reads into one reused buffer, because a fresh 1 MiB bytearray
        costs ~0.8 ms in page faults, 20x the read itself.
        """
        if len(self._read_buf) < length:
            self._read_buf = bytearray(length)
        view = memoryview(self._read_buf)[:length]
        try:
            n = os.preadv(self.fd(obj), [view], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise
        if n != length:
            return None
        return bytes(view)

    def read(self, obj: StoredObject, offset: int, length: int) -> bytes:
        """Blocking read of held bytes."""
        return os.pread(self.fd(obj), length, offset)

    def read_parts(
        self, obj: StoredObject, offset: int, length: int
    ) -> list[bytes | memoryview | range]:
        """Bytes of [offset, offset+length) of a held range, without blocking (trio thread).

        Staged chunks come back as views of their RAM buffers, not copies: valid only until
        the trio thread next yields (a buffer is recycled only from the trio thread), so
        the caller must use or copy them before any checkpoint. Page-cached runs are read
        with RWF_NOWAIT. What would need the disk comes back as a `range` of file offsets
        for the caller to `pread` in a thread: those chunks are written, so the file has
        them.
        """
        cs = obj.chunk_size
        parts: list[bytes | memoryview | range] = []
        pos, end = offset, offset + length
        while pos < end:
            index = pos // cs
            stop = min(end, (index + 1) * cs)
            view = obj.staged.get(index)
            if view is not None:
                parts.append(view[pos - index * cs : stop - index * cs])
                self._touch_staged(obj, index)
            else:
                while stop < end and (stop // cs) not in obj.staged:
                    stop = min(end, stop + cs)  # one pread for a run of written chunks
                data = self.read_nowait(obj, pos, stop - pos)
                parts.append(range(pos, stop) if data is None else data)
            pos = stop
        return parts

    # -- presence (trio thread) ---------------------------------------------------------

    def stage(
        self,
        obj: StoredObject,
        index: int,
        data: memoryview,
        release: Callable[[], None],
        digest: str,
    ) -> None:
        """Make verified bytes (of this digest) readable from RAM now; pinned until
        `mark_written`. `release` gives the buffer back once the chunk leaves RAM."""
        obj.staged[index] = data
        key = (obj, index)
        if key not in self._writing:
            self._writing[key] = digest
            obj.writing += 1
        self._recent[key] = release
        self._trim()

    async def keep_staged(self) -> int:
        """At shutdown: write the verified chunks still only in RAM (their writes never
        ran, or were cut short), so a restarted daemon need not fetch them again; `flush`
        then makes them durable. Returns how many were written."""
        kept, failed = 0, 0
        for (obj, index), digest_hex in list(self._writing.items()):
            data = obj.staged.get(index)
            if data is None or index in obj.written:
                continue
            try:
                await self.store_chunk(obj, index, data, digest_hex)
            except (CacheFullError, OSError) as exc:
                if not failed:  # one line, not one per chunk (a full disk fails them all)
                    log.warning("verified chunks in RAM not kept: %s", exc)
                failed += 1
                continue
            kept += 1
        return kept

    def unstage(self, obj: StoredObject, index: int, cause: str = "") -> None:
        """Drop a staged chunk (its write failed: it is simply missing again). `cause`, if
        given, is kept in `obj.unstored` for a reader that then finds the chunk missing."""
        key = (obj, index)
        self._unpin(obj, index)
        release = self._recent.pop(key, None)
        obj.staged.pop(index, None)
        if release is not None:
            release()
        if cause:
            obj.unstored[index] = cause
            self.notify()  # whoever waits for the chunk to be written learns it won't be

    def _unpin(self, obj: StoredObject, index: int) -> None:
        key = (obj, index)
        if self._writing.pop(key, None) is not None:
            obj.writing -= 1

    def _touch_staged(self, obj: StoredObject, index: int) -> None:
        key = (obj, index)
        if key in self._recent:
            self._recent.move_to_end(key)

    def _trim(self) -> None:
        excess = len(self._recent) - self.staged_chunks
        if excess <= 0:
            return
        for key in list(self._recent):
            if excess <= 0:
                break
            if key in self._writing:
                continue
            release = self._recent.pop(key)
            key[0].staged.pop(key[1], None)
            release()
            excess -= 1

    def mark_written(self, obj: StoredObject, index: int, digest: str) -> None:
        """Record a verified, written chunk; it becomes durable at the next commit."""
        if index not in obj.written:
            self._held += chunk_length(obj.size, obj.chunk_size, index)
            obj.written.add(index)
        obj.unstored.pop(index, None)
        self._unpin(obj, index)
        self._trim()
        self.notify()
        obj.digests[index] = digest
        self._pending.append((obj, index, digest))
        self._pending_event.set()

    async def commit_loop(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Group commit: fdatasync touched objects, then index their chunks in one txn.
        Also writes `last_used` of objects only read, every `touch_interval` seconds. A
        failed commit is retried a second later; on a full disk, after an LRU eviction."""
        task_status.started()
        while True:
            with trio.move_on_after(self.touch_interval):
                # Only this loop replaces the event, and only when nothing is pending: a
                # `flush()` elsewhere that took the batch can never leave it waiting on an
                # event no one sets any more (chunks written but not durable for 30 s).
                while not self._pending:
                    self._pending_event = trio.Event()
                    await self._pending_event.wait()
            if not await self._commit():
                if self._commit_enospc:
                    await self.evict_lru(1)
                await trio.sleep(1.0)  # the batch is pending again: the next turn retries

    async def flush(self) -> None:
        """Make every written chunk durable now. If the index cannot be written (logged),
        the chunks stay written-not-durable and the commit loop retries them."""
        await self._commit()

    async def _commit(self) -> bool:
        """One group commit; False if it failed (the batch is queued again)."""
        async with self._index_lock:  # a discard never runs between batch and commit
            batch, self._pending = self._pending, []
            metas = self._touched_metas({obj for obj, _, _ in batch})
            if not batch and not metas:
                return True
            try:
                lost = await trio.to_thread.run_sync(self._commit_blocking, batch, metas)
            except (OSError, lmdb.Error) as exc:
                self._commit_enospc = is_enospc(exc)
                if self._commit_enospc:
                    self.disk.refused("the cache index", exc)
                elif self._commit_failures % 60 == 0:  # once a minute while it lasts
                    log.error("cannot commit %d chunks to the cache index: %s", len(batch), exc)
                self._commit_failures += 1
                self._pending[:0] = batch
                return False
            if self._commit_failures:
                log.info("cache index commits work again")
            self._commit_enospc = False
            self._commit_failures = 0
            done = []
            for item in batch:
                obj, index, _digest = item
                if obj in lost:
                    self._forget_chunk(obj, index)
                elif index in obj.written:
                    obj.durable.add(index)
                    done.append(item)
        if batch:
            self.newly_durable.extend(done)
            self.durable_event.set()
            self.notify()
        return True

    def _forget_chunk(self, obj: StoredObject, index: int) -> None:
        """A written chunk whose bytes did not reach the disk: missing again."""
        if index in obj.written:
            self._held -= chunk_length(obj.size, obj.chunk_size, index)
            obj.written.discard(index)
        obj.digests.pop(index, None)

    def _commit_blocking(
        self, batch: list[tuple[StoredObject, int, str]], metas: list[tuple[bytes, bytes]]
    ) -> set[StoredObject]:
        """fdatasync, then one txn. Returns the objects whose fdatasync failed: their chunks
        of the batch are not indexed (writeback errors are reported once, so a later sync
        would succeed over lost bytes)."""
        lost: set[StoredObject] = set()
        for obj in {obj for obj, _, _ in batch}:
            try:
                os.fdatasync(self.fd(obj))
            except OSError as exc:
                log.error(
                    "fdatasync of object %s failed, its new chunks are dropped: %s",
                    obj.id[:12],
                    exc,
                )
                lost.add(obj)
        assert self._env is not None
        chunks_db = self._db("chunks")
        with self._write() as txn:
            self._put_metas(
                txn, [m for m in metas if m[0] not in {bytes.fromhex(o.id) for o in lost}]
            )
            for obj, index, digest in batch:
                if obj not in lost:
                    txn.put(_chunk_key(obj.id, index), bytes.fromhex(digest), db=chunks_db)
        return lost

    def _touched_metas(self, extra: set[StoredObject]) -> list[tuple[bytes, bytes]]:
        """Index records (key, JSON) of `extra` and of objects touched since the last write
        that still have an index record; forgets the touches (trio thread)."""
        objs = extra | {o for o in self._touched if o.durable and o.evicting is None}
        self._touched.clear()
        return [
            (
                bytes.fromhex(obj.id),
                json.dumps(
                    {"size": obj.size, "chunk_size": obj.chunk_size, "last_used": obj.last_used}
                ).encode(),
            )
            for obj in objs
        ]

    def _put_metas(self, txn: lmdb.Transaction, metas: list[tuple[bytes, bytes]]) -> None:
        objects_db = self._db("objects")
        for key, value in metas:
            txn.put(key, value, db=objects_db)

    def notify(self) -> None:
        """Wake everyone waiting on `written_event` (a chunk or object state changed)."""
        self.written_event.set()
        self.written_event = trio.Event()

    def sha256(self, obj: StoredObject) -> str:
        """Blocking: SHA-256 of the whole object file (hashlib releases the GIL)."""
        h = hashlib.sha256()
        fd = self.fd(obj)
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        offset = 0
        while offset < obj.size:
            n = os.preadv(fd, [view[: min(len(buf), obj.size - offset)]], offset)
            if n <= 0:
                raise OSError(errno.EIO, f"short read of object {obj.id[:12]}")
            h.update(view[:n])
            offset += n
        return h.hexdigest()

    async def discard(self, obj: StoredObject) -> None:
        """Forget every chunk of an object and free its space; readers fetch it anew."""
        async with self._index_lock:  # not between a commit's batch and its txn
            while obj.evicting is not None:
                await obj.evicting.wait()
            held = sorted(obj.written | obj.durable)
            for index in list(obj.staged):
                self.unstage(obj, index)
            self._held -= obj.bytes_in(obj.written)
            with self._use_lock:
                obj.written.clear()
                obj.durable.clear()
            obj.digests.clear()
            obj.unverified.clear()
            obj.discards += 1
            self._pending = [p for p in self._pending if p[0] is not obj]
            done = obj.evicting = trio.Event()  # writes to it wait for the truncation
            try:
                await trio.to_thread.run_sync(self._discard_blocking, obj)
            except (OSError, lmdb.Error) as exc:
                # Gone from memory all the same; the index may still list the chunks, so
                # no clean-shutdown marker: the next start re-verifies them.
                log.error("cannot remove object %s from the cache index: %s", obj.id[:12], exc)
                self._index_unclean = True
            finally:
                obj.evicting = None
                done.set()
        self.newly_removed.append((obj, held))
        self.durable_event.set()
        self.notify()

    def _discard_blocking(self, obj: StoredObject) -> None:
        assert self._env is not None
        with self._write() as txn:
            self._delete_chunks(txn, obj)
        fd = self.fd(obj)
        os.ftruncate(fd, 0)  # frees the blocks
        os.ftruncate(fd, obj.size)

    def _delete_chunks(self, txn: lmdb.Transaction, obj: StoredObject) -> None:
        """Delete every index entry of an object's chunks (they sort together)."""
        prefix = bytes.fromhex(obj.id)
        cursor = txn.cursor(db=self._db("chunks"))
        if not cursor.set_range(prefix):
            return
        while cursor.key()[:-4] == prefix:
            if not cursor.delete():
                break

    # -- verification: stored chunks re-read against their digests (trio thread) --------

    def unverified_chunks(self) -> int:
        """Chunks not re-verified since an unclean shutdown."""
        return sum(len(o.unverified) for o in self._objects.values())

    async def verify_chunks(self, obj: StoredObject, indexes: Iterable[int]) -> None:
        """Re-verify the chunks of `indexes` that are still unverified since an unclean
        shutdown, now (a read waits for this before it uses them); a bad one is dropped
        and so simply missing afterwards."""
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
            objs = sorted(self._objects.values(), key=lambda o: o.last_used, reverse=True)
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
            with self.in_use(obj):  # not evicted under the read
                good = await trio.to_thread.run_sync(
                    self._chunk_matches, obj, index, expected, direct
                )
        finally:
            del self._checking[key]
            done.set()
        if index not in obj.durable or obj.digests.get(index) != expected:
            return ChunkCheck.GONE  # evicted or discarded meanwhile
        if good:
            obj.unverified.discard(index)
            self.verified_chunks += 1
            return ChunkCheck.GOOD
        await self._drop_chunk(obj, index)
        return ChunkCheck.DROPPED

    def _chunk_matches(self, obj: StoredObject, index: int, expected: str, direct: bool) -> bool:
        """Blocking: whether the object file holds the chunk's bytes (a read error or a
        short file is a mismatch)."""
        length = chunk_length(obj.size, obj.chunk_size, index)
        offset = index * obj.chunk_size
        try:
            fd = self.fd(obj)
            if direct and obj.direct_fd >= 0 and offset % _ALIGN == 0:
                buf = mmap.mmap(-1, -(-length // _ALIGN) * _ALIGN)  # page-aligned
                try:
                    n = os.preadv(obj.direct_fd, [buf], offset)
                    with memoryview(buf) as view, view[:length] as part:
                        return n >= length and digest(part) == expected
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here after all
                        raise
                finally:
                    buf.close()
            data = os.pread(fd, length, offset)
        except OSError as exc:
            log.error("cannot re-read chunk %d of object %s: %s", index, obj.id[:12], exc)
            return False
        return len(data) == length and digest(data) == expected

    async def _drop_chunk(self, obj: StoredObject, index: int) -> None:
        """A durable chunk whose bytes on disk do not match its digest: out of memory at
        once, out of the index in a worker thread; reported as removed. Fetched again
        when needed (it is then simply missing)."""
        async with self._index_lock:
            if index not in obj.durable:
                return
            with self._use_lock:
                obj.written.discard(index)
                obj.durable.discard(index)
            self._held -= chunk_length(obj.size, obj.chunk_size, index)
            obj.digests.pop(index, None)
            obj.unverified.discard(index)
            if index in obj.staged:  # a RAM copy kept after the write: missing means missing
                self.unstage(obj, index)
            self.dropped_chunks += 1
            log.error(
                "chunk %d of object %s does not match its digest on disk: dropped (fetched "
                "again when needed)",
                index,
                obj.id[:12],
            )
            try:
                await trio.to_thread.run_sync(self._delete_chunk_blocking, obj, index)
            except (OSError, lmdb.Error) as exc:
                log.error("cannot remove the bad chunk from the cache index: %s", exc)
                self._index_unclean = True  # the next start re-verifies it
        self.newly_removed.append((obj, [index]))
        self.durable_event.set()
        self.notify()

    def _delete_chunk_blocking(self, obj: StoredObject, index: int) -> None:
        with self._write() as txn:
            txn.delete(_chunk_key(obj.id, index), db=self._db("chunks"))

    # -- cache lifecycle: budget, pins, LRU eviction, gc (trio thread) -------------------

    def set_pins(self, object_ids: Iterable[str], sizes: Mapping[str, int] | None = None) -> None:
        """The objects of the datasets assigned to this node: never evicted by the LRU.
        `sizes` (object -> bytes) lets `usage()` tell that pinned data alone exceeds the
        budget before those objects are fetched."""
        self._pins = set(object_ids)
        self._pin_sizes = {k: v for k, v in (sizes or {}).items() if k in self._pins}

    def pinned(self, obj: StoredObject) -> bool:
        return obj.id in self._pins

    def _busy(self, obj: StoredObject) -> bool:
        """In use (see the module docstring); the caller holds the use lock."""
        return (
            obj.readers > 0
            or obj.writing > 0
            or obj.evicting is not None
            or len(obj.written) != len(obj.durable)
        )

    def _victim(self, keep: StoredObject | None) -> StoredObject | None:
        """The least recently used unpinned object that holds bytes and is idle; objects of
        files open through the mount only when no other object can go (a file open across
        a dataset update keeps its old bytes as long as there is room)."""
        best: StoredObject | None = None
        for obj in self._objects.values():
            if obj is keep or not obj.written or obj.id in self._pins or self._busy(obj):
                continue  # readers read without the lock: `_claim` checks again
            if best is None or (obj.opened > 0, obj.last_used) < (best.opened > 0, best.last_used):
                best = obj
        return best

    def _claim(self, obj: StoredObject) -> tuple[int, list[int]] | None:
        """Take an idle object for eviction: clears its presence at once (under the use
        lock, so a reader in another thread either holds it first or finds nothing).
        Returns (bytes held, durable chunks), or None if it is in use."""
        with self._use_lock:
            if self._busy(obj):
                return None
            obj.evicting = trio.Event()
            held = obj.bytes_in(obj.written)
            durable = sorted(obj.durable)
            obj.written.clear()
            obj.durable.clear()
        obj.digests.clear()
        obj.unstored.clear()
        obj.unverified.clear()
        for index in list(obj.staged):  # RAM copies of written chunks: idle means none pinned
            self.unstage(obj, index)
        self._touched.discard(obj)
        if durable:  # not yet reported as held: now never will be
            self.newly_durable = [d for d in self.newly_durable if d[0] is not obj]
        self._held -= held
        self._freeing += held
        return held, durable

    async def _evict(self, objs: list[StoredObject], why: str) -> tuple[int, list[StoredObject]]:
        """Evict the idle ones of `objs` in one txn plus file deletions (a worker thread).
        Returns (bytes freed, objects evicted); objects in use are left alone."""
        claimed: list[tuple[StoredObject, int, list[int]]] = []
        for obj in objs:
            got = self._claim(obj)
            if got is not None:
                claimed.append((obj, *got))
        if not claimed:
            return 0, []
        metas = self._touched_metas(set())
        freeing = sum(held for _, held, _ in claimed)
        ok = False
        try:
            await trio.to_thread.run_sync(self._evict_blocking, [o for o, _, _ in claimed], metas)
            ok = True
        except (OSError, lmdb.Error) as exc:
            # Index untouched or file left behind: both safe (absent here, refetched on use;
            # gc or the next eviction removes the file).
            log.error("eviction of %d objects failed: %s", len(claimed), exc)
        finally:
            self._freeing -= freeing
            for obj, held, durable in claimed:
                done, obj.evicting = obj.evicting, None
                if done is not None:
                    done.set()
                if durable:
                    self.newly_removed.append((obj, durable))
                if held and ok:
                    self.evictions += 1
                    self.evicted_bytes += held
                    log.info("evicted object %s (%s): %s", obj.id[:12], _size(held), why)
            self.durable_event.set()
            self.notify()
        return (freeing if ok else 0), [o for o, _, _ in claimed]

    def _evict_blocking(self, objs: list[StoredObject], metas: list[tuple[bytes, bytes]]) -> None:
        """Index first, then files: a crash in between leaves only orphan files."""
        assert self._env is not None
        objects_db = self._db("objects")
        with self._write() as txn:
            for obj in objs:
                self._delete_chunks(txn, obj)
                txn.delete(bytes.fromhex(obj.id), db=objects_db)
            gone = {bytes.fromhex(o.id) for o in objs}
            self._put_metas(txn, [m for m in metas if m[0] not in gone])
        for obj in objs:
            self._unlink(obj)

    def _unlink(self, obj: StoredObject) -> int:
        """Close and delete an object's file (a later write creates it anew); the blocks
        it held. Under the I/O lock, so `fd()` never opens the file being deleted."""
        with self._io_lock:
            fds = (obj.fd, obj.direct_fd)
            obj.fd = obj.direct_fd = -1
            try:
                blocks = os.stat(obj.path).st_blocks * 512
                os.unlink(obj.path)
            except FileNotFoundError:
                blocks = 0
            finally:
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)
        return blocks

    async def make_room(self, nbytes: int, obj: StoredObject | None = None) -> None:
        """Reserve `nbytes` for a chunk write, evicting least recently used unpinned idle
        objects (whole objects) until used + nbytes <= cache_size. Release the reservation
        with `release_reservation(nbytes)` once the write is done or failed.

        `obj` is the object about to be written: never evicted here, and if it is being
        evicted this waits until that finished. Objects busy only for a moment (commit or
        write in progress, a read) are waited for up to `busy_wait` seconds.

        Raises:
            CacheFullError: what is left is pinned or in use; the message says how much is
                pinned against the budget.
        """
        while obj is not None and obj.evicting is not None:
            await obj.evicting.wait()
        if nbytes > self.cache_size:
            raise CacheFullError(
                f"a chunk of {_size(nbytes)} is larger than the whole cache budget of "
                f"{_size(self.cache_size)}: raise --cache-size"
            )
        give_up = trio.current_time() + self.busy_wait
        while self.used_bytes() + nbytes > self.cache_size:
            if self._held + self._reserved + nbytes <= self.cache_size:
                await self._changed(1.0)  # evictions under way free enough: wait for them
                continue
            victim = self._victim(obj)
            if victim is not None:
                await self._evict([victim], "least recently used, making room")
                continue
            if (self._freeing or self._waitable(obj)) and trio.current_time() < give_up:
                await self._changed(0.05)
                continue
            raise CacheFullError(self._full_message(nbytes))
        self._reserved += nbytes

    def release_reservation(self, nbytes: int) -> None:
        """Give back a `make_room` reservation (after `mark_written`, or on failure)."""
        self._reserved -= nbytes
        assert self._reserved >= 0, "released more than was reserved"

    def _waitable(self, keep: StoredObject | None) -> bool:
        """Some unpinned object other than `keep` holds bytes but is in use right now."""
        return any(
            o is not keep and o.written and o.id not in self._pins and self._busy(o)
            for o in self._objects.values()
        )

    async def _changed(self, timeout: float) -> None:
        """Wait for a chunk or object state change (readers in other threads don't signal:
        hence the timeout)."""
        with trio.move_on_after(timeout):
            await self.written_event.wait()

    def _full_message(self, nbytes: int) -> str:
        u = self.usage()
        other = self._held - u["pinned"]
        msg = (
            f"cache full: {_size(u['pinned'])} pinned (assigned datasets) and {_size(other)} "
            f"in use of a {_size(self.cache_size)} budget; cannot store {_size(nbytes)} more"
        )
        if u["pinned_over_budget"]:
            msg += (
                f" (the assigned datasets need {_size(u['pinned_size'])}, more than the budget:"
                " raise --cache-size or assign less to this node)"
            )
        return msg

    async def store_chunk(
        self, obj: StoredObject, index: int, data: memoryview, digest: str
    ) -> None:
        """Write a staged chunk within the budget and mark it written: `make_room`, the
        write in a thread, on ENOSPC an LRU eviction and one retry, then `mark_written`.

        On failure the chunk is unstaged (simply missing again; `obj.unstored[index]` says
        why) and the error raised: CacheFullError (budget full of what may not be
        evicted), DiskFullError (the filesystem, likewise), or OSError (another write error).
        """
        nbytes = len(data)
        try:
            await self.make_room(nbytes, obj)
            try:
                await self._write_retrying(obj, index, data)
                self.mark_written(obj, index, digest)
            finally:
                self.release_reservation(nbytes)
        except (CacheFullError, OSError) as exc:
            self.unstage(obj, index, cause=str(exc))
            raise

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
        freed = await self.evict_lru(2 * len(data), keep=obj)
        if not freed and self._freeing:  # another write's eviction is freeing space: wait
            freed = self._freeing
            with trio.move_on_after(self.busy_wait):
                while self._freeing:
                    await self._changed(1.0)
        if not freed:
            raise self._disk_full(
                f"disk full under {self.cache_dir} and nothing left to evict: {first}", first
            ) from first
        if not self._disk_limited_told:  # the normal state of a budget above the disk
            self._disk_limited_told = True
            log.info(
                "the disk under %s fills before the cache budget of %s: least recently used "
                "data is evicted to make room (the free space is the effective budget)",
                self.cache_dir,
                _size(self.cache_size),
            )
        log.debug("disk full writing chunk %d of %s: evicted %s", index, obj.id[:12], _size(freed))
        try:
            await trio.to_thread.run_sync(self.write_chunk, obj, index, data)
        except OSError as exc:
            if not is_enospc(exc):
                raise
            raise self._disk_full(
                f"disk full under {self.cache_dir} even after evicting {_size(freed)}: {exc}", exc
            ) from exc

    def _disk_full(self, message: str, cause: OSError) -> DiskFullError:
        """A chunk write refused for lack of space, with nothing left to evict: the
        disk-full episode (logged once) and the error for this chunk."""
        self.disk.refused("a chunk", cause)
        return DiskFullError(message)

    async def evict_lru(self, nbytes: int, keep: StoredObject | None = None) -> int:
        """Evict least recently used unpinned idle objects (never `keep`) until `nbytes`
        are freed or none is left, whatever the budget (a full disk). Bytes freed."""
        freed = 0
        while freed < nbytes:
            victim = self._victim(keep)
            if victim is None:
                break
            got, _ = await self._evict([victim], "least recently used, disk full")
            freed += got
        return freed

    async def enforce(self) -> int:
        """Evict least recently used unpinned idle objects until the cache is within its
        budget (after the budget was lowered across a restart, or pins changed). Logs
        when pinned or in-use data alone is over budget. Bytes freed."""
        freed = 0
        while self.used_bytes() > self.cache_size:
            victim = self._victim(None)
            if victim is None:
                log.warning("%s", self._full_message(0))
                break
            got, _ = await self._evict([victim], "over the cache budget")
            freed += got
        return freed

    async def evict(self, object_ids: Iterable[str]) -> EvictResult:
        """Evict these objects now, pinned or not (the caller decides policy): their index
        entries and files go, readers fetch them anew. Objects in use are skipped."""
        result = EvictResult()
        for oid in object_ids:
            obj = self._objects.get(oid)
            if obj is None:
                continue
            freed, done = await self._evict([obj], "on request")
            if done:
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
        for obj in list(self._objects.values()):
            if obj.written and obj.id not in referenced and obj.id not in self._pins:
                unreferenced.append(obj)
            elif not obj.written and not obj.staged:
                empty.append(obj)
        freed, _ = await self._evict(unreferenced, "not referenced by any dataset")
        if empty:
            _, _ = await self._evict(empty, "holds nothing")
        files: int = await trio.to_thread.run_sync(self._gc_blocking)
        return freed + files

    def _gc_blocking(self) -> int:
        freed = 0
        root = self.cache_dir / "objects"
        for sub in list(root.iterdir()):
            paths = list(sub.iterdir()) if sub.is_dir() else [sub]
            for path in paths:
                with self._io_lock:  # `fd()` opens files under this lock
                    known = self._objects.get(path.name)
                    if known is not None and known.path == path:
                        continue
                    if path.is_dir() and not path.is_symlink():
                        continue  # not a file we wrote: not ours to guess at
                    with contextlib.suppress(FileNotFoundError):
                        blocks = path.lstat().st_blocks * 512
                        path.unlink()
                        freed += blocks
                        log.info("gc: removed %s (not in the index)", path)
            if sub.is_dir():
                with self._io_lock, contextlib.suppress(OSError):
                    sub.rmdir()  # only if empty
        assert self._env is not None
        objects_db, chunks_db = self._db("objects"), self._db("chunks")
        with self._write() as txn:
            cursor = txn.cursor(db=chunks_db)
            orphans = 0
            if cursor.first():
                while cursor.key():
                    if txn.get(cursor.key()[:-4], db=objects_db) is None:
                        orphans += 1
                        if not cursor.delete():
                            break
                    elif not cursor.next():
                        break
            if orphans:
                log.info("gc: removed %d index entries of unknown objects", orphans)
        return freed

    def usage(self) -> dict[str, Any]:
        """Counters for status and metrics: bytes used against the budget, bytes held of
        pinned objects and the size they need, whether pinned data alone exceeds the
        budget, evictions so far, the filesystem's state (`DiskWatch.state`) and
        verification (chunks not yet re-verified, re-verified, dropped)."""
        pinned = pinned_size = 0
        for oid in self._pins:
            obj = self._objects.get(oid)
            held = obj.bytes_in(obj.written) if obj is not None else 0
            pinned += held
            size = self._pin_sizes.get(oid, obj.size if obj is not None else 0)
            pinned_size += max(size, held)
        return {
            "used": self.used_bytes(),
            "budget": self.cache_size,
            "reserved": self._reserved,
            "pinned": pinned,
            "pinned_size": pinned_size,
            "pinned_over_budget": pinned_size > self.cache_size,
            "evicted_bytes": self.evicted_bytes,
            "evictions": self.evictions,
            **self.disk.state(),
            "unverified": self.unverified_chunks(),
            "verified_chunks": self.verified_chunks,
            "dropped_chunks": self.dropped_chunks,
        }

    def listing(self) -> list[dict[str, Any]]:
        """What is cached (`cache ls`): per object holding bytes or pinned, most recently
        used first: id, size, held bytes, complete, pinned, in use, last used (epoch s)."""
        rows: list[dict[str, Any]] = []
        for obj in self._objects.values():
            pinned = obj.id in self._pins
            if not obj.written and not pinned:
                continue
            rows.append(
                {
                    "id": obj.id,
                    "size": obj.size,
                    "held": obj.bytes_in(obj.written),
                    "complete": obj.complete,
                    "pinned": pinned,
                    "in_use": self._busy(obj),
                    "last_used": obj.last_used,
                }
            )
        rows.sort(key=lambda r: r["last_used"], reverse=True)
        return rows

    # -- manifests known to this node (so a restart serves without the scheduler) -------

    def save_manifests(self, manifests: dict[str, str]) -> None:
        """Blocking: replace the stored manifest JSON documents (name -> JSON). Raises
        OSError (ENOSPC on a full disk) when they cannot be written."""
        assert self._env is not None
        db = self._db("manifests")
        try:
            with self._write() as txn:
                txn.drop(db, delete=False)
                for name, doc in manifests.items():
                    txn.put(name.encode(), doc.encode(), db=db)
        except lmdb.Error as exc:
            code = errno.ENOSPC if is_enospc(exc) else errno.EIO
            raise OSError(code, f"cannot save the manifests in the cache index: {exc}") from exc

    def load_manifests(self) -> dict[str, str]:
        assert self._env is not None
        db = self._db("manifests")
        with self._env.begin() as txn:
            return {k.decode(): v.decode() for k, v in txn.cursor(db=db)}
