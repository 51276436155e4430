"""FUSE operations called directly (no mount): tree from manifests, lookups, modes, errors."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest
import trio
from fakes import Directory, MemSource, Peers

from syncbit.fetch import Fetcher
from syncbit.fs.ops import SyncbitFS
from syncbit.fs.tree import ROOT_INODE, Tree
from syncbit.fs.wire import EntryAttributes, FUSEError
from syncbit.manifest import FileEntry, Manifest, build_manifest
from syncbit.store import ObjectStore

BODY = b"0123456789" * 1000


def _manifest(name: str = "ds", size: int = len(BODY)) -> Manifest:
    files = [
        FileEntry(path="a/b/w.bin", size=size, object="ee" * 32, locator="w", mode=0o755),
        FileEntry(path="empty", size=0, object="ff" * 32, locator="e"),
    ]
    return build_manifest(name, "mem://x", files, dirs=["void"], chunk_size=4096)


@pytest.fixture
async def fs(tmp_path: Path, nursery: trio.Nursery):  # type: ignore[no-untyped-def]
    store = ObjectStore.open(tmp_path, 1 << 30)
    fetcher = Fetcher(store, Directory(), Peers(), read_deadline=0.5)
    await nursery.start(fetcher.run)
    tree = Tree()
    tree.update({"ds": _manifest()})
    src = MemSource("mem://x", data=BODY)
    yield SyncbitFS(tree, fetcher, lambda m: src), src
    store.close()


async def _lookup_path(ops: SyncbitFS, path: str) -> EntryAttributes:
    inode = ROOT_INODE
    attr = await ops.getattr(inode)
    for part in path.split("/"):
        attr = await ops.lookup(inode, part.encode())
        inode = attr.st_ino
    return attr


async def test_tree_lookup_modes_sizes(fs) -> None:  # type: ignore[no-untyped-def]
    ops, _ = fs
    top = await _lookup_path(ops, "ds")
    assert stat.S_ISDIR(top.st_mode) and top.entry_timeout <= 1.0  # dataset names can move
    f = await _lookup_path(ops, "ds/a/b/w.bin")
    assert stat.S_ISREG(f.st_mode) and f.st_size == len(BODY)
    assert stat.S_IMODE(f.st_mode) == 0o555  # exec kept, write stripped
    assert (await _lookup_path(ops, "ds/empty")).st_size == 0
    assert stat.S_ISDIR((await _lookup_path(ops, "ds/void")).st_mode)
    with pytest.raises(FUSEError) as err:
        await _lookup_path(ops, "ds/nope")
    assert err.value.errno == errno.ENOENT


async def test_open_for_write_is_erofs_and_read_returns_bytes(fs) -> None:  # type: ignore[no-untyped-def]
    ops, _ = fs
    attr = await _lookup_path(ops, "ds/a/b/w.bin")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        with pytest.raises(FUSEError) as err:
            await ops.open(attr.st_ino, flags)
        assert err.value.errno == errno.EROFS
    fi = await ops.open(attr.st_ino, os.O_RDONLY)
    assert fi.keep_cache
    assert await ops.read(fi.fh, 4000, 200) == BODY[4000:4200]
    assert await ops.read(fi.fh, len(BODY) - 5, 100) == BODY[-5:]
    await ops.release(fi.fh)


async def test_read_failure_is_eio_only(fs) -> None:  # type: ignore[no-untyped-def]
    ops, src = fs
    src.down = True
    attr = await _lookup_path(ops, "ds/a/b/w.bin")
    fi = await ops.open(attr.st_ino, os.O_RDONLY)
    with pytest.raises(FUSEError) as err:
        await ops.read(fi.fh, 0, 10)
    assert err.value.errno == errno.EIO
    assert ops.errors == {("read", "EIO"): 1}  # counted for /metrics
    assert ops.requests["read"] == 1 and ops.requests["open"] == 1


async def test_new_revision_gets_new_inodes_old_ones_stay_readable(fs) -> None:  # type: ignore[no-untyped-def]
    ops, _ = fs
    old = await _lookup_path(ops, "ds/a/b/w.bin")
    fi = await ops.open(old.st_ino, os.O_RDONLY)
    changed = ops.tree.update({"ds": _manifest(size=100), "other": _manifest("other")})
    assert changed == ["ds"]
    new = await _lookup_path(ops, "ds/a/b/w.bin")
    assert new.st_ino != old.st_ino and new.st_size == 100
    assert await ops.read(fi.fh, 0, 5) == BODY[:5]  # the open file keeps its version
    assert ops.tree.update({}) == ["ds", "other"]
    with pytest.raises(FUSEError):
        await _lookup_path(ops, "ds")


async def test_xattrs_name_dataset_and_revision(fs) -> None:  # type: ignore[no-untyped-def]
    ops, _ = fs
    attr = await _lookup_path(ops, "ds/a/b/w.bin")
    names = await ops.listxattr(attr.st_ino)
    assert b"user.syncbit.revision" in names
    assert await ops.getxattr(attr.st_ino, b"user.syncbit.dataset") == b"ds"
    with pytest.raises(FUSEError):
        await ops.getxattr(attr.st_ino, b"user.nope")


async def test_a_complete_file_offers_its_object_file_for_passthrough(fs) -> None:  # type: ignore[no-untyped-def]
    ops, _ = fs
    attr = await _lookup_path(ops, "ds/a/b/w.bin")
    first = await ops.open(attr.st_ino, os.O_RDONLY)
    assert first.backing_fd is None  # not all here: reads come to us
    assert await ops.read(first.fh, 0, len(BODY)) == BODY
    with trio.fail_after(5):  # the chunks reach the object file a moment after the read
        while (second := await ops.open(attr.st_ino, os.O_RDONLY)).backing_fd is None:
            await ops.release(second.fh)
            await trio.sleep(0.01)
    assert os.pread(second.backing_fd, len(BODY), 0) == BODY
    empty = await ops.open((await _lookup_path(ops, "ds/empty")).st_ino, os.O_RDONLY)
    assert empty.backing_fd is None  # nothing to read, no object file
    for fi in (first, second, empty):
        await ops.release(fi.fh)


async def test_readdir_resumes_at_an_offset(fs) -> None:  # type: ignore[no-untyped-def]
    ops, _ = fs
    ds = await _lookup_path(ops, "ds")
    fh = await ops.opendir(ds.st_ino)
    listing = list(ops.readdir(fh, 0))
    assert [(n, off) for n, _, off in listing] == [(b"a", 1), (b"empty", 2), (b"void", 3)]
    assert [n for n, _, _ in ops.readdir(fh, 2)] == [b"void"]
    assert stat.S_ISDIR(listing[0][1].st_mode)


async def test_a_read_counts_as_under_way_for_the_trace_until_it_ends(  # type: ignore[no-untyped-def]
    fs, nursery: trio.Nursery
) -> None:
    """The access-trace recorder sees a read begin (its order) and knows it waits for its
    bytes until it returns: a stalled load is not a quiet one."""
    from syncbit.trace import TraceRecorder

    ops, src = fs
    recorder = TraceRecorder(_manifest())
    ops.recorder = lambda m: recorder
    src.gate = threading.Event()
    attr = await _lookup_path(ops, "ds/a/b/w.bin")
    fi = await ops.open(attr.st_ino, os.O_RDONLY)
    got: list[bytes | memoryview] = []

    async def read() -> None:
        got.append(await ops.read(fi.fh, 0, 100))

    nursery.start_soon(read)
    await trio.sleep(0.2)  # held at the source's gate
    assert recorder.reading == 1 and recorder.recorded == 1 and not got
    src.gate.set()
    with trio.fail_after(10):
        while not got:
            await trio.sleep(0.01)
    assert bytes(got[0]) == BODY[:100] and recorder.reading == 0
    await ops.release(fi.fh)
