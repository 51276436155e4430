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
  I/O handed to them (pwrite, fdatasync, pread, LMDB commit) and peer-service threads only
  read `durable` membership, which is safe under the GIL.
- LMDB write transactions are short, run in a worker thread, and never span an `await`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import trio

from syncbit.chunks import chunk_count, chunk_length
from syncbit.errors import CacheLockedError

log = logging.getLogger("syncbit.store")

_MAP_SIZE = 1 << 36  # virtual; LMDB grows the file only as needed


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _chunk_key(object_id: str, index: int) -> bytes:
    return bytes.fromhex(object_id) + index.to_bytes(4, "big")


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
    last_used: float = 0.0
    discards: int = 0  # bumped when the content is thrown away (failed verification)

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def has(self, index: int) -> bool:
        """Readable by this process (staged in RAM or written to the object file)."""
        return index in self.written or index in self.staged

    def has_range(self, offset: int, length: int) -> bool:
        """True if every chunk covering [offset, offset+length) is durable (peer service)."""
        if length <= 0:
            return True
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size
        durable = self.durable
        return all(i in durable for i in range(first, last + 1))

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


class ObjectStore:
    """The cache directory: objects, index, lock. Build with `ObjectStore.open()`."""

    def __init__(self, cache_dir: Path, cache_size: int, staged_chunks: int = 32) -> None:
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
        self._pinned: set[tuple[StoredObject, int]] = set()
        self.staged_chunks = staged_chunks
        self.direct_io = True
        self._io_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._dbs: dict[str, lmdb._Database] = {}  # serialises lazy fd opening across threads
        self.newly_durable: list[tuple[StoredObject, int, str]] = []  # for the reporter
        self.durable_event = trio.Event()
        self.written_event = trio.Event()  # set (and replaced) whenever a chunk is written
        self.newly_removed: list[tuple[StoredObject, list[int]]] = []  # for the reporter

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def open(cls, cache_dir: Path, cache_size: int, staged_chunks: int = 32) -> ObjectStore:
        """Lock `cache_dir` (CacheLockedError if another daemon has it) and load the index."""
        store = cls(cache_dir, cache_size, staged_chunks)
        (cache_dir / "objects").mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CacheLockedError(
                f"cache dir {cache_dir} is in use by another syncbit daemon (pid {holder or '?'})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        store._lock_fd = fd
        store._env = lmdb.open(
            str(cache_dir / "index.lmdb"), max_dbs=4, map_size=_MAP_SIZE, metasync=False
        )
        for name in ("objects", "chunks", "manifests"):  # all handles before any thread runs
            store._db(name)
        store._load()
        return store

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
        with self._write_lock, self._env.begin(write=True) as txn:
            yield txn

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
        held = sum(len(o.durable) for o in self._objects.values())
        log.info(
            "cache %s: %d objects, %d chunks present", self.cache_dir, len(self._objects), held
        )

    def close(self) -> None:
        """Close files and the index, release the lock. Pending (non-durable) chunks are
        dropped: they were never marked present, so nothing is lost but the transfer."""
        for obj in self._objects.values():
            for fd in (obj.fd, obj.direct_fd):
                if fd >= 0:
                    os.close(fd)
            obj.fd = obj.direct_fd = -1
        if self._env is not None:
            self._env.sync(True)
            self._env.close()
            self._env = None
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
        obj.last_used = time.time()
        return obj

    def get(self, object_id: str) -> StoredObject | None:
        return self._objects.get(object_id)

    def objects(self) -> Iterator[StoredObject]:
        return iter(list(self._objects.values()))

    def cached_bytes(self) -> int:
        return sum(o.held_bytes() for o in self._objects.values())

    def fd(self, obj: StoredObject) -> int:
        """The object's file descriptor, opening (and sizing) the file on first use."""
        if obj.fd < 0:
            with self._io_lock:
                if obj.fd < 0:
                    obj.path.parent.mkdir(exist_ok=True)
                    fd = os.open(obj.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
        O_DIRECT; anything else (a short last chunk) through the page cache.
        """
        fd = self.fd(obj)
        offset = index * obj.chunk_size
        if obj.direct_fd >= 0 and len(data) % _ALIGN == 0 and offset % _ALIGN == 0:
            try:
                _pwrite_all(obj.direct_fd, data, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: buffer not aligned after all
                    raise
        _pwrite_all(fd, data, offset)

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

    def read_parts(self, obj: StoredObject, offset: int, length: int) -> list[bytes | range]:
        """Bytes of [offset, offset+length) of a held range, without blocking (trio thread).

        Staged chunks are copied from RAM here, where nothing can recycle their buffers;
        page-cached runs are read with RWF_NOWAIT. What would need the disk comes back as a
        `range` of file offsets for the caller to `pread` in a thread: those chunks are
        written, so the file has them.
        """
        cs = obj.chunk_size
        parts: list[bytes | range] = []
        pos, end = offset, offset + length
        while pos < end:
            index = pos // cs
            stop = min(end, (index + 1) * cs)
            view = obj.staged.get(index)
            if view is not None:
                parts.append(bytes(view[pos - index * cs : stop - index * cs]))
                self._touch(obj, index)
            else:
                while stop < end and (stop // cs) not in obj.staged:
                    stop = min(end, stop + cs)  # one pread for a run of written chunks
                data = self.read_nowait(obj, pos, stop - pos)
                parts.append(range(pos, stop) if data is None else data)
            pos = stop
        return parts

    # -- presence (trio thread) ---------------------------------------------------------

    def stage(
        self, obj: StoredObject, index: int, data: memoryview, release: Callable[[], None]
    ) -> None:
        """Make verified bytes readable from RAM now; pinned until `mark_written`.
        `release` gives the buffer back once the chunk leaves RAM."""
        obj.staged[index] = data
        key = (obj, index)
        self._pinned.add(key)
        self._recent[key] = release
        self._trim()

    def unstage(self, obj: StoredObject, index: int) -> None:
        """Drop a staged chunk whose write failed (it is simply missing again)."""
        key = (obj, index)
        self._pinned.discard(key)
        release = self._recent.pop(key, None)
        obj.staged.pop(index, None)
        if release is not None:
            release()

    def _touch(self, obj: StoredObject, index: int) -> None:
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
            if key in self._pinned:
                continue
            release = self._recent.pop(key)
            key[0].staged.pop(key[1], None)
            release()
            excess -= 1

    def mark_written(self, obj: StoredObject, index: int, digest: str) -> None:
        """Record a verified, written chunk; it becomes durable at the next commit."""
        obj.written.add(index)
        self._pinned.discard((obj, index))
        self._trim()
        self.notify()
        obj.digests[index] = digest
        self._pending.append((obj, index, digest))
        self._pending_event.set()

    async def commit_loop(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Group commit: fdatasync touched objects, then index their chunks in one txn."""
        task_status.started()
        while True:
            await self._pending_event.wait()
            await self.flush()

    async def flush(self) -> None:
        """Make every written chunk durable now."""
        self._pending_event = trio.Event()
        batch, self._pending = self._pending, []
        if not batch:
            return
        await trio.to_thread.run_sync(self._commit_blocking, batch)
        for obj, index, _digest in batch:
            obj.durable.add(index)
        self.newly_durable.extend(batch)
        self.durable_event.set()

    def _commit_blocking(self, batch: list[tuple[StoredObject, int, str]]) -> None:
        for fd in {self.fd(obj) for obj, _, _ in batch}:
            os.fdatasync(fd)
        assert self._env is not None
        objects_db, chunks_db = self._db("objects"), self._db("chunks")
        with self._write() as txn:
            for obj in {obj for obj, _, _ in batch}:
                meta = {"size": obj.size, "chunk_size": obj.chunk_size, "last_used": obj.last_used}
                txn.put(bytes.fromhex(obj.id), json.dumps(meta).encode(), db=objects_db)
            for obj, index, digest in batch:
                txn.put(_chunk_key(obj.id, index), bytes.fromhex(digest), db=chunks_db)

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
        held = sorted(obj.written | obj.durable)
        for index in list(obj.staged):
            self.unstage(obj, index)
        obj.written.clear()
        obj.durable.clear()
        obj.digests.clear()
        obj.discards += 1
        self._pending = [p for p in self._pending if p[0] is not obj]
        await trio.to_thread.run_sync(self._discard_blocking, obj)
        self.newly_removed.append((obj, held))
        self.durable_event.set()
        self.notify()

    def _discard_blocking(self, obj: StoredObject) -> None:
        assert self._env is not None
        chunks_db = self._db("chunks")
        with self._write() as txn:
            for index in range(obj.chunks):
                txn.delete(_chunk_key(obj.id, index), db=chunks_db)
        fd = self.fd(obj)
        os.ftruncate(fd, 0)  # frees the blocks
        os.ftruncate(fd, obj.size)

    # -- manifests known to this node (so a restart serves without the scheduler) -------

    def save_manifests(self, manifests: dict[str, str]) -> None:
        """Blocking: replace the stored manifest JSON documents (name -> JSON)."""
        assert self._env is not None
        db = self._db("manifests")
        with self._write() as txn:
            txn.drop(db, delete=False)
            for name, doc in manifests.items():
                txn.put(name.encode(), doc.encode(), db=db)

    def load_manifests(self) -> dict[str, str]:
        assert self._env is not None
        db = self._db("manifests")
        with self._env.begin() as txn:
            return {k.decode(): v.decode() for k, v in txn.cursor(db=db)}
