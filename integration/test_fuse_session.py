"""The FUSE protocol layer on a real mount, with a toy filesystem: the requests a reader's
system calls turn into, passthrough for files the ops say are whole, the helper mount."""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from syncbit.fs.kernel import Session
from syncbit.fs.wire import (
    ENOATTR,
    ROOT_INODE,
    EntryAttributes,
    FileInfo,
    FUSEError,
    StatvfsData,
)

T = TypeVar("T")
BODY = os.urandom(3 * 2**20 + 123)
FILE_INODE, DIR_INODE = 2, 3
MANY = 600


class Toy:
    """/f (BODY, backed by a real file when `whole`) and /d (an empty directory)."""

    def __init__(self, backing: Path) -> None:
        self.backing_fd = os.open(backing, os.O_RDONLY)
        self.whole = True
        self.reads = 0
        self.released: list[int] = []
        self._fh = 0

    def _attr(self, inode: int) -> EntryAttributes:
        if inode == FILE_INODE:
            return EntryAttributes(st_ino=inode, st_mode=stat.S_IFREG | 0o444, st_size=len(BODY))
        if inode in (ROOT_INODE, DIR_INODE):
            return EntryAttributes(st_ino=inode, st_mode=stat.S_IFDIR | 0o555, st_nlink=2)
        raise FUSEError(errno.ENOENT)

    async def lookup(self, parent: int, name: bytes) -> EntryAttributes:
        found = {b"f": FILE_INODE, b"d": DIR_INODE}.get(name) if parent == ROOT_INODE else None
        if parent == DIR_INODE and name.endswith(b"x" * 200):
            found = FILE_INODE
        if found is None:
            raise FUSEError(errno.ENOENT)
        return self._attr(found)

    async def getattr(self, inode: int) -> EntryAttributes:
        return self._attr(inode)

    async def access(self, inode: int, mode: int) -> bool:
        return not mode & os.W_OK

    async def opendir(self, inode: int) -> int:
        return inode

    def readdir(self, fh: int, start: int) -> Iterable[tuple[bytes, EntryAttributes, int]]:
        names = [(b"d", DIR_INODE), (b"f", FILE_INODE)] if fh == ROOT_INODE else []
        if fh == DIR_INODE:  # many entries with long names: READDIR takes several rounds
            names = [(b"%04d-" % i + b"x" * 200, FILE_INODE) for i in range(MANY)]
        for position, (name, inode) in enumerate(names[start:], start + 1):
            yield name, self._attr(inode), position

    async def open(self, inode: int, flags: int) -> FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FUSEError(errno.EROFS)
        self._fh += 1
        return FileInfo(self._fh, backing_fd=self.backing_fd if self.whole else None)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.reads += 1
        return BODY[off : off + size]

    async def release(self, fh: int) -> None:
        self.released.append(fh)

    async def statfs(self) -> StatvfsData:
        return StatvfsData(f_blocks=42, f_files=3)

    async def getxattr(self, inode: int, name: bytes) -> bytes:
        if name != b"user.toy":
            raise FUSEError(ENOATTR)
        return b"yes"

    async def listxattr(self, inode: int) -> list[bytes]:
        return [b"user.toy"]


@asynccontextmanager
async def mounted(tmp_path: Path, **options: bool) -> AsyncIterator[tuple[Toy, Session, Path]]:
    backing = tmp_path / "backing"
    backing.write_bytes(BODY)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    toy = Toy(backing)
    session = Session(toy, mnt, **options)
    session.mount("default_permissions")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            with trio.fail_after(10):
                await session.initialized.wait()
            yield toy, session, mnt
            nursery.cancel_scope.cancel()
    finally:
        session.close()
        os.close(toy.backing_fd)
    assert not os.path.ismount(mnt)


