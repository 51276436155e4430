"""The node mirror's relayed blobs (`NodeBlobSource.shareable`): a blob this node warms
from another node's registry read is offered to peers chunk by chunk once the cluster
recorded every chunk's digest, not before; one it read from the registry itself only
after its own whole-blob check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import trio
import trio.testing

from syncbit.manifest import FileEntry
from syncbit.mirror import MirrorConfig
from syncbit.node.mirror import RELAY_POLL, NodeBlobSource, blob_entry
from syncbit.protocol import ChunkMap

CHUNK = 4 << 20
DIGEST = "sha256:" + "ab" * 32


@dataclass
class Directory:
    """The chunk directory as the relay watcher asks it: a settable chunk map. (Not
    tests.fakes': importing it registers a `mem` source over the scheduler tests' own.)"""

    info: ChunkMap = field(default_factory=ChunkMap)

    async def chunk_info(self, object_id: str, max_age: float = 1.0) -> ChunkMap:
        return self.info


@dataclass
class _Fetcher:
    """What `shareable` asks of the fetch layer: whether a whole-blob check passed."""

    verified: set[str] = field(default_factory=set)

    def is_verified(self, object_id: str) -> bool:
        return object_id in self.verified


@dataclass(frozen=True)
class _Object:
    id: str


async def _register(object_id: str, size: int, chunk_size: int) -> tuple[int, int]:
    return size, chunk_size


def _fetched_blob(chunks: int) -> tuple[NodeBlobSource, Directory, _Fetcher, FileEntry, Any]:
    """A source that warmed a blob of `chunks` chunks (held back by default), its
    directory and fetch layer fakes, the blob's entry and its stored object."""
    directory, fetcher = Directory(), _Fetcher()
    none = cast(Any, None)  # the store and upstream: not asked here
    source = NodeBlobSource(
        MirrorConfig(), none, none, cast(Any, fetcher), cast(Any, directory), _register
    )
    entry = blob_entry(DIGEST, chunks * CHUNK)
    source._fetched.add(entry.object)
    return source, directory, fetcher, entry, _Object(entry.object)


async def test_a_relayed_blob_is_offered_once_every_chunk_digest_is_recorded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, directory, _, entry, obj = _fetched_blob(3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source._relay_once_recorded, entry, CHUNK)
        directory.info.digests = {0: "d0", 1: "d1"}  # the first reader reported two of three
        await trio.sleep(10 * RELAY_POLL)
        assert not source.shareable(obj)
        directory.info.digests[2] = "d2"
        await trio.sleep(2 * RELAY_POLL)
        assert source.shareable(obj)


async def test_a_broken_or_self_read_blob_is_held_back_until_verified(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, directory, fetcher, entry, obj = _fetched_blob(2)
    directory.info.digests = {0: "d0", 1: "d1"}
    directory.info.broken = "the source changed"
    with trio.move_on_after(10 * RELAY_POLL):
        await source._relay_once_recorded(entry, CHUNK)
    assert not source.shareable(obj)  # a broken version is never relayed
    fetcher.verified.add(entry.object)  # its own whole-blob check passed
    assert source.shareable(obj)


async def test_a_size_no_mirror_could_keep_is_not_registered_for_the_cluster() -> None:
    """The registry's size is its word: one beyond what the mirror keeps (a lie, a broken
    registry) is served from the registry alone, never recorded cluster-wide nor split
    into chunks to claim."""
    registered: list[tuple[str, int, int]] = []

    async def register(object_id: str, size: int, chunk_size: int) -> tuple[int, int]:
        registered.append((object_id, size, chunk_size))
        return size, chunk_size

    class _Store:
        def get(self, object_id: str) -> None:
            return None

    source = NodeBlobSource(
        MirrorConfig(cache_size=1 << 30),
        cast(Any, None),
        cast(Any, _Store()),
        cast(Any, _Fetcher()),
        cast(Any, Directory()),
        register,
    )
    repo = cast(Any, None)  # not asked: the size is given
    assert await source._locate(repo, DIGEST, 1 << 50, "blob") == (None, 0)
    assert registered == []
    entry, _ = await source._locate(repo, DIGEST, 3 * CHUNK, "blob")
    assert entry is not None and entry.size == 3 * CHUNK and registered
