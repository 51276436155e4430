"""Hedged peer transfers: a chunk asked of its holders one after another, and, when the
current transfer runs past the straggler delay of recent ones (`syncbit.hedging.Hedging`),
of the next holder at once too; the first right answer wins and the other is aborted.
Never verifies bytes itself (each attempt checks its own against the digest) and never
stages anything: the winner's buffer goes back to the caller.
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

import trio

from syncbit.fetch.flight import Flight
from syncbit.hedging import Hedging
from syncbit.protocol import Peer
from syncbit.store.staging import BufferPool
from syncbit.wire import Abort

log = logging.getLogger("syncbit.fetch")

KIND = "peer"  # the transfers `Hedging` keeps times of here
# Seconds without a single byte after which a transfer is stalled (a stopped node's port
# takes connections and answers nothing; a node stopped mid-transfer sends no more; an
# origin connection that hangs). Not the straggler delay: that is how long whole transfers
# took lately, seconds on a busy node, while a live sender sends bytes every few
# milliseconds, its first within milliseconds. Above the 1 s a lost SYN costs and the
# retransmission timeouts of a congested link: a live sender is never given up on for one
# dropped packet.
QUIET = 2.0
# Seconds a prefetch waits for its last holder or its source read, and that transfer may
# still need at its pace after that, before the chunk is asked again (of the source; only
# while it is slower than a fresh transfer): a prefetch waits for a transfer that is slow
# but about to finish (the origin's bytes once), not for one that trickles (a sick node's
# or origin connection's bytes at a few KB/s would hold it for minutes). Not sooner: at
# N=8 on shared 400 Mbit/s links, a transfer's pace after its first second promised over
# 5 s more a few times a run; none lasted 2 s.
TRICKLE = 5.0


def silent_for(abort: Abort, running: float) -> float:
    """Seconds the transfers of `abort`, running for `running` seconds, have received no
    byte: since the last, or since they started (an Abort may be made before that)."""
    return min(abort.quiet_for(), running)


def stalled(abort: Abort, running: float) -> bool:
    """Not a byte for QUIET seconds (from the start, or since the last)."""
    return silent_for(abort, running) >= QUIET


def trickles(abort: Abort, running: float, length: int) -> bool:
    """The transfer of `length` bytes has run TRICKLE seconds and at its average pace would
    need more than TRICKLE more (no pace before its first bytes: `stalled` judges those)."""
    received = abort.received
    return (
        received > 0 and running >= TRICKLE and (length - received) * running / received > TRICKLE
    )


class PeerResult(Enum):
    OK = "ok"  # the view is filled and verified
    BUSY = "busy"  # no upload slot free: not a fault
    FAILED = "failed"  # not asked again for this chunk


# One attempt: fill the view from the peer (verified), abortable from another thread.
Attempt = Callable[[Flight, Peer, memoryview, str, Abort], Awaitable[PeerResult]]


@dataclass(eq=False)
class _Running:
    peer: Peer
    buf: mmap.mmap
    view: memoryview
    began: float
    abort: Abort = field(default_factory=Abort)
    result: PeerResult | None = None


@dataclass(frozen=True)
class Won:
    """The verified chunk in `view`, a slice of `buf` (the caller's to give back)."""

    buf: mmap.mmap
    view: memoryview
    peer: Peer


class PeerRace:
    """Runs the attempts of one chunk against its holders, hedging stragglers."""

    def __init__(
        self,
        attempt: Attempt,
        buffers: BufferPool,
        hedging: Hedging,
        stats: dict[str, int],
        left_out: Callable[[str], bool],
        leave_out: Callable[[str], None],
    ) -> None:
        self.attempt = attempt
        self.buffers = buffers
        self.hedging = hedging
        # Whether a peer node is left out now (unreachable, or it stalled a reader), and
        # leaving one out: a holder given up on for a reader is not asked for a while.
        self.left_out = left_out
        self.leave_out = leave_out
        # "hedged": second requests sent; "aborted": losers aborted mid-transfer.
        self.stats = stats

    async def run(
        self, flight: Flight, holders: list[Peer], length: int, expected: str
    ) -> Won | PeerResult:
        """The chunk from the first holder that sends the right bytes, or BUSY when every
        holder that could was busy, FAILED when every one failed. A straggler is hedged
        with the next holder, a stalled one (silent for QUIET) at once. The last holder
        is given up on (FAILED, the holder in `flight.bad_peers`: the source serves it
        then) when it stalls, and when it straggles: for a chunk a reader waits for, when
        it would outlast a fresh transfer; a prefetch's only when it trickles (TRICKLE)."""
        pending = list(holders)
        running: set[_Running] = set()
        done_send, done_recv = trio.open_memory_channel[_Running](len(holders))
        busy = False
        won: _Running | None = None
        waiting: list[trio.CancelScope] = []  # the current wait, cut short when a reader joins

        def reader_joined() -> None:
            for scope in waiting:
                scope.deadline = trio.current_time()

        with flight.telling_readers(reader_joined):
            async with trio.open_nursery() as nursery:

                def launch() -> float:
                    """The next holder's attempt; when to look whether it straggles."""
                    r = self._start(pending.pop(0), length)
                    running.add(r)
                    nursery.start_soon(self._one, flight, r, expected, done_send)
                    return self._due(running, length)

                hedge_at = launch() if pending else math.inf
                while running:
                    with trio.move_on_at(hedge_at) as scope:
                        waiting[:] = [scope]
                        r = await done_recv.receive()
                        running.discard(r)
                        if r.result is PeerResult.OK:
                            won = r
                            break
                        busy = busy or r.result is PeerResult.BUSY
                        self.buffers.give(r.buf)  # its thread has ended
                        hedge_at = launch() if pending and not running else hedge_at
                        continue
                    hedge_at = self._due(running, length)
                    if trio.current_time() < hedge_at:
                        continue  # a reader joined early: look again when it is due
                    hedge_at = math.inf
                    (slow,) = running
                    if pending:
                        if self._stalled(slow):
                            log.info(
                                "chunk %d of %s: nothing from %s for %.2fs; asking another "
                                "holder too",
                                flight.index,
                                flight.entry.path,
                                slow.peer.node,
                                slow.abort.quiet_for(),
                            )
                            hedge_at = launch()
                        elif self._should_hedge(flight, running, length, "another holder too"):
                            hedge_at = launch()
                    elif self._to_source(flight, slow, length):
                        break
                    else:
                        hedge_at = self._next_look(slow, length)
                for r in running:  # losers: their threads end as their sockets shut
                    r.abort.fire()
                    self.stats["aborted"] += 1
                nursery.cancel_scope.cancel()
        if won is not None:
            self.hedging.record(KIND, length, trio.current_time() - won.began)
            return Won(won.buf, won.view, won.peer)
        return PeerResult.BUSY if busy else PeerResult.FAILED

    def _due(self, running: set[_Running], length: int) -> float:
        """When to look whether the one attempt running straggles or stalled: at the
        straggler delay, or when it would count as stalled if nothing comes meanwhile
        (inf while two run: a hedge is out already)."""
        if len(running) != 1:
            return math.inf
        (r,) = running
        return min(self._stall_at(r), r.began + self.hedging.delay(KIND, length))

    def _next_look(self, r: _Running, length: int) -> float:
        """After a look that kept waiting for the last holder: the next one, a straggler
        delay on, or when the holder would count as stalled if that is sooner."""
        now: float = trio.current_time()
        return min(self._stall_at(r), now + self.hedging.delay(KIND, length))

    def _stall_at(self, r: _Running) -> float:
        """When `r` counts as stalled if nothing comes meanwhile (trio time)."""
        now: float = trio.current_time()
        return now + QUIET - silent_for(r.abort, now - r.began)

    def _stalled(self, r: _Running) -> bool:
        """Not a byte from the holder for QUIET (from the start, or since the last)."""
        return stalled(r.abort, trio.current_time() - r.began)

    def _start(self, peer: Peer, length: int) -> _Running:
        buf = self.buffers.take(length)
        return _Running(peer, buf, memoryview(buf)[:length], trio.current_time())

    def _to_source(self, flight: Flight, slow: _Running, length: int) -> bool:
        """The last holder's transfer is due a look: whether to read the source instead
        (the holder then in `flight.bad_peers`). Yes when no byte came for QUIET (a
        stalled node: left out a while, as each of its transfers stalls) or another
        transfer found the node stalled already. Else, within the hedging budget, when at
        its pace it would take longer than a fresh transfer (one slow but about to finish
        is waited for: the origin's bytes are not for nothing), and for a prefetch's chunk
        (nobody's wait yet; a second source read of it is the origin's bytes twice) only
        after TRICKLE seconds if its pace leaves it more than TRICKLE more."""
        node = slow.peer.node
        elapsed = trio.current_time() - slow.began
        received = slow.abort.received
        if self.left_out(node) or self._stalled(slow):
            self.stats["hedged"] += 1
            log.info(
                "chunk %d of %s: nothing from %s for %.2fs (%d of %d bytes in %.2fs); "
                "reading the source instead and leaving it out a while",
                flight.index,
                flight.entry.path,
                node,
                silent_for(slow.abort, elapsed),
                received,
                length,
                elapsed,
            )
            self.leave_out(node)
        elif (
            not self.hedging.outlasts_fresh(
                KIND, length, length - received, received / max(elapsed, 1e-6)
            )
            or not (flight.for_reader or trickles(slow.abort, elapsed, length))
            or not self._should_hedge(flight, {slow}, length, "the source instead")
        ):
            return False
        flight.bad_peers.add(node)
        return True

    def _should_hedge(
        self, flight: Flight, running: set[_Running], length: int, instead: str
    ) -> bool:
        """Whether to ask `instead` for the one straggling attempt's chunk (within the
        hedging budget); counted and logged when so."""
        (slow,) = running
        elapsed = trio.current_time() - slow.began
        if not self.hedging.should_hedge(KIND, length, elapsed):
            return False
        self.hedging.hedged(KIND)
        self.stats["hedged"] += 1
        log.info(
            "chunk %d of %s: %s has taken %.2fs; asking %s",
            flight.index,
            flight.entry.path,
            slow.peer.node,
            elapsed,
            instead,
        )
        return True

    async def _one(
        self,
        flight: Flight,
        r: _Running,
        expected: str,
        done: trio.MemorySendChannel[_Running],
    ) -> None:
        try:
            r.result = await self.attempt(flight, r.peer, r.view, expected, r.abort)
        except BaseException:
            # Cancelled (a loser, or the flight): the thread may still write into the
            # buffer until its socket shuts, so the buffer is left to it, not pooled.
            r.abort.fire()
            raise
        done.send_nowait(r)
