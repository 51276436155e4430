"""The node fetcher: makes chunks present, from peers when they have them, else the source.

Owns single-flight (one transfer per missing chunk however many readers wait), priorities
(foreground read > readahead > prefetch), peer fallback, digest verification, retries with
backoff and per-read deadlines. It never serves FUSE itself and never trusts a peer's bytes
without a digest the scheduler recorded from a source fetch.

What is verified here: a peer's bytes against the recorded digest; the source's bytes
against the recorded digest where there is one (a mismatch fails the read, stores nothing
and is reported to the scheduler, which has a third node re-check it); the head sample of a
file whose source cannot prove its content (`version["head"]`), on every source read; a
published whole-file SHA-256 before a file counts as ready. An object the scheduler marked
broken (its source changed under the same version) is never read, cached or not.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

import trio

from syncbit.chunks import chunk_count, chunk_length, chunk_span, digest, head_length
from syncbit.errors import (
    CacheFullError,
    DigestMismatchError,
    DiskFullError,
    PeerBusyError,
    PeerError,
    ReadDeadlineError,
    SourceChangedError,
    SourceError,
    SourcePermanentError,
    SyncbitError,
    UserError,
)
from syncbit.manifest import FileEntry
from syncbit.peer import PeerClient
from syncbit.retry import retrying
from syncbit.scheduler.client import ChunkMap, ClaimResult, Peer
from syncbit.sources.base import Source
from syncbit.store import BackingFile, Hold, ObjectReader, ObjectStore, StoredObject

log = logging.getLogger("syncbit.fetcher")


class Priority(IntEnum):
    FOREGROUND = 0
    READAHEAD = 1
    PREFETCH = 2


class ChunkDirectory(Protocol):
    """Where the fetcher learns digests and holders, claims source reads (so the cluster
    reads each chunk from the source once), and reports bad peers."""

    async def chunk_info(self, object_id: str, max_age: float = ...) -> ChunkMap: ...

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult: ...

    async def release(self, object_id: str, indexes: list[int]) -> None: ...

    async def report_bad_peer(self, peer: str, object_id: str, index: int, reason: str) -> None: ...

    async def report_check(
        self, object_id: str, index: int, digest: str | None, changed: str
    ) -> str: ...


class _SourceDisagrees(Exception):
    """A source read whose bytes may not be kept (see `Fetcher._check_source`): `digest`
    of chunk `index` differs from the record, or (digest None) the file's head changed."""

    def __init__(self, index: int, digest: str | None, why: str) -> None:
        super().__init__(why)
        self.index = index
        self.digest = digest
        self.why = why
        self.error = SourceChangedError(why)


class _ToPeerLane(Exception):
    """A prefetch taken from the source lane whose chunk a peer has: it belongs in the
    peer lane, so a slow peer never holds up this node's source reads."""


class _Wait(Exception):
    """Another node is reading this chunk from the source (or is the planned reader):
    park the flight until a peer holds it, instead of reading the source a second time."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


@dataclass(eq=False)
class Flight:
    """One chunk transfer in progress, shared by every reader that needs the chunk."""

    obj: StoredObject
    entry: FileEntry
    source: Source
    index: int
    priority: Priority
    deadline: float
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    last_error: str = ""
    started: bool = False
    retry_after: float = 0.0  # until then a new flight for this chunk gets one attempt
    one_shot: bool = False  # such a flight: one attempt, no retries
    bad_peers: set[str] = field(default_factory=set)
    # Prefetch of a chunk another node is planned to read from the source: False while
    # that node is expected to (see `daemon.PrefetchJob`). None: anyone may.
    may_source: Callable[[], bool] | None = None
    waiting_for: str = ""  # the node this parked flight waits for
    origin: str = ""  # where the bytes came from: "peer" or "source" (metrics)
    lane: str = ""  # the prefetch lane running it ("peer", "source"; "" for reads)
    ran: bool = False  # a worker started it at least once
    scope: trio.CancelScope | None = None  # its transfer, while a worker runs it
    abandoned: str = ""  # why `Fetcher.abandon` stopped it


@dataclass(eq=False)
class Staged:
    """A chunk a transfer made readable from RAM, still to be written to disk."""

    flight: Flight
    view: memoryview
    digest: str


@dataclass(eq=False)
class OpenFile:
    """A file opened through the mount: what to read, and where sequential reads were."""

    entry: FileEntry
    obj: StoredObject
    source: Source
    backing: BackingFile  # the object file, for the kernel to read itself
    next_offset: int = 0
    readahead_until: int = 0  # chunk index up to which readahead was scheduled
    hold: Hold | None = None  # while open through the mount (`Fetcher.hold`)

    async def backing_fd(self) -> int | None:
        """A descriptor of the file's bytes for FUSE passthrough, or None while not every
        byte is here and verified. Valid until the caller's next checkpoint."""
        return await self.backing.fd()


def _spread(peers: list[Peer]) -> list[Peer]:
    """The scheduler's ranked holders with the best few shuffled: its load figures are a
    heartbeat old, and many nodes asking for a fresh chunk at once must not all pick the
    same holder (the rest are fallbacks, in rank order)."""
    head = peers[:3]
    random.shuffle(head)
    return head + peers[3:]


def _raise_for(flight: Flight) -> None:
    """A failed flight's error, as a fresh exception per waiter (one flight may fail many
    readers): a lost version (or access a person must fix) is SourceChangedError, any
    other source error that was not worth a retry SourcePermanentError, the rest (a
    temporary failure that outlasted its deadline, an abandoned flight)
    ReadDeadlineError."""
    error = flight.error
    if error is None:
        return
    kind: type[SyncbitError] = ReadDeadlineError
    if isinstance(error, SourceChangedError | UserError):
        kind = SourceChangedError
    elif isinstance(error, SourceError) and not flight.source.is_temp_failure(error):
        kind = SourcePermanentError
    raise kind(str(error)) from error


