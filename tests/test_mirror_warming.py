"""The node mirror's warming hands its registry slot to the next blob near the end of the
current one (`WARM_TAIL_BYTES` still to come) while it reads the image alone, so the
registry link does not idle between blobs; once per blob, also when the read fails. When
other nodes read blobs of the image too, the slot is held to the last byte as before."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import trio
import trio.testing

from syncbit.errors import SourceUnavailableError
from syncbit.mirror import MirrorConfig, Repository, UpstreamOptions
from syncbit.node.mirror import WARM_TAIL_BYTES, NodeBlobSource, _Pull, _Warming, blob_entry
from syncbit.protocol import ChunkMap, ClaimResult

CHUNK = 4 << 20
CHUNKS = 8
DIGEST = "sha256:" + "cd" * 32
REPO = Repository("registry.test:5000", "team/app")


@dataclass
class _Object:
    """A stored object as warming counts it: which chunks are written."""

    chunks: int = CHUNKS
    chunk_size: int = CHUNK
    size: int = CHUNKS * CHUNK
    written: set[int] = field(default_factory=set)

    def has(self, index: int) -> bool:
        return index in self.written


@dataclass
class _Store:
    objects: dict[str, _Object] = field(default_factory=dict)
    written_event: trio.Event = field(default_factory=trio.Event)

    def get(self, object_id: str) -> _Object:
        return self.objects.setdefault(object_id, _Object())

    @property
    def obj(self) -> _Object:
        return self.get(blob_entry(DIGEST, CHUNKS * CHUNK).object)

    def arrive(self, *indexes: int, digest: str = DIGEST) -> None:
        self.get(blob_entry(digest, CHUNKS * CHUNK).object).written.update(indexes)
        self.written_event.set()
        self.written_event = trio.Event()


@dataclass
class _Fetcher:
    """The registry read of a warmed blob: done when the test says, or failing."""

    finish: trio.Event = field(default_factory=trio.Event)
    fail: bool = False

    async def fetch_chunks(self, *args: object) -> None:
        await self.finish.wait()
        if self.fail:
            raise SourceUnavailableError("the registry went away")

    async def ensure(self, *args: object) -> None:
        return None


@dataclass
class _Directory:
    """Claims as the cluster answers them: objects another node reads are busy."""

    others: set[str] = field(default_factory=set)
    claimed: list[str] = field(default_factory=list)

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult:
        self.claimed.append(object_id)
        if object_id in self.others:
            return ClaimResult(busy={i: "another node" for i in indexes})
        return ClaimResult(granted=indexes)

    async def release(self, object_id: str, indexes: list[int]) -> None:
        return None

    async def chunk_info(self, object_id: str, max_age: float = 1.0) -> ChunkMap:
        return ChunkMap()


async def _register(object_id: str, size: int, chunk_size: int) -> tuple[int, int]:
    return size, chunk_size


def _source(directory: _Directory | None = None) -> tuple[NodeBlobSource, _Store, _Fetcher]:
    store, fetcher = _Store(), _Fetcher()
    config = MirrorConfig(registries={REPO.registry: UpstreamOptions(insecure=True)})
    upstream = cast(Any, None)  # tags and manifests: not asked here
    source = NodeBlobSource(
        config,
        upstream,
        cast(Any, store),
        cast(Any, fetcher),
        cast(Any, directory or _Directory()),
        _register,
    )
    return source, store, fetcher


async def _slot_free(source: NodeBlobSource) -> bool:
    """Whether the next blob could take the registry slot now (without taking it)."""
    await trio.testing.wait_all_tasks_blocked()
    value: int = source._warm_slots.value
    return value > 0


async def test_the_next_blob_gets_the_registry_slot_before_the_last_bytes_arrive() -> None:
    source, store, fetcher = _source()
    entry = blob_entry(DIGEST, CHUNKS * CHUNK)
    warming = _Warming()
    await source._warm_slots.acquire()  # as `_warm_claim` does for a blob this node reads
    tail = WARM_TAIL_BYTES // CHUNK
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source._warm_one, REPO, entry, CHUNK, True, warming, _Pull())
        store.arrive(*range(CHUNKS - tail - 1))
        assert not await _slot_free(source)  # more than the tail still to come
        store.arrive(CHUNKS - tail - 1)
        assert await _slot_free(source)  # the tail is on its way: the next blob may start
        assert not warming.done.is_set()
        store.arrive(*range(CHUNKS))
        fetcher.finish.set()
    assert warming.done.is_set()
    assert source._warm_slots.value == 1  # handed over once, not twice


@pytest.mark.parametrize("near_the_end", [False, True])
async def test_a_failed_registry_read_frees_its_slot_once(near_the_end: bool) -> None:
    source, store, fetcher = _source()
    entry = blob_entry(DIGEST, CHUNKS * CHUNK)
    warming = _Warming()
    await source._warm_slots.acquire()
    fetcher.fail = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source._warm_one, REPO, entry, CHUNK, True, warming, _Pull())
        if near_the_end:
            store.arrive(*range(CHUNKS - 1))
            assert await _slot_free(source)
        fetcher.finish.set()
    assert warming.done.is_set()
    assert source._warm_slots.value == 1


FIRST, SECOND = "sha256:" + "01" * 32, "sha256:" + "02" * 32
BLOBS = [(FIRST, CHUNKS * CHUNK), (SECOND, CHUNKS * CHUNK)]


def _two_blobs(directory: _Directory) -> tuple[NodeBlobSource, _Store, _Fetcher]:
    """A source about to warm BLOBS (an image manifest was handed out)."""
    source, store, fetcher = _source(directory)
    for digest, _ in BLOBS:
        source._warming[digest] = _Warming()
    return source, store, fetcher


async def test_with_other_nodes_reading_the_image_the_slot_is_held_to_the_last_byte() -> None:
    first, second, blobs = FIRST, SECOND, BLOBS
    directory = _Directory(others={blob_entry(first, CHUNKS * CHUNK).object})
    source, store, fetcher = _two_blobs(directory)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source._warm_blobs, REPO, blobs)
        await trio.testing.wait_all_tasks_blocked()
        # The first blob is another node's; this node reads the second from the registry.
        assert directory.claimed == [blob_entry(d, s).object for d, s in blobs]
        store.arrive(*range(CHUNKS - 1), digest=second)
        assert not await _slot_free(source)  # not handed over: others keep the link busy
        store.arrive(CHUNKS - 1, digest=second)
        fetcher.finish.set()
    assert await _slot_free(source)


async def test_alone_the_next_blob_is_claimed_before_the_last_bytes_arrive() -> None:
    first, second, blobs = FIRST, SECOND, BLOBS
    directory = _Directory()
    source, store, fetcher = _two_blobs(directory)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source._warm_blobs, REPO, blobs)
        await trio.testing.wait_all_tasks_blocked()
        assert directory.claimed == [blob_entry(first, CHUNKS * CHUNK).object]
        store.arrive(*range(CHUNKS - 1), digest=first)
        await trio.testing.wait_all_tasks_blocked()
        assert directory.claimed == [blob_entry(d, s).object for d, s in blobs]
        store.arrive(CHUNKS - 1, digest=first)
        store.arrive(*range(CHUNKS), digest=second)
        fetcher.finish.set()
