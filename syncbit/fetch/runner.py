"""Runs flights: joins readers to the flight of each chunk, queues or parks it, workers
transfer it, staged chunks go to the store and parked flights are watched until a peer
holds their chunk. Never decides what a read needs (fetcher) nor where bytes come from.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from collections.abc import Set as AbstractSet

import trio

from syncbit.errors import (
    CacheFullError,
    DiskFullError,
    ReadDeadlineError,
    SourceError,
    SyncbitError,
    UserError,
)
from syncbit.fetch.flight import (
    BACKGROUND,
    Flight,
    FlightTable,
    Joined,
    Park,
    Priority,
    Staged,
    State,
)
from syncbit.fetch.handle import OpenFile
from syncbit.fetch.plan import takeover
from syncbit.fetch.queue import FlightQueue
from syncbit.fetch.served import Served
from syncbit.fetch.transfer import Transfers
from syncbit.fetch.verify import WholeFile
from syncbit.store import ObjectStore

log = logging.getLogger("syncbit.fetch")

_KEEP_FAILED = (ReadDeadlineError, SourceError, UserError)  # kept briefly for the retry


class Runner:
    """The flights of one node and the tasks that run them. Run `run()` in a nursery."""

    def __init__(
        self,
        store: ObjectStore,
        table: FlightTable,
        queue: FlightQueue,
        transfers: Transfers,
        whole: WholeFile,
        served: Served,
        stats: dict[str, int],
        *,
        workers: int,
        max_workers: int,
        write_backlog: int,
        park_poll: float,
    ) -> None:
        self._store = store
        self.table = table
        self._queue = queue
        self._transfers = transfers
        self._whole = whole
        self._served = served
        self.stats = stats
        self.workers = workers
        self.max_workers = max(workers, max_workers)
        self._started = 0  # worker tasks so far (never more than max_workers)
        self._idle = 0  # of them, waiting for a flight
        self.read_deadline = table.read_deadline
        self.park_poll = park_poll
        self._watching: set[str] = set()  # objects whose parked flights a task watches
        self._nudges: dict[str, trio.Event] = {}  # watchers waiting longer than park_poll
        # Chunks fetched but not yet on disk: lets a burst run ahead of a slower disk,
        # bounded so RAM stays bounded (each slot pins one chunk buffer).
        self._write_slots = trio.Semaphore(write_backlog)
        # Called with (origin, seconds) after every transfer: the daemon's latency histogram.
        self.on_transfer: Callable[[str, float], None] = lambda origin, seconds: None
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for _ in range(self.workers):
                    self._add_worker()
                if log.isEnabledFor(logging.DEBUG):
                    nursery.start_soon(self._log_queues)
                task_status.started()
        finally:
            self._nursery = None  # closed: a job stopping after it spawns nothing here

    async def _log_queues(self) -> None:
        """Debug aid: once a second while anything is in flight, what each lane holds."""
        while True:
            await trio.sleep(1)
            q = self._queue.describe()
            if not (len(self.table) or q["parked"]):
                continue
            log.debug(
                "flights %d; %s; waiting to write %d; busy holders %d",
                len(self.table),
                ", ".join(f"{k} {v}" for k, v in q.items()),
                self._write_slots.statistics().tasks_waiting,
                self.stats["busy"],
            )

    def abandon(self, object_ids: AbstractSet[str], why: str) -> int:
        """Stop the prefetch flights of these objects: nobody wants them any more (their
        dataset was removed, its pull cancelled, its job failed). Queued and parked ones
        end at once, running ones are cancelled (a blocking source read in a thread
        finishes first: at most one more request each). A flight a reader or readahead
        waits on is left alone: its own deadline bounds it. Returns how many stopped."""
        stopped = 0
        for flight in self.table:
            if flight.obj.id not in object_ids or flight.priority < BACKGROUND:
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
            self.table.finish(flight)
        if self._nursery is not None:
            claims = self._transfers.claims
            for object_id, indexes in claims.forget(object_ids).items():
                self._nursery.start_soon(claims.release, object_id, indexes)
        if stopped:
            log.info("stopped %d prefetch transfers: %s", stopped, why)
        return stopped

    # -- flights: joining, queueing, parking -------------------------------------------------

    def join(
        self,
        handle: OpenFile,
        index: int,
        prio: Priority,
        may_source: Callable[[int], bool] | None = None,
    ) -> Flight:
        flight, joined = self.table.join(
            handle.obj, handle.entry, handle.source, index, prio, may_source
        )
        if joined is Joined.NEW:
            self.push(flight)
        elif joined is Joined.RAISED and not (
            flight.state is State.PARKED and flight.priority >= BACKGROUND
        ):
            # Queued again at its new priority, in the lane it waited in; its older heap
            # entry is skipped when popped. (A parked one raised to OPENED still waits for
            # the node its plan names; the watcher queues it at its new priority.)
            self.push(flight, peer_ready=flight.state is State.QUEUED and flight.peer_ready)
        return flight

    def push(self, flight: Flight, peer_ready: bool = False) -> None:
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
        if flight.priority < BACKGROUND and object_id in self._nudges:
            self._nudges[object_id].set()  # a reader waits: its watcher looks now
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
                await self._pause(object_id)
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
                    elif self._transfers.holders(flight, info):
                        self.push(flight, peer_ready=True)
                    elif index not in info.fetching and (
                        flight.may_source is None or flight.may_source()
                    ):
                        self.push(flight)  # nobody is reading it: this node will
                    elif flight.priority < BACKGROUND and now > flight.deadline:
                        self._queue.unpark(flight)
                        flight.error = ReadDeadlineError(
                            f"chunk {index} of {flight.entry.path}: {flight.waiting_for} was "
                            f"reading it from the source and did not deliver within "
                            f"{self.read_deadline:g}s"
                        )
                        self.table.keep_failure(flight)
                if self._queue.source_lane_idle():
                    spare = takeover(parked, info)
                    if spare is not None:
                        log.debug(
                            "taking over the source read of chunk %d of %s",
                            spare.index,
                            spare.entry.path,
                        )
                        spare.may_source = None  # from now on this node may read it
                        self.push(spare)
        finally:
            self._watching.discard(object_id)
            self._queue.drop_object_if_idle(object_id)

    async def _pause(self, object_id: str) -> None:
        """Until the next look at `object_id`'s chunk map: `park_poll` while a reader
        waits on it; with prefetches only, this object's share of the lookups the
        scheduler asks of this node (`Transfers.lookup_interval`, spread over the objects
        watched here), cut short when a reader parks on it."""
        parked = self._queue.parked(object_id).values()
        wait, interval = self.park_poll, self._transfers.lookup_interval
        if interval > 0 and all(f.priority >= BACKGROUND for f in parked):
            wait = max(wait, interval * len(self._watching))
        if wait <= self.park_poll:
            await trio.sleep(wait)
            return
        nudge = self._nudges[object_id] = trio.Event()
        try:
            with trio.move_on_after(wait):
                await nudge.wait()
        finally:
            del self._nudges[object_id]

    # -- workers -------------------------------------------------------------------------------

    def _add_worker(self) -> None:
        assert self._nursery is not None
        self._started += 1
        self._nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        while True:
            flight = self._queue.take()
            if flight is None:
                self._idle += 1
                try:
                    await self._queue.changed.wait()
                finally:
                    self._idle -= 1
                continue
            if (
                not self._idle
                and self._started < self.max_workers
                and self._transfers.streams.busy() >= max(1, self._started - 1)
            ):
                # Every worker is busy, all but this one with source reads (running, or
                # waiting for a stream): one more, so that the sources get the streams
                # their limits allow and a reader still finds a free worker. Grown on
                # demand, never shrunk.
                self._add_worker()
            if not flight.one_shot and (not flight.ran or not flight.for_reader):
                # A queued prefetch must not spend its deadline waiting in the queue, nor
                # one back from parking (it waited for a peer or a plan: with its deadline
                # gone, its first wait for a source stream failed at once, and the whole
                # prefetch with it); a reader's flight back from parking keeps the
                # deadline it had (its wait must not outlast its own deadline by a retry
                # of the kernel's).
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
                self.push(flight, peer_ready=True)
            else:
                self._park(flight, result.holder)
            return
        if result is None and flight.error is None:
            # never report success
            flight.error = SyncbitError(flight.abandoned or "fetch cancelled")
        if isinstance(flight.error, _KEEP_FAILED):
            self.table.keep_failure(flight)
        else:
            self.table.finish(flight)
        for done in result or []:
            if done.flight.priority < BACKGROUND:
                self._served.fetched(done.flight)
            if done.flight is not flight:
                self.table.finish(done.flight)  # readers go on from RAM while it is written

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
        if expected:  # hashed as the file's chunks arrive in order; decided with the last
            await self._whole.verify(obj, flight.entry.path, expected)