def _is_temp_failure(source: Source, exc: BaseException) -> bool:
    """Whether a chunk transfer that failed with `exc` is worth another attempt: source
    errors as the source classifies them, a person's mistake (UserError) never, other
    syncbit errors (a peer or the scheduler failing) always. Anything else is not ours
    to retry (the parking signals, bugs)."""
    if isinstance(exc, SourceError):
        return source.is_temp_failure(exc)
    return isinstance(exc, SyncbitError) and not isinstance(exc, UserError)


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
        self.store = store
        self.directory = directory
        self.peers = peers
        self.workers = workers
        self.read_deadline = read_deadline
        self.readahead_chunks = readahead_chunks
        self.failure_ttl = failure_ttl
        self.source_batch = source_batch  # bytes one source request may bring at most
        self.prefetch_concurrency = prefetch_concurrency  # prefetch transfers at once
        self.prefetch_bandwidth = prefetch_bandwidth  # bytes/s for prefetch; 0: no cap
        self.claim_ttl = max(claim_ttl, read_deadline)
        self.park_poll = park_poll
        self._flights: dict[tuple[str, int], Flight] = {}
        # Reads and readahead go first, in `_queue`. Prefetch runs in two lanes of its own:
        # flights a peer can serve now (up to `prefetch_concurrency` at once) and the rest,
        # mostly source reads (see `_source_limit`); chunks a plan gives to other nodes wait
        # parked, outside both, until a peer has them. Separate lanes keep this node's
        # share of the origin's bytes flowing while peer transfers run, and the source
        # reads from starving the peer transfers. With more workers than both lanes (the
        # default) a reader always finds a free one. Entries: (priority, seq, flight).
        self._queue: list[tuple[int, int, Flight]] = []
        self._lanes: dict[str, list[tuple[int, int, Flight]]] = {"peer": [], "source": []}
        self._lane_running = {"peer": 0, "source": 0}
        # How many nodes share the source reads of the prefetches running here (the
        # largest plan's member count); set by the prefetch jobs.
        self.source_sharers: Callable[[], int] = lambda: 1

        self._bandwidth_next = 0.0  # token bucket: when the next prefetch byte may go
        self._seq = itertools.count()
        self._changed = trio.Event()
        self._failure = trio.Event()  # set and replaced whenever a flight fails
        # Flights parked while another node reads their chunk from the source, by object.
        self._parked: dict[str, dict[int, Flight]] = {}
        self._watching: set[str] = set()
        # Chunks fetched but not yet on disk: lets a burst run ahead of a slower disk,
        # bounded so RAM stays bounded (each slot pins one chunk buffer).
        self._write_slots = trio.Semaphore(write_backlog)
        self.stats = {"source": 0, "peer": 0, "verify_failures": 0, "parked": 0, "busy": 0}
        self.read_bytes: Counter[str] = Counter()  # bytes served to readers, by origin
        self._came_from: dict[tuple[str, int], str] = {}  # fetched for readers, not yet read
        # Called with (origin, seconds) after every transfer: the daemon's latency histogram.
        self.on_transfer: Callable[[str, float], None] = lambda origin, seconds: None
        self._verified: set[str] = set()  # objects whose whole-file digest checked out
        self._verifying: set[str] = set()
        # Objects whose version is broken (the source changed under it): object -> why.
        # The scheduler's word, from the dataset listing (`mark_broken`) or a chunk map.
        self._broken: dict[str, str] = {}

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
            parked = sum(len(p) for p in self._parked.values())
            if not (self._flights or parked):
                continue
            log.debug(
                "flights %d; reads queued %d; peer lane %d running, %d queued; source lane "
                "%d running, %d queued; parked %d; waiting to write %d; busy holders %d",
                len(self._flights),
                len(self._queue),
                self._lane_running["peer"],
                len(self._lanes["peer"]),
                self._lane_running["source"],
                len(self._lanes["source"]),
                parked,
                self._write_slots.statistics().tasks_waiting,
                self.stats["busy"],
            )

    # -- the read path --------------------------------------------------------------------

    def open(self, entry: FileEntry, chunk_size: int, source: Source) -> OpenFile:
        self._refuse_broken(entry)
        obj = self.store.object(entry.object, entry.size, chunk_size)
        return OpenFile(entry, obj, source, self.store.backing(obj))

    def mark_broken(self, object_id: str, reason: str) -> bool:
        """The scheduler found this object's version broken: refuse it from now on, cached
        or not. True if it was not known to be broken yet."""
        new = object_id not in self._broken
        self._broken[object_id] = reason
        return new

    def is_broken(self, object_id: str) -> bool:
        return object_id in self._broken

    def _refuse_broken(self, entry: FileEntry) -> None:
        """SourceChangedError for a file whose version the cluster found broken: what is
        cached of it may be one version and what the source sends another."""
        reason = self._broken.get(entry.object)
        if reason is not None:
            raise SourceChangedError(
                f"{entry.path}: this revision is broken ({reason}); run `syncbit dataset add` "
                "again to pick up the source's current content"
            )

    def hold(self, handle: OpenFile) -> None:
        """A file opened through the mount: its object is evicted only when nothing else
        can go, so a file open across a dataset update keeps reading the old revision's
        bytes while there is room. Until `release`."""
        handle.hold = self.store.hold(handle.obj)

    def release(self, handle: OpenFile) -> None:
        if handle.hold is not None:
            handle.hold.release()

    async def read(self, handle: OpenFile, offset: int, length: int) -> bytes | memoryview:
        """Bytes [offset, offset+length) of an open file, fetching what is missing. A
        memoryview result is valid only until the caller's next checkpoint (see
        `ObjectReader.parts`).

        Raises ReadDeadlineError (with the last cause) when the chunks did not arrive within
        the read deadline, SourceChangedError when the source lost the recorded version,
        CacheFullError when a chunk arrived twice but the cache could not keep it.
        """
        obj = handle.obj
        self._refuse_broken(handle.entry)
        length = max(0, min(length, obj.size - offset))
        if length == 0:
            return b""
        span = chunk_span(offset, length, obj.size, obj.chunk_size)
        sequential = offset == handle.next_offset
        handle.next_offset = offset + length
        self.store.touch(obj)
        # Kept while its chunks come: the cache does not evict the object meanwhile.
        with self.store.keeping(obj):
            if obj.unverified:  # after an unclean shutdown: checked before first use
                await self.store.verify_chunks(obj, span)
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
            with self.store.reading(obj) as reader:
                if missing:
                    cause = obj.unstored.get(missing[0], "dropped again before it was read")
                    raise CacheFullError(
                        f"chunk {missing[0]} of {handle.entry.path} arrived but could not be "
                        f"kept: {cause}"
                    )
                if sequential and self.readahead_chunks:
                    self._readahead(handle, span.stop)
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

    def _count_read(self, obj: StoredObject, offset: int, length: int) -> None:
        """Bytes served to readers, by where their chunk came from (for /metrics): a chunk
        fetched for a reader (or its readahead) counts as peer or source bytes until a
        read reaches its end; every other byte was already in the cache."""
        came_from = self._came_from
        if not came_from:
            self.read_bytes["cache"] += length
            return
        cs, end = obj.chunk_size, offset + length
        for index in chunk_span(offset, length, obj.size, cs):
            chunk_end = min(obj.size, (index + 1) * cs)
            part = min(end, chunk_end) - max(offset, index * cs)
            key = (obj.id, index)
            origin = came_from.pop(key, "cache") if end >= chunk_end else came_from.get(key)
            self.read_bytes[origin or "cache"] += part

    def _readahead(self, handle: OpenFile, after: int) -> None:
        """Sequential reader: keep the next `readahead_chunks` missing chunks coming.

        Held chunks need nothing: the kernel's own readahead on the object file keeps
        them ahead of the reader (an explicit fadvise(WILLNEED) measured slower).
        """
        obj = handle.obj
        if handle.readahead_until - after > self.readahead_chunks // 2:
            # Like the kernel's async readahead, top the window up only once half of it is
            # consumed: the new chunks queue together and go out as one source request and
            # one claim, not one of each per chunk.
            return
        stop = min(after + self.readahead_chunks, chunk_count(obj.size, obj.chunk_size))
        for index in range(max(after, handle.readahead_until), stop):
            if not obj.has(index):
                self._flight(handle, index, Priority.READAHEAD)
        handle.readahead_until = max(handle.readahead_until, stop)

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
                    await self._done_or_failure(flight.done)
                    failed = next((f for f in flights if f.done.is_set() and f.error), None)
                    if failed is not None:
                        _raise_for(failed)
                _raise_for(flight)
        if scope.cancelled_caught:
            pending = next((f for f in flights if not f.done.is_set()), None)
            if pending is None:  # every flight finished just as the deadline fired
                for flight in flights:
                    _raise_for(flight)
                return flights
            raise ReadDeadlineError(
                f"read of {handle.entry.path} chunk {pending.index} timed out after "
                f"{self.read_deadline:g}s: {pending.last_error or 'no answer yet'}"
            )
        return flights

    async def _done_or_failure(self, done: trio.Event) -> None:
        """Until `done` is set or any flight fails (failures are rare: the caller then
        looks whether one of its own flights failed)."""
        failure = self._failure
        if done.is_set():
            return
        async with trio.open_nursery() as nursery:

            async def until(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until, done)
            nursery.start_soon(until, failure)

    def _signal_failure(self) -> None:
        self._failure.set()
        self._failure = trio.Event()

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
        with self.store.keeping(obj):  # not evicted between its chunks, nor under the hash
            discards = obj.discards
            missing = [i for i in range(obj.chunks) if not obj.has(i)]
            if missing:
                await self._wait_chunks(handle, missing, prio, bounded=False, may_source=may_source)
            while len(obj.written) < obj.chunks or obj.id in self._verifying:
                if obj.discards != discards:
                    raise SourceChangedError(f"{entry.path}: content failed verification")
                lost = next((i for i in obj.unstored if not obj.has(i)), None)
                if lost is not None:
                    raise CacheFullError(
                        f"{entry.path}: chunk {lost} could not be stored: {obj.unstored[lost]}"
                    )
                await self.store.written_event.wait()
            expected = entry.version.get("sha256")
            if expected and obj.id not in self._verified and obj.discards == discards:
                # Complete before this process started (a restart): check it once now.
                await self._verify_whole(obj, entry.path, expected)
                while obj.id in self._verifying:  # another caller's check of the same object
                    await self.store.written_event.wait()
            if obj.discards != discards:
                raise SourceChangedError(f"{entry.path}: content failed verification")

    def is_verified(self, object_id: str) -> bool:
        """The object's whole-file digest (where the source publishes one) checked out."""
        return object_id in self._verified

    def abandon(self, object_ids: AbstractSet[str], why: str) -> int:
        """Stop the prefetch flights of these objects: nobody wants them any more (their
        dataset was removed, its pull cancelled, its job failed). Queued and parked ones
        end at once, running ones are cancelled (a blocking source read in a thread
        finishes first: at most one more request each). A flight a reader or readahead
        waits on is left alone: its own deadline bounds it. Returns how many stopped."""
        stopped = 0
        for key, flight in list(self._flights.items()):
            if key[0] not in object_ids or flight.priority < Priority.PREFETCH:
                continue
            if flight.done.is_set():
                continue
            stopped += 1
            flight.abandoned = why
            if flight.scope is not None:
                flight.scope.cancel()  # the worker settles it
                continue
            parked = self._parked.get(flight.obj.id)
            if parked is not None and parked.get(flight.index) is flight:
                del parked[flight.index]
            # Queued (its heap entry is skipped from now on), parked, or carried along by
            # another flight's source read (which still stores it if it arrives).
            flight.error = SyncbitError(why)
            self._finish(flight)
        if stopped:
            log.info("stopped %d prefetch transfers: %s", stopped, why)
        return stopped

    # -- single flight and the priority queue ----------------------------------------------

    def _flight(
        self,
        handle: OpenFile,
        index: int,
        prio: Priority,
        may_source: Callable[[int], bool] | None = None,
    ) -> Flight:
        key = (handle.obj.id, index)
        flight = self._flights.get(key)
        deadline = trio.current_time() + self.read_deadline
        if flight is not None and flight.done.is_set():
            if trio.current_time() < flight.retry_after:
                # Failed a moment ago (the kernel retries a failed readahead page at once):
                # one more attempt, no new deadline's worth of retrying. A source that came
                # back still answers it.
                deadline = trio.current_time()
            flight = None
        if flight is None:
            flight = Flight(handle.obj, handle.entry, handle.source, index, prio, deadline)
            flight.one_shot = deadline <= trio.current_time()
            if may_source is not None and prio >= Priority.PREFETCH:
                flight.may_source = functools.partial(may_source, index)
            self._flights[key] = flight
            self._push(flight)
        elif prio < flight.priority and not flight.started:
            flight.priority = prio
            flight.may_source = None  # a reader needs it now: no waiting for a plan
            self._push(flight)  # the stale heap entry is skipped when popped
        return flight

    def _push(self, flight: Flight, peer_ready: bool = False) -> None:
        """Queue a flight: a read's, or a prefetch in its lane (peer-ready or the rest), or
        park a prefetch that the plan gives to another node."""
        parked = self._parked.get(flight.obj.id)
        if parked is not None and parked.get(flight.index) is flight:
            del parked[flight.index]
        if flight.priority < Priority.PREFETCH:
            queue = self._queue
        elif not peer_ready and flight.may_source is not None and not flight.may_source():
            # Planned for another node: park it now (the chunk-map watcher moves it to the
            # peer lane once a holder reports it). Queued in the source lane instead, it
            # waited behind this node's own source read, 0.7-1.2 s each on a shared origin
            # link, so peers learnt of the other nodes' chunks in bursts and the swarm
            # trailed the origin (bench/swarm.py: 1.67x -> 1.45x T_min median, 6 pairs).
            self._park(flight, "the node planned to read it")
            return
        else:
            queue = self._lanes["peer" if peer_ready else "source"]
        heapq.heappush(queue, (int(flight.priority), next(self._seq), flight))
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _next(self) -> tuple[Flight, str] | None:
        """The most urgent runnable flight and its lane ("" for reads), or None; skips
        stale heap entries (flights started meanwhile or moved to another queue)."""
        while self._queue:
            flight = heapq.heappop(self._queue)[2]
            if (
                not flight.started
                and not flight.done.is_set()
                and flight.priority < Priority.PREFETCH
            ):
                return flight, ""
        for lane in ("peer", "source"):
            queue = self._lanes[lane]
            if not queue:
                continue  # every worker wake-up comes here: skip the limit's job scan
            limit = self.prefetch_concurrency if lane == "peer" else self._source_limit()
            while queue and self._lane_running[lane] < limit:
                flight = heapq.heappop(queue)[2]
                if (
                    not flight.started
                    and not flight.done.is_set()
                    and flight.priority >= Priority.PREFETCH
                ):
                    return flight, lane
        return None

    def _source_limit(self) -> int:
        """Prefetch source reads at once on this node: about `prefetch_concurrency / 2`
        across the whole plan, at least one per node. Peers can forward a chunk only once
        it is complete, and streams that share the origin's link each run slower: with 8
        nodes at 3 reads each, a chunk took 24x its own transfer time to complete, peers
        idled in the first seconds and the origin's last chunks all landed at once, each
        on one holder that 7 nodes then queued on (bench/swarm.py: 1.80x T_min mean of 3
        runs at 3 per node, 1.62x at 1)."""
        budget = max(1, self.prefetch_concurrency // 2)
        return max(1, -(-budget // max(1, self.source_sharers())))

    async def _worker(self) -> None:
        while True:
            picked = self._next()
            if picked is None:
                await self._changed.wait()
                continue
            flight, lane = picked
            flight.started = True
            flight.lane = lane
            if lane:
                self._lane_running[lane] += 1
            if not flight.one_shot and not flight.ran:
                # A queued prefetch must not spend its deadline waiting in the queue; a
                # flight back from parking keeps the deadline it had (a reader's wait
                # must not outlast its own deadline by a retry of the kernel's).
                flight.deadline = max(flight.deadline, trio.current_time() + self.read_deadline)
            flight.ran = True
            staged: list[Staged] | None = None
            parked: _Wait | _ToPeerLane | None = None
            began = trio.current_time()
            try:
                with trio.CancelScope() as flight.scope:  # `abandon` may end it
                    staged = await self._transfer(flight)
                if staged:
                    self.on_transfer(flight.origin, trio.current_time() - began)
            except (_Wait, _ToPeerLane) as wait:
                parked = wait
            except SyncbitError as exc:
                flight.error = exc
            except Exception as exc:
                log.exception("chunk %d of %s: unexpected error", flight.index, flight.entry.path)
                flight.error = exc
            finally:
                flight.scope = None
                if lane:
                    self._lane_running[lane] -= 1
                    self._wake()
                self._settle(flight, staged, parked)
            for done in staged or []:
                # The write overlaps the next transfer; the slots bound staged RAM and let
                # a disk slower than the network push back on fetching.
                await self._write_slots.acquire()
                self._nursery.start_soon(self._persist, done.flight, done.view, done.digest)

    def _settle(
        self, flight: Flight, staged: list[Staged] | None, parked: _Wait | _ToPeerLane | None
    ) -> None:
        """After a transfer attempt: park or requeue the flight, or complete it (and the
        chunks its source read brought along), keeping a failure briefly for the kernel's
        retry."""
        if isinstance(parked, _ToPeerLane):
            flight.started = False
            self._push(flight, peer_ready=True)
            return
        if parked is not None:
            self._park(flight, parked.holder)
            return
        if staged is None and flight.error is None:
            # never report success
            flight.error = SyncbitError(flight.abandoned or "fetch cancelled")
        if isinstance(flight.error, (ReadDeadlineError, SourceError, UserError)):
            self._keep_failure(flight)
        else:
            self._finish(flight)
        for done in staged or []:
            if done.flight.priority < Priority.PREFETCH:
                if len(self._came_from) > 100_000:  # chunks read ahead but never read
                    self._came_from.clear()
                self._came_from[(done.flight.obj.id, done.flight.index)] = done.flight.origin
            if done.flight is not flight:
                self._finish(done.flight)  # readers go on from RAM while it is written

    def _keep_failure(self, flight: Flight) -> None:
        """End a failed flight but keep its failure briefly: the kernel retries a failed
        readahead page at once, and that retry must fail now, not after another
        deadline."""
        flight.retry_after = trio.current_time() + self.failure_ttl
        flight.done.set()
        self._signal_failure()

    def _finish(self, flight: Flight) -> None:
        key = (flight.obj.id, flight.index)
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.done.set()
        if flight.error is not None:
            self._signal_failure()

    async def _persist(self, flight: Flight, view: memoryview, digest_hex: str) -> None:
        """Write a staged chunk to the object file within the cache budget; only then may
        it become durable. A chunk the cache cannot keep (full of pinned or in-use data,
        disk full after eviction, a write error) is dropped from RAM with its cause: the
        readers that had it from RAM are served, a later read fetches it again."""
        obj, index = flight.obj, flight.index
        try:
            await self.store.store_chunk(obj, index, view, digest_hex)
        except (CacheFullError, OSError) as exc:
            if not isinstance(exc, DiskFullError):  # the store logs a full disk once
                log.error("cannot store chunk %d of %s: %s", index, flight.entry.path, exc)
            return
        finally:
            self._write_slots.release()
        expected = flight.entry.version.get("sha256")
        if expected and obj.complete and len(obj.written) == obj.chunks:
            with self.store.keeping(obj):  # no eviction under the hash
                await self._verify_whole(obj, flight.entry.path, expected)

    async def _verify_whole(self, obj: StoredObject, path: str, expected: str) -> None:
        """The source published the whole file's SHA-256 (HF LFS): check the assembled
        object once, and discard it on mismatch so no reader gets those bytes again."""
        if obj.id in self._verified or obj.id in self._verifying:
            return
        self._verifying.add(obj.id)
        try:
            got = await self.store.sha256(obj)
            if got == expected:
                self._verified.add(obj.id)
            else:
                log.error(
                    "%s: whole-file SHA-256 %s does not match the source's %s: discarding it",
                    path,
                    got[:16],
                    expected[:16],
                )
                self.stats["verify_failures"] += 1
                await self.store.discard(obj)
        finally:
            self._verifying.discard(obj.id)
            self.store.notify()  # wake ensure(): verified, or discarded

    # -- one chunk transfer -----------------------------------------------------------------

    async def _transfer(self, flight: Flight) -> list[Staged]:
        """Peers first (verified against the recorded digest), then the source; retry
        temporary failures with backoff until the flight's deadline. A permanent failure
        (the source's `is_temp_failure` says so: no Range support, access denied, the
        version gone; or a UserError) is not retried at all. Returns what was staged:
        this flight's chunk, and queued chunks right after it that a source read brought
        along (empty if the chunk was already here)."""

        def retried(exc: Exception, delay: float) -> None:
            flight.last_error = str(exc)
            log.warning("chunk %d of %s: %s; retrying", flight.index, flight.entry.path, exc)

        try:
            return await retrying(
                functools.partial(self._transfer_once, flight),
                functools.partial(_is_temp_failure, flight.source),
                deadline=flight.deadline,
                base=0.05,
                cap=2.0,
                on_retry=retried,
            )
        except SyncbitError as exc:
            flight.last_error = str(exc)
            if not _is_temp_failure(flight.source, exc):
                log.error("%s: %s", flight.entry.path, exc)
                raise
            log.error("chunk %d of %s failed: %s", flight.index, flight.entry.path, exc)
            raise ReadDeadlineError(f"chunk {flight.index} of {flight.entry.path}: {exc}") from exc

    async def _transfer_once(self, flight: Flight) -> list[Staged]:
        obj, index = flight.obj, flight.index
        if obj.has(index):
            return []
        info = await self._chunk_info(obj.id)
        if info.broken is not None:
            self.mark_broken(obj.id, info.broken)
            self._refuse_broken(flight.entry)
        expected = info.digests.get(index)
        if expected is not None and info.peers.get(index):
            if flight.lane == "source":
                raise _ToPeerLane()
            buf = self.store.buffers.take(obj.chunk_size)
            view = memoryview(buf)[: chunk_length(obj.size, obj.chunk_size, index)]
            busy = False
            for peer in _spread(info.peers[index]):
                if peer.node in flight.bad_peers:
                    continue
                got = await self._from_peer(flight, peer, view, expected)
                if got == "ok":
                    self.stats["peer"] += len(view)
                    flight.origin = "peer"
                    self.store.stage(
                        obj, index, view, functools.partial(self.store.buffers.give, buf), expected
                    )
                    return [Staged(flight, view, expected)]
                busy = busy or got == "busy"
            self.store.buffers.give(buf)
            if busy:
                # Every holder that could serve it is at its upload limit: wait briefly
                # (parked, no worker held) while this node's other transfers go on.
                self.stats["busy"] += 1
                raise _Wait("holders busy")
        if flight.may_source is not None and not flight.may_source():
            raise _Wait("the node planned to read it")
        holder = info.fetching.get(index)
        if holder is not None:
            raise _Wait(holder)
        return await self._from_source(flight, info)

    # -- parked flights: waiting for another node's source read ----------------------------

    def _park(self, flight: Flight, holder: str) -> None:
        """Hold a flight (no worker, no queue) until a peer has its chunk, the claim on it
        lapses, or, for a reader, its deadline passes."""
        flight.started = False
        flight.waiting_for = holder
        self.stats["parked"] += 1
        self._parked.setdefault(flight.obj.id, {})[flight.index] = flight
        if flight.obj.id not in self._watching:
            self._watching.add(flight.obj.id)
            self._nursery.start_soon(self._watch_parked, flight.obj.id)

    async def _watch_parked(self, object_id: str) -> None:
        """One poll of the chunk map per object every `park_poll`, however many flights
        wait. Prefetch once polled half as often, to spare the shared CPU (1.58x -> 1.51x
        T_min median, 6 pairs, when other nodes' chunks queued behind the source lane);
        since they wait here from the start, the quicker notice wins: bench/swarm.py
        1.49x -> 1.44x mean of 6 pairs, 1.58x -> 1.46x worst run."""
        try:
            while self._parked.get(object_id):
                await trio.sleep(self.park_poll)
                parked = self._parked.get(object_id, {})
                if not parked:
                    break
                info = await self._chunk_info(object_id, max_age=self.park_poll / 2)
                now = trio.current_time()
                # In random order: nodes that wait for the same chunks would otherwise all
                # ask the same holder for the same chunk at once while others sit idle.
                waiting = list(parked.items())
                random.shuffle(waiting)
                for index, flight in waiting:
                    if flight.started or flight.done.is_set():
                        del parked[index]  # taken along by a source read, or requeued
                    elif info.peers.get(index):
                        self._push(flight, peer_ready=True)
                    elif index not in info.fetching and (
                        flight.may_source is None or flight.may_source()
                    ):
                        self._push(flight)  # nobody is reading it: this node will
                    elif flight.priority < Priority.PREFETCH and now > flight.deadline:
                        del parked[index]
                        flight.error = ReadDeadlineError(
                            f"chunk {index} of {flight.entry.path}: {flight.waiting_for} was "
                            f"reading it from the source and did not deliver within "
                            f"{self.read_deadline:g}s"
                        )
                        self._keep_failure(flight)
                self._steal(parked, info)
        finally:
            self._watching.discard(object_id)
            if not self._parked.get(object_id):
                self._parked.pop(object_id, None)

    def _steal(self, parked: dict[int, Flight], info: ChunkMap) -> None:
        """This node's share of a prefetch's source reads is done (its source lane is
        idle): read one chunk planned for another node that nobody holds or reads yet,
        the last such chunk, since owners read their share from the front. Nodes finish
        their shares seconds apart, and the origin's link is the swarm's scarcest: it
        must not sit waiting on the slowest node's last reads. The claim still gives
        each chunk one reader, so the origin sends it once."""
        if self._lane_running["source"] or any(
            not f.started and f.priority >= Priority.PREFETCH for _, _, f in self._lanes["source"]
        ):
            return
        spare = [
            (index, flight)
            for index, flight in parked.items()
            if flight.may_source is not None
            and not flight.started
            and not flight.done.is_set()
            and not info.peers.get(index)
            and index not in info.fetching
        ]
        if spare:
            index, flight = max(spare, key=lambda item: item[0])
            log.debug("taking over the source read of chunk %d of %s", index, flight.entry.path)
            flight.may_source = None  # from now on this node may read it
            self._push(flight)

    def _followers(self, flight: Flight, info: ChunkMap) -> list[Flight]:
        """Queued flights for the chunks right after `flight` that no peer can serve and no
        one else is reading: candidates for one source request that brings them all
        (object stores and CDNs charge per request, and some, like moto, cost a
        whole-object read per request)."""
        obj = flight.obj
        found: list[Flight] = []
        budget = self.source_batch - obj.chunk_size
        index = flight.index + 1
        while budget >= obj.chunk_size and index < obj.chunks:
            nxt = self._flights.get((obj.id, index))
            if (
                nxt is None
                or nxt.started
                or nxt.done.is_set()
                or info.peers.get(index)
                or index in info.fetching
                or (nxt.may_source is not None and not nxt.may_source())
            ):
                break
            found.append(nxt)
            budget -= obj.chunk_size
            index += 1
        return found

    async def _claim(self, flight: Flight, followers: list[Flight], info: ChunkMap) -> list[Flight]:
        """Claim the source read of `flight`'s chunk (and its followers, already marked
        started) cluster-wide; returns the followers granted in an unbroken run and puts
        the rest back in the queue. Raises _Wait if another node has the chunk. Without an
        answer from the scheduler a reader's read goes ahead (the source has the bytes),
        a prefetch waits (_Wait)."""
        obj = flight.obj
        wanted = [flight.index, *(f.index for f in followers)]
        try:
            claim = await self.directory.claim(obj.id, wanted, self.claim_ttl)
        except SyncbitError as exc:
            log.debug("no claim on %s: %s", obj.id[:12], exc)
            if flight.priority >= Priority.PREFETCH:
                # Background reads wait for the scheduler (a failover takes seconds) rather
                # than read what another node may be reading too: the origin's bytes twice.
                raise _Wait("the scheduler (no answer to a claim)") from None
            return followers
        granted = set(claim.granted)
        log.debug("claim on chunks %s of %s: granted %s", wanted, obj.id[:12], sorted(granted))
        run: list[Flight] = []
        if flight.index in granted:
            for f in followers:
                if f.index not in granted:
                    break
                run.append(f)
        self._unclaim(followers[len(run) :])
        unused = sorted(granted - {flight.index} - {f.index for f in run})
        if flight.index not in granted:
            unused = sorted(granted)
        if unused:
            await self._release(obj.id, unused)
        if flight.index not in granted:
            holders = info.peers.get(flight.index, [])
            if (
                flight.index in claim.held
                and holders
                and all(p.node in flight.bad_peers for p in holders)
            ):
                # Held only by peers that just failed this node (gone, not down yet in
                # the scheduler's eyes): nobody is reading it, so the source it is.
                return []
            raise _Wait(claim.busy.get(flight.index, "a peer"))
        return run

    def _unclaim(self, followers: list[Flight]) -> None:
        for f in followers:  # back in the queue, on their own
            f.started = False
            self._push(f)

    async def _release(self, object_id: str, indexes: list[int]) -> None:
        try:
            await self.directory.release(object_id, indexes)
        except SyncbitError as exc:
            log.debug("could not release claims on %s: %s", object_id[:12], exc)

    async def _throttle(self, nbytes: int) -> None:
        """The prefetch bandwidth cap: a token bucket shared by every prefetch transfer."""
        if self.prefetch_bandwidth <= 0:
            return
        now = trio.current_time()
        start = max(now, self._bandwidth_next)
        self._bandwidth_next = start + nbytes / self.prefetch_bandwidth
        await trio.sleep_until(start)

    async def _from_source(self, flight: Flight, info: ChunkMap) -> list[Staged]:
        # Taken now, before any checkpoint, so no other worker starts them meanwhile.
        followers = self._followers(flight, info)
        for f in followers:
            f.started = True
        return await self._read_source(flight, info, followers)

    async def _read_source(
        self, flight: Flight, info: ChunkMap, followers: list[Flight]
    ) -> list[Staged]:
        obj = flight.obj
        try:
            followers = await self._claim(flight, followers, info)
        except BaseException:
            self._unclaim([f for f in followers if f.started and not f.done.is_set()])
            raise
        for f in followers:
            f.deadline = flight.deadline
        batch = [flight, *followers]
        span = sum(chunk_length(obj.size, obj.chunk_size, f.index) for f in batch)
        if flight.priority >= Priority.PREFETCH:
            await self._throttle(span)
        buf = self.store.buffers.take(span)
        try:
            digests, head_ok = await read_checked(
                flight.source,
                flight.entry,
                flight.index,
                obj.chunk_size,
                memoryview(buf)[:span],
                len(batch),
            )
            self._check_source(batch, info, digests, head_ok)
        except _SourceDisagrees as disagree:
            self.store.buffers.give(buf)
            await self._refuse_batch(batch, disagree)
            raise disagree.error from None
        except BaseException as exc:
            self.store.buffers.give(buf)
            if isinstance(exc, SyncbitError) and not _is_temp_failure(flight.source, exc):
                # The same refusal awaits the chunks after it: they fail with it now rather
                # than each asking the source again.
                for f in followers:
                    f.error = exc
                    self._keep_failure(f)
            else:
                self._unclaim(followers)
            with trio.CancelScope(shield=True):
                await self._release(obj.id, [f.index for f in batch])
            raise
        self.stats["source"] += span
        log.debug(
            "chunks %d-%d of %s read from the source (%d bytes)",
            flight.index,
            batch[-1].index,
            flight.entry.path,
            span,
        )
        pending = [len(batch)]

        def release() -> None:
            pending[0] -= 1
            if pending[0] == 0:
                self.store.buffers.give(buf)

        staged = []
        for i, f in enumerate(batch):
            start = i * obj.chunk_size
            length = chunk_length(obj.size, obj.chunk_size, f.index)
            view = memoryview(buf)[start : start + length]
            f.origin = "source"
            self.store.stage(obj, f.index, view, release, digests[i])
            staged.append(Staged(f, view, digests[i]))
        return staged

    def _check_source(
        self, batch: list[Flight], info: ChunkMap, digests: list[str], head_ok: bool
    ) -> None:
        """Raise _SourceDisagrees unless the source's bytes of a batch may be kept: the
        file's head still matches the one recorded at `dataset add`, and every chunk with a
        recorded digest matches it (a chunk without one is established by this read)."""
        entry = batch[0].entry
        if not head_ok:
            why = (
                f"the first {head_length(entry.size)} bytes of {entry.path} at the source differ "
                "from those recorded at `dataset add` (the source changed under the same "
                "version facts)"
            )
            raise _SourceDisagrees(batch[0].index, None, why)
        for f, got in zip(batch, digests, strict=True):
            expected = info.digests.get(f.index)
            if expected is not None and got != expected:
                raise _SourceDisagrees(
                    f.index,
                    got,
                    f"the source's bytes of chunk {f.index} of {entry.path} differ from the "
                    f"recorded digest ({got[:16]} != {expected[:16]}): not served, nothing "
                    "stored; the scheduler has another node re-check the source",
                )

    async def _refuse_batch(self, batch: list[Flight], disagree: _SourceDisagrees) -> None:
        """A source read that disagreed: every chunk it brought fails (the source may have
        changed under all of them), its claims end, and the scheduler hears what was read."""
        obj = batch[0].obj
        self.stats["verify_failures"] += 1
        now = trio.current_time()
        for f in batch[1:]:  # the first is failed by its worker with the same error
            f.error = disagree.error
            f.retry_after = now + self.failure_ttl
            f.done.set()
        with trio.CancelScope(shield=True):
            await self._release(obj.id, [f.index for f in batch])
            try:
                await self.directory.report_check(
                    obj.id, disagree.index, disagree.digest, "" if disagree.digest else disagree.why
                )
            except SyncbitError as exc:
                log.warning("could not tell the scheduler about %s: %s", batch[0].entry.path, exc)

    async def recheck(self, entry: FileEntry, chunk_size: int, source: Source, index: int) -> str:
        """Read chunk `index` of a file from the source, as the scheduler asked (to settle a
        dispute), and return its digest; nothing is stored. SourceChangedError when the
        source no longer has the recorded version (head sample included)."""
        buf = bytearray(chunk_length(entry.size, chunk_size, index))
        digests, head_ok = await read_checked(source, entry, index, chunk_size, memoryview(buf), 1)
        if not head_ok:
            raise SourceChangedError(
                f"source changed: the first {head_length(entry.size)} bytes of {entry.path} "
                "differ from those recorded at `dataset add`"
            )
        return digests[0]

    async def _chunk_info(self, object_id: str, max_age: float = 1.0) -> ChunkMap:
        try:
            return await self.directory.chunk_info(object_id, max_age)
        except SyncbitError as exc:
            # No scheduler is no reason to fail a read: the source still has the bytes.
            log.debug("no chunk info for %s: %s", object_id[:12], exc)
            return ChunkMap()

    async def _from_peer(self, flight: Flight, peer: Peer, view: memoryview, expected: str) -> str:
        """ "ok" (view filled and verified), "busy" (no upload slot free: not a fault), or
        "failed" (the peer is not asked again for this chunk)."""
        began = trio.current_time()
        try:
            await trio.to_thread.run_sync(self._from_peer_blocking, flight, peer, view, expected)
            log.debug(
                "chunk %d of %s from %s in %.2fs",
                flight.index,
                flight.entry.path,
                peer.node,
                trio.current_time() - began,
            )
            return "ok"
        except PeerBusyError:
            return "busy"
        except DigestMismatchError as exc:
            self.stats["verify_failures"] += 1
            flight.bad_peers.add(peer.node)
            log.warning("%s", exc)
            await self._report(peer.node, flight, str(exc))
        except PeerError as exc:
            flight.bad_peers.add(peer.node)
            flight.last_error = str(exc)
            log.info("chunk %d of %s: %s; trying next", flight.index, flight.entry.path, exc)
        return "failed"

    async def _report(self, peer: str, flight: Flight, reason: str) -> None:
        try:
            await self.directory.report_bad_peer(peer, flight.obj.id, flight.index, reason)
        except SyncbitError as exc:
            log.warning("could not report bad peer %s: %s", peer, exc)

    def _from_peer_blocking(
        self, flight: Flight, peer: Peer, view: memoryview, expected: str
    ) -> None:
        offset = flight.index * flight.obj.chunk_size
        prefetch = flight.priority >= Priority.PREFETCH
        self.peers.get_into(peer.address, flight.obj.id, offset, view, prefetch=prefetch)
        got = digest(view)
        if got != expected:
            raise DigestMismatchError(
                f"peer {peer.node} ({peer.address}) sent bad bytes for chunk {flight.index} "
                f"of {flight.entry.path}: digest {got[:16]} != {expected[:16]}"
            )


def _read_disk_parts(
    reader: ObjectReader, parts: list[bytes | memoryview | range]
) -> list[bytes | memoryview]:
    """Blocking: the `range` parts of a read, from the object file."""
    return [reader.pread(p.start, len(p)) if isinstance(p, range) else p for p in parts]


async def read_checked(
    source: Source, entry: FileEntry, first: int, cs: int, view: memoryview, chunks: int
) -> tuple[list[str], bool]:
    """One range read of `chunks` consecutive chunks from chunk `first` (of `cs` bytes), in
    a worker thread: their digests, and whether the file's head still matches its recorded
    sample (True when none is recorded). A batch that starts at 0 holds the head; any other
    reads the head alongside, on a second connection: in sequence it would cost a round
    trip per batch on a distant origin. A change of the head before the batch's read began
    shows; one while it was read may not."""
    expected = entry.version.get("head")
    n = head_length(entry.size)

    def batch() -> list[str]:
        source.read_into(entry, first * cs, view)
        return [digest(view[i * cs : (i + 1) * cs]) for i in range(chunks)]

    def head() -> bool:
        sample = bytearray(n)
        source.read_into(entry, 0, memoryview(sample))
        return digest(sample) == expected

    if not expected or (first == 0 and len(view) >= n):
        return await trio.to_thread.run_sync(batch), not expected or digest(view[:n]) == expected
    digests: list[str] = []
    head_ok = False
    errors: list[SyncbitError] = []  # kept, so one failure does not cancel the other read

    async def read_batch() -> None:
        nonlocal digests
        try:
            digests = await trio.to_thread.run_sync(batch)
        except SyncbitError as exc:
            errors.insert(0, exc)  # the batch's own error is the one to report

    async def read_head() -> None:
        nonlocal head_ok
        try:
            head_ok = await trio.to_thread.run_sync(head)
        except SyncbitError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_batch)
        nursery.start_soon(read_head)
    if errors:
        raise errors[0]
    return digests, head_ok
