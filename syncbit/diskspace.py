"""Living with a full filesystem, for every part of syncbit that writes: LMDB environments
that can always commit (the node's cache index, the scheduler's state) and a log that
never dies of ENOSPC. The cache filesystem's disk-full episodes are the store's
(`syncbit.store.disk`).

Owns two rules. An LMDB environment opened here never gets SIGBUS from its lock file on
a full filesystem (the file is allocated before LMDB maps it) and keeps a reserve of
blocks allocated past the end of its data file, so the small commits that free space
(evictions, drops) and record state still succeed when the filesystem is 100% full. Log
records that cannot be written are counted, never raised. Decides nothing about what to
evict or fetch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path
from typing import Any

import lmdb

from syncbit.errors import DiskFullError
from syncbit.humanize import size_text as size_text  # re-exported: store.py reads it here

log = logging.getLogger("syncbit.disk")

# LMDB's lock file for its default 126 readers is 8 KiB (64-byte reader slots after a
# header): allocated in full before LMDB maps it, since a write fault on a hole of a
# mapped file on a full tmpfs or ext4 is SIGBUS, which kills the process.
_LOCK_BYTES = 8192
INDEX_RESERVE = 8 << 20  # blocks kept allocated past an environment's data, for commits;
# at most this share of the filesystem (a test's 64 MiB filesystem gets 4 MiB)
_RESERVE_SHARE = 16
_FALLOC_FL_KEEP_SIZE = 1

_libc: Any = None


def is_enospc(exc: BaseException) -> bool:
    """A full disk, as the OS or LMDB reports it (LMDB errors carry only the message)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left" in str(exc) or "quota exceeded" in str(exc).lower()


def free_bytes(path: Path | int) -> int:
    """Blocking: bytes an unprivileged writer may still allocate on the filesystem."""
    st = os.fstatvfs(path) if isinstance(path, int) else os.statvfs(path)
    return st.f_bavail * st.f_frsize


def allocate_past_end(fd: int, nbytes: int) -> bool:
    """Blocking: make sure `nbytes` past the end of the file are allocated, without
    changing its size (fallocate KEEP_SIZE), so later appends need no free block. False
    when the filesystem has no room for all of it or cannot do this."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    end = os.fstat(fd).st_size
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, end, nbytes) == 0:
        return True
    err = ctypes.get_errno()
    if err not in (errno.ENOSPC, errno.EDQUOT, errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    return False


class IndexReserve:
    """The blocks kept allocated past the end of an LMDB data file (see the module
    docstring). `top_up()` after each write transaction: one fstat, and one fallocate
    only when the file grew into the reserve. Any thread; callers serialise writes."""

    def __init__(self, data_file: Path, nbytes: int = INDEX_RESERVE) -> None:
        self.data_file = data_file
        self.nbytes = nbytes
        self._size = -1  # the data file's size at the last successful top-up

    def top_up(self) -> None:
        if not self.nbytes:
            return
        try:
            fd = os.open(self.data_file, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            size = os.fstat(fd).st_size
            if size != self._size and allocate_past_end(fd, self.nbytes):
                self._size = size
        except OSError as exc:  # the reserve is a safety margin, never a reason to fail
            log.debug("cannot keep a reserve for %s: %s", self.data_file, exc)
        finally:
            os.close(fd)


def open_env(
    path: Path, reserve: int = INDEX_RESERVE, **kwargs: Any
) -> tuple[lmdb.Environment, IndexReserve]:
    """Blocking: `lmdb.open(path, **kwargs)` that survives a full filesystem: its lock file
    allocated before LMDB maps it (never SIGBUS), and up to `reserve` bytes allocated past
    the end of its data file: the returned `IndexReserve`, to top up after each write
    transaction. Raises DiskFullError when the filesystem has no room to create the
    environment; other errors as lmdb.Error or OSError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        _allocate_lock_file(path / "lock.mdb")
        env = lmdb.open(str(path), **kwargs)
    except (OSError, lmdb.Error) as exc:
        if is_enospc(exc):
            raise DiskFullError(f"no space left under {path} to open the index: {exc}") from exc
        raise
    with contextlib.suppress(OSError):
        _allocate_lock_file(path / "lock.mdb")  # in case LMDB made it larger
    st = os.statvfs(path)
    share = st.f_blocks * st.f_frsize // _RESERVE_SHARE
    keep = IndexReserve(path / "data.mdb", min(reserve, share))
    keep.top_up()
    return env, keep


def _allocate_lock_file(lock: Path) -> None:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(_LOCK_BYTES, os.fstat(fd).st_size))
    finally:
        os.close(fd)


class LogHandler(logging.Handler):
    """Log records to a file descriptor (stderr), surviving a full disk: a record that
    cannot be written is counted, never raised nor reported with a traceback (which
    could not be written either); the next record that can be written is preceded by a
    line saying how many were lost (on a line of its own, after a record cut short).
    Unbuffered, so nothing half-written waits in a buffer to surface later out of order."""

    def __init__(self, fd: int = 2) -> None:
        super().__init__()
        self.fd = fd
        self.lost = 0
        self._cut = False  # the last record was written in part: end its line first

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        if self.lost:
            notice = logging.LogRecord(
                "syncbit.log",
                logging.WARNING,
                __file__,
                0,
                "%d log records were lost: no space left to write them",
                (self.lost,),
                None,
            )
            line = self.format(notice) + "\n" + line
        data = (("\n" if self._cut else "") + line).encode(errors="replace")
        whole = len(data)
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            self.lost += 1
            self._cut = self._cut or len(data) < whole
            return
        self.lost = 0
        self._cut = False
