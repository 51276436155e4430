"""Source reads that adapt to the origin, end to end on loopback: the fetcher and a real
HTTP source against a test origin that caps each connection (it settles at several
streams), one that caps only the total (few), and one that throttles (fewer, and the pull
still completes). Bounds on stream counts, never on time."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from fakes import Directory, Peers

from syncbit.fetch import Fetcher, Priority
from syncbit.manifest import FileEntry
from syncbit.sources.http import HttpSource
from syncbit.store import ObjectStore
from syncbit_testing.capped import CappedOrigin

CS = 256 << 10
MB = 1_000_000
SIZE = 40 << 20
CAP = 16


@pytest.fixture
def data(tmp_path: Path) -> bytes:
    payload = os.urandom(SIZE)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "big.bin").write_bytes(payload)
    return payload


@pytest.fixture
def www(tmp_path: Path, data: bytes) -> Path:
    return tmp_path / "www"


@pytest.fixture
async def fetcher(store: ObjectStore) -> AsyncIterator[Fetcher]:
    """One request per chunk, so that a 40 MiB file is 160 requests: enough for the
    controller's measurements."""
    f = Fetcher(store, Directory(), Peers(), source_batch=CS, source_concurrency=CAP)
    async with trio.open_nursery() as nursery:
        await nursery.start(f.run)
        yield f
        nursery.cancel_scope.cancel()


@pytest.fixture
def origins() -> Iterator[list[CappedOrigin]]:
    started: list[CappedOrigin] = []
    yield started
    for origin in started:
        origin.stop()


@asynccontextmanager
async def serving(
    origins: list[CappedOrigin], www: Path, **kwargs: float
) -> AsyncIterator[tuple[CappedOrigin, HttpSource, FileEntry]]:
    """A capped origin serving `www` (stopped by the `origins` fixture), a source on its
    file and the file's entry; the source is closed afterwards."""
    origin = CappedOrigin(www, **kwargs)  # type: ignore[arg-type]
    origin.start()
    origins.append(origin)
    source = HttpSource(f"{origin.url}big.bin")
    try:
        entry = (await source.list()).files[0]
        # Without the head sample, which each read would fetch beside it as a second (tiny)
        # body: the origin's count of bodies at once is then the count of streams.
        version = {k: v for k, v in entry.version.items() if k != "head"}
        yield origin, source, entry.model_copy(update={"version": version})
    finally:
        source.close()


async def pull(fetcher: Fetcher, source: HttpSource, entry: FileEntry, data: bytes) -> None:
    with trio.fail_after(120):
        await fetcher.ensure(entry, CS, source, Priority.PREFETCH)
    handle = fetcher.open(entry, CS, source)
    assert await fetcher.read(handle, 0, len(data)) == data


async def test_a_per_connection_cap_makes_it_settle_at_several_streams(
    fetcher: Fetcher, www: Path, data: bytes, origins: list[CappedOrigin]
) -> None:
    async with serving(origins, www, per_connection=4 * MB) as (origin, source, entry):
        await pull(fetcher, source, entry, data)
        stats = fetcher.streams.stats(source)
        assert stats.limit >= 8, stats
        assert origin.peak_streams >= 8
        # The origin counts a body until its write fails: a raced read's loser, shut by
        # the fetcher, may still count there while its replacement starts (seen once on
        # a loaded machine: 17).
        assert origin.peak_streams <= CAP + 1
        assert stats.throttles == stats.failures == 0


async def test_an_origin_capped_only_in_total_keeps_few_streams(
    fetcher: Fetcher, www: Path, data: bytes, origins: list[CappedOrigin]
) -> None:
    """More streams than one bring nothing here (like loopback): no more than it started
    with, after one doubling tried and dropped."""
    async with serving(origins, www, total=16 * MB) as (origin, source, entry):
        await pull(fetcher, source, entry, data)
        stats = fetcher.streams.stats(source)
        assert stats.limit <= 4, stats
        assert origin.peak_streams <= 2 * 4


async def test_throttling_answers_shrink_it_and_the_pull_completes(
    fetcher: Fetcher, www: Path, data: bytes, origins: list[CappedOrigin]
) -> None:
    """An origin that refuses (503, Retry-After: 1) every request beyond 2 open: the
    fetcher comes down below that and waits as asked, so refusals stay few."""
    async with serving(
        origins, www, per_connection=8 * MB, throttle_above=2, throttle_retry_after=1
    ) as (origin, source, entry):
        await pull(fetcher, source, entry, data)
        stats = fetcher.streams.stats(source)
        assert stats.throttles >= 1
        assert stats.limit <= 2, stats
        assert origin.throttled >= stats.throttles  # answers to one burst: one cut
        assert origin.throttled <= 8  # one cut per burst, not one refusal per chunk


async def test_a_lazy_sequential_reader_grows_its_readahead_with_the_streams(
    fetcher: Fetcher, www: Path, data: bytes, origins: list[CappedOrigin]
) -> None:
    async with serving(origins, www, per_connection=4 * MB) as (origin, source, entry):
        handle = fetcher.open(entry, CS, source)
        first_window = fetcher.readahead_window(handle)
        got = bytearray()
        with trio.fail_after(120):
            while len(got) < len(data):
                got += await fetcher.read(handle, len(got), 1 << 20)
        assert got == data
        assert fetcher.streams.stats(source).limit >= 8
        assert fetcher.readahead_window(handle) >= 2 * first_window
        assert origin.peak_streams >= 8


@asynccontextmanager
async def batching(store: ObjectStore, chunks: int) -> AsyncIterator[Fetcher]:
    """A fetcher whose source requests may bring `chunks` chunks each."""
    f = Fetcher(store, Directory(), Peers(), source_batch=chunks * CS, source_concurrency=CAP)
    async with trio.open_nursery() as nursery:
        await nursery.start(f.run)
        yield f
        nursery.cancel_scope.cancel()


async def test_requests_to_an_origin_slow_per_connection_ask_for_less(
    store: ObjectStore, www: Path, data: bytes, origins: list[CappedOrigin]
) -> None:
    """At 2 MB/s a connection, a 4 MiB request would take 2 s: each measurement of the
    concurrency search (a request per stream) and each of the file's last requests that
    long. Requests ask for about half a second of a stream's bytes instead: 3 chunks."""
    batch = 16
    async with (
        batching(store, batch) as fetcher,
        serving(origins, www, per_connection=2 * MB) as (origin, source, entry),
    ):
        await pull(fetcher, source, entry, data)
        gets = sum(origin.state.stats()["gets"].values())
        assert gets >= 3 * (SIZE // (batch * CS)), gets  # 10 requests of 16 chunks would do
        assert fetcher.streams.request_bytes(source, CS, batch * CS) <= 4 * CS
        assert fetcher.streams.stats(source).limit >= 8


async def test_requests_to_a_fast_origin_bring_whole_batches(
    store: ObjectStore, www: Path, data: bytes, origins: list[CappedOrigin]
) -> None:
    """Uncapped (loopback): every request brings a whole batch."""
    batch = 16
    async with batching(store, batch) as fetcher, serving(origins, www) as (origin, source, entry):
        await pull(fetcher, source, entry, data)
        gets = sum(origin.state.stats()["gets"].values())
        # 10 requests of 16 chunks, a straggler's second one now and then (160 if every
        # request brought a chunk).
        assert gets <= 2 * (SIZE // (batch * CS)), gets
        assert fetcher.streams.request_bytes(source, CS, batch * CS) == batch * CS