def _read(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def _mapped(path: Path) -> bytes:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return m[:]


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    result: T = await trio.to_thread.run_sync(fn, *args)
    return result


async def _drop_page_cache(path: Path) -> None:
    def drop() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    await _in_thread(drop)


async def test_a_whole_file_is_read_by_the_kernel_itself(tmp_path: Path) -> None:
    async with mounted(tmp_path) as (toy, session, mnt):
        if not session.kernel_passthrough:
            pytest.skip("this kernel offers no FUSE passthrough")
        assert await _in_thread(_read, mnt / "f") == BODY
        assert await _in_thread(_mapped, mnt / "f") == BODY  # mmap faults too
        assert toy.reads == 0 and session.passthrough_opens == 2


async def test_opens_of_one_inode_stay_in_the_mode_of_the_first(tmp_path: Path) -> None:
    async with mounted(tmp_path) as (toy, session, mnt):
        if not session.kernel_passthrough:
            pytest.skip("this kernel offers no FUSE passthrough")
        toy.whole = False  # still being fetched: READ requests
        first = await _in_thread(lambda: open(mnt / "f", "rb", buffering=0))  # noqa: SIM115 (closed below)
        try:
            assert await _in_thread(first.read) == BODY
            reads = toy.reads
            assert reads > 0
            toy.whole = True  # the last chunk landed while the file is open
            await _drop_page_cache(mnt / "f")
            # The kernel would fail a passthrough open of a cached-mode inode with EIO.
            assert await _in_thread(_read, mnt / "f") == BODY
            assert toy.reads > reads and session.passthrough_opens == 0
        finally:
            await _in_thread(first.close)
        with trio.fail_after(5):
            while len(toy.released) < 2:  # RELEASE is sent after close() returns
                await trio.sleep(0.01)
        reads = toy.reads
        assert await _in_thread(_read, mnt / "f") == BODY
        assert toy.reads == reads and session.passthrough_opens == 1


async def test_a_backing_file_the_kernel_refuses_means_reads_come_to_the_ops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with mounted(tmp_path) as (toy, session, mnt):
        if not session.kernel_passthrough:
            pytest.skip("this kernel offers no FUSE passthrough")
        pipe_r, pipe_w = os.pipe()  # not a regular file: FUSE_DEV_IOC_BACKING_OPEN says EINVAL
        real, toy.backing_fd = toy.backing_fd, pipe_r
        try:
            for _ in range(2):
                assert await _in_thread(_read, mnt / "f") == BODY
        finally:
            toy.backing_fd = real
            os.close(pipe_r)
            os.close(pipe_w)
        assert toy.reads > 0 and session.passthrough_opens == 0 and not session.passthrough
        warned = [r for r in caplog.records if "passthrough unavailable" in r.getMessage()]
        assert len(warned) == 1  # said once, then not asked again


@pytest.mark.parametrize("options", [{"passthrough": False}, {"use_helper": True}])
async def test_without_passthrough_reads_come_to_the_ops(
    tmp_path: Path, options: dict[str, bool]
) -> None:
    async with mounted(tmp_path, **options) as (toy, session, mnt):
        assert not session.passthrough
        assert await _in_thread(_read, mnt / "f") == BODY
        assert toy.reads > 0 and session.passthrough_opens == 0

        def system_calls() -> None:
            assert sorted(os.listdir(mnt)) == ["d", "f"]
            many = os.listdir(mnt / "d")
            assert many == [f"{i:04d}-" + "x" * 200 for i in range(MANY)]
            with os.scandir(mnt / "d") as entries:  # READDIRPLUS: attributes come along
                assert all(e.is_file() and e.stat().st_size == len(BODY) for e in entries)
            st = os.stat(mnt / "f")
            assert stat.S_ISREG(st.st_mode) and st.st_size == len(BODY)
            assert os.getxattr(mnt / "f", "user.toy") == b"yes"
            assert os.listxattr(mnt / "f") == ["user.toy"]
            with pytest.raises(OSError) as err:
                os.getxattr(mnt / "f", "user.nope")
            assert err.value.errno == errno.ENODATA
            assert os.statvfs(mnt).f_blocks == 42
            for path, flags, code in (
                (mnt / "nope", os.O_RDONLY, errno.ENOENT),
                (mnt / "f", os.O_WRONLY, errno.EROFS),
                (mnt / "new", os.O_WRONLY | os.O_CREAT, errno.EROFS),
            ):
                with pytest.raises(OSError) as err:
                    os.open(path, flags)
                assert err.value.errno == code, path
            with pytest.raises(OSError) as err:
                os.mkdir(mnt / "x")
            assert err.value.errno == errno.EROFS

        await _in_thread(system_calls)
