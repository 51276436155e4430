"""`Fetcher`, the fetch layer's entry: builds its pieces; reads and prefetches wait on
the flights of the chunks they miss (the runner runs them). Never serves FUSE, never
reaches past the store's facade, never transfers a byte itself.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from collections.abc import Set as AbstractSet

import trio

from syncbit.chunks import chunk_span
from syncbit.errors import (
    CacheFullError,
    ReadDeadlineError,
    SourceChangedError,
)
from syncbit.fetch.claims import Claims
from syncbit.fetch.directory import ChunkDirectory, ChunkPeers
from syncbit.fetch.flight import Flight, FlightTable, Priority, raise_for
from syncbit.fetch.handle import OpenFile
from syncbit.fetch.limiter import Bandwidth
from syncbit.fetch.patience import ReaderPatience
from syncbit.fetch.plan import Plans, source_limit
from syncbit.fetch.queue import FlightQueue
from syncbit.fetch.runner import Runner
from syncbit.fetch.served import Served
from syncbit.fetch.streams import Streams
from syncbit.fetch.transfer import Transfers
from syncbit.fetch.verify import Broken, WholeFile, recheck
from syncbit.manifest import FileEntry
from syncbit.sources.base import Source
from syncbit.store import ObjectReader, ObjectStore, ReadersRam

log = logging.getLogger("syncbit.fetch")

# The most a sequential reader's readahead holds: chunks in flight or staged are RAM
# (the store keeps `staging.WANTED_BYTES` of them until read; the rest are read back).
READAHEAD_MAX_BYTES = 512 << 20


class Fetcher:
    """Single-flight, prioritised chunk fetching. Run `run()` in the node's nursery."""

    def __init__(
        self,
        store: ObjectStore,
        directory: ChunkDirectory,
        peers: ChunkPeers,
        *,
        workers: int = 12,
        read_deadline: float = 60.0,
        readahead_chunks: int = 8,
        failure_ttl: float = 1.0,
        write_backlog: int = 8,
        source_batch: int = 16 << 20,
        prefetch_concurrency: int = 6,
        prefetch_bandwidth: int = 0,
        source_concurrency: int = 64,
        claim_ttl: float = 30.0,
        park_poll: float = 0.1,
        reader_patience: float = 2.0,
    ) -> None:
        self._store = store
        self.read_deadline = read_deadline
        self.readahead_chunks = readahead_chunks
        self.failure_ttl = failure_ttl
        self.plans = Plans()  # the running prefetches' source plans (their jobs keep it)
        self.stats = {
            "source": 0,
            "peer": 0,
            "verify_failures": 0,
            "parked": 0,
            "busy": 0,
            "hedged": 0,  # peer transfers asked of a second holder (stragglers)
            "aborted": 0,  # the losers of those, ended mid-transfer
            "unreachable": 0,  # peers no connection could be made to (then left out a while)
            "source_hedged": 0,  # source reads asked a second time (stragglers)
            "source_aborted": 0,  # reads ended mid-way: hedge losers, abandoned flights
        }
        self._table = FlightTable(read_deadline, failure_ttl)
        self._source_batch = source_batch
        # Source reads at once, per source, adapted to what each delivers (`streams`).
        self.streams = Streams(source_concurrency)
        queue = FlightQueue(
            prefetch_concurrency,
            lambda: source_limit(prefetch_concurrency, self.plans.sharers(), self.streams.lanes()),
        )
        self._broken = Broken()
        self._whole = WholeFile(store, self.stats)
        self._served = Served()
        patience = ReaderPatience(reader_patience, stats=self.stats)
        claims = Claims(
            directory,
            self._table,
            lambda flight: self._runner.push(flight),  # chunks a claim did not grant
            source_batch,
            max(claim_ttl, read_deadline),
            patience,
        )
        transfers = self._transfers = Transfers(
            store,
            directory,
            peers,
            self._table,
            claims,
            Bandwidth(prefetch_bandwidth),
            self._broken,
            self.streams,
            self.stats,
        )
        self._runner = Runner(
            store,
            self._table,
            queue,
            transfers,
            self._whole,
            self._served,
            self.stats,
            workers=workers,
            # Beyond `workers`, one more per stream the sources may allow: a worker holds
            # its flight while it waits for a stream, and readers must still find one.
            max_workers=workers + source_concurrency,
            write_backlog=write_backlog,
            park_poll=park_poll,
        )

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The workers and watchers; until cancelled."""
        await self._runner.run(task_status)

    @property
    def read_bytes(self) -> Counter[str]:
        """Bytes served to readers through the mount, by origin (cache, peer, source)."""
        return self._served.read_bytes

    @property
    def on_transfer(self) -> Callable[[str, float], None]:
        """Called with (origin, seconds) after every transfer (a latency histogram)."""
        return self._runner.on_transfer

    @on_transfer.setter
    def on_transfer(self, call: Callable[[str, float], None]) -> None:
        self._runner.on_transfer = call

    @property
    def lookup_interval(self) -> float:
        """See `Transfers.lookup_interval`."""
        return self._transfers.lookup_interval

    @lookup_interval.setter
    def lookup_interval(self, seconds: float) -> None:
        self._transfers.lookup_interval = seconds

    def abandon(self, object_ids: AbstractSet[str], why: str) -> int:
        """See `Runner.abandon`."""
        return self._runner.abandon(object_ids, why)

    # -- files and what the cluster says of them ----------------------------------------------

    def open(self, entry: FileEntry, chunk_size: int, source: Source) -> OpenFile:
        self._broken.refuse(entry)
        obj = self._store.object(entry.object, entry.size, chunk_size)
        return OpenFile(entry, obj, source, self._store.backing(obj))

    def hold(self, handle: OpenFile) -> None:
        """A file opened through the mount: its object is evicted only when nothing else
        can go, so a file open across a dataset update keeps reading the old revision's
        bytes while there is room. Until `release`."""
        handle.hold = self._store.hold(handle.obj)

    def release(self, handle: OpenFile) -> None:
        if handle.hold is not None:
            handle.hold.release()

    def mark_broken(self, object_id: str, reason: str) -> bool:
        """The scheduler found this object's version broken: refuse it from now on, cached
        or not. True if it was not known to be broken yet."""
        return self._broken.mark(object_id, reason)

    def is_broken(self, object_id: str) -> bool:
        return object_id in self._broken

    def is_verified(self, object_id: str) -> bool:
        """The object's whole-file digest (where the source publishes one) checked out."""
        return self._whole.verified(object_id)

    async def recheck(self, entry: FileEntry, chunk_size: int, source: Source, index: int) -> str:
        """Read chunk `index` of a file from the source, as the scheduler asked (to settle a
        dispute), and return its digest; nothing is stored. SourceChangedError when the
        source no longer has the recorded version (head sample included)."""
        return await recheck(entry, chunk_size, source, index)

    # -- the read path --------------------------------------------------------------------

    async def read(self, handle: OpenFile, offset: int, length: int) -> bytes | memoryview:
        """Bytes [offset, offset+length) of an open file, fetching what is missing. A
        memoryview result is valid only until the caller's next checkpoint (see
        `ObjectReader.parts`).

        Raises ReadDeadlineError (with the last cause) when the chunks did not arrive within
        the read deadline, SourceChangedError when the source lost the recorded version,
        CacheFullError when a chunk arrived twice but the cache could not keep it.
        """
        obj = handle.obj
        self._broken.refuse(handle.entry)
        length = max(0, min(length, obj.size - offset))
        if length == 0:
            return b""
        span = chunk_span(offset, length, obj.size, obj.chunk_size)
        sequential = handle.readahead.sequential(offset, length)
        self._store.touch(obj)
        # Kept while its chunks come: the cache does not evict the object meanwhile.
        with self._store.keeping(obj):
            if obj.unverified:  # after an unclean shutdown: checked before first use
                await self._store.verify_chunks(obj, span)
            missing = [i for i in span if not obj.has(i)]
            for _attempt in range(2):
                if not missing:
                    break
                await self._wait_chunks(handle, missing, Priority.FOREGROUND)
                # Fetched, yet gone before this reader ran: the cache could not store it
                # (full of pinned or in-use data, disk full). Fetch once more, then fail.
                missing = [i for i in span if not obj.has(i)]
            # Reading from the presence check just made (no checkpoint in between) to the
            # end of the pread: no removal takes the object meanwhile (a hole punched
            # under a pread reads as zeros).
            with self._store.reading(obj) as reader:
                if missing:
                    cause = obj.unstored.get(missing[0], "dropped again before it was read")
                    raise CacheFullError(
                        f"chunk {missing[0]} of {handle.entry.path} arrived but could not be "
                        f"kept: {cause}"
                    )
                if sequential and self.readahead_chunks:
                    self._readahead(handle, span.stop)
                self._served.count(obj, offset, length)
                parts = reader.parts(offset, length)
                if len(parts) == 1 and not isinstance(parts[0], range):
                    # A view of a staged chunk's buffer goes to the kernel as it is: the FUSE
                    # session replies before the trio thread yields, so the buffer cannot be
                    # recycled first, and the reader's bytes skip one 1 MiB copy.
                    return parts[0]
                if any(isinstance(p, range) for p in parts):
                    # Staged views must not outlive this checkpoint: copy them first.
                    held = [bytes(p) if isinstance(p, memoryview) else p for p in parts]
                    parts = await trio.to_thread.run_sync(_read_disk_parts, reader, held)
        return b"".join(parts)  # type: ignore[arg-type]

    def _readahead(self, handle: OpenFile, after: int) -> None:
        """A sequential reader: keep the next missing chunks of its window coming. The
        window starts at `readahead_chunks` and doubles with every top-up, up to
        `readahead_window` (what the source's streams can keep busy)."""
        obj = handle.obj
        ahead = handle.readahead
        size = ahead.grown(self.readahead_chunks, self.readahead_window(handle), after)
        for index in ahead.window(after, size, obj.chunks):
            if not obj.has(index):
                self._runner.join(handle, index, Priority.READAHEAD)

    def readers_ram(self) -> ReadersRam:
        """The RAM kept for readers now (`ObjectStore.readers_ram`)."""
        return self._store.readers_ram()

    def readahead_window(self, handle: OpenFile) -> int:
        """Chunks a sequential reader keeps coming: `readahead_chunks` at least, else
        enough source requests to keep every stream its source allows busy while half
        the window is consumed (it is topped up half a window at a time), within
        `READAHEAD_MAX_BYTES` of RAM."""
        chunk_size = handle.obj.chunk_size
        per_read = max(1, self._source_batch // chunk_size)
        wanted = 2 * self.streams.limit(handle.source) * per_read
        return max(self.readahead_chunks, min(wanted, READAHEAD_MAX_BYTES // chunk_size))

    async def _wait_chunks(
        self,
        handle: OpenFile,
        indexes: list[int],
        prio: Priority,
        bounded: bool = True,
        may_source: Callable[[int], bool] | None = None,
    ) -> list[Flight]:
        """Wait for the chunks' flights (returned); a reader (`bounded`) gives up after the
        read deadline, a prefetch relies on each flight's own deadline. The first flight
        to fail fails the wait at once, whichever it is: a prefetch must not go on asking
        the source for later chunks while it waits for an earlier one (parked for a
        peer, say) after a refusal that holds for all of them."""
        flights = [self._runner.join(handle, i, prio, may_source) for i in indexes]
        with trio.move_on_after(self.read_deadline if bounded else math.inf) as scope:
            for flight in flights:
                while not flight.done.is_set():
                    await self._table.done_or_failure(flight.done)
                    failed = next((f for f in flights if f.done.is_set() and f.error), None)
                    if failed is not None:
                        raise_for(failed)
                raise_for(flight)
        if scope.cancelled_caught:
            pending = next((f for f in flights if not f.done.is_set()), None)
            if pending is None:  # every flight finished just as the deadline fired
                for flight in flights:
                    raise_for(flight)
                return flights
            raise ReadDeadlineError(
                f"read of {handle.entry.path} chunk {pending.index} timed out after "
                f"{self.read_deadline:g}s: {pending.last_error or 'no answer yet'}"
            )
        return flights

    # -- whole files: prefetch and pull ------------------------------------------------------

    async def fetch_chunks(
        self,
        entry: FileEntry,
        chunk_size: int,
        source: Source,
        indexes: range,
        prio: Priority,
        may_source: Callable[[int], bool] | None = None,
    ) -> None:
        """Make chunks `indexes` of a file present, raising on failure (a prefetch that
        follows an access trace brings the chunks in the order it names; `ensure` then
        completes each file). Flights are queued in the order they are asked for."""
        handle = self.open(entry, chunk_size, source)  # refuses a broken file
        obj = handle.obj
        with self._store.keeping(obj):
            missing = [i for i in indexes if not obj.has(i)]
            if missing:
                await self._wait_chunks(handle, missing, prio, bounded=False, may_source=may_source)

    async def ensure(
        self,
        entry: FileEntry,
        chunk_size: int,
        source: Source,
        prio: Priority,
        may_source: Callable[[int], bool] | None = None,
    ) -> None:
        """Make every chunk of a file present (prefetch / pull), raising on failure.
        Returns once every chunk is written to the object file.

        `may_source(i)`: whether this node should read chunk i from the source itself now
        (a prefetch plan gives each chunk one reader); the others wait for a peer."""
        handle = self.open(entry, chunk_size, source)  # refuses a broken file
        obj = handle.obj
        with self._store.keeping(obj):  # not evicted between its chunks, nor under the hash
            discards = obj.discards
            missing = [i for i in range(obj.chunks) if not obj.has(i)]
            if missing:
                await self._wait_chunks(handle, missing, prio, bounded=False, may_source=may_source)
            while len(obj.written) < obj.chunks or self._whole.verifying(obj.id):
                if obj.discards != discards:
                    raise SourceChangedError(f"{entry.path}: content failed verification")
                lost = next((i for i in obj.unstored if not obj.has(i)), None)
                if lost is not None:
                    raise CacheFullError(
                        f"{entry.path}: chunk {lost} could not be stored: {obj.unstored[lost]}"
                    )
                await self._store.written_event.wait()
            expected = entry.version.get("sha256")
            if expected and not self._whole.verified(obj.id) and obj.discards == discards:
                # Complete before this process started (a restart): check it once now.
                await self._whole.verify(obj, entry.path, expected)
                while self._whole.verifying(obj.id):  # another caller's check of the object
                    await self._store.written_event.wait()
            if obj.discards != discards:
                raise SourceChangedError(f"{entry.path}: content failed verification")


def _read_disk_parts(
    reader: ObjectReader, parts: list[bytes | memoryview | range]
) -> list[bytes | memoryview]:
    """Blocking: the `range` parts of a read, from the object file."""
    return [reader.pread(p.start, len(p)) if isinstance(p, range) else p for p in parts]
