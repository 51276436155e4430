"""Prefetch on open: an open() of a cold file through the mount fetches the whole file in
the background, so a loader that touches it in its own order (safetensors' mmap, torch.load)
does not fault its way through it one small read at a time. Owns the decision (dataset
setting, node setting, size) and the life of those fetches; never transfers a byte itself
(`Fetcher.ensure` does, at the OPENED priority: foreground reads and readahead go first,
a dataset's background prefetch after, and all share the same flights: one transfer per
chunk whoever asks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from syncbit.aio import first_of
from syncbit.errors import SyncbitError
from syncbit.fetch.fetcher import Fetcher
from syncbit.fetch.flight import Priority
from syncbit.fetch.handle import OpenFile

log = logging.getLogger("syncbit.fetch.onopen")

PIECE_CHUNKS = 16  # chunks an open's fetch asks for at a time
# Seconds without a reader taking a chunk from RAM after which an open's fetch stops
# pacing itself and brings the rest at once (to disk: a file opened and not read).
IDLE = 1.0


@dataclass(eq=False)
class _Whole:
    """The background fetch of one object, and how many open handles want it."""

    opens: int = 1
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class OpenPrefetch:
    """Whole-file fetches started by opens, one per object however many opens.

    A dataset's `prefetch_on_open` option decides (on: every non-empty file, off: none);
    `auto` or none leaves it to the node: `enabled` and the file at least `min_size`. The
    fetch ends when the file is here, or when the last handle that wanted it is released
    first: then its queued chunk transfers are abandoned (unless `wanted` says a pull or
    prefetch job needs the object too), and what did arrive stays, chunk by verified chunk
    (an object counts as present only when every chunk is, so a half-fetched file never
    does)."""

    def __init__(
        self,
        fetcher: Fetcher,
        *,
        enabled: bool = True,
        min_size: int = 64 << 20,
        wanted: Callable[[str], bool] = lambda object_id: False,
    ) -> None:
        self.fetcher = fetcher
        self.enabled = enabled
        self.min_size = min_size
        self.wanted = wanted  # a job needs this object: closing must not stop its transfers
        self.started = 0  # whole-file fetches started (metrics, tests)
        self._running: dict[str, _Whole] = {}
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def wants(self, size: int, setting: object) -> bool:
        """Whether an open of a file of `size` bytes fetches it whole, given the dataset's
        `prefetch_on_open` option (`setting`, None when it has none)."""
        if size <= 0 or setting == "off":
            return False
        if setting == "on":
            return True
        return self.enabled and size >= self.min_size

    def opened(self, handle: OpenFile, chunk_size: int, setting: object) -> bool:
        """An open of `handle` (call `closed` on its release). True if it started or joined
        a whole-file fetch."""
        obj = handle.obj
        whole = self._running.get(obj.id)
        if whole is not None:
            whole.opens += 1
            return True
        if self._nursery is None or not self.wants(obj.size, setting) or obj.complete:
            return False
        whole = self._running[obj.id] = _Whole()
        self.started += 1
        self._nursery.start_soon(self._fetch, handle, chunk_size, whole)
        return True

    def closed(self, handle: OpenFile) -> None:
        """A handle `opened` counted was released: the last one stops an unfinished fetch."""
        object_id = handle.obj.id
        whole = self._running.get(object_id)
        if whole is None:
            return
        whole.opens -= 1
        if whole.opens > 0:
            return
        del self._running[object_id]
        whole.scope.cancel()
        if not self.wanted(object_id):
            self.fetcher.abandon({object_id}, f"{handle.entry.path} closed before fetched whole")

    async def _fetch(self, handle: OpenFile, chunk_size: int, whole: _Whole) -> None:
        path = handle.entry.path
        try:
            with whole.scope:
                log.debug("prefetch on open of %s: fetching %d bytes", path, handle.obj.size)
                await self._paced(handle, chunk_size)
                await self.fetcher.ensure(handle.entry, chunk_size, handle.source, Priority.OPENED)
                log.debug("prefetch on open of %s: complete", path)
        except (SyncbitError, OSError) as exc:
            # The reader's own reads report what matters to it; this is only ahead of them.
            log.info("prefetch on open of %s stopped: %s", path, exc)
        except Exception:
            # Never the daemon's end: a fetch nobody waits for failed in a way it should not.
            log.exception("prefetch on open of %s: unexpected error", path)
        finally:
            if self._running.get(handle.obj.id) is whole:
                del self._running[handle.obj.id]

    async def _paced(self, handle: OpenFile, chunk_size: int) -> None:
        """Ask for the file a piece at a time, each once the RAM kept for readers has room
        for it beside what is already asked for: a loader reading along finds the chunks
        in RAM, where a fetch far ahead of it would leave them on the disk to be read
        back (on a slow disk, slower than the origin). When readers stop taking chunks
        from RAM for `IDLE` seconds, the rest is asked for at once (`ensure` then). Waits
        for a chunk to leave that RAM or a piece to arrive, never polls."""
        obj = handle.obj
        piece_bytes = PIECE_CHUNKS * chunk_size
        asked = 0  # bytes of pieces asked for and not yet here
        arrived = trio.Event()  # set, and replaced, as each piece arrives
        taken = self.fetcher.readers_ram().taken
        active = trio.current_time()

        async def piece(chunks: range, size: int) -> None:
            nonlocal asked, arrived
            try:
                await self.fetcher.fetch_chunks(
                    handle.entry, chunk_size, handle.source, chunks, Priority.OPENED
                )
            finally:
                asked -= size
                arrived.set()
                arrived = trio.Event()

        async with trio.open_nursery() as nursery:
            for start in range(0, obj.chunks, PIECE_CHUNKS):
                chunks = range(start, min(start + PIECE_CHUNKS, obj.chunks))
                if all(obj.has(i) for i in chunks):
                    continue
                while True:
                    ram = self.fetcher.readers_ram()
                    if ram.taken != taken:
                        taken, active = ram.taken, trio.current_time()
                    if ram.kept + asked + piece_bytes <= max(ram.budget, piece_bytes):
                        break
                    idle = IDLE - (trio.current_time() - active)
                    if idle <= 0:
                        # Nobody reads along: the rest at once, beside the pieces asked.
                        nursery.start_soon(
                            self.fetcher.ensure,
                            handle.entry,
                            chunk_size,
                            handle.source,
                            Priority.OPENED,
                        )
                        return
                    with trio.move_on_after(idle):
                        await first_of(ram.freed, arrived)
                size = min(piece_bytes, obj.size - start * chunk_size)
                asked += size
                nursery.start_soon(piece, chunks, size)
