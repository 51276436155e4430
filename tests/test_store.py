"""Object store: exclusive cache dir, chunk presence, durability order, persistence."""

import os
from pathlib import Path

import pytest
import trio

from syncbit.chunks import digest
from syncbit.errors import CacheLockedError
from syncbit.store import ObjectStore

OID = "ab" * 32
CS = 1024


def _write(store: ObjectStore, index: int, data: bytes) -> None:
    obj = store.object(OID, 2500, CS)
    store.write_chunk(obj, index, memoryview(data))
    store.mark_written(obj, index, digest(data))


async def test_chunks_survive_reopen(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 30)
    chunk1 = bytes(range(256)) * 4
    _write(store, 1, chunk1)
    await store.flush()
    obj = store.get(OID)
    assert obj is not None and obj.durable == {1} and not obj.complete
    store.close()

    again = ObjectStore.open(tmp_path, 1 << 30)
    try:
        obj = again.get(OID)
        assert obj is not None
        assert obj.written == obj.durable == {1}
        assert obj.digests[1] == digest(chunk1)
        assert again.read(obj, CS, CS) == chunk1
        assert again.cached_bytes() == CS
    finally:
        again.close()


async def test_written_but_not_committed_is_absent_after_restart(tmp_path: Path) -> None:
    # Simulates kill -9 between pwrite and the group commit: the chunk must not be
    # considered present afterwards, so it is fetched again rather than trusted.
    store = ObjectStore.open(tmp_path, 1 << 30)
    _write(store, 0, b"x" * CS)
    obj = store.get(OID)
    assert obj is not None and obj.has(0) and 0 not in obj.durable
    store.close()  # no flush
    again = ObjectStore.open(tmp_path, 1 << 30)
    try:
        obj = again.get(OID)
        assert obj is None or not obj.has(0)
    finally:
        again.close()


