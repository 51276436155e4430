"""A full cache filesystem and re-verification at store level: chunk writes that fail
with ENOSPC (an injected write function, and a real 8 MiB tmpfs filled to the last
block), the disk-full episode logged once, the index committing on a 100% full
filesystem, `verify` dropping chunks whose bytes rotted, a crash detected by the missing
clean-shutdown marker, and a log that survives a full disk."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from syncbit.chunks import chunk_length, digest
from syncbit.diskspace import LogHandler
from syncbit.errors import DiskFullError
from syncbit.store import ChunkCheck, ObjectStore, StoredObject, VerifyRun
from syncbit.store.disk import DiskWatch
from syncbit_testing.smallfs import fill, takes_no_block

CS = 4096
OBJ = 4 * CS


def _oid(n: int) -> str:
    return f"{n:02x}" * 32


def _bytes(n: int, size: int = OBJ) -> bytes:
    return bytes((n * 7 + i) % 251 for i in range(size))


async def _put(store: ObjectStore, n: int, chunks: range | None = None) -> StoredObject:
    """Store chunks of object `n` (all by default) the way the fetcher does."""
    obj = store.object(_oid(n), OBJ, CS)
    data = _bytes(n)
    for i in chunks if chunks is not None else range(obj.chunks):
        part = data[i * CS : i * CS + chunk_length(OBJ, CS, i)]
        await store.store_chunk(obj, i, memoryview(part), digest(part))
    await store.flush()
    return obj


def _reopened_good(path: Path) -> int:
    """Open the store at `path` anew: how many chunks its index holds (all right)."""
    store = ObjectStore.open(path, 1 << 30)
    try:
        return _index_good(store)
    finally:
        store.close()


def _index_good(store: ObjectStore) -> int:
    """Every chunk the index holds reads back with its digest's bytes; how many."""
    n = 0
    for obj in store.objects():
        for i in obj.durable:
            got = store.read(obj, i * CS, chunk_length(obj.size, CS, i))
            assert digest(got) == obj.digests[i], f"chunk {i} of {obj.id[:8]} is wrong"
            n += 1
    return n


class FullDisk:
    """A write function that fails like a full disk while `full` is set, and for the
    next `refuse` calls (full until the store evicts something)."""

    def __init__(self) -> None:
        self.full = False
        self.refuse = 0

    def __call__(self, fd: int, data: memoryview, offset: int) -> None:
        if self.full or self.refuse:
            self.refuse = max(0, self.refuse - 1)
            raise OSError(errno.ENOSPC, "No space left on device")
        os.pwrite(fd, data, offset)


def _disk_lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


# -- ENOSPC on chunk writes (injected) -------------------------------------------------------


async def test_full_disk_fails_new_chunks_keeps_cached_ones_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = FullDisk()
    store = ObjectStore.open(tmp_path, 1 << 30, pwrite=disk)
    store.disk_headroom = 0
    try:
        kept = await _put(store, 1)
        store.set_pins([kept.id])  # nothing may be evicted to make room
        disk.full = True
        obj = store.object(_oid(2), OBJ, CS)
        data = _bytes(2)
        for i in range(obj.chunks):
            part = data[i * CS : (i + 1) * CS]
            with pytest.raises(DiskFullError, match="nothing left to evict"):
                await store.store_chunk(obj, i, memoryview(part), digest(part))
            assert not obj.has(i) and "disk full" in obj.unstored[i]
        await store.flush()
        assert obj.written == obj.durable == set()
        assert store.read(kept, 0, OBJ) == _bytes(1)  # cached reads go on
        usage = store.usage()
        assert usage["disk_full"] is True and usage["disk_refusals"] == obj.chunks
        assert usage["reserved"] == 0 and usage["used"] == OBJ
        assert _disk_lines(caplog, "cache filesystem full") == 1  # once, not per chunk
        assert not any("cannot store chunk" in r.getMessage() for r in caplog.records)

        disk.full = False  # space comes back
        store.disk.free = store.disk.recover_bytes
        assert store.disk.check() is True
        assert store.usage()["disk_full"] is False
        assert _disk_lines(caplog, "space is back under") == 1
        await _put(store, 2)
        assert obj.complete
    finally:
        store.close()
    assert _reopened_good(tmp_path) == 8


