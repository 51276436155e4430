"""Hedged source reads: a batch of chunks read from the source in one ranged request, and,
when that request runs past the straggler delay of recent reads of its size from the same
origin (`syncbit.hedging.Hedging`) and, at the rate its bytes arrived lately, would still
take longer than a fresh read, the same bytes asked again on a second connection; the
first read to complete wins and the other is aborted (its connection shut).

Only for sources whose reads `Abort` ends (`Source.abortable`): a loser that could not be
ended would keep its connection and its buffer busy for as long as the straggler takes.
The second read takes a stream of the source's adaptive limit like any other and is sent
only if one is free at that moment. Never verifies bytes itself (the caller checks the
digests it returns against what is known) and never stages anything.
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass, field

import trio

from syncbit.errors import SourceUnavailableError, SyncbitError, TransferAbortedError
from syncbit.fetch.flight import Flight
from syncbit.fetch.hedge import silent_for, stalled, trickles
from syncbit.fetch.streams import Streams, key_of
from syncbit.fetch.verify import HeadChecks, read_checked
from syncbit.hedging import HedgePolicy, Hedging
from syncbit.store.staging import BufferPool
from syncbit.wire import Abort

log = logging.getLogger("syncbit.fetch")

# A second request costs the origin: only a read far slower than recent ones (twice their
# p95) is a straggler, never before a quarter second, and two seconds while too few reads
# are known to judge. (At 1x the p95, an origin that caps each connection saw every
# twentieth read asked twice for nothing: its reads are all about equally slow.)
SOURCE_HEDGING = HedgePolicy(factor=2.0, floor=0.25, default=2.0)


@dataclass(eq=False)
class _Attempt:
    abort: Abort = field(default_factory=Abort)
    admitted: trio.Event = field(default_factory=trio.Event)  # or ended before that
    began: float = math.inf
    buf: mmap.mmap | None = None
    digests: list[str] = field(default_factory=list)
    head_ok: bool = False
    error: SyncbitError | None = None
    done: bool = False


@dataclass(frozen=True)
class SourceRead:
    """A batch read from the source: `buf` holds its bytes (the caller's to give back)."""

    buf: mmap.mmap
    digests: list[str]
    head_ok: bool


class SourceRace:
    """Reads a batch of chunks from the source, hedging a straggling read."""

    def __init__(
        self, streams: Streams, buffers: BufferPool, hedging: Hedging, stats: dict[str, int]
    ) -> None:
        self.streams = streams
        self.buffers = buffers
        self.hedging = hedging
        # "source_hedged": second reads sent; "source_aborted": losers ended mid-read.
        self.stats = stats
        # The average rate of each race's first read at its last look, by source kind: what
        # a read is compared with while too few are known (`Hedging.outlasts_fresh`).
        self._rates: dict[str, dict[int, float]] = {}
        self.heads = HeadChecks()  # one head sample answers every read of a file at once

    async def run(self, flight: Flight, chunks: int, span: int) -> SourceRead:
        """The batch of `chunks` chunks (`span` bytes) from `flight`'s chunk on; raises the
        first read's error when no read delivered."""
        kind = f"source {key_of(flight.source)}"
        attempts: list[_Attempt] = []
        won: _Attempt | None = None
        try:
            won = await self._race(flight, kind, chunks, span, attempts)
        finally:
            # Every thread has ended by now (reads are waited for, not abandoned): the
            # losers' buffers go back, also when the flight itself was cancelled.
            for a in attempts:
                if a is not won and a.buf is not None:
                    self.buffers.give(a.buf)
        if won is not None:
            assert won.buf is not None
            self.hedging.record(kind, span, trio.current_time() - won.began)
            return SourceRead(won.buf, won.digests, won.head_ok)
        errors = [a.error for a in attempts if a.error is not None]
        raise errors[0]

    async def _race(
        self, flight: Flight, kind: str, chunks: int, span: int, attempts: list[_Attempt]
    ) -> _Attempt | None:
        done_send, done_recv = trio.open_memory_channel[_Attempt](2)
        won: _Attempt | None = None
        async with trio.open_nursery() as nursery:

            def launch(deadline: float, second: bool) -> _Attempt:
                a = _Attempt()
                attempts.append(a)
                nursery.start_soon(self._one, flight, a, chunks, span, deadline, second, done_send)
                return a

            first = launch(flight.deadline, False)
            rates = self._rates.setdefault(kind, {})
            try:
                await first.admitted.wait()
                # The first read's progress is sampled every quarter of the straggler
                # delay, so that at the delay its recent rate is known.
                check_at = probe = math.inf
                if flight.source.abortable and not first.done:
                    probe = self.hedging.delay(kind, span) / 4
                    check_at = first.began + probe
                seen = (first.began, 0)  # (when, bytes received then)
                running = 1
                refunded = False
                while running:
                    with trio.move_on_at(check_at):
                        a = await done_recv.receive()
                        running -= 1
                        if a.error is None:
                            won = a
                            break
                        if a is not first and not first.done:
                            # The second read found no stream free or failed: the first
                            # is looked at again (the hedging budget bounds the asking).
                            check_at = trio.current_time() + probe
                            if not refunded and not a.abort.received:
                                # It cost the origin no transfer: once a race, it leaves
                                # the budget, which on a fresh origin (one hedge until a
                                # read completes) would leave the stalled read to time
                                # out.
                                self.hedging.unhedged(kind)
                                refunded = True
                        continue
                    now, got = trio.current_time(), first.abort.received
                    rate = (got - seen[1]) / max(1e-6, now - seen[0])
                    seen = (now, got)
                    check_at = now + probe
                    average = got / max(1e-6, now - first.began)
                    beside = [r for k, r in rates.items() if k != id(first)]
                    rates[id(first)] = average
                    if self._should_hedge(
                        flight, kind, span, first, span - got, rate, beside, average
                    ):
                        launch(now, True)  # a free stream now, or no second read
                        running += 1
                        check_at = math.inf
            finally:
                rates.pop(id(first), None)
                # The loser, or every read when the flight is cancelled: ended now rather
                # than waited out (their threads are waited for on the way out).
                for a in attempts:
                    if not a.done and a.admitted.is_set():
                        a.abort.fire()
                        if flight.source.abortable:
                            self.stats["source_aborted"] += 1
                nursery.cancel_scope.cancel()
        return won

    def _should_hedge(
        self,
        flight: Flight,
        kind: str,
        span: int,
        slow: _Attempt,
        left: int,
        rate: float,
        beside: list[float],
        average: float,
    ) -> bool:
        """Past the straggler delay, and at its recent rate `slow` would still take longer
        than a fresh read (a stalled or trickling connection, not a link every read
        shares: at N=8 each node's first source read was asked twice, and the origin
        sent 1.04-1.06x the dataset). A prefetch's read (nobody waits for it yet; asked
        again, the origin sends its bytes twice) only once it stalled or trickles: at N=8
        on 200 Mbit/s links, one in three runs had a node's first read, slow on the link
        every node's first reads share, or silent for half a second (a retransmission
        timeout), asked twice."""
        elapsed = trio.current_time() - slow.began
        if not self.hedging.should_hedge(kind, span, elapsed):
            return False
        if not (
            flight.for_reader or stalled(slow.abort, elapsed) or trickles(slow.abort, elapsed, span)
        ):
            return False
        if not self.hedging.outlasts_fresh(kind, span, left, rate, beside, average):
            return False
        self.hedging.hedged(kind)
        self.stats["source_hedged"] += 1
        log.info(
            "chunk %d of %s: the source read has taken %.2fs (%d of %d bytes, the last "
            "%.2fs ago); asking the source again",
            flight.index,
            flight.entry.path,
            elapsed,
            span - left,
            span,
            silent_for(slow.abort, elapsed),
        )
        return True

    async def _one(
        self,
        flight: Flight,
        a: _Attempt,
        chunks: int,
        span: int,
        deadline: float,
        second: bool,
        done: trio.MemorySendChannel[_Attempt],
    ) -> None:
        try:
            # The buffer is taken once admitted: waiting reads hold no RAM.
            async with self.streams.read(
                flight.source, flight.priority, deadline, span, second, a.abort
            ):
                a.began = trio.current_time()
                a.admitted.set()
                a.buf = self.buffers.take(span)
                try:
                    a.digests, a.head_ok = await read_checked(
                        flight.source,
                        flight.entry,
                        flight.index,
                        flight.obj.chunk_size,
                        memoryview(a.buf)[:span],
                        chunks,
                        self.streams.threads,
                        a.abort,
                        self.heads,
                    )
                except SourceUnavailableError as exc:
                    if a.abort.fired:
                        raise TransferAbortedError(str(exc)) from exc
                    raise
        except TransferAbortedError:
            return  # a loser: the race is over (the stream controller took it as abandoned)
        except SyncbitError as exc:
            a.error = exc
        finally:
            a.done = True
            a.admitted.set()
        done.send_nowait(a)