async def test_chunks_still_in_ram_are_kept_at_shutdown(tmp_path: Path) -> None:
    # A clean shutdown cancels writes still queued: verified chunks staged in RAM are
    # written then, so the restarted daemon has them without any network.
    store = ObjectStore.open(tmp_path, 1 << 30)
    obj = store.object(OID, 2500, CS)
    chunk0, last = b"a" * CS, b"z" * (2500 - 2 * CS)
    released: list[int] = []
    store.stage(obj, 0, memoryview(chunk0), lambda: released.append(0), digest(chunk0))
    store.stage(obj, 2, memoryview(last), lambda: released.append(2), digest(last))
    assert obj.has(0) and not obj.written  # readable from RAM, not on disk yet
    assert await store.keep_staged() == 2
    assert await store.keep_staged() == 0  # nothing left in RAM only
    await store.flush()
    store.close()

    again = ObjectStore.open(tmp_path, 1 << 30)
    try:
        kept = again.get(OID)
        assert kept is not None and kept.durable == {0, 2}
        assert again.read(kept, 0, CS) == chunk0 and again.read(kept, 2 * CS, len(last)) == last
        assert kept.digests[2] == digest(last)
    finally:
        again.close()


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
async def test_chunks_of_a_lost_object_file_are_forgotten_at_start(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The index must not outlive the bytes: a file recreated empty would read as zeros
    # where the index promised verified chunks.
    store = ObjectStore.open(tmp_path, 1 << 30)
    _write(store, 0, b"k" * CS)
    await store.flush()
    path = store.get(OID).path  # type: ignore[union-attr]
    store.close()
    if damage == "deleted":
        path.unlink()
    else:
        os.truncate(path, CS)
    again = ObjectStore.open(tmp_path, 1 << 30)
    try:
        obj = again.get(OID)
        assert obj is not None and not obj.has(0) and not obj.durable
        assert again.cached_bytes() == 0
        assert "is missing or short" in caplog.text
        removed = again.changes.take().removed
        assert [(o.id, idx) for o, idx in removed] == [(OID, [0])]  # to report
    finally:
        again.close()
    third = ObjectStore.open(tmp_path, 1 << 30)  # and the index says so from now on
    try:
        assert not third.get(OID).durable  # type: ignore[union-attr]
    finally:
        third.close()


async def test_an_object_file_lost_while_running_fails_reads_instead_of_zeros(
    tmp_path: Path,
) -> None:
    store = ObjectStore.open(tmp_path, 1 << 30)
    _write(store, 0, b"k" * CS)
    await store.flush()
    store.close()
    again = ObjectStore.open(tmp_path, 1 << 30)  # file there at start: chunks kept
    try:
        obj = again.get(OID)
        assert obj is not None and obj.has(0)
        obj.path.unlink()  # gone before this run opened it
        with pytest.raises(FileNotFoundError, match="a restart fetches its chunks again"):
            again.read(obj, 0, CS)
        assert not obj.path.exists()  # not recreated empty
    finally:
        again.close()


async def test_last_chunk_short_and_range_presence(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 30)
    try:
        _write(store, 2, b"z" * (2500 - 2 * CS))
        await store.flush()
        obj = store.get(OID)
        assert obj is not None
        assert obj.has_range(2 * CS, 2500 - 2 * CS)
        assert not obj.has_range(CS, CS + 10)
        assert obj.held_bytes() == 2500 - 2 * CS
        with store.reading(obj) as reader:
            assert reader.read_nowait(2 * CS, 10) in (None, b"z" * 10)
    finally:
        store.close()


def test_second_store_on_same_dir_is_refused(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 30)
    try:
        with pytest.raises(CacheLockedError, match="in use by another syncbit daemon"):
            ObjectStore.open(tmp_path, 1 << 30)
    finally:
        store.close()
    ObjectStore.open(tmp_path, 1 << 30).close()  # free again once released


def test_manifests_persist(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 30)
    store.save_manifests({"a": '{"x": 1}', "b": "{}"})
    store.save_manifests({"b": "{}"})
    store.close()
    again = ObjectStore.open(tmp_path, 1 << 30)
    try:
        assert again.load_manifests() == {"b": "{}"}
    finally:
        again.close()


def test_bytes_in_counts_the_short_last_chunk(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 30)
    try:
        obj = store.object(OID, 2500, CS)  # chunks of 1024, 1024, 452
        assert obj.bytes_in(set()) == 0
        assert obj.bytes_in({0}) == CS
        assert obj.bytes_in({2}) == 452
        assert obj.bytes_in({0, 1, 2}) == 2500
    finally:
        store.close()


async def test_commit_loop_keeps_committing_after_a_flush_elsewhere(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A `flush()` from another task (a finished prefetch) takes the pending batch while
    the commit loop waits: chunks written afterwards must still become durable at once,
    not after the loop's 30 s timer (other nodes wait for them)."""
    store = ObjectStore.open(tmp_path, 1 << 30)
    try:
        await nursery.start(store.commit_loop)
        await trio.sleep(0.05)  # the loop waits for work
        await store.flush()  # elsewhere, e.g. a finished prefetch job: nothing pending
        await trio.sleep(0.05)
        _write(store, 1, b"b" * CS)
        obj = store.get(OID)
        assert obj is not None
        with trio.fail_after(5):
            while 1 not in obj.durable:
                await trio.sleep(0.01)
    finally:
        nursery.cancel_scope.cancel()
        store.close()


async def test_hashing_an_object_file_reads_ahead_and_hashes_every_byte_once(
    tmp_path: Path,
) -> None:
    """The whole-file hash reads the object back in blocks, the next ones read while one
    is hashed: what it feeds is the file's bytes in order, from any chunk on, through a
    short last block; a read that fails fails the hash (nothing is fed past it)."""
    import hashlib

    from storefixtures import content, fill

    size, cs = 19 * (1 << 20) + 1000, 1 << 20  # five 4 MiB blocks and a short one
    store = ObjectStore.open(tmp_path, 1 << 30)
    try:
        obj = await fill(store, 7, size, cs)
        data = content(7, size)
        assert await store.sha256(obj) == hashlib.sha256(data).hexdigest()
        h = hashlib.sha256()
        with store.reading(obj) as reader:
            await trio.to_thread.run_sync(reader.hash_into, h, 3 * cs, size - 3 * cs)
        assert h.hexdigest() == hashlib.sha256(data[3 * cs :]).hexdigest()
        os.truncate(obj.path, 9 * cs)  # the disk loses the file's end under the hash
        fed = hashlib.sha256()
        with pytest.raises(OSError, match="short read"), store.reading(obj) as reader:
            await trio.to_thread.run_sync(reader.hash_into, fed, 0, size)
        # Blocks are fed in order: everything before the first failed read, nothing after.
        assert fed.hexdigest() == hashlib.sha256(data[: 8 * cs]).hexdigest()
    finally:
        store.close()
