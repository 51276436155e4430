"""What the fetch layer verifies of the source: chunks against the record, the head
sample, a published whole-file SHA-256, broken revisions (no network)."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import pytest
import trio
from fakes import Directory, MemSource, Peers
from fetchfixtures import (
    CS,
    DATA,
    ENTRY,
    HEAD_ENTRY,
    chunk_of,
    prefetch_in_background,
    started,
)
from trio.testing import wait_all_tasks_blocked

from syncbit.chunks import HEAD_SAMPLE, digest
from syncbit.errors import SourceChangedError, SourceUnavailableError
from syncbit.fetch import Fetcher, Priority
from syncbit.fetch.handle import OpenFile
from syncbit.fetch.verify import HeadChecks, read_checked
from syncbit.manifest import FileEntry
from syncbit.protocol import ChunkMap
from syncbit.store import ObjectStore
from syncbit.store.read import ObjectReader


async def test_source_bytes_that_differ_from_the_record_are_never_served_nor_stored(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """The source now sends other bytes for chunk 2 than the ones recorded: the read fails,
    the batch's other chunks fail with it, nothing is stored, the scheduler is told."""
    source, directory = MemSource(data=DATA), Directory()
    source.data = DATA[: 2 * CS] + bytes(CS) + DATA[3 * CS :]
    directory.info = ChunkMap(digests={2: digest(chunk_of(DATA, 2))})
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=4)
    await started(fetcher, nursery)
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
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0)
    await started(fetcher, nursery)
    obj = store.object(ENTRY.object, ENTRY.size, CS)
    with pytest.raises(SourceChangedError):
        await fetcher.ensure(ENTRY, CS, source, Priority.PREFETCH)
    assert source.reads == 1  # one batch brought all six chunks...
    assert not any(obj.has(i) for i in range(obj.chunks))  # ...and none was kept
    assert [c[0] for c in directory.checks] == [3]


async def test_a_changed_head_fails_every_source_read_of_the_file(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """An HTTP origin changed the file but kept its ETag: the head sample recorded at
    `dataset add` tells, on the first source read after the change."""
    source, directory = MemSource(data=DATA), Directory()
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0)
    await started(fetcher, nursery)
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


class _Samples:
    """Head samples for `HeadChecks`: each sees the head as it is when it starts (as a
    server reads it when the request arrives) and ends when the test lets it."""

    def __init__(self) -> None:
        self.head_ok = True
        self.taken = 0
        self.release = trio.Event()
        self.error: Exception | None = None

    async def read(self) -> bool:
        self.taken += 1
        seen = self.head_ok
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return seen


async def test_reads_of_one_file_at_once_share_head_samples(nursery: trio.Nursery) -> None:
    """Five batch reads of one file: the first read's sample, then one more that began
    after the other four, shared by them; a read waits for nothing once a sample that
    began after it is in."""
    heads, samples, answers = HeadChecks(), _Samples(), []

    async def batch_read() -> None:
        began = trio.current_time()
        answers.append(await heads.after("f", began, samples.read, trio.Event()))

    nursery.start_soon(batch_read)
    await wait_all_tasks_blocked()
    for _ in range(4):  # began while the first sample was out: it cannot answer for them
        await trio.sleep(0.001)
        nursery.start_soon(batch_read)
    await wait_all_tasks_blocked()
    assert samples.taken == 1
    samples.release.set()
    await wait_all_tasks_blocked()
    assert answers == [True] * 5
    assert samples.taken == heads.started == 2
    await heads.after("f", 0.0, samples.read, trio.Event())  # answered by the last one
    assert samples.taken == 2


async def test_a_head_changed_before_a_read_began_fails_it_though_a_sample_was_out(
    nursery: trio.Nursery,
) -> None:
    heads, samples, answers = HeadChecks(), _Samples(), {}

    async def batch_read(name: str) -> None:
        began = trio.current_time()
        answers[name] = await heads.after("f", began, samples.read, trio.Event())

    nursery.start_soon(batch_read, "before")
    await wait_all_tasks_blocked()
    samples.head_ok = False  # the origin changed the file's head now
    await trio.sleep(0.001)
    nursery.start_soon(batch_read, "after")
    await wait_all_tasks_blocked()
    samples.release.set()
    await wait_all_tasks_blocked()
    # The first sample went out before the change: it answers only for the read that
    # began before it too (as that read's own sample did before samples were shared).
    assert answers == {"before": True, "after": False}


