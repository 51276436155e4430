"""Fetcher: single flight, peers verified against digests, fallback, deadlines (no network)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import trio
from fakes import Directory, MemSource, Peers

from syncbit.chunks import HEAD_SAMPLE, digest
from syncbit.errors import ReadDeadlineError, SchedulerError, SourceChangedError
from syncbit.fetcher import Fetcher, Priority
from syncbit.jobs import Jobs
from syncbit.manifest import FileEntry, Manifest
from syncbit.scheduler.client import ChunkMap, ClaimResult, Peer
from syncbit.sources.base import Source
from syncbit.store import ObjectStore

CS = 64 * 1024
DATA = bytes((i * 7 + i // 251) % 256 for i in range(5 * CS + 123))
ENTRY = FileEntry(path="f.bin", size=len(DATA), object="cd" * 32, locator="f.bin")


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = ObjectStore.open(tmp_path, 1 << 30)
    yield s
    s.close()


async def _run(fetcher: Fetcher, nursery: trio.Nursery) -> None:
    await nursery.start(fetcher.run)


async def test_single_flight_ten_readers_one_transfer(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    source.gate = threading.Event()
    fetcher = Fetcher(store, Directory(), Peers(DATA), readahead_chunks=0)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    results: list[bytes] = []

    async def reader(off: int) -> None:
        results.append(bytes(await fetcher.read(fetcher.open(ENTRY, CS, source), off, 1000)))

    async with trio.open_nursery() as readers:
        for i in range(10):
            readers.start_soon(reader, CS + i * 1000)
        await trio.sleep(0.2)
        source.gate.set()
    assert source.reads == 1
    assert sorted(results) == sorted(DATA[CS + i * 1000 : CS + i * 1000 + 1000] for i in range(10))
    assert await fetcher.read(handle, CS, 10) == DATA[CS : CS + 10]
    assert source.reads == 1  # now cached


async def test_whole_file_through_reads_across_chunks(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    fetcher = Fetcher(store, Directory(), Peers(DATA), readahead_chunks=2)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    out = bytearray()
    while len(out) < len(DATA):
        out += await fetcher.read(handle, len(out), 50_000)
    assert bytes(out) == DATA
    assert await fetcher.read(handle, len(DATA), 10) == b""
    assert source.bytes == len(DATA)  # each byte once, readahead included
    obj = store.get(ENTRY.object)
    assert obj is not None
    with trio.fail_after(5):
        while len(obj.written) < 6:  # staged chunks reach the object file in the background
            await trio.sleep(0.01)
    await store.flush()
    assert store.get(ENTRY.object).durable == set(range(6))  # type: ignore[union-attr]


async def test_bad_peer_detected_reported_and_reader_gets_right_bytes(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    directory.info = ChunkMap(
        digests={0: digest(DATA[:CS])},
        peers={
            0: [
                Peer("bad", "evil"),
                Peer("gone", "dead"),
                Peer("bad2", "evil"),
                Peer("ok", "good"),
            ]
        },
    )
    fetcher = Fetcher(store, directory, peers, readahead_chunks=0)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    assert await fetcher.read(fetcher.open(ENTRY, CS, source), 0, CS) == DATA[:CS]
    # The best three are tried in random order (load spreading), then the rest in rank.
    assert sorted(directory.reports) == [("bad", 0), ("bad2", 0)]
    assert sorted(peers.calls[:3]) == ["dead", "evil", "evil"] and peers.calls[3:] == ["good"]
    assert source.reads == 0
    assert fetcher.stats["peer"] == CS


async def test_peer_chunk_without_known_digest_is_never_used(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    directory.info = ChunkMap(digests={}, peers={0: [Peer("ok", "good")]})
    fetcher = Fetcher(store, directory, peers, readahead_chunks=0)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    assert await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 10) == DATA[:10]
    assert peers.calls == []
    assert source.reads == 1


async def test_only_bad_peers_falls_back_to_source(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    directory.info = ChunkMap(
        digests={1: digest(DATA[CS : 2 * CS])}, peers={1: [Peer("bad", "evil")]}
    )
    fetcher = Fetcher(store, directory, peers, readahead_chunks=0)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    with trio.fail_after(2):  # at once: the only holder failed, nobody else reads it
        got = await fetcher.read(fetcher.open(ENTRY, CS, source), CS, CS)
    assert got == DATA[CS : 2 * CS]
    assert source.reads == 1 and directory.reports == [("bad", 1)]
    assert fetcher.stats["parked"] == 0


async def test_deadline_gives_read_error_with_cause_then_recovers(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    source.down = True
    fetcher = Fetcher(store, Directory(), Peers(DATA), read_deadline=0.5, readahead_chunks=0)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    started = time.monotonic()
    with pytest.raises(ReadDeadlineError, match="connection refused"):
        await fetcher.read(handle, 0, 10)
    assert time.monotonic() - started < 5
    assert source.reads >= 2  # retried with backoff before giving up
    # The kernel retries a failed page at once: that read makes one attempt and fails
    # fast, without a new deadline's worth of waiting.
    reads = source.reads
    started = time.monotonic()
    with pytest.raises(ReadDeadlineError):
        await fetcher.read(handle, 0, 10)
    assert time.monotonic() - started < 0.2 and source.reads == reads + 1
    source.down = False  # the source is back: the very next read succeeds
    assert await fetcher.read(handle, 0, 10) == DATA[:10]


async def test_changed_source_fails_without_retry(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    source.changed = True
    fetcher = Fetcher(store, Directory(), Peers(DATA), readahead_chunks=0)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    with pytest.raises(SourceChangedError):
        await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 10)
    assert source.reads == 1
    assert not store.get(ENTRY.object).has(0)  # type: ignore[union-attr]


# -- source bytes against the record ------------------------------------------------------


def chunk_of(data: bytes, index: int) -> bytes:
    return data[index * CS : (index + 1) * CS]


async def test_source_bytes_that_differ_from_the_record_are_never_served_nor_stored(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """The source now sends other bytes for chunk 2 than the ones recorded: the read fails,
    the batch's other chunks fail with it, nothing is stored, the scheduler is told."""
    source, directory = MemSource(data=DATA), Directory()
    source.data = DATA[: 2 * CS] + bytes(CS) + DATA[3 * CS :]
    directory.info = ChunkMap(digests={2: digest(chunk_of(DATA, 2))})
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=4)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    assert await fetcher.read(handle, 0, CS) == DATA[:CS]  # chunk 0: nothing recorded yet
    with pytest.raises(SourceChangedError, match="differ from the recorded digest"):
        await fetcher.read(handle, 2 * CS, 10)
    obj = store.get(ENTRY.object)
    assert obj is not None and not obj.has(2)
    assert directory.checks[-1] == (2, digest(bytes(CS)), "")
    assert any(2 in r for r in directory.released)  # its claim (and right) ends
    await store.flush()
    assert 2 not in obj.durable and 2 not in obj.digests
    assert fetcher.stats["verify_failures"] == 1


