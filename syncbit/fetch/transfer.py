"""One chunk transfer: peers first (verified against the recorded digest), then the source
in a claimed batch (claims), checked against the record (verify). Stages what arrives;
never queues nor waits for flights (the runner does).
"""

from __future__ import annotations

import functools
import logging
import mmap
import random

import trio

from syncbit.chunks import chunk_length, digest
from syncbit.errors import (
    DigestMismatchError,
    PeerBusyError,
    PeerError,
    PeerUnreachableError,
    ReadDeadlineError,
    SyncbitError,
)
from syncbit.fetch.claims import Claims
from syncbit.fetch.directory import ChunkDirectory, ChunkPeers
from syncbit.fetch.flight import (
    BACKGROUND,
    Flight,
    FlightTable,
    Lane,
    Origin,
    Park,
    Staged,
    State,
    is_temp_failure,
)
from syncbit.fetch.hedge import PeerRace, PeerResult, Won
from syncbit.fetch.limiter import Bandwidth
from syncbit.fetch.source_race import SOURCE_HEDGING, SourceRace
from syncbit.fetch.streams import Streams
from syncbit.fetch.verify import Broken, Disagreement, check_source
from syncbit.hedging import Hedging
from syncbit.protocol import ChunkMap, Peer
from syncbit.retry import retrying
from syncbit.sources.base import abandon_on_cancel
from syncbit.store import ObjectStore
from syncbit.wire import Abort

log = logging.getLogger("syncbit.fetch")


# Seconds a peer that could not be connected to is left out of every read's holders.
UNREACHABLE_FOR = 10.0
MAP_AGE = 1.0  # seconds a transfer may act on a chunk map as old (a prefetch's: see map_age)


def _spread(peers: list[Peer]) -> list[Peer]:
    """The scheduler's ranked holders with the best few shuffled: its load figures are a
    heartbeat old, and many nodes asking for a fresh chunk at once must not all pick the
    same holder (the rest are fallbacks, in rank order)."""
    head = peers[:3]
    random.shuffle(head)
    return head + peers[3:]


def _for_reader(flight: Flight) -> bool:
    """Whether a reader waits for the chunk or its readahead asked for it: then RAM keeps
    it until read (a prefetch's chunk goes to disk and the LRU)."""
    return flight.priority < BACKGROUND


