"""How many source reads this node runs at once against each source (a host, a bucket):
admits reads under `SourceConcurrency`'s adaptive limit, most urgent first, waits out a
Retry-After, and reports how each read ended. Never reads a byte itself and never decides
which chunks are read (queue) nor which node reads them (plan).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from syncbit.errors import SourceThrottledError, SourceUnavailableError
from syncbit.fetch.flight import Priority
from syncbit.fetch_control import ConcurrencyPolicy, SourceConcurrency, SourceStats
from syncbit.sources.base import Source
from syncbit.sources.throttle import source_key
from syncbit.wire import Abort

# Source options that name the endpoint a source talks to (S3's, the Hub's): two sources
# with the same URI prefix but different endpoints are different origins.
_ENDPOINT_OPTIONS = ("endpoint_url", "endpoint")
# How often a read waiting behind a source's first read looks whether that one is being
# answered (its body arriving): the first read's progress wakes nobody.
_ANSWER_POLL = 0.005
# Seconds of one stream's bytes a source request asks for (whole chunks, at most a batch):
# long enough that a request's wait for its first byte stays a small share of it, short
# enough that the concurrency search (a measurement waits for a request per stream) and a
# file's last requests do not take seconds each. Against an origin giving each connection
# 5 MiB/s, 16 MiB requests took 3.4 s each: a 1 GiB pull ran at 66 MiB/s and was still at
# 16 streams when it ended; sized to half a second (a chunk each), 200 MiB/s at 64 streams.
# A stream delivering 32 MiB/s or more asks for whole 16 MiB batches (S3, the Hub and
# loopback in bench/origin.py: 62 of a 1 GiB S3 pull's 67 requests).
REQUEST_SECONDS = 0.5


def key_of(source: Source) -> str:
    """The unit one concurrency level applies to (see `sources.throttle.source_key`)."""
    endpoint = next((source.options[k] for k in _ENDPOINT_OPTIONS if source.options.get(k)), None)
    return source_key(source.uri, str(endpoint) if endpoint else None)


class Streams:
    """Concurrent source reads per source key, adapted to what the source delivers.

    `read(source, priority, deadline, nbytes)` is entered around one range read: it waits
    until the source's limit has a free slot for this caller (waiters of a lower priority
    value go first, then in arrival order; one read at a time until the source answered
    one with its body, but for readers and `second` reads) and no Retry-After holds (nor,
    but for a reader's own read, the backoff after failures), and on exit tells the
    controller whether the read delivered, was throttled or failed. A read that cannot be
    admitted by `deadline` fails with SourceThrottledError (temporary: the flight's retry
    decides).
    `threads`: the worker threads source reads run in (a read and its head sample each),
    kept apart from trio's shared default so that many streams cannot starve the store's
    and the peers' threads.
    """

    def __init__(self, cap: int, clock: Callable[[], float] = trio.current_time) -> None:
        policy = ConcurrencyPolicy(cap=cap, initial=min(ConcurrencyPolicy.initial, cap))
        self.control = SourceConcurrency(policy, clock)
        self.threads = trio.CapacityLimiter(2 * cap)
        self._seq = itertools.count()
        self._waiting: dict[str, list[_Waiter]] = {}  # heaps
        self._active: dict[str, int] = {}  # keys with reads admitted or waiting: how many
        # Each key's latest refusal or failure, until a read delivers: what a read that
        # could not be admitted (the source backed off) failed of.
        self._last_error: dict[str, SourceThrottledError | SourceUnavailableError] = {}
        # Keys no read has delivered yet: the progress of the reads running against them.
        self._first: dict[str, list[Abort]] = {}

    def limit(self, source: Source) -> int:
        """Reads allowed at once against `source`'s origin now."""
        return self.control.limit(key_of(source))

    def stats(self, source: Source) -> SourceStats:
        return self.control.stats(key_of(source))

    def request_bytes(self, source: Source, chunk_size: int, most: int) -> int:
        """Bytes one request to `source` should bring, in whole chunks: what one of its
        streams delivered in REQUEST_SECONDS lately, at least a chunk, at most `most` (all
        of it while nothing is known: a fast origin's first requests stay whole)."""
        rate = self.control.stream_rate(key_of(source))
        whole = max(1, most // chunk_size)
        if rate <= 0:
            return whole * chunk_size
        return max(1, min(whole, int(rate * REQUEST_SECONDS) // chunk_size)) * chunk_size

    def busy(self) -> int:
        """Source reads running or waiting for a stream, across every source."""
        return sum(self._active.values())

    def lanes(self) -> int:
        """Reads worth running at once across the sources in use: the sum of their limits
        (the policy's first level when none is in use)."""
        if not self._active:
            return self.control.policy.initial
        return sum(self.control.limit(k) for k in self._active)

    @asynccontextmanager
    async def read(
        self,
        source: Source,
        priority: int,
        deadline: float,
        nbytes: int,
        second: bool = False,
        progress: Abort | None = None,
    ) -> AsyncIterator[None]:
        """`second`: the same bytes asked again beside a read that straggles (a hedge).
        `progress`: the read's transfer, whose body bytes arriving prove a new source (the
        others need not wait for the whole read); without it only its end does."""
        key = key_of(source)
        self._active[key] = self._active.get(key, 0) + 1
        watched: list[Abort] | None = None
        try:
            await self._admit(key, priority, deadline, second)
            if progress is not None and not self.control.stream_rate(key):
                watched = self._first.setdefault(key, [])
                watched.append(progress)
            async with self._reporting(key, nbytes):
                yield
        finally:
            if watched is not None and progress is not None:
                watched.remove(progress)
                if not watched and self._first.get(key) is watched:
                    del self._first[key]
            self._active[key] -= 1
            if not self._active[key]:
                del self._active[key]
            self._wake(key)

    @asynccontextmanager
    async def _reporting(self, key: str, nbytes: int) -> AsyncIterator[None]:
        control = self.control
        sent = control.started(key)
        began = trio.current_time()
        try:
            yield
        except SourceThrottledError as exc:
            control.throttled(key, exc.retry_after, sent)
            self._remember(key, exc)
            raise
        except SourceUnavailableError as exc:
            control.failed(key, sent)
            self._remember(key, exc)
            raise
        except BaseException:
            # Cancelled, or refused for good (a changed version, no access): says nothing
            # of how many reads the origin takes at once.
            control.cancelled(key)
            raise
        control.finished(key, nbytes, trio.current_time() - began)
        self._last_error.pop(key, None)

    def _remember(self, key: str, exc: SourceThrottledError | SourceUnavailableError) -> None:
        self._last_error[key] = exc
        while len(self._last_error) > self.control.policy.max_keys:
            del self._last_error[next(iter(self._last_error))]

    async def _admit(self, key: str, priority: int, deadline: float, second: bool) -> None:
        control = self.control
        waiting = self._waiting.setdefault(key, [])
        me = _Waiter(priority, next(self._seq))
        heapq.heappush(waiting, me)
        try:
            with trio.move_on_at(deadline):
                while not (waiting[0] is me and self._may_start(key, priority, second)):
                    me.turn = trio.Event()
                    if waiting[0] is not me:
                        await me.turn.wait()  # only the head is woken: see `_wake`
                        continue
                    background = priority > Priority.FOREGROUND
                    delay = control.delay(key, background)
                    if not delay and self._first.get(key) and control.may_start(key, background):
                        # A slot is free, held only for a first read's answer: is it here
                        # yet? (A full limit waits for a read's end, which wakes it.)
                        delay = _ANSWER_POLL
                    with trio.move_on_after(delay or math.inf):
                        await me.turn.wait()
                return
        finally:
            me.gone = True
            _drop_gone(waiting)
            if not waiting:
                del self._waiting[key]
            self._wake(key)
        stats = control.stats(key)
        last = self._last_error.get(key)
        if last is not None and stats.blocked_for > 0:
            # Backed off after refusals: the read failed of the latest one.
            kind = (
                SourceThrottledError
                if isinstance(last, SourceThrottledError)
                else SourceUnavailableError
            )
            raise kind(f"{last} (not asked again for {stats.blocked_for:.1f}s)") from last
        raise SourceThrottledError(
            f"{key}: no source read admitted in time ({stats.in_flight} running, limit "
            f"{stats.limit}, asked to wait {stats.blocked_for:.1f}s more)"
        )

    def _may_start(self, key: str, priority: int, second: bool) -> bool:
        """A slot is free and no Retry-After holds; for a source that has not delivered a
        read yet, only while nothing else is asked of it or once a read running is
        answered with its body, but for a reader's own read and a second read: a refusal
        that holds for every read (no Range support, access denied) then costs a prefetch
        one request, not a burst, and neither a reader nor a prefetch waits on a stalled
        one. Waiting for the first read's end instead held a pull of a 1 GiB object to one
        stream for its first 16 MiB (0.09-0.17 s at 100-180 MB/s a connection)."""
        control = self.control
        if not control.may_start(key, backoff=priority > Priority.FOREGROUND):
            return False
        if priority <= Priority.FOREGROUND or second or control.in_flight(key) == 0:
            return True
        if control.stream_rate(key) > 0:
            return True
        return any(p.received for p in self._first.get(key, ()))

    def _wake(self, key: str) -> None:
        """Something changed for `key` (a read ended or was admitted): its first waiter
        looks again. Only that one: it alone may start next, and waking every waiter on
        every change cost more CPU than the reads' bookkeeping (a cancel scope and a scan
        each); an admitted waiter wakes the next in turn."""
        waiting = self._waiting.get(key)
        if waiting:
            waiting[0].turn.set()


@dataclass(order=True, slots=True)
class _Waiter:
    """A read waiting for a stream: the most urgent priority first, then arrival order."""

    priority: int
    seq: int
    turn: trio.Event = field(default_factory=trio.Event, compare=False)
    gone: bool = field(default=False, compare=False)  # admitted or given up: skipped


def _drop_gone(waiting: list[_Waiter]) -> None:
    """Pop the heap's waiters that left, down to the first still waiting (the others go
    when they reach the top)."""
    while waiting and waiting[0].gone:
        heapq.heappop(waiting)
