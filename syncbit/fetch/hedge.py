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
        self, attempt: Attempt, buffers: BufferPool, hedging: Hedging, stats: dict[str, int]
    ) -> None:
        self.attempt = attempt
        self.buffers = buffers
        self.hedging = hedging
        # "hedged": second requests sent; "aborted": losers aborted mid-transfer.
        self.stats = stats

    async def run(
        self, flight: Flight, holders: list[Peer], length: int, expected: str
    ) -> Won | PeerResult:
        """The chunk from the first holder that sends the right bytes, or BUSY when every
        holder that could was busy, FAILED when every one failed."""
        pending = list(holders)
        running: set[_Running] = set()
        done_send, done_recv = trio.open_memory_channel[_Running](len(holders))
        busy = False
        won: _Running | None = None
        async with trio.open_nursery() as nursery:

            def launch() -> float:
                """The next holder's attempt; when to hedge it (inf: never)."""
                r = self._start(pending.pop(0), length)
                running.add(r)
                nursery.start_soon(self._one, flight, r, expected, done_send)
                if len(running) > 1 or not pending:
                    return math.inf
                return r.began + self.hedging.delay(KIND, length)

            hedge_at = launch() if pending else math.inf
            while running:
                with trio.move_on_at(hedge_at):
                    r = await done_recv.receive()
                    running.discard(r)
                    if r.result is PeerResult.OK:
                        won = r
                        break
                    busy = busy or r.result is PeerResult.BUSY
                    self.buffers.give(r.buf)  # its thread has ended
                    if pending and not running:
                        hedge_at = launch()
                    continue
                hedge_at = math.inf
                if pending and self._should_hedge(flight, running, length):
                    hedge_at = launch()
            for r in running:  # losers: their threads end as their sockets shut
                r.abort.fire()
                self.stats["aborted"] += 1
            nursery.cancel_scope.cancel()
        if won is not None:
            self.hedging.record(KIND, length, trio.current_time() - won.began)
            return Won(won.buf, won.view, won.peer)
        return PeerResult.BUSY if busy else PeerResult.FAILED

    def _start(self, peer: Peer, length: int) -> _Running:
        buf = self.buffers.take(length)
        return _Running(peer, buf, memoryview(buf)[:length], trio.current_time())

    def _should_hedge(self, flight: Flight, running: set[_Running], length: int) -> bool:
        (slow,) = running
        elapsed = trio.current_time() - slow.began
        if not self.hedging.should_hedge(KIND, length, elapsed):
            return False
        self.hedging.hedged(KIND)
        self.stats["hedged"] += 1
        log.info(
            "chunk %d of %s: %s has taken %.2fs; asking another holder too",
            flight.index,
            flight.entry.path,
            slow.peer.node,
            elapsed,
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