class Transfers:
    """Runs the transfer of a flight to a result: what was staged, or where to wait."""

    def __init__(
        self,
        store: ObjectStore,
        directory: ChunkDirectory,
        peers: ChunkPeers,
        table: FlightTable,
        claims: Claims,
        bandwidth: Bandwidth,
        broken: Broken,
        streams: Streams,
        stats: dict[str, int],
    ) -> None:
        self.store = store
        self.directory = directory
        self.peers = peers
        self.table = table
        self.claims = claims
        self.bandwidth = bandwidth
        self.broken = broken
        self.streams = streams
        self.stats = stats
        self.unreachable: dict[str, float] = {}  # peer node -> left out until then
        # Seconds between two chunk-map lookups of one object the scheduler asks of this
        # node, told with each heartbeat (0: none): how long a prefetch's transfer reuses
        # a chunk map, and how often parked prefetches look (`Runner._pause`). At 2,000
        # nodes (`bench/scale.py --mode prefetch`) every transferring node refreshed its
        # maps every MAP_AGE whatever the scheduler asked, and the updates it could not
        # answer in time came back as busy (429) 6,776 times in a 40 s window. A reader's
        # transfer still refreshes after MAP_AGE.
        self.lookup_interval = 0.0
        self.race = PeerRace(
            self._from_peer, store.buffers, Hedging(), stats, self._left_out, self._leave_out
        )
        self.source_race = SourceRace(streams, store.buffers, Hedging(SOURCE_HEDGING), stats)

    def _left_out(self, node: str) -> bool:
        """Whether no transfer asks `node` now (unreachable, or it stalled a reader)."""
        now: float = trio.current_time()
        return self.unreachable.get(node, -1.0) > now

    def _leave_out(self, node: str) -> None:
        """No transfer asks `node` for UNREACHABLE_FOR seconds (the scheduler may offer it
        for a while yet)."""
        now = trio.current_time()
        if len(self.unreachable) >= 1024:  # one entry per peer node: forget the expired
            self.unreachable = {n: t for n, t in self.unreachable.items() if t > now}
        self.unreachable[node] = now + UNREACHABLE_FOR
        self.stats["unreachable"] += 1

    async def run(self, flight: Flight) -> list[Staged] | Park:
        """Retry temporary failures with backoff until the flight's deadline; a permanent
        failure (the source's `is_temp_failure` says so, or a UserError) is raised at once.
        Returns what was staged: this flight's chunk and queued chunks right after it that
        a source read brought along (empty if the chunk was already here)."""

        def retried(exc: Exception, delay: float) -> None:
            flight.last_error = str(exc)
            log.warning("chunk %d of %s: %s; retrying", flight.index, flight.entry.path, exc)

        is_temp = functools.partial(is_temp_failure, flight.source)
        try:
            return await retrying(
                functools.partial(self._once, flight),
                is_temp,
                deadline=flight.deadline,
                base=0.05,
                cap=2.0,
                on_retry=retried,
            )
        except SyncbitError as exc:
            flight.last_error = str(exc)
            if not is_temp(exc):
                log.error("%s: %s", flight.entry.path, exc)
                raise
            log.error("chunk %d of %s failed: %s", flight.index, flight.entry.path, exc)
            raise ReadDeadlineError(f"chunk {flight.index} of {flight.entry.path}: {exc}") from exc

    def map_age(self, flight: Flight) -> float:
        """Seconds `flight`'s transfer may act on a chunk map as old (see `lookup_interval`)."""
        if flight.priority >= BACKGROUND:
            return max(MAP_AGE, self.lookup_interval)
        return MAP_AGE

    async def chunk_info(
        self, object_id: str, max_age: float = MAP_AGE, flight: Flight | None = None
    ) -> ChunkMap:
        """The object's chunk map, or an empty one when the scheduler cannot say (within a
        reader's patience, when `flight` is a chunk a reader waits for)."""
        try:
            ask = functools.partial(self.directory.chunk_info, object_id, max_age)
            if flight is None:
                return await ask()
            return await self.claims.patience.ask(flight, ask)
        except SyncbitError as exc:
            # No scheduler is no reason to fail a read: the source still has the bytes.
            log.debug("no chunk info for %s: %s", object_id[:12], exc)
            return ChunkMap()

    async def _once(self, flight: Flight) -> list[Staged] | Park:
        obj, index = flight.obj, flight.index
        if obj.has(index):
            return []
        info = await self.chunk_info(obj.id, self.map_age(flight), flight)
        if info.broken is not None:
            self.broken.mark(obj.id, info.broken)
            self.broken.refuse(flight.entry)
        expected = info.digests.get(index)
        holders = self.holders(flight, info)
        if expected is not None and holders:
            if flight.lane is Lane.SOURCE:
                return Park(peer_lane=True)  # a slow peer must not hold up source reads
            got = await self._from_peers(flight, holders, expected)
            if got is not None:
                return got
            self._unplanned(flight, info.peers[index])  # every one failed it
        if flight.may_source is not None and not flight.may_source():
            return Park("the node planned to read it")
        holder = info.fetching.get(index)
        if holder is not None:
            return Park(holder)
        size = self.streams.request_bytes(flight.source, obj.chunk_size, self.claims.source_batch)
        followers = self.claims.followers(flight, info, size - obj.chunk_size)
        for f in followers:  # taken now, before any checkpoint: no other worker starts them
            f.move(State.RUNNING)
        return await self._from_source(flight, info, followers)

    # -- from peers --------------------------------------------------------------------------

    def holders(self, flight: Flight, info: ChunkMap) -> list[Peer]:
        """The holders the chunk map names for `flight`'s chunk that it may ask: none it
        failed with (`bad_peers`: bad bytes, stalled, unreachable), and none left out now
        (then in `bad_peers` too: the claim's answer goes by them). When it names holders
        and none may be asked, the flight is freed from its plan (`_unplanned`)."""
        named = info.peers.get(flight.index)
        if not named:
            return []
        for p in named:
            if p.node not in flight.bad_peers and self._left_out(p.node):
                flight.bad_peers.add(p.node)  # as good as failed: not asked for this chunk
        usable = [p for p in named if p.node not in flight.bad_peers]
        if not usable:
            self._unplanned(flight, named)
        return usable

    def _unplanned(self, flight: Flight, named: list[Peer]) -> None:
        """Every holder `named` failed the flight or is left out: it may read the source
        from now on. Its plan left the chunk's source read to other nodes because a peer
        would serve it, and until the scheduler finds a stopped holder down (its node
        timeout) nobody else would read it; its claim still gives the chunk one reader."""
        if flight.may_source is None:
            return
        # Debug: a stopped node's every chunk comes here once (thousands for a large
        # file); the node left out is logged once, where it was left out.
        log.debug(
            "chunk %d of %s: no holder left to ask (%s); this node may read the source",
            flight.index,
            flight.entry.path,
            ", ".join(sorted({p.node for p in named})),
        )
        flight.may_source = None

    async def _from_peers(
        self, flight: Flight, holders: list[Peer], expected: str
    ) -> list[Staged] | Park | None:
        """The chunk from the first of `holders` (those it may ask) that sends the right
        bytes (a straggler hedged with the next holder); None when every holder failed
        (then the source), Park when every one that could was busy."""
        obj, index = flight.obj, flight.index
        length = chunk_length(obj.size, obj.chunk_size, index)
        got = await self.race.run(flight, _spread(holders), length, expected)
        if isinstance(got, Won):
            self.stats["peer"] += length
            flight.origin = Origin.PEER
            give = functools.partial(self.store.buffers.give, got.buf)
            self.store.stage(obj, index, got.view, give, expected, _for_reader(flight))
            return [Staged(flight, got.view, expected)]
        if got is PeerResult.BUSY:
            # Every holder that could serve it is at its upload limit: wait briefly
            # (parked, no worker held) while this node's other transfers go on.
            self.stats["busy"] += 1
            return Park("holders busy")
        return None

    async def _from_peer(
        self, flight: Flight, peer: Peer, view: memoryview, expected: str, abort: Abort
    ) -> PeerResult:
        began = trio.current_time()
        try:
            # Abandoned when cancelled (a hedge's loser, an abandoned flight): `abort` ends
            # the thread's transfer, and the caller leaves the buffer to it.
            await trio.to_thread.run_sync(
                self._from_peer_blocking, flight, peer, view, expected, abort, **abandon_on_cancel()
            )
        except PeerBusyError:
            return PeerResult.BUSY
        except DigestMismatchError as exc:
            self.stats["verify_failures"] += 1
            flight.bad_peers.add(peer.node)
            log.warning("%s", exc)
            await self._report(peer.node, flight, str(exc))
            return PeerResult.FAILED
        except PeerUnreachableError as exc:
            # Down or gone, and the scheduler may offer it for a while yet: no read of this
            # node asks it again until UNREACHABLE_FOR has passed.
            flight.bad_peers.add(peer.node)
            flight.last_error = str(exc)
            self._leave_out(peer.node)
            log.info(
                "chunk %d of %s: %s; avoiding it for %.0fs",
                flight.index,
                flight.entry.path,
                exc,
                UNREACHABLE_FOR,
            )
            return PeerResult.FAILED
        except PeerError as exc:
            flight.bad_peers.add(peer.node)
            flight.last_error = str(exc)
            log.info("chunk %d of %s: %s; trying next", flight.index, flight.entry.path, exc)
            return PeerResult.FAILED
        log.debug(
            "chunk %d of %s from %s in %.2fs",
            flight.index,
            flight.entry.path,
            peer.node,
            trio.current_time() - began,
        )
        return PeerResult.OK

    async def _report(self, peer: str, flight: Flight, reason: str) -> None:
        try:
            await self.directory.report_bad_peer(peer, flight.obj.id, flight.index, reason)
        except SyncbitError as exc:
            log.warning("could not report bad peer %s: %s", peer, exc)

    def _from_peer_blocking(
        self, flight: Flight, peer: Peer, view: memoryview, expected: str, abort: Abort
    ) -> None:
        offset = flight.index * flight.obj.chunk_size
        prefetch = flight.priority >= BACKGROUND
        self.peers.get_into(
            peer.address, flight.obj.id, offset, view, prefetch=prefetch, abort=abort
        )
        got = digest(view)
        if got != expected:
            raise DigestMismatchError(
                f"peer {peer.node} ({peer.address}) sent bad bytes for chunk {flight.index} "
                f"of {flight.entry.path}: digest {got[:16]} != {expected[:16]}"
            )

    # -- from the source -----------------------------------------------------------------------

    async def _from_source(
        self, flight: Flight, info: ChunkMap, followers: list[Flight]
    ) -> list[Staged] | Park:
        obj = flight.obj
        try:
            claimed = await self.claims.claim(flight, followers, info)
        except BaseException:
            self.claims.unclaim(followers)
            raise
        if isinstance(claimed, Park):
            return claimed
        for f in claimed:
            f.deadline = flight.deadline
        batch = [flight, *claimed]
        span = sum(chunk_length(obj.size, obj.chunk_size, f.index) for f in batch)
        if flight.priority >= BACKGROUND:
            await self.bandwidth.take(span)
        try:
            # One stream of the source's adaptive limit (two while a straggler is hedged);
            # a reader's read goes before readahead's and prefetch's, and none goes out
            # while a Retry-After holds.
            got = await self.source_race.run(flight, len(batch), span)
        except BaseException as exc:
            if isinstance(exc, SyncbitError) and not is_temp_failure(flight.source, exc):
                # The same refusal awaits the chunks after it: they fail with it now rather
                # than each asking the source again.
                for f in claimed:
                    f.error = exc
                    self.table.keep_failure(f)
            else:
                self.claims.unclaim(claimed)
            with trio.CancelScope(shield=True):
                await self.claims.release(obj.id, [f.index for f in batch])
            raise
        disagree = check_source(batch, info, got.digests, got.head_ok)
        if disagree is not None:
            self.store.buffers.give(got.buf)
            await self._refuse(batch, disagree)
            raise disagree.error
        return self._stage_batch(batch, got.buf, span, got.digests)

    def _stage_batch(
        self, batch: list[Flight], buf: mmap.mmap, span: int, digests: list[str]
    ) -> list[Staged]:
        """Stage each chunk of a source read from its slice of the one buffer, given back
        once the last of them leaves RAM."""
        flight, obj = batch[0], batch[0].obj
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
            view = memoryview(buf)[start : start + chunk_length(obj.size, obj.chunk_size, f.index)]
            f.origin = Origin.SOURCE
            self.store.stage(obj, f.index, view, release, digests[i], _for_reader(f))
            staged.append(Staged(f, view, digests[i]))
        return staged

    async def _refuse(self, batch: list[Flight], disagree: Disagreement) -> None:
        """A source read that disagreed: every chunk it brought fails (the source may have
        changed under all of them), its claims end, and the scheduler hears what was read."""
        obj = batch[0].obj
        self.stats["verify_failures"] += 1
        for f in batch[1:]:  # the first is failed by its worker with the same error
            f.error = disagree.error
            self.table.keep_failure(f)
        with trio.CancelScope(shield=True):
            await self.claims.release(obj.id, [f.index for f in batch])
            try:
                await self.directory.report_check(
                    obj.id, disagree.index, disagree.digest, "" if disagree.digest else disagree.why
                )
            except SyncbitError as exc:
                log.warning("could not tell the scheduler about %s: %s", batch[0].entry.path, exc)