async def test_a_read_does_not_wait_on_another_reads_trickling_sample_past_its_batch(
    nursery: trio.Nursery,
) -> None:
    heads, stuck = HeadChecks(), _Samples()
    nursery.start_soon(heads.after, "f", trio.current_time(), stuck.read, trio.Event())
    await wait_all_tasks_blocked()
    await trio.sleep(0.001)
    mine, batch_done = _Samples(), trio.Event()
    mine.release.set()
    got: list[bool] = []

    async def later_read() -> None:
        got.append(await heads.after("f", trio.current_time(), mine.read, batch_done))

    nursery.start_soon(later_read)
    await wait_all_tasks_blocked()
    assert not got and mine.taken == 0  # waits while its batch runs...
    batch_done.set()
    await wait_all_tasks_blocked()
    assert got == [True] and mine.taken == 1  # ...then takes its own
    stuck.release.set()


async def test_a_shared_sample_that_trickles_holds_a_read_only_as_long_again_as_its_batch(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    heads, trickling = HeadChecks(), _Samples()
    began = trio.current_time()  # a read begins; another read's sample goes out after it
    nursery.start_soon(heads.after, "f", trio.current_time(), trickling.read, trio.Event())
    await wait_all_tasks_blocked()
    mine, batch_done = _Samples(), trio.Event()
    mine.release.set()
    answered: list[float] = []

    async def read() -> None:
        assert await heads.after("f", began, mine.read, batch_done)
        answered.append(trio.current_time() - began)

    nursery.start_soon(read)
    await trio.sleep(2)  # its batch takes 2 s; the shared sample is still out
    assert not answered and mine.taken == 0
    batch_done.set()
    await trio.sleep(10)
    assert answered == [pytest.approx(4.0)] and mine.taken == 1  # 2 s more, then its own
    trickling.release.set()


async def test_a_failed_sample_answers_no_one_else(nursery: trio.Nursery) -> None:
    heads, failing = HeadChecks(), _Samples()
    failing.error = SourceUnavailableError("origin: 503")
    errors: list[Exception] = []

    async def first_read() -> None:
        try:
            await heads.after("f", trio.current_time(), failing.read, trio.Event())
        except SourceUnavailableError as exc:
            errors.append(exc)

    nursery.start_soon(first_read)
    await wait_all_tasks_blocked()
    fine = _Samples()
    fine.release.set()
    got: list[bool] = []

    async def sharing_read() -> None:  # began before the failing sample: would share it
        got.append(await heads.after("f", -1.0, fine.read, trio.Event()))

    nursery.start_soon(sharing_read)
    await wait_all_tasks_blocked()
    failing.release.set()
    await wait_all_tasks_blocked()
    assert len(errors) == 1 and got == [True] and fine.taken == 1


async def test_a_batch_that_failed_takes_no_head_sample(nursery: trio.Nursery) -> None:
    """A throttled or failed batch read whose sample was still to come (another read's
    was out) sends none: the origin would only get one more request to refuse."""
    heads, out = HeadChecks(), _Samples()
    key = f"{HEAD_ENTRY.object}:{HEAD_ENTRY.locator}"
    nursery.start_soon(heads.after, key, trio.current_time(), out.read, trio.Event())
    await wait_all_tasks_blocked()
    source = MemSource(data=DATA)
    source.down = True
    with pytest.raises(SourceUnavailableError):
        await read_checked(source, HEAD_ENTRY, 2, CS, memoryview(bytearray(CS)), 1, heads=heads)
    assert source.asked == [(HEAD_ENTRY.path, 2 * CS)]  # the batch alone
    out.release.set()


async def test_a_pull_with_streams_at_once_takes_fewer_head_samples_than_reads(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    """End to end: the file's chunks after the first are read as one-chunk batches on
    several streams at once, each needing a head sample (the first batch holds the head);
    they share them, and a changed head still fails the next read."""
    source = MemSource(data=DATA)
    fetcher = Fetcher(store, Directory(), Peers(DATA), readahead_chunks=0, source_batch=CS)
    await started(fetcher, nursery)
    handle = fetcher.open(HEAD_ENTRY, CS, source)
    assert await fetcher.read(handle, 0, 10) == DATA[:10]  # delivered: more streams now
    source.gate = threading.Event()
    done = prefetch_in_background(fetcher, source, nursery, HEAD_ENTRY)
    with trio.fail_after(10):
        while source.active < 3:  # batches (and a sample) held at the source at once
            await trio.sleep(0.005)
    source.gate.set()
    with trio.fail_after(10):
        await done.wait()
    batches = 5  # chunks 1-5
    samples = sum(1 for _, offset in source.asked if offset == 0) - 1  # less chunk 0's batch
    assert 1 <= samples < batches, source.asked
    assert store.read(store.get(ENTRY.object), 0, len(DATA)) == DATA  # type: ignore[arg-type]


async def test_broken_files_are_refused_cached_or_not(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source, directory = MemSource(data=DATA), Directory()
    fetcher = Fetcher(store, directory, Peers(DATA), readahead_chunks=0)
    await started(fetcher, nursery)
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
    fetcher = Fetcher(store, Directory(), Peers(DATA))
    assert await fetcher.recheck(HEAD_ENTRY, CS, source, 2) == digest(chunk_of(DATA, 2))
    assert await fetcher.recheck(HEAD_ENTRY, CS, source, 5) == digest(DATA[5 * CS :])
    assert store.get(ENTRY.object) is None
    source.data = bytes(HEAD_SAMPLE) + DATA[HEAD_SAMPLE:]
    with pytest.raises(SourceChangedError, match="first 65536 bytes"):
        await fetcher.recheck(HEAD_ENTRY, CS, source, 2)


async def test_ensure_brings_whole_file_and_checks_published_sha256(
    store: ObjectStore, nursery: trio.Nursery
) -> None:
    source = MemSource(data=DATA)
    fetcher = Fetcher(store, Directory(), Peers(DATA))
    await started(fetcher, nursery)
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
    fetcher = Fetcher(store, Directory(), Peers(DATA))
    await started(fetcher, nursery)
    entry = ENTRY.model_copy(update={"version": {"sha256": "0" * 64}})
    with pytest.raises(SourceChangedError, match="failed verification"):
        await fetcher.ensure(entry, CS, source, Priority.PREFETCH)
    obj = store.get(ENTRY.object)
    assert obj is not None and not obj.written and not obj.durable
    assert fetcher.stats["verify_failures"] == 1
    await store.flush()
    removed = store.changes.take().removed
    assert removed and removed[0][0] is obj  # told to the scheduler


class _Hashed:
    """Counts what the store hashes: the running hash's reads, and whole-file re-reads."""

    def __init__(self, store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        self.whole = 0
        hash_chunks, sha256 = store.hash_chunks, store.sha256
        self.from_file = 0  # of those, read back from the object file (not from RAM)
        real_file_hash = ObjectReader.hash_into

        async def counting_hash_chunks(obj: Any, h: Any, first: int, end: int) -> None:
            self.bytes += min(obj.size, end * obj.chunk_size) - first * obj.chunk_size
            await hash_chunks(obj, h, first, end)

        def counting_file_hash(reader: ObjectReader, h: Any, offset: int, length: int) -> None:
            self.from_file += length
            real_file_hash(reader, h, offset, length)

        async def counting_sha256(obj: Any) -> str:
            self.whole += 1
            return await sha256(obj)

        monkeypatch.setattr(store, "hash_chunks", counting_hash_chunks)
        monkeypatch.setattr(ObjectReader, "hash_into", counting_file_hash)
        monkeypatch.setattr(store, "sha256", counting_sha256)

    async def reach(self, nbytes: int) -> None:
        """Until `nbytes` were hashed (chunks are written and hashed in worker threads)."""
        with trio.fail_after(10):
            while self.bytes < nbytes:
                await trio.sleep(0.005)


async def _published(
    store: ObjectStore, nursery: trio.Nursery
) -> tuple[MemSource, Fetcher, FileEntry, OpenFile]:
    """A fetcher (no readahead) and an open file whose source publishes its SHA-256."""
    source = MemSource(data=DATA)
    fetcher = Fetcher(store, Directory(), Peers(DATA), readahead_chunks=0)
    await started(fetcher, nursery)
    entry = ENTRY.model_copy(update={"version": {"sha256": hashlib.sha256(DATA).hexdigest()}})
    return source, fetcher, entry, fetcher.open(entry, CS, source)


async def test_the_whole_file_sha256_is_computed_as_chunks_arrive(
    store: ObjectStore, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks are hashed in file order as they are written, each once: the check ends with
    the download instead of reading the whole file again after it."""
    hashed = _Hashed(store, monkeypatch)
    source, fetcher, entry, handle = await _published(store, nursery)
    for index in (3, 4, 0, 1):  # out of order: 3 and 4 wait until 2 is there
        assert await fetcher.read(handle, index * CS, 10) == chunk_of(DATA, index)[:10]
    await hashed.reach(2 * CS)
    await store.flush()
    await wait_all_tasks_blocked()
    assert hashed.bytes == 2 * CS
    assert not fetcher.is_verified(ENTRY.object)
    await fetcher.ensure(entry, CS, source, Priority.PREFETCH)
    assert fetcher.is_verified(ENTRY.object)
    assert hashed.bytes == len(DATA) and hashed.whole == 0
    assert hashed.from_file == 0  # every chunk hashed from RAM, none read back from disk
    assert fetcher.stats["verify_failures"] == 0


async def test_a_chunk_replaced_after_it_was_hashed_is_caught(
    store: ObjectStore, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk 0 is hashed, the object evicted, and the source then sends other bytes for
    chunk 0 (no digest recorded yet to refuse them): the running hash still matches the
    published SHA-256, but the file no longer does. The object is discarded, never
    verified."""
    hashed = _Hashed(store, monkeypatch)
    source, fetcher, entry, handle = await _published(store, nursery)
    assert await fetcher.read(handle, 0, 10) == DATA[:10]
    await hashed.reach(CS)
    await store.flush()
    assert (await store.evict([ENTRY.object])).evicted == [ENTRY.object]
    source.data = bytes(CS) + DATA[CS:]
    with pytest.raises(SourceChangedError, match="failed verification"):
        await fetcher.ensure(entry, CS, source, Priority.PREFETCH)
    assert hashed.whole == 1  # the running hash's "match" was checked on the file itself
    assert not fetcher.is_verified(ENTRY.object)
    obj = store.get(ENTRY.object)
    assert obj is not None and not obj.written
    assert fetcher.stats["verify_failures"] == 1


async def test_a_verified_file_evicted_and_fetched_again_is_verified_again(
    store: ObjectStore, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check stands for the content it hashed: once that left the cache, the content
    fetched again is checked again, and a source that now sends other bytes (no digest
    recorded to refuse them) is caught, not served as verified."""
    hashed = _Hashed(store, monkeypatch)
    source, fetcher, entry, _ = await _published(store, nursery)
    await fetcher.ensure(entry, CS, source, Priority.PREFETCH)
    assert fetcher.is_verified(ENTRY.object)
    await store.flush()
    assert (await store.evict([ENTRY.object])).evicted == [ENTRY.object]
    assert not fetcher.is_verified(ENTRY.object)
    source.data = bytes(CS) + DATA[CS:]
    with pytest.raises(SourceChangedError, match="failed verification"):
        await fetcher.ensure(entry, CS, source, Priority.PREFETCH)
    assert not fetcher.is_verified(ENTRY.object)
    assert fetcher.stats["verify_failures"] == 1
    source.data = DATA  # the source is right again: fetched and verified anew
    await fetcher.ensure(entry, CS, source, Priority.PREFETCH)
    assert fetcher.is_verified(ENTRY.object)
    assert hashed.bytes >= 2 * len(DATA)
