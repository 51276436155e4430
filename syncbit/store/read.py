"""Reading an object's bytes (RAM, page cache without blocking, disk in a thread) and the
descriptors sendfile and FUSE passthrough need, only inside a reading section. Never
checks presence itself: the caller does, inside the section.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import trio

from syncbit.store.files import page_buffer
from syncbit.store.objects import Reading, StoredObject
from syncbit.store.staging import Staging

Part = bytes | memoryview | range


class Hasher(Protocol):
    """What `hash_into` feeds: a hashlib object."""

    def update(self, data: bytes | memoryview, /) -> None: ...


class ReadBuffer:
    """One reused buffer for non-blocking reads on the trio thread: a fresh 1 MiB
    bytearray costs ~0.8 ms in page faults, 20x the read itself."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray(1 << 20)

    def view(self, length: int) -> memoryview:
        if len(self.buf) < length:
            self.buf = bytearray(length)
        return memoryview(self.buf)[:length]


_local = threading.local()
# Reads the next blocks of a file being hashed while the caller hashes one: the disk and
# SHA-256 overlap instead of taking turns. A pull's whole-file hash reads back
# what left RAM before its turn came (chunks are written with O_DIRECT, so from the disk,
# which the pull's own writes keep busy): taking turns, it ran at half its CPU speed and
# finished up to 0.5 s after a 1 GiB download's last byte.
_READ_AHEAD = ThreadPoolExecutor(max_workers=4, thread_name_prefix="syncbit-hash-read")
_HASH_BLOCK = 4 << 20
_HASH_DEPTH = 4  # blocks: one hashed, the others read meanwhile (the disk serves several at once)


def _hash_buffers() -> list[mmap.mmap]:
    """This thread's page-aligned buffers for `hash_into` (O_DIRECT reads need them;
    fresh ones per call cost more in page faults than a chunk's hash): the rest are read
    into while one is hashed."""
    bufs: list[mmap.mmap] | None = getattr(_local, "hash_buffers", None)
    if bufs is None:
        bufs = _local.hash_buffers = [page_buffer(_HASH_BLOCK) for _ in range(_HASH_DEPTH)]
    return bufs


class ObjectReader(Reading):
    """A reading section on one object, and the ways to its bytes. Which thread may call
    what is said per method."""

    __slots__ = ("_buffer", "_staging")

    def __init__(
        self, lock: threading.Lock, obj: StoredObject, staging: Staging, buffer: ReadBuffer
    ) -> None:
        # Reading.__init__ inlined: one of these per read of the mount.
        self._lock = lock
        self.obj = obj
        self._staging = staging
        self._buffer = buffer

    def fd(self) -> int:
        """Blocking (peer-service or worker thread): the object file's descriptor, for
        sendfile; valid until the section ends."""
        return self.obj.file.fd(create=not self.obj.written)

    def pread(self, offset: int, length: int) -> bytes:
        """Blocking (worker or peer-service thread): bytes of written chunks."""
        return self.obj.file.pread(offset, length)

    def hash_into(self, h: Hasher, offset: int, length: int) -> None:
        """Blocking (worker thread): feed bytes [offset, offset+length) of the object file
        to `h` (hashlib releases the GIL), read as the disk holds them, the next blocks
        read while one is hashed. A file shorter than the range fails it (OSError)."""
        end = offset + length
        file = self.obj.file

        def fill(buf: mmap.mmap, at: int) -> int:
            # Whole blocks or none: the next block is already asked for past this one.
            want = min(len(buf), end - at)
            if file.readinto(buf, at, want) != want:
                raise OSError(errno.EIO, f"short read of object {self.obj.id[:12]}")
            return want

        free = list(_hash_buffers())
        reads: deque[tuple[Future[int], mmap.mmap]] = deque()
        at = offset
        try:
            while reads or at < end:
                while at < end and free:
                    buf = free.pop()
                    reads.append((_READ_AHEAD.submit(fill, buf, at), buf))
                    at += min(len(buf), end - at)
                future, buf = reads.popleft()
                h.update(memoryview(buf)[: future.result()])
                free.append(buf)
        finally:
            for future, _ in reads:  # this thread's buffers: not reused while read into
                future.exception()

    def sha256(self) -> str:
        """Blocking (worker thread): SHA-256 of the whole object file."""
        h = hashlib.sha256()
        self.hash_into(h, 0, self.obj.size)
        return h.hexdigest()

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """Trio thread: page-cached bytes, or None if reading them would touch the disk."""
        view = self._buffer.view(length)
        if not self.obj.file.read_nowait(view, offset):
            return None
        return bytes(view)

    def parts(self, offset: int, length: int) -> list[Part]:
        """Trio thread, never blocking: bytes of [offset, offset+length) of a held range.

        Staged chunks come back as views of their RAM buffers, not copies: valid only until
        the trio thread next yields (a buffer is recycled only from the trio thread), so
        the caller must use or copy them before any checkpoint. Page-cached runs are read
        with RWF_NOWAIT. What would need the disk comes back as a `range` of file offsets
        for the caller to `pread` in a thread: those chunks are written, so the file has
        them.
        """
        obj, staging = self.obj, self._staging
        cs = obj.chunk_size
        parts: list[Part] = []
        pos, end = offset, offset + length
        while pos < end:
            index = pos // cs
            stop = min(end, (index + 1) * cs)
            view = staging.view(obj, index)
            if view is not None:
                parts.append(view[pos - index * cs : stop - index * cs])
            else:
                while stop < end and not staging.holds(obj, stop // cs):
                    stop = min(end, stop + cs)  # one pread for a run of written chunks
                data = self.read_nowait(pos, stop - pos)
                parts.append(range(pos, stop) if data is None else data)
            pos = stop
        return parts


class BackingFile:
    """The capability to serve one object's file directly (FUSE passthrough), handed to
    the fetch layer's open handle: `fd()` gives a descriptor only while every byte is
    here and verified."""

    __slots__ = ("_lock", "obj")

    def __init__(self, lock: threading.Lock, obj: StoredObject) -> None:
        self._lock = lock
        self.obj = obj

    def _ready(self) -> bool:
        # After an unclean shutdown not before every chunk is re-verified: the kernel
        # would read them unchecked.
        obj = self.obj
        return obj.size > 0 and obj.complete and not obj.unverified

    async def fd(self) -> int | None:
        """Trio thread: the object file's descriptor if the kernel may read the whole file
        itself, else None. Opened in a worker thread if need be; valid until the caller's
        next checkpoint (the kernel takes its own reference when it registers it)."""
        if not self._ready():
            return None
        with Reading(self._lock, self.obj):
            fd = self.obj.file.fd_nowait()
            if fd is None:
                fd = await trio.to_thread.run_sync(self.obj.file.fd, False)
            return fd if self._ready() else None  # removed while it opened
