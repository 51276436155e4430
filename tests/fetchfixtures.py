"""What the fetch layer's tests share: one file's bytes and entry, a store, a running
fetcher, and the chunk directory's helpers (a peer now holds these chunks...)."""

from __future__ import annotations

from collections.abc import Callable

import trio
from fakes import Directory

from syncbit.chunks import HEAD_SAMPLE, digest
from syncbit.fetch import Fetcher, Priority
from syncbit.manifest import FileEntry
from syncbit.protocol import Peer
from syncbit.sources.base import Source

CS = 64 * 1024
DATA = bytes((i * 7 + i // 251) % 256 for i in range(5 * CS + 123))
ENTRY = FileEntry(path="f.bin", size=len(DATA), object="cd" * 32, locator="f.bin")
HEAD_ENTRY = ENTRY.model_copy(update={"version": {"head": digest(DATA[:HEAD_SAMPLE])}})


async def started(fetcher: Fetcher, nursery: trio.Nursery) -> Fetcher:
    """The fetcher, its workers running in `nursery`."""
    await nursery.start(fetcher.run)
    return fetcher


def chunk_of(data: bytes, index: int) -> bytes:
    return data[index * CS : (index + 1) * CS]


def deliver(directory: Directory, *indexes: int) -> None:
    """A peer ("ok" at address "good") now holds these chunks of DATA, with their digests."""
    for i in indexes:
        directory.info.digests[i] = digest(chunk_of(DATA, i))
        directory.info.peers[i] = [Peer("ok", "good")]
        directory.info.fetching.pop(i, None)


def prefetch_in_background(
    fetcher: Fetcher,
    source: Source,
    nursery: trio.Nursery,
    entry: FileEntry = ENTRY,
    may_source: Callable[[int], bool] | None = None,
    prio: Priority = Priority.PREFETCH,
) -> trio.Event:
    """Start a prefetch of `entry` (`may_source`: the chunks the plan gives this node;
    `prio` OPENED: an open's whole-file fetch); the event is set once it completes."""
    done = trio.Event()

    async def prefetch() -> None:
        await fetcher.ensure(entry, CS, source, prio, may_source)
        done.set()

    nursery.start_soon(prefetch)
    return done


def prefetch_evens(fetcher: Fetcher, source: Source, nursery: trio.Nursery) -> trio.Event:
    """Start a prefetch of ENTRY in which this node is planned to read the even chunks
    (of two members); the event is set once it completes."""
    return prefetch_in_background(fetcher, source, nursery, may_source=lambda i: i % 2 == 0)
