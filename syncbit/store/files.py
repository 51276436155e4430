"""The cache directory on disk: object files (descriptors, O_DIRECT, pread, pwrite,
truncation, unlink), the lock file and the clean-shutdown marker. Blocking calls for worker
and peer threads, but `*_nowait` (trio thread); never decides what a file holds or keeps.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path

from syncbit.diskspace import is_enospc, size_text
from syncbit.errors import CacheLockedError, DiskFullError

log = logging.getLogger("syncbit.store")

ALIGN = 4096  # O_DIRECT needs buffers, offsets and lengths in whole blocks
_CLEAN = "clean-shutdown"  # marker file: the last `close` left index and files consistent

PWrite = Callable[[int, memoryview, int], None]


def page_buffer(size: int) -> mmap.mmap:
    """A zeroed, page-aligned buffer of `size` bytes (O_DIRECT needs the alignment), private
    to this process. Not `mmap.mmap(-1, size)`: that is a shared mapping backed by shmem,
    whose first fill costs more in page faults (16 MiB buffers made, filled and dropped:
    1.03 CPU-s per GiB shared, 0.66 private). Not transparent huge pages either: asked
    for with madvise they cut the faults 512-fold, but a 1 GiB S3 pull then spent 36% of
    the daemon's CPU zeroing them (fresh memory of this VM), against ~3% with base pages."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class ObjectFile:
    """One object's file, `<cache>/objects/<id[:2]>/<id>`: of the object's full size,
    sparse until complete, so a read is one `pread` and the peer service can `sendfile`.

    Descriptors open on first use and close only in `close`/`unlink`, under the cache
    dir's file lock (shared with gc; held for an open or a rename, never across an
    unlink or an fsync); the trio thread never takes it (`fd_nowait`). Whoever closes
    or unlinks makes sure nobody reads through the descriptor (the object is idle: see
    `ObjectTable.claim`).
    """

    __slots__ = ("_direct_fd", "_fd", "_lock", "label", "path", "size")

    def __init__(self, path: Path, size: int, lock: threading.Lock) -> None:
        self.path = path
        self.size = size
        self.label = path.name[:12]  # for messages
        self._fd = -1
        self._direct_fd = -1  # O_DIRECT descriptor for aligned chunk writes (-1: none)
        self._lock = lock

    def fd_nowait(self) -> int | None:
        """The descriptor if the file is open already, else None (never blocks)."""
        fd = self._fd
        return fd if fd >= 0 else None

    def fd(self, create: bool) -> int:
        """Blocking: the descriptor, opening (and sizing) the file on first use. `create`
        is False for an object that holds chunks: created anew its file would read as
        zeros where the index promised verified bytes, so FileNotFoundError instead (the
        read fails, a restart forgets the chunks)."""
        if self._fd >= 0:
            return self._fd
        with self._lock:
            if self._fd < 0:
                self._open(create)
        return self._fd

    def _open(self, create: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT,
                f"the file of cached object {self.label} is gone (deleted under the running "
                "daemon?); a restart fetches its chunks again",
                str(self.path),
            ) from None
        if os.fstat(fd).st_size != self.size:
            os.ftruncate(fd, self.size)
        try:
            self._direct_fd = os.open(self.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:  # tmpfs and some network filesystems
            self._direct_fd = -1
        self._fd = fd

    def write(self, data: memoryview, offset: int, pwrite: PWrite) -> None:
        """Blocking: write bytes at `offset` (the file is open). Page-aligned buffers of
        whole blocks go through O_DIRECT (no page-cache copy and no later writeback: on
        2 cores that halves the kernel CPU per cold byte); anything else (a short last
        chunk) through the page cache."""
        if self._direct_fd >= 0 and len(data) % ALIGN == 0 and offset % ALIGN == 0:
            try:
                pwrite(self._direct_fd, data, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: buffer not aligned after all
                    raise
        pwrite(self._fd, data, offset)

    def pread(self, offset: int, length: int) -> bytes:
        """Blocking read of held bytes."""
        return os.pread(self.fd(create=False), length, offset)

    def read_nowait(self, view: memoryview, offset: int) -> bool:
        """Fill `view` from the page cache without blocking (trio thread): False if that
        would need the disk or the file is not open yet."""
        fd = self.fd_nowait()
        if fd is None:
            return False
        try:
            n = os.preadv(fd, [view], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
        return n == len(view)

    def read_from_disk(self, offset: int, length: int) -> bytes | memoryview:
        """Blocking: bytes as the disk holds them, with O_DIRECT where the filesystem
        allows (no page-cache pollution), else through the page cache. Short at EOF."""
        buf = page_buffer(max(ALIGN, -(-length // ALIGN) * ALIGN))
        try:
            return bytes(memoryview(buf)[: self.readinto(buf, offset, length)])
        finally:
            buf.close()

    def readinto(self, buf: mmap.mmap, offset: int, length: int) -> int:
        """Blocking: fill the first `length` bytes of `buf` (page-aligned, a whole number
        of blocks long) from `offset`; the bytes read (short only at EOF). With O_DIRECT
        where the filesystem allows: chunks are written that way, so their bytes are not
        in the page cache, and filling it for one read costs more CPU than the disk read
        (and evicts what readers use)."""
        fd = self.fd(create=False)
        blocks = -(-length // ALIGN) * ALIGN
        if self._direct_fd >= 0 and offset % ALIGN == 0 and blocks <= len(buf):
            try:
                n = os.preadv(self._direct_fd, [memoryview(buf)[:blocks]], offset)
                return min(n, length)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here after all
                    raise
        return os.preadv(fd, [memoryview(buf)[:length]], offset)

    def sync(self) -> None:
        """Blocking: fdatasync (the file is open: it was just written)."""
        os.fdatasync(self.fd(create=False))

    def punch(self) -> None:
        """Blocking: free every block (truncate to nothing and back to full size)."""
        fd = self.fd(create=True)
        os.ftruncate(fd, 0)
        os.ftruncate(fd, self.size)

    def close(self) -> None:
        """Blocking: close the descriptors (a later use opens the file again)."""
        with self._lock:
            self._close()

    def unlink(self) -> int:
        """Blocking: close and delete the file (a later write creates it anew); the bytes
        of blocks it held. Renamed aside under the lock, so no thread opens it meanwhile,
        and deleted outside it: freeing a large file's blocks takes a while."""
        with self._lock:
            self._close()
            gone = _aside(self.path)
            try:
                blocks = os.stat(self.path).st_blocks * 512
                os.rename(self.path, gone)
            except FileNotFoundError:
                return 0
        os.unlink(gone)
        return blocks

    def _close(self) -> None:
        fds = (self._fd, self._direct_fd)
        self._fd = self._direct_fd = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class SpaceTaken:
    """Bytes of a chunk write in flight (see `CacheDir.room_for`), given back on exit."""

    __slots__ = ("_cache", "_nbytes")

    def __init__(self, cache: CacheDir, nbytes: int) -> None:
        self._cache = cache
        self._nbytes = nbytes

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        self._cache._give_back(self._nbytes)


def _aside(path: Path) -> Path:
    """Where a file goes between its rename and its unlink (gc removes leftovers: no
    object has such a name)."""
    return path.with_name(f".{path.name}.gone")


class CacheDir:
    """The cache directory itself: `objects/`, the lock file (held while the store is
    open), the clean-shutdown marker, the space chunk writes may take, and stray files."""

    def __init__(self, root: Path, lock_fd: int) -> None:
        self.root = root
        self.objects = root / "objects"
        self._lock_fd = lock_fd
        self.headroom = 1 << 20  # bytes of disk left free for the index (0: none)
        self._inflight = 0  # bytes of chunk writes in progress (worker threads)
        self._space_lock = threading.Lock()
        self._file_lock = threading.Lock()  # see ObjectFile

    @classmethod
    def lock(cls, root: Path) -> CacheDir:
        """Blocking: take the cache dir (CacheLockedError if another daemon has it). Works
        on a 100% full filesystem once the dir exists; a new one that cannot be created
        for lack of space raises DiskFullError."""
        try:
            (root / "objects").mkdir(parents=True, exist_ok=True)
            # Cached bytes of a root-only source file are root-only here too: only the
            # daemon (passthrough hands the kernel its own descriptors) reads object files.
            os.chmod(root / "objects", 0o700)
            fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if is_enospc(exc):
                raise DiskFullError(f"no space left to create cache dir {root}") from exc
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CacheLockedError(
                f"cache dir {root} is in use by another syncbit daemon (pid {holder or '?'})"
            ) from None
        cache = cls(root, fd)
        cache._write_pid()
        return cache

    def _write_pid(self) -> None:
        """Who holds the lock, for the error of a second daemon: written over the old pid
        before truncating (no new block needed), and skipped on a full disk."""
        data = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(self._lock_fd, data, 0)
            os.ftruncate(self._lock_fd, len(data))
        except OSError as exc:
            log.debug("cannot record the pid in %s/lock: %s", self.root, exc)

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def file(self, object_id: str, size: int) -> ObjectFile:
        return ObjectFile(self.objects / object_id[:2] / object_id, size, self._file_lock)

    # -- the clean-shutdown marker -------------------------------------------------------

    def clean_marker(self) -> bool:
        """Blocking: whether the last run shut down cleanly."""
        return (self.root / _CLEAN).exists()

    def take_clean_marker(self) -> None:
        """Blocking: remove the marker, durably: a crash of this run must never pass for a
        clean shutdown."""
        os.unlink(self.root / _CLEAN)
        self._sync_dir()

    def leave_clean_marker(self) -> None:
        """Blocking: record a clean shutdown (after the index was synced and closed). A
        failure only costs the next start a verification pass."""
        try:
            fd = os.open(self.root / _CLEAN, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._sync_dir()
        except OSError as exc:
            log.warning(
                "cannot record a clean shutdown in %s (%s): the next start re-verifies the cache",
                self.root,
                exc,
            )

    def _sync_dir(self) -> None:
        dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- space -----------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Blocking: bytes an unprivileged writer may still allocate here."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def room_for(self, fd: int, nbytes: int) -> SpaceTaken:
        """Blocking: `with cache.room_for(fd, n):` around a chunk write of `n` bytes to
        `fd`. Raises ENOSPC without writing when the disk would keep less than `headroom`
        free, counting the writes other threads have in flight: a disk filled to the last
        block leaves nothing for anything else on it (the index has its own reserve)."""
        with self._space_lock:
            if self.headroom:
                disk = os.fstatvfs(fd)
                free = disk.f_bavail * disk.f_frsize - self._inflight
                if free < nbytes + self.headroom:
                    raise OSError(
                        errno.ENOSPC,
                        f"No space left under {self.root} (keeping "
                        f"{size_text(self.headroom)} free)",
                    )
            self._inflight += nbytes
        return SpaceTaken(self, nbytes)

    def _give_back(self, nbytes: int) -> None:
        with self._space_lock:
            self._inflight -= nbytes

    # -- gc ----------------------------------------------------------------------------------

    def remove_strays(self, known: Callable[[Path], bool]) -> int:
        """Blocking: delete files under objects/ that are no known object's file: a crash
        between an eviction's index txn and its unlink leaves them. Directories we did not
        write are left alone. Bytes freed."""
        freed = 0
        for sub in list(self.objects.iterdir()):
            paths = list(sub.iterdir()) if sub.is_dir() else [sub]
            for path in paths:
                if path.is_dir() and not path.is_symlink():
                    continue  # not a file we wrote: not ours to guess at
                blocks = self._set_aside(path, known)
                if blocks is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(_aside(path))
                    freed += blocks
                    log.info("gc: removed %s (not in the index)", path)
            if sub.is_dir():
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only if empty
        return freed

    def _set_aside(self, path: Path, known: Callable[[Path], bool]) -> int | None:
        """Rename a stray file aside, checked under the file lock so that an object created
        meanwhile opens a file of its own; its blocks, or None if it is no stray."""
        with self._file_lock:
            if known(path):
                return None
            try:
                blocks = path.lstat().st_blocks * 512
                os.rename(path, _aside(path))
            except FileNotFoundError:
                return None
        return blocks
