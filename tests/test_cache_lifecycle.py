"""Cache lifecycle: the budget, LRU eviction, pins, objects in use, gc, restarts, a full
disk (a real small tmpfs), and reads through the fetcher with a budget smaller than the data."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest
import trio
from fakes import Directory, MemSource, Peers
from storefixtures import content, fill, oid, opened

from syncbit.chunks import chunk_length, digest
from syncbit.errors import CacheFullError, PeerBusyError, PeerError
from syncbit.fetch import Fetcher
from syncbit.manifest import FileEntry
from syncbit.peer import PeerClient, PeerServer
from syncbit.serving import Limits
from syncbit.sources.base import Source
from syncbit.store import ObjectStore, StoredObject

CS = 1024
OBJ = 2 * CS  # every test object: two full chunks


_oid, _bytes = oid, content


async def _fill(
    store: ObjectStore, n: int, size: int = OBJ, cs: int = CS, flush: bool = True
) -> StoredObject:
    return await fill(store, n, size, cs, flush)


def _check_index(store: ObjectStore) -> int:
    """Every chunk the index holds has exactly the bytes of its digest; how many."""
    checked = 0
    for obj in store.objects():
        for i in sorted(obj.durable):
            length = chunk_length(obj.size, obj.chunk_size, i)
            got = store.read(obj, i * obj.chunk_size, length)
            assert digest(got) == obj.digests[i], f"chunk {i} of {obj.id[:8]} corrupt"
            checked += 1
    return checked


def _consistent(store: ObjectStore) -> None:
    """The O(1) counters agree with a walk (no reservations outstanding)."""
    assert store.used_bytes() == sum(o.bytes_in(o.written) for o in store.objects())
    assert store.cached_bytes() == sum(o.held_bytes() for o in store.objects())
    assert store.unverified_chunks() == sum(len(o.unverified) for o in store.objects())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStore]:
    with opened(tmp_path, 3 * OBJ) as s:
        yield s


# -- budget and LRU ---------------------------------------------------------------------------


async def test_lru_evicts_least_recently_used_whole_object(store: ObjectStore) -> None:
    a, b, c = [await _fill(store, n) for n in (1, 2, 3)]
    a.last_used, b.last_used, c.last_used = 100.0, 200.0, 300.0
    store.touch(a)  # read just now: b is now the least recently used
    assert store.used_bytes() == 3 * OBJ
    d = await _fill(store, 4)
    assert not b.written and not b.durable and store.get(b.id) is b
    assert a.complete and c.complete and d.complete
    assert store.used_bytes() == 3 * OBJ <= store.cache_size
    _consistent(store)
    usage = store.usage()
    assert usage["evictions"] == 1 and usage["evicted_bytes"] == OBJ
    assert not b.path.exists()
    # The scheduler is told, through the reporter's queue.
    assert (b, [0, 1]) in store.changes.take().removed
    await _fill(store, 5)  # next in line: c (a was touched)
    assert not c.written and a.complete


async def test_pinned_objects_are_never_evicted(store: ObjectStore) -> None:
    a, b, c = [await _fill(store, n) for n in (1, 2, 3)]
    a.last_used, b.last_used, c.last_used = 100.0, 200.0, 300.0
    store.set_pins({a.id})
    await _fill(store, 4)
    await _fill(store, 5)
    assert a.complete  # oldest, but pinned
    assert not b.written and not c.written
    rows = {r["id"]: r for r in store.listing()}
    assert rows[a.id]["pinned"] and rows[a.id]["held"] == OBJ
    assert b.id not in rows  # holds nothing, not pinned


async def test_pinned_over_budget_fails_clearly_instead_of_thrashing(store: ObjectStore) -> None:
    pins = {_oid(n): OBJ for n in (1, 2, 3, 4)}
    store.set_pins(pins, sizes=pins)
    assert store.usage()["pinned_over_budget"]  # known before a byte arrives
    for n in (1, 2, 3):
        await _fill(store, n)
    evictions = store.evictions
    with pytest.raises(CacheFullError, match=r"6\.0 KiB pinned.*6\.0 KiB budget"):
        await _fill(store, 4)
    assert store.evictions == evictions  # nothing pinned was thrown out
    usage = store.usage()
    assert usage["pinned"] == 3 * OBJ and usage["used"] == 3 * OBJ
    assert usage["pinned_size"] == 4 * OBJ
    assert usage["reserved"] == 0  # the failed write gave its reservation back
    obj = store.get(_oid(4))
    assert obj is not None and not obj.has(0) and "pinned" in obj.unstored[0]


async def test_objects_in_use_are_not_evicted(store: ObjectStore) -> None:
    a, b, c = [await _fill(store, n) for n in (1, 2, 3)]
    a.last_used, b.last_used, c.last_used = 100.0, 200.0, 300.0
    # A read in another thread (the peer service) holds the oldest object.
    entered, leave = threading.Event(), threading.Event()

    def peer_read() -> None:
        with store.reading(a):
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=peer_read)
    thread.start()
    try:
        entered.wait(10)
        await _fill(store, 4)
        assert a.complete and not b.written
        result = await store.evict([a.id, c.id])
        assert result.skipped == [a.id] and result.evicted == [c.id] and result.freed == OBJ
    finally:
        leave.set()
        thread.join()
    result = await store.evict([a.id])
    assert result.evicted == [a.id] and not a.written


async def test_written_but_not_durable_is_in_use(store: ObjectStore) -> None:
    await _fill(store, 2)
    await _fill(store, 3)
    a = await _fill(store, 1, flush=False)  # written; its commit has not run
    a.last_used = 1.0  # the oldest
    await _fill(store, 4, flush=False)
    await _fill(store, 5, flush=False)
    assert a.complete and not store.get(_oid(2)).written  # type: ignore[union-attr]
    with pytest.raises(CacheFullError, match="in use"):
        await _fill(store, 6)  # everything left is waiting for its commit
    await store.flush()
    await _fill(store, 6)  # durable now: a may go, first
    assert not a.written


async def test_evicted_object_is_filled_again_with_the_right_bytes(
    store: ObjectStore, tmp_path: Path
) -> None:
    a = await _fill(store, 1)
    result = await store.evict([a.id])
    assert result.freed == OBJ and not a.has(0) and store.used_bytes() == 0
    again = await _fill(store, 1)
    assert again is a and a.complete
    assert store.read(a, 0, OBJ) == _bytes(1, OBJ)
    store.close()
    reopened = ObjectStore.open(tmp_path, 3 * OBJ)
    try:
        obj = reopened.get(a.id)
        assert obj is not None and obj.complete
        assert reopened.read(obj, 0, OBJ) == _bytes(1, OBJ)
        assert _check_index(reopened) == 2
    finally:
        reopened.close()


async def test_restart_keeps_last_used_and_lru_order(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 20)
    objs = [await _fill(store, n) for n in (1, 2, 3, 4)]
    for obj in (objs[2], objs[0], objs[3], objs[1]):  # reads: 3, 1, 4, 2 (newest)
        await trio.sleep(0.01)
        store.touch(obj)
    before = {o.id: o.last_used for o in objs}
    store.close()  # touches alone are written at close (and by the commit loop)

    lowered = ObjectStore.open(tmp_path, 2 * OBJ)
    try:
        assert {o.id: o.last_used for o in lowered.objects()} == before
        assert lowered.used_bytes() == 4 * OBJ  # over the lowered budget until enforced
        assert await lowered.enforce() == 2 * OBJ
        held = {o.id for o in lowered.objects() if o.written}
        assert held == {_oid(4), _oid(2)}  # the two least recently read went first
        assert lowered.used_bytes() == 2 * OBJ
    finally:
        lowered.close()


async def test_enforce_keeps_pinned_data_and_says_so(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 20)
    for n in (1, 2, 3):
        await _fill(store, n)
    store.close()
    small = ObjectStore.open(tmp_path, OBJ)
    try:
        small.set_pins({_oid(1), _oid(2)})
        assert await small.enforce() == OBJ  # only the unpinned one may go
        assert {o.id for o in small.objects() if o.written} == {_oid(1), _oid(2)}
        usage = small.usage()
        assert usage["pinned"] == 2 * OBJ and usage["pinned_over_budget"]
    finally:
        small.close()


async def test_commit_loop_records_touches_without_a_txn_per_read(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 20)
    a = await _fill(store, 1)
    a.last_used = 5.0
    store.touch(a)
    used = a.last_used
    store.touch_interval = 0.05
    async with trio.open_nursery() as nursery:
        await nursery.start(store.commit_loop)
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    a.last_used = 1.0  # not a touch: `close` writes nothing, the loop's commit stays
    store.close()
    again = ObjectStore.open(tmp_path, 1 << 20)
    try:
        reopened = again.get(a.id)
        assert reopened is not None and reopened.last_used == used
    finally:
        again.close()


# -- gc ---------------------------------------------------------------------------------------


async def test_gc_removes_orphans_and_unreferenced_but_not_pinned_or_referenced(
    tmp_path: Path,
) -> None:
    store = ObjectStore.open(tmp_path, 1 << 20)
    a, b, c = [await _fill(store, n) for n in (1, 2, 3)]
    ghost = await _fill(store, 9)  # its index record will vanish: chunk entries left over
    store.close()
    env = lmdb.open(str(tmp_path / "index.lmdb"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.delete(bytes.fromhex(ghost.id), db=env.open_db(b"objects", txn=txn))
    env.close()
    orphan = tmp_path / "objects" / "ee" / ("ee" * 32)  # a crash after an eviction's txn
    orphan.parent.mkdir()
    orphan.write_bytes(b"x" * 8192)
    (tmp_path / "objects" / "stray.tmp").write_bytes(b"y")

    store = ObjectStore.open(tmp_path, 1 << 20)
    try:
        empty = store.object(_oid(7), OBJ, CS)
        with store.reading(empty) as reader:
            reader.fd()  # an object file holding nothing
        assert empty.path.exists()
        store.set_pins({c.id})
        freed = await store.gc(referenced={a.id})
        assert freed >= OBJ + 8192
        held = {o.id for o in store.objects() if o.written}
        assert held == {a.id, c.id}  # b unreferenced and unpinned: gone
        assert not orphan.exists() and not orphan.parent.exists()
        assert not (tmp_path / "objects" / "stray.tmp").exists()
        assert not empty.path.exists() and not b.path.exists()
        assert _check_index(store) == 4
        # The empty object is still usable: its file comes back on the next write.
        data = _bytes(7, CS)
        await store.store_chunk(empty, 0, memoryview(data), digest(data))
        assert store.read(empty, 0, CS) == data
    finally:
        store.close()
    env = lmdb.open(str(tmp_path / "index.lmdb"), max_dbs=4)
    with env.begin() as txn:
        keys = [k for k, _ in txn.cursor(db=env.open_db(b"chunks", txn=txn))]
    env.close()
    assert {k[:-4].hex() for k in keys} == {a.id, c.id}  # the ghost's entries went too


# -- a full disk (a real 8 MiB tmpfs: the `small_fs` fixture) --------------------------------


async def test_disk_full_evicts_and_retries_without_corrupting_the_index(small_fs: Path) -> None:
    mib, cs = 1 << 20, 256 << 10
    store = ObjectStore.open(small_fs, 64 * mib)  # a budget far above the disk
    try:
        for n in range(1, 21):  # 20 MiB through an 8 MiB disk
            obj = await _fill(store, n, size=mib, cs=cs)
            assert obj.complete, f"object {n}"
        assert store.evictions > 0
        assert store.used_bytes() <= 8 * mib
        _consistent(store)
        newest = store.get(_oid(20))
        assert newest is not None and store.read(newest, 0, mib) == _bytes(20, mib)
    finally:
        store.close()
    reopened = ObjectStore.open(small_fs, 64 * mib)
    try:
        assert _check_index(reopened) > 0
        for obj in reopened.objects():  # whatever survived is whole and right
            if obj.complete:
                n = int(obj.id[:2], 16)
                assert reopened.read(obj, 0, obj.size) == _bytes(n, obj.size)
    finally:
        reopened.close()


async def test_disk_full_with_nothing_to_evict_fails_the_chunk_cleanly(small_fs: Path) -> None:
    mib, cs = 1 << 20, 256 << 10
    store = ObjectStore.open(small_fs, 64 * mib)
    try:
        with pytest.raises(CacheFullError, match="disk full"):
            await _fill(store, 1, size=12 * mib, cs=cs)  # one object bigger than the disk
        obj = store.get(_oid(1))
        assert obj is not None and 0 < len(obj.written) < obj.chunks
        missing = min(set(range(obj.chunks)) - obj.written)
        assert not obj.has(missing) and "disk full" in obj.unstored[missing]
        assert store.usage()["reserved"] == 0
        await store.flush()
        _consistent(store)
    finally:
        store.close()
    reopened = ObjectStore.open(small_fs, 64 * mib)
    try:
        assert _check_index(reopened) > 0
    finally:
        reopened.close()


# -- the peer service never sends an evicted range ----------------------------------------


async def test_peer_serves_until_evicted_then_answers_not_held(store: ObjectStore) -> None:
    a = await _fill(store, 1)
    server = PeerServer(store, "127.0.0.1:0")
    server.start()
    client = PeerClient(timeout=5)
    try:
        buf = bytearray(CS)
        await trio.to_thread.run_sync(client.get_into, server.address, a.id, CS, memoryview(buf))
        assert bytes(buf) == _bytes(1, OBJ)[CS:]
        with trio.fail_after(5):  # in use until the server thread is past its sendfile
            while not (await store.evict([a.id])).evicted:
                await trio.sleep(0.01)
        with pytest.raises(PeerError, match="404"):
            await trio.to_thread.run_sync(
                client.get_into, server.address, a.id, CS, memoryview(buf)
            )
    finally:
        client.close()
        server.stop()


async def test_peer_turns_prefetch_away_when_its_upload_slots_are_taken(
    tmp_path: Path,
) -> None:
    # A transfer in progress holds the one slot: a client that asks for more than the
    # socket buffers hold and reads nothing keeps the server's sendfile waiting.
    size = 64 << 20
    store = ObjectStore.open(tmp_path / "big", 2 * size)
    server = PeerServer(store, "127.0.0.1:0", upload_slots=1)
    server.start()
    client = PeerClient(timeout=5)
    buf = bytearray(CS)
    try:
        a = await _fill(store, 1, size=size, cs=4 << 20)

        def get(prefetch: bool) -> None:
            client.get_into(server.address, a.id, 0, memoryview(buf), prefetch=prefetch)

        host, _, port = server.address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as stalled:
            ask = f"GET /v1/objects/{a.id}/data HTTP/1.1\r\nHost: x\r\nRange: bytes=0-{size - 1}"
            stalled.sendall(ask.encode() + b"\r\n\r\n")
            await _until(lambda: server.load == 1)
            with pytest.raises(PeerBusyError):
                await trio.to_thread.run_sync(get, True)
            assert server.refused == 1
            await trio.to_thread.run_sync(get, False)  # a reader is served all the same
            assert bytes(buf) == _bytes(1, size)[:CS]
        await _until(lambda: server.load == 0)  # the stalled client left: the slot is free
        buf[:] = bytes(CS)
        await trio.to_thread.run_sync(get, True)
        assert bytes(buf) == _bytes(1, size)[:CS]
        # The slot is freed once the server's send has returned, which can be a moment
        # after the client read the last byte (CI saw load 1 here once).
        await _until(lambda: server.load == 0)
    finally:
        client.close()
        server.stop()
        store.close()


async def _until(ready: Callable[[], bool]) -> None:
    with trio.fail_after(30):
        while not ready():
            await trio.sleep(0.01)


# -- reads through the fetcher with a budget smaller than the data -------------------------


FCS = 64 * 1024
FILES = [
    FileEntry(path=f"f{n}.bin", size=4 * FCS + 100, object=_oid(0x40 + n), locator=f"f{n}.bin")
    for n in range(5)
]


def _files_source() -> MemSource:
    """Each file's bytes are `_bytes(its index, size)`."""
    return MemSource(files=FILES, bodies={f.path: _bytes(n, f.size) for n, f in enumerate(FILES)})