async def test_space_an_eviction_frees_during_the_burst_does_not_end_the_episode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused write, then free space back in the same instant (an eviction made room,
    and the next write takes it again): one episode and one line each way, not an episode
    per write of the burst."""
    caplog.set_level(logging.INFO, logger="syncbit.disk")
    watch = DiskWatch(tmp_path, recover_bytes=1 << 20, interval=5.0)
    free = [0]

    def sample() -> int:  # the filesystem's answer, set by the test
        watch.free = free[0]
        return watch.free

    watch.sample = sample  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        watch.refused("a chunk", OSError(errno.ENOSPC, "no space"))
        free[0] = 2 << 20  # the eviction's room, taken again before the next sample
        await trio.sleep(0.5)
        watch.refused("a chunk", OSError(errno.ENOSPC, "no space"))
        assert watch.full and watch.episodes == 1
        # Space really back: the episode ends at a look after its first second.
        with trio.fail_after(10):
            while watch.full:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert _disk_lines(caplog, "cache filesystem full under") == 1
    assert _disk_lines(caplog, "space is back under") == 1


async def test_full_disk_evicts_unpinned_data_to_make_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    disk = FullDisk()
    store = ObjectStore.open(tmp_path, 1 << 30, pwrite=disk)  # a budget above the disk
    store.disk_headroom = 0
    try:
        first = await _put(store, 1)
        second = await _put(store, 2)
        disk.refuse = 1
        new = await _put(store, 3, range(1))
        assert new.has(0) and not first.written  # the least recently used object made room
        assert second.durable == {0, 1, 2, 3}
        disk.refuse = 1
        await _put(store, 3, range(1, 2))
        assert not second.written
        assert store.usage()["disk_full"] is False  # room was made each time: no episode
        assert _disk_lines(caplog, "fills before the cache budget") == 1  # once
        assert _index_good(store) == 2
    finally:
        store.close()


# -- a real 100% full filesystem ---------------------------------------------------------


async def test_store_opens_and_commits_on_a_100_percent_full_filesystem(small_fs: Path) -> None:
    cache = small_fs / "cache"
    store = ObjectStore.open(cache, 1 << 30)
    try:
        a = await _put(store, 1)
        await _put(store, 2)
    finally:
        store.close()
    filler = small_fs / "filler"
    fill(filler)
    assert takes_no_block(small_fs)

    store = ObjectStore.open(cache, 1 << 30)  # start-up writes nothing that needs a block
    try:
        assert _index_good(store) == 8
        # The index still commits: manifests, an eviction, then chunks in the freed space.
        store.save_manifests({"ds": '{"a": 1}'})
        assert store.load_manifests() == {"ds": '{"a": 1}'}
        store.set_pins([_oid(1), _oid(2)])  # nothing the LRU may evict
        obj = store.object(_oid(3), OBJ, CS)
        data = _bytes(3)
        with pytest.raises(DiskFullError, match="disk full"):
            await store.store_chunk(obj, 0, memoryview(data[:CS]), digest(data[:CS]))
        assert store.usage()["disk_full"] is True
        result = await store.evict([a.id])
        assert result.evicted == [a.id]
        store.disk_headroom = 0
        await _put(store, 3)
        assert obj.complete and obj.durable == {0, 1, 2, 3}
    finally:
        store.close()
    filler.unlink()
    reopened = ObjectStore.open(cache, 1 << 30)
    try:
        gone = reopened.get(a.id)
        assert gone is None or not gone.durable
        assert _index_good(reopened) == 8
        assert reopened.clean_start
    finally:
        reopened.close()


def test_a_new_cache_on_a_full_filesystem_fails_with_one_clear_error(small_fs: Path) -> None:
    """LMDB maps its lock file: a fresh one on a full tmpfs is SIGBUS (the process dies)
    unless it was allocated first. In a child process, so a crash cannot take pytest."""
    fill(small_fs / "filler")
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from syncbit.errors import DiskFullError
        from syncbit.store import ObjectStore
        try:
            ObjectStore.open(Path({str(small_fs / "cache")!r}), 1 << 30)
        except DiskFullError as exc:
            print("DiskFullError:", exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    assert "DiskFullError: no space left" in done.stdout


# -- verification ---------------------------------------------------------------------------


def _rot(store_dir: Path, obj: StoredObject, index: int) -> None:
    """Flip bytes of one stored chunk in its file, as a failing disk would."""
    path = store_dir / "objects" / obj.id[:2] / obj.id
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff" * 16, index * CS + 100)
        os.fsync(fd)
    finally:
        os.close(fd)


async def test_verify_drops_chunks_that_do_not_match_and_the_index_follows(
    tmp_path: Path,
) -> None:
    store = ObjectStore.open(tmp_path, 1 << 30)
    try:
        a = await _put(store, 1)
        b = await _put(store, 2)
        _rot(tmp_path, b, 2)
        run = VerifyRun("requested", only_unverified=False)
        await store.verify(run)
        assert run.done.is_set() and run.total == run.checked == 8
        assert run.dropped == [(b.id, 2)]
        assert b.durable == {0, 1, 3} and not b.has(2) and a.durable == {0, 1, 2, 3}
        assert (b, [2]) in store.changes.take().removed  # the scheduler hears of it
        assert store.usage()["dropped_chunks"] == 1 and store.used_bytes() == 7 * CS
        assert await store.check_chunk(a, 0, direct=True) is ChunkCheck.GOOD
        await _put(store, 2, range(2, 3))  # fetched again
    finally:
        store.close()
    assert _reopened_good(tmp_path) == 8


async def test_after_a_crash_chunks_are_checked_before_use(tmp_path: Path) -> None:
    """A process that dies without `close` (SIGKILL) leaves no clean-shutdown marker: the
    next open marks every chunk unverified; a reader's check drops a rotten one."""
    code = textwrap.dedent(
        f"""
        import os, signal, trio
        from pathlib import Path
        from syncbit.chunks import digest
        from syncbit.store import ObjectStore

        async def main():
            store = ObjectStore.open(Path({str(tmp_path)!r}), 1 << 30)
            for n in (1, 2):
                obj = store.object(f"{{n:02x}}" * 32, {OBJ}, {CS})
                data = bytes((n * 7 + i) % 251 for i in range({OBJ}))
                for i in range(4):
                    part = data[i * {CS} : (i + 1) * {CS}]
                    await store.store_chunk(obj, i, memoryview(part), digest(part))
            await store.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        trio.run(main)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr

    store = ObjectStore.open(tmp_path, 1 << 30)
    try:
        assert not store.clean_start and store.unverified_chunks() == 8
        a, b = store.get(_oid(1)), store.get(_oid(2))
        assert a is not None and b is not None
        assert not a.has_range(0, OBJ)  # never served to peers unchecked
        store.close()
        _rot(tmp_path, b, 1)
        store = ObjectStore.open(tmp_path, 1 << 30)  # still unclean: close() was no proof
        a, b = store.get(_oid(1)), store.get(_oid(2))
        assert a is not None and b is not None and store.unverified_chunks() == 8

        await store.verify_chunks(b, range(4))  # what a read does first
        assert b.durable == {0, 2, 3} and not b.unverified
        run = VerifyRun("after an unclean shutdown", only_unverified=True)
        await store.verify(run)
        assert run.checked == 4 and run.dropped == []  # b was done by the read
        assert store.unverified_chunks() == 0 and a.has_range(0, OBJ)
    finally:
        store.close()
    reopened = ObjectStore.open(tmp_path, 1 << 30)
    try:
        assert reopened.clean_start and reopened.unverified_chunks() == 0
        assert _index_good(reopened) == 7
    finally:
        reopened.close()


async def test_an_evicted_object_is_no_longer_unverified(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 30)
    try:
        await _put(store, 1)
        await _put(store, 2)
    finally:
        store.close()
    (tmp_path / "clean-shutdown").unlink()  # as after a crash
    store = ObjectStore.open(tmp_path, 1 << 30)
    try:
        a = store.get(_oid(1))
        assert a is not None and a.unverified == {0, 1, 2, 3}
        assert (await store.evict([a.id])).evicted == [a.id]
        assert not a.unverified and store.unverified_chunks() == 4
        await _put(store, 1)  # fetched again: nothing left to re-verify
        assert a.complete and not a.unverified and a.has_range(0, OBJ)
    finally:
        store.close()


async def test_a_pass_skips_what_was_evicted_meanwhile(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 30)
    try:
        a = await _put(store, 1)
        await _put(store, 2)
        run = VerifyRun("requested", only_unverified=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.verify, run)
            await store.evict([a.id])
        assert run.done.is_set() and run.dropped == []
        assert 4 <= run.checked <= 8
        assert _index_good(store) == 4
    finally:
        store.close()


# -- the log ---------------------------------------------------------------------------------


def test_log_lines_that_cannot_be_written_are_counted_not_raised(small_fs: Path) -> None:
    path = small_fs / "daemon.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    handler = LogHandler(fd)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("syncbit.test.disklog")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("before")
        filler = small_fs / "filler"
        fill(filler)
        for i in range(5):
            logger.error("while full %d %s", i, "x" * 8192)  # needs new blocks: raises nothing
        assert handler.lost == 5
        filler.unlink()
        logger.warning("after")
        assert handler.lost == 0
    finally:
        logger.removeHandler(handler)
        os.close(fd)
    lines = path.read_text().splitlines()
    assert lines[0] == "WARNING syncbit.test.disklog: before"
    assert lines[-2:] == [
        "WARNING syncbit.log: 5 log records were lost: no space left to write them",
        "WARNING syncbit.test.disklog: after",
    ]
