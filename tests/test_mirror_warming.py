"""The node mirror's warming hands its registry slot to the next blob near the end of the
current one (`WARM_TAIL_BYTES` still to come), so the registry link does not idle between
blobs; once per blob, also when the read fails."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import trio
import trio.testing

from syncbit.errors import SourceUnavailableError
from syncbit.mirror import MirrorConfig, Repository, UpstreamOptions
from syncbit.node.mirror import WARM_TAIL_BYTES, NodeBlobSource, _Warming, blob_entry

CHUNK = 4 << 20
CHUNKS = 8
DIGEST = "sha256:" + "cd" * 32
REPO = Repository("registry.test:5000", "team/app")


@dataclass
class _Object:
    """A stored object as the hand-over counts it: which chunks are written."""

    chunks: int = CHUNKS
    chunk_size: int = CHUNK
    written: set[int] = field(default_factory=set)


@dataclass
class _Store:
    obj: _Object = field(default_factory=_Object)
    written_event: trio.Event = field(default_factory=trio.Event)

    def get(self, object_id: str) -> _Object:
        return self.obj

    def arrive(self, *indexes: int) -> None:
        self.obj.written.update(indexes)
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


class _Directory:
    async def release(self, object_id: str, indexes: list[int]) -> None:
        return None


async def _register(object_id: str, size: int, chunk_size: int) -> tuple[int, int]:
    return size, chunk_size


def _source() -> tuple[NodeBlobSource, _Store, _Fetcher]:
    store, fetcher = _Store(), _Fetcher()
    config = MirrorConfig(registries={REPO.registry: UpstreamOptions(insecure=True)})
    upstream = cast(Any, None)  # tags and manifests: not asked here
    source = NodeBlobSource(
        config, upstream, cast(Any, store), cast(Any, fetcher), cast(Any, _Directory()), _register
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
        nursery.start_soon(source._warm_one, REPO, entry, CHUNK, True, warming)
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
        nursery.start_soon(source._warm_one, REPO, entry, CHUNK, True, warming)
        if near_the_end:
            store.arrive(*range(CHUNKS - 1))
            assert await _slot_free(source)
        fetcher.finish.set()
    assert warming.done.is_set()
    assert source._warm_slots.value == 1