async def _read_all(fetcher: Fetcher, entry: FileEntry, source: Source, step: int) -> bytes:
    handle = fetcher.open(entry, FCS, source)
    out = bytearray()
    while len(out) < entry.size:
        out += await fetcher.read(handle, len(out), step)
    return bytes(out)


async def test_reads_through_a_budget_smaller_than_the_data(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    size = FILES[0].size
    store = ObjectStore.open(tmp_path, 2 * size + FCS)  # two files and a bit: not five
    try:
        await nursery.start(store.commit_loop)
        source = _files_source()
        fetcher = Fetcher(store, Directory(), Peers(), readahead_chunks=2)
        await nursery.start(fetcher.run)
        peak = 0
        for n, entry in enumerate(FILES):
            got = await _read_all(fetcher, entry, source, 50_000)
            assert got == _bytes(n, size), entry.path
            peak = max(peak, store.used_bytes())
        with trio.fail_after(5):  # the last writes and commits land in the background
            while store.pending_writes():
                await trio.sleep(0.01)
        await store.flush()
        assert store.evictions >= 2
        assert peak <= store.cache_size and store.used_bytes() <= store.cache_size
        _consistent(store)
        # The first file was evicted: reading it again fetches it again, right.
        first = store.get(FILES[0].object)
        assert first is not None and not first.complete
        before = source.bytes
        assert await _read_all(fetcher, FILES[0], source, 1 << 20) == _bytes(0, size)
        assert source.bytes > before
        assert _check_index(store) > 0
    finally:
        nursery.cancel_scope.cancel()
        await trio.sleep(0)
        store.close()


async def test_read_of_a_chunk_the_cache_cannot_keep_fails_cleanly(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = ObjectStore.open(tmp_path, FCS // 2)  # not even one chunk fits
    try:
        await nursery.start(store.commit_loop)
        source = _files_source()
        fetcher = Fetcher(
            store, Directory(), Peers(), workers=1, readahead_chunks=0, source_batch=FCS
        )
        await nursery.start(fetcher.run)
        handle = fetcher.open(FILES[0], FCS, source)
        with trio.fail_after(10):
            # One chunk: the reader takes it from RAM before the failed write drops it.
            assert await fetcher.read(handle, 0, 100) == _bytes(0, FILES[0].size)[:100]
            # Three chunks: each is dropped while the next is fetched; the read fails with
            # the cause instead of waiting forever.
            with pytest.raises(CacheFullError, match=r"could not be kept: a chunk of 64\.0 KiB"):
                await fetcher.read(handle, 0, 3 * FCS)
        obj = handle.obj
        assert not obj.written and store.used_bytes() == 0
    finally:
        nursery.cancel_scope.cancel()
        await trio.sleep(0)
        store.close()


def test_used_bytes_is_a_counter_not_a_walk(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 20)
    try:
        obj = store.object(_oid(1), 2500, CS)  # chunks of 1024, 1024, 452
        store.mark_written(obj, 2, digest(b"z" * 452))
        store.mark_written(obj, 2, digest(b"z" * 452))  # twice: counted once
        assert store.used_bytes() == 452
        assert os.path.exists(tmp_path / "objects")
    finally:
        store.close()


async def test_a_peer_that_stops_reading_is_dropped_and_the_port_serves_on(
    tmp_path: Path,
) -> None:
    """A client that asks for a range and takes nothing is dropped after the idle timeout
    (its upload slot freed, the object no longer in use), and the port goes on serving."""
    size = 64 << 20
    store = ObjectStore.open(tmp_path / "big", 2 * size)
    server = PeerServer(store, "127.0.0.1:0", limits=Limits(idle_timeout=1))
    server.start()
    client = PeerClient(timeout=5)
    buf = bytearray(CS)
    try:
        a = await _fill(store, 1, size=size, cs=4 << 20)
        host, _, port = server.address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as stalled:
            ask = f"GET /v1/objects/{a.id}/data HTTP/1.1\r\nHost: x\r\nRange: bytes=0-{size - 1}"
            stalled.sendall(ask.encode() + b"\r\n\r\n")
            await _until(lambda: server.load == 1)
            await _until(lambda: server.load == 0)  # dropped: the slot is free again
            assert server.bytes_served == 0  # the range was not sent whole
        await trio.to_thread.run_sync(client.get_into, server.address, a.id, 0, memoryview(buf))
        assert bytes(buf) == _bytes(1, size)[:CS]
        assert server.bytes_served == CS
    finally:
        client.close()
        server.stop()
        store.close()


async def test_a_chunk_goes_out_without_trios_16_kib_cap_on_unsent_bytes() -> None:
    """trio caps a socket's unsent bytes at 16 KiB (TCP_NOTSENT_LOWAT, for latency): a
    4 MiB chunk then went out in ~250 sends and wake-ups (15% more daemon CPU in
    bench/swarm.py). A chunk's connection gets the kernel's own limit back, TLS or not."""
    from syncbit.httpd.connection import bulk as _bulk

    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    dialled = trio.socket.socket()
    await dialled.connect(listener.getsockname())
    stream = trio.SocketStream(dialled)
    try:
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 16384
        _bulk(stream)
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 0
        wrapped = trio.SSLStream(stream, ssl.create_default_context())
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 16384)
        _bulk(wrapped)
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 0
    finally:
        await stream.aclose()
        listener.close()
