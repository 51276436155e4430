"""`Fetcher`, the fetch layer's entry: reads and prefetches wait on flights, workers run
them through transfers, staged chunks go to the store. Composes the pieces of this package
and owns only what joins them; never serves FUSE, never reaches past the store's facade.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from collections.abc import Set as AbstractSet

import trio

from syncbit.chunks import chunk_span
from syncbit.errors import (
    CacheFullError,
    DiskFullError,
    ReadDeadlineError,
    SourceChangedError,
    SourceError,
    SyncbitError,
    UserError,
)
from syncbit.fetch.flight import Flight, FlightTable, Joined, Origin, Priority, State, raise_for
from syncbit.fetch.handle import OpenFile
from syncbit.fetch.limiter import Bandwidth
from syncbit.fetch.plan import Plans, source_limit, takeover
from syncbit.fetch.queue import FlightQueue
from syncbit.fetch.transfer import ChunkDirectory, Park, Staged, Transfers, TransferSettings
from syncbit.fetch.verify import Broken, WholeFile, recheck
from syncbit.manifest import FileEntry
from syncbit.peer import PeerClient
from syncbit.sources.base import Source
from syncbit.store import ObjectReader, ObjectStore, StoredObject

log = logging.getLogger("syncbit.fetch")

_KEEP_FAILED = (ReadDeadlineError, SourceError, UserError)  # kept briefly for the retry


class Fetcher:
    """Single-flight, prioritised chunk fetching. Run `run()` in the node's nursery."""

    def __init__(
        self,
        store: ObjectStore,
        directory: ChunkDirectory,
        peers: PeerClient,
        *,
        workers: int = 12,
        read_deadline: float = 60.0,
        readahead_chunks: int = 8,
        failure_ttl: float = 1.0,
        write_backlog: int = 8,
        source_batch: int = 16 << 20,
        prefetch_concurrency: int = 6,
        prefetch_bandwidth: int = 0,
        claim_ttl: float = 30.0,
        park_poll: float = 0.1,
    ) -> None:
        self._store = store
        self.workers = workers
        self.read_deadline = read_deadline
        self.readahead_chunks = readahead_chunks
        self.failure_ttl = failure_ttl
        self.park_poll = park_poll
        self.plans = Plans()  # the running prefetches' source plans (their jobs keep it)
        self._table = FlightTable(read_deadline, failure_ttl)
        self._queue = FlightQueue(
            prefetch_concurrency,
            lambda: source_limit(prefetch_concurrency, self.plans.sharers()),
        )
        self.stats = {"source": 0, "peer": 0, "verify_failures": 0, "parked": 0, "busy": 0}
        self._broken = Broken()
        self._whole = WholeFile(store, self.stats)
        settings = TransferSettings(failure_ttl, source_batch, max(claim_ttl, read_deadline))
        self._transfers = Transfers(
            store,
            directory,
            peers,
            self._table,
            self._push,
            Bandwidth(prefetch_bandwidth),
            self._broken,
            self.stats,
            settings,
        )
        self._watching: set[str] = set()  # objects whose parked flights a task watches
        # Chunks fetched but not yet on disk: lets a burst run ahead of a slower disk,
        # bounded so RAM stays bounded (each slot pins one chunk buffer).
        self._write_slots = trio.Semaphore(write_backlog)
        self.read_bytes: Counter[str] = Counter()  # bytes served to readers, by origin
        self._came_from: dict[tuple[str, int], Origin] = {}  # fetched for readers, not yet read
        # Called with (origin, seconds) after every transfer: the daemon's latency histogram.
        self.on_transfer: Callable[[str, float], None] = lambda origin, seconds: None
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.workers):
                nursery.start_soon(self._worker)
            if log.isEnabledFor(logging.DEBUG):
                nursery.start_soon(self._log_queues)
            task_status.started()

    async def _log_queues(self) -> None:
        """Debug aid: once a second while anything is in flight, what each lane holds."""
        while True:
            await trio.sleep(1)
            q = self._queue.describe()
            if not (len(self._table) or q["parked"]):
                continue
            log.debug(
                "flights %d; %s; waiting to write %d; busy holders %d",
                len(self._table),
                ", ".join(f"{k} {v}" for k, v in q.items()),
                self._write_slots.statistics().tasks_waiting,
                self.stats["busy"],
            )

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
                    for index in handle.readahead.window(
                        span.stop, self.readahead_chunks, obj.chunks
                    ):
                        if not obj.has(index):
                            self._flight(handle, index, Priority.READAHEAD)
                self._count_read(obj, offset, length)
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
        """A sequential reader: keep the next `readahead_chunks` missing chunks coming."""
        obj = handle.obj
        for index in handle.readahead.window(after, self.readahead_chunks, obj.chunks):
            if not obj.has(index):
                self._flight(handle, index, Priority.READAHEAD)

    def _count_read(self, obj: StoredObject, offset: int, length: int) -> None:
        """Bytes served to readers, by where their chunk came from (for /metrics): a chunk
        fetched for a reader (or its readahead) counts as peer or source bytes until a
        read reaches its end; every other byte was already in the cache."""
        came_from = self._came_from
        if not came_from:
            self.read_bytes[Origin.CACHE] += length
            return
        cs, end = obj.chunk_size, offset + length
        for index in chunk_span(offset, length, obj.size, cs):
            chunk_end = min(obj.size, (index + 1) * cs)
            part = min(end, chunk_end) - max(offset, index * cs)
            key = (obj.id, index)
            origin = came_from.pop(key, Origin.CACHE) if end >= chunk_end else came_from.get(key)
            self.read_bytes[origin or Origin.CACHE] += part

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
        flights = [self._flight(handle, i, prio, may_source) for i in indexes]
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

    def abandon(self, object_ids: AbstractSet[str], why: str) -> int:
        """Stop the prefetch flights of these objects: nobody wants them any more (their
        dataset was removed, its pull cancelled, its job failed). Queued and parked ones
        end at once, running ones are cancelled (a blocking source read in a thread
        finishes first: at most one more request each). A flight a reader or readahead
        waits on is left alone: its own deadline bounds it. Returns how many stopped."""
        stopped = 0
        for flight in self._table:
            if flight.obj.id not in object_ids or flight.priority < Priority.PREFETCH:
                continue
            if flight.final:
                continue
            stopped += 1
            flight.abandoned = why
            if flight.scope is not None:
                flight.scope.cancel()  # the worker settles it
                continue
            # Queued, parked, or carried along by another flight's source read (which
            # still stores it if it arrives).
            self._queue.unpark(flight)
            flight.error = SyncbitError(why)
            self._table.finish(flight)
        if stopped:
            log.info("stopped %d prefetch transfers: %s", stopped, why)
        return stopped

    # -- flights: joining, queueing, parking -------------------------------------------------

    def _flight(
        self,
        handle: OpenFile,
        index: int,
        prio: Priority,
        may_source: Callable[[int], bool] | None = None,
    ) -> Flight:
        flight, joined = self._table.join(
            handle.obj, handle.entry, handle.source, index, prio, may_source
        )
        if joined is not Joined.JOINED:
            self._push(flight)  # a raised flight's older heap entry is skipped when popped
        return flight

    def _push(self, flight: Flight, peer_ready: bool = False) -> None:
        if not self._queue.push(flight, peer_ready):
            # Planned for another node: parked until a holder reports it (the watcher
            # then moves it to the peer lane).
            self._park(flight, "the node planned to read it")

    def _park(self, flight: Flight, holder: str) -> None:
        """Hold a flight (no worker, no queue) until a peer has its chunk, the claim on it
        lapses, or, for a reader, its deadline passes."""
        self.stats["parked"] += 1
        self._queue.park(flight, holder)
        object_id = flight.obj.id
        if object_id not in self._watching:
            self._watching.add(object_id)
            assert self._nursery is not None, "Fetcher.run() first"
            self._nursery.start_soon(self._watch_parked, object_id)

    async def _watch_parked(self, object_id: str) -> None:
        """One poll of the chunk map per object every `park_poll`, however many flights
        wait: a parked flight goes to the peer lane once a holder has its chunk, back to
        the queue once nobody reads it, and a reader's fails at its deadline."""
        try:
            while self._queue.parked(object_id):
                await trio.sleep(self.park_poll)
                parked = self._queue.parked(object_id)
                if not parked:
                    break
                info = await self._transfers.chunk_info(object_id, max_age=self.park_poll / 2)
                now = trio.current_time()
                # In random order: nodes that wait for the same chunks would otherwise all
                # ask the same holder for the same chunk at once while others sit idle.
                waiting = list(parked.values())
                random.shuffle(waiting)
                for flight in waiting:
                    index = flight.index
                    if flight.state is not State.PARKED:
                        self._queue.unpark(flight)  # taken along by a source read, or queued
                    elif info.peers.get(index):
                        self._push(flight, peer_ready=True)
                    elif index not in info.fetching and (
                        flight.may_source is None or flight.may_source()
                    ):
                        self._push(flight)  # nobody is reading it: this node will
                    elif flight.priority < Priority.PREFETCH and now > flight.deadline:
                        self._queue.unpark(flight)
                        flight.error = ReadDeadlineError(
                            f"chunk {index} of {flight.entry.path}: {flight.waiting_for} was "
                            f"reading it from the source and did not deliver within "
                            f"{self.read_deadline:g}s"
                        )
                        self._table.keep_failure(flight)
                if self._queue.source_lane_idle():
                    spare = takeover(parked, info)
                    if spare is not None:
                        log.debug(
                            "taking over the source read of chunk %d of %s",
                            spare.index,
                            spare.entry.path,
                        )
                        spare.may_source = None  # from now on this node may read it
                        self._push(spare)
        finally:
            self._watching.discard(object_id)
            self._queue.drop_object_if_idle(object_id)

    # -- workers -------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            flight = self._queue.take()
            if flight is None:
                await self._queue.changed()
                continue
            if not flight.one_shot and not flight.ran:
                # A queued prefetch must not spend its deadline waiting in the queue; a
                # flight back from parking keeps the deadline it had (a reader's wait
                # must not outlast its own deadline by a retry of the kernel's).
                flight.deadline = max(flight.deadline, trio.current_time() + self.read_deadline)
            flight.ran = True
            result: list[Staged] | Park | None = None
            began = trio.current_time()
            try:
                with trio.CancelScope() as flight.scope:  # `abandon` may end it
                    result = await self._transfers.run(flight)
                if isinstance(result, list) and result:
                    self.on_transfer(flight.origin, trio.current_time() - began)
            except SyncbitError as exc:
                flight.error = exc
            except Exception as exc:
                log.exception("chunk %d of %s: unexpected error", flight.index, flight.entry.path)
                flight.error = exc
            finally:
                flight.scope = None
                self._queue.done_running(flight)
                self._settle(flight, result)
            if isinstance(result, list):
                for done in result:
                    # The write overlaps the next transfer; the slots bound staged RAM and
                    # let a disk slower than the network push back on fetching.
                    await self._write_slots.acquire()
                    assert self._nursery is not None
                    self._nursery.start_soon(self._persist, done)

    def _settle(self, flight: Flight, result: list[Staged] | Park | None) -> None:
        """After a transfer attempt: park or requeue the flight, or end it (and the chunks
        its source read brought along), keeping a failure briefly for the kernel's retry."""
        if isinstance(result, Park):
            if result.peer_lane:
                self._push(flight, peer_ready=True)
            else:
                self._park(flight, result.holder)
            return
        if result is None and flight.error is None:
            # never report success
            flight.error = SyncbitError(flight.abandoned or "fetch cancelled")
        if isinstance(flight.error, _KEEP_FAILED):
            self._table.keep_failure(flight)
        else:
            self._table.finish(flight)
        for done in result or []:
            if done.flight.priority < Priority.PREFETCH:
                if len(self._came_from) > 100_000:  # chunks read ahead but never read
                    self._came_from.clear()
                self._came_from[(done.flight.obj.id, done.flight.index)] = done.flight.origin
            if done.flight is not flight:
                self._table.finish(done.flight)  # readers go on from RAM while it is written

    async def _persist(self, done: Staged) -> None:
        """Write a staged chunk to the object file within the cache budget; only then may
        it become durable. A chunk the cache cannot keep (full of pinned or in-use data,
        disk full after eviction, a write error) is dropped from RAM with its cause: the
        readers that had it from RAM are served, a later read fetches it again."""
        flight = done.flight
        obj, index = flight.obj, flight.index
        try:
            await self._store.store_chunk(obj, index, done.view, done.digest)
        except (CacheFullError, OSError) as exc:
            if not isinstance(exc, DiskFullError):  # the store logs a full disk once
                log.error("cannot store chunk %d of %s: %s", index, flight.entry.path, exc)
            return
        finally:
            self._write_slots.release()
        expected = flight.entry.version.get("sha256")
        if expected and obj.complete and len(obj.written) == obj.chunks:
            with self._store.keeping(obj):  # no eviction under the hash
                await self._whole.verify(obj, flight.entry.path, expected)


def _read_disk_parts(
    reader: ObjectReader, parts: list[bytes | memoryview | range]
) -> list[bytes | memoryview]:
    """Blocking: the `range` parts of a read, from the object file."""
    return [reader.pread(p.start, len(p)) if isinstance(p, range) else p for p in parts]
