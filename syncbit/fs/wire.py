"""The FUSE wire protocol's data: struct layouts, opcodes and flags from linux/fuse.h, the
records handlers answer with (entry attributes, open flags, statfs), the `Operations`
protocol a filesystem implements, and the encoders of entries and directory records.
Pure: no I/O, no session, no mount (`fs.kernel` does those).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

ROOT_INODE = 1
ENOATTR = errno.ENODATA

# -- wire layouts (linux/fuse.h) ----------------------------------------------------------
_IN = struct.Struct("<IIQQIIIHH")  # fuse_in_header
_OUT = struct.Struct("<IiQ")  # fuse_out_header
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr
_ENTRY = struct.Struct("<QQQQII")  # fuse_entry_out without its attr
_ATTR_OUT = struct.Struct("<QII")  # fuse_attr_out without its attr
_INIT_IN = struct.Struct("<IIIII")  # major, minor, max_readahead, flags, flags2
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
_OPEN_IN = struct.Struct("<II")
_OPEN_OUT = struct.Struct("<QIi")
_READ_IN = struct.Struct("<QQI")  # fh, offset, size (the rest unused)
_RELEASE_IN = struct.Struct("<Q")
_GETXATTR = struct.Struct("<II")
_DIRENT = struct.Struct("<QQII")
_STATFS = struct.Struct("<QQQQQIIII24x")
_NOTIFY_INVAL_ENTRY = struct.Struct("<QII")
_BACKING_MAP = struct.Struct("<iIQ")

_LOOKUP, _FORGET, _GETATTR, _OPEN, _READ, _STATFS_OP, _RELEASE = 1, 2, 3, 14, 15, 17, 18
_GETXATTR_OP, _LISTXATTR, _INIT, _OPENDIR, _READDIR, _RELEASEDIR = 22, 23, 26, 27, 28, 29
_ACCESS, _INTERRUPT, _DESTROY, _BATCH_FORGET, _READDIRPLUS = 34, 36, 38, 42, 44
_NO_REPLY = {_FORGET, _INTERRUPT, _BATCH_FORGET}
# Requests that would change something: a read-only filesystem refuses them.
_WRITES = {4, 6, 8, 9, 10, 11, 12, 13, 16, 21, 24, 35, 43, 45, 51}

_ASYNC_READ = 1 << 0
_BIG_WRITES = 1 << 5
_DO_READDIRPLUS = 1 << 13
_READDIRPLUS_AUTO = 1 << 14
_PARALLEL_DIROPS = 1 << 18
_MAX_PAGES = 1 << 22
_INIT_EXT = 1 << 30
_PASSTHROUGH2 = 1 << (37 - 32)  # in flags2

_FOPEN_KEEP_CACHE = 1 << 1
_FOPEN_PASSTHROUGH = 1 << 7
_NOTIFY_INVAL_ENTRY_CODE = 3
_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)

_MAX_PAGES_WANTED = 256  # 1 MiB reads, the kernel's default limit
_BUFFER = 128 * 1024 + 4096  # >= FUSE_MIN_READ_BUFFER; no request of ours carries data
_MNT_DETACH = 2


class FUSEError(Exception):
    """Raised by an operation: the request fails with this errno."""

    def __init__(self, errno_: int) -> None:
        super().__init__(os.strerror(errno_))
        self.errno = errno_


@dataclass
class EntryAttributes:
    st_ino: int = 0
    st_mode: int = 0
    st_nlink: int = 1
    st_size: int = 0
    st_blksize: int = 4096
    st_blocks: int = 0
    st_uid: int = 0
    st_gid: int = 0
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0

    def pack(self) -> bytes:
        a, m, c = (
            divmod(t, 1_000_000_000) for t in (self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns)
        )
        return _ATTR.pack(
            self.st_ino,
            self.st_size,
            self.st_blocks,
            a[0],
            m[0],
            c[0],
            a[1],
            m[1],
            c[1],
            self.st_mode,
            self.st_nlink,
            self.st_uid,
            self.st_gid,
            0,
            self.st_blksize,
            0,
        )


@dataclass
class FileInfo:
    """An open's answer. `backing_fd`: the file holds all the bytes, serve it directly."""

    fh: int
    keep_cache: bool = True
    backing_fd: int | None = None


@dataclass
class StatvfsData:
    f_bsize: int = 4096
    f_frsize: int = 4096
    f_blocks: int = 0
    f_bfree: int = 0
    f_bavail: int = 0
    f_files: int = 0
    f_ffree: int = 0
    f_namemax: int = 255


class Operations(Protocol):
    async def lookup(self, parent: int, name: bytes) -> EntryAttributes: ...
    async def getattr(self, inode: int) -> EntryAttributes: ...
    async def access(self, inode: int, mode: int) -> bool: ...
    async def opendir(self, inode: int) -> int: ...
    def readdir(self, fh: int, start: int) -> Iterable[tuple[bytes, EntryAttributes, int]]: ...
    async def open(self, inode: int, flags: int) -> FileInfo: ...
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview: ...
    async def release(self, fh: int) -> None: ...
    async def statfs(self) -> StatvfsData: ...
    async def getxattr(self, inode: int, name: bytes) -> bytes: ...
    async def listxattr(self, inode: int) -> list[bytes]: ...


def _timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def _entry(attr: EntryAttributes) -> bytes:
    ev, evn = _timeout(attr.entry_timeout)
    av, avn = _timeout(attr.attr_timeout)
    return _ENTRY.pack(attr.st_ino, 0, ev, av, evn, avn) + attr.pack()


def _dirent(ino: int, offset: int, name: bytes, mode: int) -> bytes:
    record = _DIRENT.pack(ino, offset, len(name), stat.S_IFMT(mode) >> 12) + name
    return record + b"\0" * (-len(record) % 8)