async def test_a_batch_with_one_bad_chunk_keeps_none(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), Directory()
    source.data = bytes(len(DATA))  # every chunk changed; only chunk 3 has a record
    directory.info = ChunkMap(digests={3: digest(chunk_of(DATA, 3))})
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    obj = store.object(ENTRY.object, ENTRY.size, CS)
    with pytest.raises(SourceChangedError):
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    assert source.reads == 1  # one batch brought all six chunks...
    assert not any(obj.has(i) for i in range(obj.chunks))  # ...and none was kept
    assert [c[0] for c in directory.checks] == [3]


HEAD_ENTRY = ENTRY.model_copy(update={"version": {"head": digest(DATA[:HEAD_SAMPLE])}})


async def test_a_changed_head_fails_every_source_read_of_the_file(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """An HTTP origin changed the file but kept its ETag: the head sample recorded at
    `dataset add` tells, on the first source read after the change."""
    source, directory = MemSource(data=DATA), Directory()
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    handle = fetcher.open(HEAD_ENTRY, CS, source)
    assert await fetcher.read(handle, 0, CS) == DATA[:CS]
    assert source.reads == 1  # the batch holds the head: no second request
    assert await fetcher.read(handle, CS, 10) == DATA[CS : CS + 10]
    assert source.reads == 3  # a batch elsewhere costs one small head request
    source.data = b"\xff" + DATA[1:]
    with pytest.raises(SourceChangedError, match="differ from those recorded at `dataset add`"):
        await fetcher.read(handle, 4 * CS, 10)
    assert not store.get(ENTRY.object).has(4)  # type: ignore[union-attr]
    ((index, digest_, changed),) = directory.checks
    assert (index, digest_) == (4, None) and "first 65536 bytes of f.bin" in changed
    assert await fetcher.read(handle, 0, 10) == DATA[:10]  # cached before the change: kept


async def test_broken_files_are_refused_cached_or_not(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), Directory()
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    handle = fetcher.open(ENTRY, CS, source)
    assert await fetcher.read(handle, 0, 10) == DATA[:10]
    assert fetcher.mark_broken(ENTRY.object, "source changed: head differs")
    with pytest.raises(SourceChangedError, match=r"revision is broken \(source changed"):
        await fetcher.read(handle, 0, 10)  # cached, and still refused
    with pytest.raises(SourceChangedError, match="syncbit dataset add"):
        fetcher.open(ENTRY, CS, source)
    with pytest.raises(SourceChangedError):
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    # A node that has not heard yet learns it from the chunk map on its next miss.
    other = ENTRY.model_copy(update={"object": "ee" * 32})
    directory.info = ChunkMap(broken="source changed: elsewhere")
    with pytest.raises(SourceChangedError, match="elsewhere"):
        await fetcher.read(fetcher.open(other, CS, source), 0, 10)
    assert fetcher.is_broken(other.object)
    assert not fetcher.mark_broken(other.object, "source changed: elsewhere")
    assert source.reads == 1


async def test_recheck_reads_the_source_and_stores_nothing(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    fetcher = Fetcher(store, Directory(), Peers(DATA))  # type: ignore[arg-type]
    assert await fetcher.recheck(HEAD_ENTRY, CS, source, 2) == digest(chunk_of(DATA, 2))
    assert await fetcher.recheck(HEAD_ENTRY, CS, source, 5) == digest(DATA[5 * CS :])
    assert store.get(ENTRY.object) is None
    source.data = bytes(HEAD_SAMPLE) + DATA[HEAD_SAMPLE:]
    with pytest.raises(SourceChangedError, match="first 65536 bytes"):
        await fetcher.recheck(HEAD_ENTRY, CS, source, 2)


async def test_foreground_goes_before_prefetch(store: ObjectStore, nursery: trio.Nursery) -> None:
    source = MemSource(data=DATA)
    order: list[int] = []
    original = source.read_into

    def recording(entry: FileEntry, offset: int, buf: memoryview) -> None:
        order.append(offset // CS)
        original(entry, offset, buf)

    source.read_into = recording  # type: ignore[method-assign]
    fetcher = Fetcher(store, Directory(), Peers(DATA), workers=1, readahead_chunks=0)  # type: ignore[arg-type]
    handle = fetcher.open(ENTRY, CS, source)
    # Queue prefetch of everything, then a foreground read of the last chunk, before any
    # worker runs: the foreground chunk must be transferred first.
    nursery.start_soon(fetcher.ensure, ENTRY, CS, source, Priority.PREFETCH)
    await trio.sleep(0)
    reader = trio.Event()

    async def read_last() -> None:
        await fetcher.read(handle, 5 * CS, 10)
        reader.set()

    nursery.start_soon(read_last)
    await trio.sleep(0)
    await _run(fetcher, nursery)
    await reader.wait()
    assert order[0] == 5


async def test_ensure_brings_whole_file_and_checks_published_sha256(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    import hashlib

    source = MemSource(data=DATA)
    fetcher = Fetcher(store, Directory(), Peers(DATA))  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    entry = ENTRY.model_copy(update={"version": {"sha256": hashlib.sha256(DATA).hexdigest()}})
    await fetcher.ensure(entry, CS, source, Priority.PREFETCH)
    obj = store.get(ENTRY.object)
    assert obj is not None and obj.complete and len(obj.written) == obj.chunks
    assert store.read(obj, 0, len(DATA)) == DATA
    assert fetcher.stats["verify_failures"] == 0


async def test_whole_file_sha256_mismatch_discards_content(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    fetcher = Fetcher(store, Directory(), Peers(DATA))  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    entry = ENTRY.model_copy(update={"version": {"sha256": "0" * 64}})
    with pytest.raises(SourceChangedError, match="failed verification"):
        await fetcher.ensure(entry, CS, source, Priority.PREFETCH)
    obj = store.get(ENTRY.object)
    assert obj is not None and not obj.written and not obj.durable
    assert fetcher.stats["verify_failures"] == 1
    await store.flush()
    removed = store.changes.take().removed
    assert removed and removed[0][0] is obj  # told to the scheduler


async def test_source_reads_coalesce_queued_neighbours(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    fetcher = Fetcher(store, Directory(), Peers(DATA), source_batch=3 * CS)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    assert source.reads == 2  # 6 chunks, 3 per request
    assert source.bytes == len(DATA)
    handle = fetcher.open(ENTRY, CS, source)
    assert await fetcher.read(handle, 0, len(DATA)) == DATA


async def test_sequential_readahead_goes_out_in_batches(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """A sequential reader's readahead is topped up half a window at a time, so the chunks
    go to the source (and to the scheduler for claims) a batch per request, not one each."""
    chunks = 24
    big = bytes(i % 251 for i in range(chunks * CS))
    entry = FileEntry(path="big.bin", size=len(big), object="ab" * 32, locator="big.bin")

    source = MemSource(data=big)
    directory = Directory()
    fetcher = Fetcher(
        store,
        directory,
        Peers(DATA),
        readahead_chunks=8,
        source_batch=4 * CS,  # type: ignore[arg-type]
    )
    await _run(fetcher, nursery)
    handle = fetcher.open(entry, CS, source)
    out = bytearray()
    while len(out) < len(big):
        out += await fetcher.read(handle, len(out), CS // 4)
        await trio.sleep(0.002)  # a reader slower than the source: the window stays full
    assert bytes(out) == big
    assert source.bytes == len(big)
    # One chunk per request would be 24; in batches of up to 4 it is about a quarter.
    assert source.reads <= 9, source.reads
    assert len(directory.claims) == source.reads


async def test_failed_batch_puts_neighbours_back_on_their_own(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    source.down = True
    fetcher = Fetcher(store, Directory(), Peers(DATA), source_batch=6 * CS, read_deadline=0.3)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    with pytest.raises(ReadDeadlineError):
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    source.down = False
    await trio.sleep(fetcher.failure_ttl)
    await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


async def test_access_errors_are_not_retried(store: ObjectStore, nursery: trio.Nursery) -> None:
    from syncbit.errors import InvalidSourceError

    source = MemSource(data=DATA)
    source.error = InvalidSourceError("gated repo: set HF_TOKEN")
    fetcher = Fetcher(store, Directory(), Peers(DATA), readahead_chunks=0)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    with pytest.raises(SourceChangedError, match="HF_TOKEN"):
        await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 10)
    assert source.reads == 1


# -- coordination: one source read per chunk across the cluster ------------------------------


def _chunk(i: int) -> bytes:
    return DATA[i * CS : (i + 1) * CS]


def _deliver(directory: Directory, *indexes: int) -> None:
    """A peer ("ok" at address "good") now holds these chunks, with their digests."""
    for i in indexes:
        directory.info.digests[i] = digest(_chunk(i))
        directory.info.peers[i] = [Peer("ok", "good")]
        directory.info.fetching.pop(i, None)


def _prefetch_evens(fetcher: Fetcher, source: Source, nursery: trio.Nursery) -> trio.Event:
    """Start a prefetch of ENTRY in which this node is planned to read the even chunks
    (of two members); the event is set once it completes."""
    done = trio.Event()

    async def prefetch() -> None:
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH, lambda i: i % 2 == 0)
        done.set()

    nursery.start_soon(prefetch)
    return done


async def test_chunk_another_node_is_reading_is_waited_for_and_taken_from_it(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    directory.info = ChunkMap(fetching={0: "n2"})
    fetcher = Fetcher(store, directory, peers, readahead_chunks=0, park_poll=0.01)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    got: list[bytes] = []

    async def read() -> None:
        got.append(bytes(await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 100)))

    nursery.start_soon(read)
    await trio.sleep(0.2)
    assert got == [] and source.reads == 0  # waiting for n2, not reading the source
    assert fetcher.stats["parked"] >= 1
    _deliver(directory, 0)
    with trio.fail_after(5):
        while not got:
            await trio.sleep(0.01)
    assert got == [DATA[:100]]
    assert source.reads == 0 and peers.calls == ["good"]


async def test_lapsed_claim_lets_this_node_read_the_source(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), Directory()
    directory.info = ChunkMap(fetching={0: "n2"})
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0, park_poll=0.01)  # type: ignore[arg-type]
    await _run(fetcher, nursery)

    async def n2_gives_up() -> None:
        await trio.sleep(0.2)
        directory.info.fetching.clear()  # n2 went down or released its claim

    nursery.start_soon(n2_gives_up)
    assert await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 100) == DATA[:100]
    assert source.reads == 1
    assert directory.claims[-1][0] == 0


async def test_waiting_reader_fails_at_its_deadline_naming_the_node(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), Directory()
    directory.info = ChunkMap(fetching={0: "n2"})
    fetcher = Fetcher(  # type: ignore[arg-type]
        store, directory, Peers(DATA), readahead_chunks=0, park_poll=0.01, read_deadline=0.3
    )
    await _run(fetcher, nursery)
    # The reader's deadline and the parked flight's are the same moment: either says so.
    with pytest.raises(ReadDeadlineError, match=r"timed out|n2 was reading it"):
        await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 100)
    # The parked flight itself fails too, with the cause, and keeps that failure for a
    # moment: a read that comes meanwhile meets it at once.
    with trio.fail_after(5):
        while True:
            with pytest.raises(ReadDeadlineError) as failed:
                await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 100)
            if "n2 was reading it from the source" in str(failed.value):
                break
    assert source.reads == 0


async def test_prefetch_plan_reads_own_chunks_and_takes_the_rest_from_peers(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    fetcher = Fetcher(store, directory, peers, park_poll=0.01, source_batch=CS)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    mine = {0, 2, 4}
    directory.info.fetching.update({1: "n2", 3: "n2", 5: "n2"})  # the other member's reads
    done = trio.Event()

    async def prefetch() -> None:
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH, lambda i: i in mine)
        done.set()

    nursery.start_soon(prefetch)
    await trio.sleep(0.3)
    assert not done.is_set()
    assert source.bytes == 3 * CS  # only the chunks planned for this node
    _deliver(directory, 1, 3, 5)  # the other member read them
    with trio.fail_after(5):
        await done.wait()
    assert sorted(peers.calls) == ["good"] * 3
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


async def test_node_done_with_its_share_takes_over_unread_chunks_from_the_end(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """The other member has not got to chunks 3 and 5 yet (nobody holds or reads them):
    once this node's own share is in, it reads them itself, the last one first (owners
    read from the front), one at a time, each under a claim."""
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    fetcher = Fetcher(store, directory, peers, park_poll=0.01, source_batch=CS)  # type: ignore[arg-type]
    fetcher.source_sharers = lambda: 2
    await _run(fetcher, nursery)
    _deliver(directory, 1)  # the other member's first chunk is in
    with trio.fail_after(5):
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH, lambda i: i % 2 == 0)
    assert source.bytes == len(DATA) - CS  # its own three, then 5 and 3; chunk 1 from the peer
    assert directory.claims[3:] == [[5], [3]]
    assert peers.calls == ["good"]
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


async def test_planned_owner_gone_means_this_node_reads_it(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), Directory()
    fetcher = Fetcher(store, directory, Peers(DATA), park_poll=0.01)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    members = ["me", "other"]

    def may_source(i: int) -> bool:
        return members[i % len(members)] == "me"

    async def other_goes_down() -> None:
        await trio.sleep(0.2)
        members.remove("other")  # the plan no longer has it

    nursery.start_soon(other_goes_down)
    with trio.fail_after(5):
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH, may_source)
    assert source.bytes == len(DATA)


async def test_foreground_read_is_not_starved_by_slow_prefetch(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    slow = MemSource(data=DATA)
    slow.gate = threading.Event()  # prefetch source reads hang until set
    other = ENTRY.model_copy(update={"object": "ef" * 32})
    fetcher = Fetcher(  # type: ignore[arg-type]
        store, Directory(), Peers(DATA), workers=4, prefetch_concurrency=2, readahead_chunks=0
    )
    await _run(fetcher, nursery)
    nursery.start_soon(fetcher.ensure, ENTRY, CS, slow, Priority.PREFETCH)
    await trio.sleep(0.1)
    try:
        with trio.fail_after(5):
            got = await fetcher.read(fetcher.open(other, CS, MemSource(data=DATA)), 0, 100)
        assert got == DATA[:100]
    finally:
        slow.gate.set()


async def test_prefetch_bandwidth_cap(
    store: ObjectStore, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = MemSource(data=DATA)
    rate = CS * 10  # bytes per (virtual) second
    fetcher = Fetcher(  # type: ignore[arg-type]
        store, Directory(), Peers(DATA), prefetch_bandwidth=rate, source_batch=CS
    )
    await _run(fetcher, nursery)
    start = trio.current_time()
    await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    elapsed = trio.current_time() - start
    # Every read waits for the bytes before it: all but the last read's (whichever that
    # is; the file's short last chunk may go at any point).
    assert elapsed >= (len(DATA) - CS) / rate
    assert source.bytes == len(DATA)


async def test_source_reads_keep_flowing_while_peer_transfers_are_slow(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """The node's share of the origin's bytes is the cluster's bottleneck: peer transfers
    that hang must not hold it back (they run in a lane of their own)."""
    gate = threading.Event()

    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    peers.gate = gate
    fetcher = Fetcher(  # type: ignore[arg-type]
        store, directory, peers, park_poll=0.01, source_batch=CS, prefetch_concurrency=2
    )
    await _run(fetcher, nursery)
    _deliver(directory, 1, 3, 5)  # the other member already holds its share
    done = _prefetch_evens(fetcher, source, nursery)
    try:
        with trio.fail_after(5):
            while source.bytes < 3 * CS:  # chunks 0, 2, 4 from the source
                await trio.sleep(0.01)
        assert not done.is_set()  # the peer transfers are still hanging
    finally:
        gate.set()
    with trio.fail_after(5):
        await done.wait()
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


async def test_chunks_planned_elsewhere_come_from_peers_during_own_source_read(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """The other node's chunks do not queue behind this node's source read (one at a
    time with 2 sharers): they wait parked and go to the peer lane as soon as a holder
    has them, while the node's own read from the origin still runs."""
    source, directory, peers = MemSource(data=DATA), Directory(), Peers(DATA)
    source.gate = threading.Event()  # this node's own source read hangs until set
    fetcher = Fetcher(store, directory, peers, park_poll=0.01, source_batch=CS)  # type: ignore[arg-type]
    fetcher.source_sharers = lambda: 2
    await _run(fetcher, nursery)
    _deliver(directory, 1, 3)  # the other member's first chunks are in
    done = _prefetch_evens(fetcher, source, nursery)
    try:
        with trio.fail_after(5):
            while len(peers.calls) < 2:
                await trio.sleep(0.01)
        assert source.reads == 0  # chunk 0's source read is still hanging
        assert fetcher.stats["parked"] >= 1  # chunk 5 waits for its holder, parked
    finally:
        source.gate.set()
    _deliver(directory, 5)
    with trio.fail_after(5):
        await done.wait()
    assert sorted(peers.calls) == ["good"] * 3 and source.bytes == 3 * CS
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


@pytest.mark.parametrize(("sharers", "at_once"), [(1, 3), (2, 2), (8, 1)])
async def test_prefetch_source_reads_at_once_shrink_with_the_plan(
    store: ObjectStore, nursery: trio.Nursery, sharers: int, at_once: int
) -> None:
    """About prefetch_concurrency/2 source reads across the plan's nodes, at least one per
    node: with many nodes each reads its share one chunk at a time, so every chunk is
    complete (and can be forwarded) as soon as possible."""
    source = MemSource(data=DATA)
    gate = source.gate = threading.Event()
    fetcher = Fetcher(  # type: ignore[arg-type]
        store, Directory(), Peers(DATA), source_batch=CS, prefetch_concurrency=6
    )
    fetcher.source_sharers = lambda: sharers
    await _run(fetcher, nursery)
    nursery.start_soon(fetcher.ensure, ENTRY, CS, source, Priority.PREFETCH)
    with trio.fail_after(5):
        while source.active < at_once:
            await trio.sleep(0.01)
    await trio.sleep(0.2)  # room for more to start, if the limit let them
    assert source.peak == at_once
    gate.set()
    handle = fetcher.open(ENTRY, CS, source)
    with trio.fail_after(5):
        assert await fetcher.read(handle, 0, len(DATA)) == DATA


async def test_prefetch_jobs_tell_the_fetcher_how_many_nodes_share_the_source(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    gate = source.gate = threading.Event()
    fetcher = Fetcher(store, Directory(), Peers(DATA))  # type: ignore[arg-type]
    await _run(fetcher, nursery)

    async def flush() -> None:
        await store.flush()

    jobs = Jobs("me", fetcher, lambda m: source, lambda m: False, flush)
    jobs.bind(nursery)
    manifest = Manifest(dataset="d", source="mem://", revision="r1", chunk_size=CS, files=[ENTRY])
    assert fetcher.source_sharers() == 1
    job = jobs.start(manifest, "prefetch", ["a", "me", "z"])
    assert fetcher.source_sharers() == 3
    jobs.start(manifest, "prefetch", ["a", "me"])  # the plan lost a member
    assert fetcher.source_sharers() == 2
    jobs.start(manifest, "prefetch", ["me"])  # alone: it reads everything itself
    gate.set()
    with trio.fail_after(5):
        await job.finished.wait()
    assert fetcher.source_sharers() == 1  # nothing running: a read has the whole budget


async def test_busy_holders_are_waited_for_not_blamed(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """A holder at its upload limit turns a prefetch transfer away: the fetcher asks the
    other holders, and when all are busy it waits and asks again (a busy peer is not a
    bad one). A reader's transfer is never turned away."""
    directory, peers = Directory(), Peers(DATA)
    peers.busy = {"a", "b"}
    for i in range(len(DATA) // CS + 1):
        directory.info.digests[i] = digest(_chunk(i))
        directory.info.peers[i] = [Peer("na", "a"), Peer("nb", "b")]
    fetcher = Fetcher(  # type: ignore[arg-type]
        store, directory, peers, park_poll=0.01, readahead_chunks=0
    )
    await _run(fetcher, nursery)
    # A reader is served by a busy holder at once.
    with trio.fail_after(5):
        assert await fetcher.read(fetcher.open(ENTRY, CS, MemSource(data=DATA)), 0, 10) == DATA[:10]
    done = trio.Event()

    async def prefetch() -> None:
        await fetcher.ensure(ENTRY, CS, MemSource(data=DATA), Priority.PREFETCH)
        done.set()

    nursery.start_soon(prefetch)
    await trio.sleep(0.3)
    assert not done.is_set() and fetcher.stats["busy"] > 0  # both holders busy: waiting
    peers.busy.discard("b")  # one holder frees a slot
    with trio.fail_after(5):
        await done.wait()
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]
    assert fetcher.stats["source"] == 0  # nothing from the source: busy is not gone


class _SchedulerDown(Directory):
    """The chunk directory while no scheduler answers (a failover): every call fails."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def chunk_info(self, object_id: str, max_age: float = 1.0) -> ChunkMap:
        if self.down:
            raise SchedulerError("no scheduler leads now")
        return await super().chunk_info(object_id, max_age)

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult:
        if self.down:
            raise SchedulerError("no scheduler leads now")
        return await super().claim(object_id, indexes, ttl)


async def test_without_a_scheduler_prefetch_waits_and_readers_read(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), _SchedulerDown()
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0, park_poll=0.01)  # type: ignore[arg-type]
    await _run(fetcher, nursery)
    done = trio.Event()

    async def prefetch() -> None:
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
        done.set()

    nursery.start_soon(prefetch)
    await trio.sleep(0.3)
    # Another node may be reading the same chunks: the origin would send them twice.
    assert source.reads == 0 and not done.is_set()
    # A reader never waits for the scheduler: the source has the bytes.
    assert await fetcher.read(fetcher.open(ENTRY, CS, source), 0, 100) == DATA[:100]
    assert source.reads == 1
    directory.down = False  # a new leader answers
    with trio.fail_after(10):
        await done.wait()
    assert source.bytes == len(DATA)  # each byte once
