"""Claims on source reads: which queued chunks one source request brings along, and the
cluster-wide claim that gives each chunk one reader (the rest wait for a peer). Never
reads a byte; a chunk it cannot take goes back to the queue through `requeue`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Set as AbstractSet

import trio

from syncbit.errors import SyncbitError
from syncbit.fetch.directory import ChunkDirectory
from syncbit.fetch.flight import Flight, FlightTable, Park, Priority, State
from syncbit.fetch.patience import ReaderPatience
from syncbit.protocol import ChunkMap

log = logging.getLogger("syncbit.fetch")

AHEAD_REQUESTS = 2  # whole source batches' worth of chunks claimed ahead with each claim
# Only a pull's or prefetch's chunks are claimed ahead. A reader's window may be dropped at
# any moment (and another node's reader would wait on the lease); an open file's whole
# fetch keeps pace with its loader, and with claims ahead bench/checkpoint.py's load with
# prefetch_on_open took 7.9-8.6 s instead of 5.6-6.1 s.
AHEAD_FROM = Priority.PREFETCH


class Claims:
    """Source-read claims of one node, through the chunk directory."""

    def __init__(
        self,
        directory: ChunkDirectory,
        table: FlightTable,
        requeue: Callable[[Flight], None],
        source_batch: int,
        ttl: float,
        patience: ReaderPatience,
    ) -> None:
        self.directory = directory
        self.table = table
        self.requeue = requeue  # back to the queue, on its own
        self.source_batch = source_batch  # bytes one source request may bring at most
        self.ttl = ttl
        # A reader's chunk waits for the scheduler only so long (its map, its claim).
        self.patience = patience
        # Chunks granted ahead of their reads (see `claim`): (object, chunk) -> the trio
        # time until which this node counts on the grant (half the lease).
        self._ahead: dict[tuple[str, int], float] = {}
        # Chunks a claim in flight asks for ahead, and the event set when it is answered.
        self._asking: dict[tuple[str, int], trio.Event] = {}

    def followers(self, flight: Flight, info: ChunkMap, budget: int | None = None) -> list[Flight]:
        """Queued flights for the chunks right after `flight` that no peer can serve and no
        one else is reading: candidates for one source request that brings them all
        (object stores and CDNs charge per request, and some, like moto, cost a
        whole-object read per request). `budget`: bytes after `flight`'s chunk (default:
        the rest of one source request)."""
        obj = flight.obj
        found: list[Flight] = []
        if budget is None:
            budget = self.source_batch - obj.chunk_size
        index = flight.index + 1
        while budget >= obj.chunk_size and index < obj.chunks:
            nxt = self.table.get(obj.id, index)
            if (
                nxt is None
                or (nxt.state is not State.QUEUED and nxt.state is not State.PARKED)
                or info.peers.get(index)
                or index in info.fetching
                or (nxt.may_source is not None and not nxt.may_source())
            ):
                break
            found.append(nxt)
            budget -= obj.chunk_size
            index += 1
        return found

    def forget(self, object_ids: AbstractSet[str]) -> dict[str, list[int]]:
        """Drop the grants taken ahead for these objects (their transfers were abandoned):
        what to release, by object, so other nodes need not wait for the leases to end."""
        gone: dict[str, list[int]] = {}
        for key in [k for k in self._ahead if k[0] in object_ids]:
            del self._ahead[key]
            gone.setdefault(key[0], []).append(key[1])
        return gone

    def unclaim(self, followers: list[Flight]) -> None:
        for f in followers:  # back in the queue, on their own (unless abandoned meanwhile)
            if f.state is State.RUNNING:
                self.requeue(f)

    async def claim(
        self, flight: Flight, followers: list[Flight], info: ChunkMap
    ) -> list[Flight] | Park:
        """Claim the source read of `flight`'s chunk (and its followers) cluster-wide: the
        followers granted in an unbroken run (the rest go back to the queue), or Park if
        another node has the chunk. Without an answer from the scheduler a reader's read
        goes ahead (the source has the bytes); a prefetch parks until one answers."""
        obj = flight.obj
        wanted = [flight.index, *(f.index for f in followers)]
        now = trio.current_time()
        asking = {self._asking[k] for i in wanted if (k := (obj.id, i)) in self._asking}
        if asking and all(
            (obj.id, i) in self._asking or self._ahead.get((obj.id, i), -1.0) > now for i in wanted
        ):
            # Another worker's claim is asking for these chunks ahead right now: its
            # answer, not a second request for the same chunks.
            for answered in asking:
                await answered.wait()
            now = trio.current_time()
        held = {i for i in wanted if self._ahead.get((obj.id, i), -1.0) > now}
        if len(held) == len(wanted):
            for i in wanted:
                del self._ahead[(obj.id, i)]
            return followers
        # The queued chunks the next source requests will bring are claimed with this
        # one: a pull of 1 GiB asked the scheduler ~70 times, now ~25. A grant taken
        # ahead is counted on for half its lease; one never used lapses with its lease.
        self._ahead = {k: t for k, t in self._ahead.items() if t > now}
        last = followers[-1] if followers else flight
        ahead = []
        if flight.priority >= AHEAD_FROM:
            for f in self.followers(last, info, AHEAD_REQUESTS * self.source_batch):
                if f.state is not State.QUEUED or f.priority < AHEAD_FROM:
                    break  # a parked chunk waits for a peer, not for a worker
                key = (obj.id, f.index)
                if key not in self._ahead and key not in self._asking:
                    ahead.append(f.index)
        asked = [i for i in wanted if i not in held] + ahead
        answered = trio.Event()
        for i in ahead:
            self._asking[(obj.id, i)] = answered
        try:
            claim = await self.patience.ask(
                flight, lambda: self.directory.claim(obj.id, asked, self.ttl)
            )
        except SyncbitError as exc:
            log.debug("no claim on %s: %s", obj.id[:12], exc)
            if not flight.for_reader:
                # Background reads wait for the scheduler (a failover takes seconds) rather
                # than read what another node may be reading too: the origin's bytes twice.
                self.unclaim(followers)
                return Park("the scheduler (no answer to a claim)")
            return followers
        finally:
            # Waiters run at this task's next checkpoint: after the grants are noted below.
            for i in ahead:
                if self._asking.get((obj.id, i)) is answered:
                    del self._asking[(obj.id, i)]
            answered.set()
        granted = set(claim.granted) | held
        log.debug("claim on chunks %s of %s: granted %s", asked, obj.id[:12], sorted(granted))
        for i in held:
            self._ahead.pop((obj.id, i), None)  # abandoned meanwhile: gone already
        if flight.index in granted and flight.priority >= AHEAD_FROM:
            until = trio.current_time() + self.ttl / 2
            for i in ahead:
                if i in granted:
                    self._ahead[(obj.id, i)] = until
                    granted.discard(i)
        run: list[Flight] = []
        if flight.index in granted:
            for f in followers:
                if f.index not in granted:
                    break
                run.append(f)
        self.unclaim(followers[len(run) :])
        unused = sorted(granted - {flight.index} - {f.index for f in run})
        if flight.index not in granted:
            unused = sorted(granted)
        if unused:
            await self.release(obj.id, unused)
        if flight.index in granted:
            return run
        holders = info.peers.get(flight.index, [])
        if (
            flight.index in claim.held
            and holders
            and all(p.node in flight.bad_peers for p in holders)
        ):
            # Held only by peers that just failed this node (gone, not down yet in the
            # scheduler's eyes): nobody is reading it, so the source it is.
            return []
        return Park(claim.busy.get(flight.index, "a peer"))

    async def release(self, object_id: str, indexes: list[int]) -> None:
        for i in indexes:
            self._ahead.pop((object_id, i), None)
        try:
            await self.directory.release(object_id, indexes)
        except SyncbitError as exc:
            log.debug("could not release claims on %s: %s", object_id[:12], exc)
