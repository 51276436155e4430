"""Which requests the scheduler serves first when it cannot serve them all at once.

One scheduler process answers a bounded number of requests a second (one core of
Python: ~2,000 of the fleet's small ones). When thousands of nodes ask for more, an
unprotected loop slows every request alike: heartbeats wait behind chunk reports, nodes
are seen late or down, and a cluster that only needed slower bookkeeping loses its peers.
So, as Kubernetes' API priority and fairness puts node leases first, requests come in two
classes:

- **live** (heartbeats, leaving, credentials, probes, metrics, the generation long poll,
  which waits in its handler anyway and costs nothing while it does, and what a node
  needs to know what it should hold: the dataset listing, a manifest, sent as stored,
  and its plan): never held here. A node must be able to say it is alive and learn what
  to hold however busy the fleet is; a node whose sync is refused also finds the
  generation still new at its next long poll and asks again, which costs more than the
  answer it was refused.
- **bulk** (everything else: chunk reports and maps, claims, updates, listings, writes):
  admitted at a rate the loop keeps up with. Each node sends its next bulk request only
  once the last is answered, so holding one paces its sender, and the parked request
  costs a coroutine, not CPU. A request held longer than `max_wait` is answered 429 with
  `Retry-After` (`SchedulerBusyError`), before its client's own timeout would resend it.

The rate follows how busy the loop is and how late it runs, additive increase and
multiplicative decrease. Two measures: the share of each `CONTROL` period the loop spent
running tasks rather than waiting for sockets (`LoopMeter`), and the lag, how late a task
that sleeps `TICK` seconds wakes (the time one turn of the loop takes through every
runnable task). Busier than `BUSY_HIGH` or a median lag over `LAG_HIGH`: the rate shrinks
by `DECREASE`, never below `MIN_RATE`, a pace no small cluster reaches, so that one (or
an embedded scheduler whose loop is late because the daemon beside it holds the GIL) is
never held. With requests waiting, a lag under `LAG_LOW` and the loop busy less than
`BUSY_TARGET`: it grows, by a quarter while the loop is less than half that busy. Lag
alone comes too late: it stays near zero until the loop has no time left, then grows by
seconds, so a rate driven by it climbs until the loop is full and every heartbeat then
waits behind the backlog (at 5,000 nodes, bench/scale.py: admitting 2,450/s, then the
loop 0.9-6 s late, the rate cut to the floor, 4,800 requests waiting, a thousand a second
answered busy, and again). Held under `BUSY_TARGET`, the loop keeps room for the
heartbeats and the bursts no admission holds.
A bucket of tokens at that rate admits requests (a burst of one `TICK`'s worth), in
arrival order once any waits; an answer larger than `TURN_BYTES` costs a token per
`TURN_BYTES` (`charge`): the rate is of work, not of requests. (Counting requests in
flight instead does not work: a handler runs in one step, so however far behind the
loop is, almost none are ever in flight.)

A handler that waits for something else (the chunk updates long poll) took its turn to
start; its answer, after the wait, takes another (`step_aside`).

One burst the classes cannot hold: a change of the generation (a dataset added, an
assignment) wakes every node's long poll at once, and each woken node asks at once for
the listing, a manifest and its plan, all live. At 5,000 nodes (`bench/scale.py --mode
prefetch`) that was ~15,000 live requests in a few seconds and heartbeats waited behind
them (p99 4.1 s). `Pacer` spreads the answers to those long polls: at most `rate` a
second, in the order they woke, none while the loop is behind (the wakes are the one
source of live requests that can wait), none later than its own poll's timeout.

Single trio loop: no locks. `Admission.run` must run for parked requests to be admitted.
"""

from __future__ import annotations

import logging
import math
import random
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import trio

from syncbit.errors import SchedulerBusyError

LIVE_ROUTES = frozenset(
    {
        "heartbeat",
        "leave",
        "credential",
        "generation",
        "datasets",
        "manifest",
        "plan",
        "healthz",
        "readyz",
    }
)
TICK = 0.02  # seconds between two looks at the loop's lag
CONTROL = 0.25  # seconds between two changes of the rate
LAG_LOW = 0.03  # a loop this late at most has room for more
LAG_HIGH = 0.1  # a loop later than this is behind: admit less
BUSY_TARGET = 0.7  # share of its time the loop may spend running before the rate stops growing
BUSY_HIGH = 0.9  # a loop busier than this is about to fall behind: admit less
FAST = 0.25  # the rate's growth per CONTROL while the loop is less than half BUSY_TARGET
DECREASE = 0.7  # the rate's factor when the loop is behind
INCREASE = 0.05  # the rate's growth per CONTROL while there is room (at least MIN_STEP)
MIN_STEP = 10.0  # requests/s
MIN_RATE = 100.0  # requests/s: never slower than this
START_RATE = 2000.0  # requests/s: what one process answers at best
MAX_RATE = 1e6
REPORT_EVERY = 10.0  # seconds between two log lines about held requests
TURN_BYTES = 4096  # an admitted answer costs one turn per this many bytes (at least one)
SPREAD = 0.5  # a refused request's Retry-After: its wait at the pace, times 1 to 1 + SPREAD
MAX_RETRY = 120  # seconds: the longest Retry-After (a node asks again by then anyway)
MIN_SERVED = 10.0  # requests/s: the slowest pace a Retry-After counts on
SERVED_WEIGHT = 0.3  # the last second's weight in the moving average of the pace
WAKE_RATE = 250.0  # generation long polls answered a second after a change (`Pacer`)

log = logging.getLogger("syncbit.scheduler")


@dataclass
class _Waiter:
    event: trio.Event
    admitted: bool = False
    gone: bool = False  # gave up (timed out, cancelled): skipped when its turn comes


class _Line:
    """Waiters in arrival order, let go as turns allow; one that gave up stays where it is
    (a removal from the middle of thousands costs each one that gives up the whole
    queue) and is dropped when its turn comes."""

    def __init__(self) -> None:
        self._queue: deque[_Waiter] = deque()
        self.waiting = 0  # waiters in the queue not gone

    async def wait(self, deadline: float) -> bool:
        """Until this caller's turn (True) or `deadline`, trio time (False)."""
        waiter = _Waiter(trio.Event())
        self._queue.append(waiter)
        self.waiting += 1
        try:
            with trio.move_on_at(deadline):
                await waiter.event.wait()
        finally:
            if not waiter.admitted:
                waiter.gone = True
                self.waiting -= 1
        return waiter.admitted

    def release(self, take: Callable[[], bool]) -> None:
        """Let waiters go in arrival order while `take()` grants a turn."""
        queue = self._queue
        while queue:
            if queue[0].gone:
                queue.popleft()
            elif take():
                waiter = queue.popleft()
                waiter.admitted = True
                self.waiting -= 1
                waiter.event.set()
            else:
                break


def _refilled(tokens: float, rate: float, elapsed: float) -> float:
    """A token bucket at `rate` a second, `elapsed` seconds on: at most a TICK's worth
    (one at least) held."""
    return min(max(1.0, rate * TICK), tokens + elapsed * rate)


class LoopMeter(trio.abc.Instrument):  # type: ignore[misc, unused-ignore]  # untyped base
    """How much of the time trio's loop runs tasks rather than waiting for I/O: trio
    tells it before and after each wait (a zero-timeout poll while tasks are runnable)."""

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        self._idle = 0.0  # seconds spent in waits, in all
        self._waiting_since: float | None = None
        self._last = (clock(), 0.0)  # (when, idle) at the last `busy`

    def before_io_wait(self, timeout: float) -> None:
        self._waiting_since = self._clock()

    def after_io_wait(self, timeout: float) -> None:
        if self._waiting_since is not None:
            self._idle += self._clock() - self._waiting_since
            self._waiting_since = None

    def busy(self) -> float | None:
        """The share of the time since the last call the loop ran tasks (None: no time
        has passed)."""
        now, idle = self._clock(), self._idle
        since, idle_then = self._last
        self._last = (now, idle)
        if now <= since:
            return None
        return min(1.0, max(0.0, 1.0 - (idle - idle_then) / (now - since)))


class Admission:
    """Admits bulk requests at a rate the loop keeps up with (see the module docstring).

    Args:
        max_wait: seconds a bulk request may wait before it is answered busy.
        clock: trio's clock by default (tests use an autojump clock through trio).
        metered: whether `run` measures how busy the loop is (`LoopMeter`); off, the lag
            alone moves the rate (on an autojump clock time passes outside any wait, so
            the loop would seem always busy).
        rng: draws the spread of Retry-After (injectable for tests).
    """

    def __init__(
        self,
        max_wait: float = 5.0,
        clock: Callable[[], float] = trio.current_time,
        *,
        metered: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.max_wait = max_wait
        self._clock = clock
        self.metered = metered
        self._rng = rng or random.Random()
        self.rate = START_RATE
        self.tokens = max(1.0, self.rate * TICK)
        self._line = _Line()
        self._lags: list[float] = []  # how late the loop ran at each look since the last change
        self._starved = False  # a request waited for a token since the rate last changed
        self._refilled: float | None = None
        self.behind = False  # the last control found the loop behind (lag or busy)
        self.busy: float | None = None  # the loop's busy share in the last control period
        self.served = START_RATE  # requests admitted a second lately (moving average)
        self._pacers: weakref.WeakSet[Pacer] = weakref.WeakSet()
        # Counters for /metrics: admitted at once, after waiting, answered busy.
        self.admitted = 0
        self.delayed = 0
        self.refused = 0

    def pace(self, pacer: Pacer) -> None:
        """Hand out `pacer`'s turns from this admission's loop (see `Pacer`)."""
        pacer.paced = True
        self._pacers.add(pacer)

    @staticmethod
    def is_live(route: str) -> bool:
        """Whether requests of `route` are never held (module docstring)."""
        return route in LIVE_ROUTES

    @property
    def waiting(self) -> int:
        return self._line.waiting

    def _refill(self) -> None:
        now = self._clock()
        if self._refilled is not None:
            self.tokens = _refilled(self.tokens, self.rate, now - self._refilled)
        self._refilled = now

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold the caller until it may go on (SchedulerBusyError after `max_wait`)."""
        await self._enter()
        token = _CURRENT.set(self)
        try:
            yield
        finally:
            _CURRENT.reset(token)

    async def _enter(self) -> None:
        """Wait for the turn."""
        if not self._line.waiting and self._take():
            self.admitted += 1
        else:
            await self._wait()

    def charge(self, nbytes: int) -> None:
        """An admitted request answered `nbytes`: past TURN_BYTES, each further TURN_BYTES
        costs a turn more (the bucket may go below zero; the next ones wait for it to
        refill). Encoding and sending an answer costs the loop in proportion to its size:
        at 2,000 nodes, chunk maps and updates of ~90 KiB each at the floor rate held the
        loop 8 s behind, where counting requests alone saw nothing to slow down."""
        extra = nbytes / TURN_BYTES - 1.0
        if extra > 0:
            self._refill()
            self.tokens -= extra

    def _take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    async def _wait(self) -> None:
        self._starved = True
        if await self._line.wait(trio.current_time() + self.max_wait):
            self.delayed += 1
            return
        self.refused += 1
        waiting = self._line.waiting
        retry = self.retry_after(waiting)
        raise SchedulerBusyError(
            f"the scheduler is busy ({waiting} requests waiting); try again in {retry} s",
            retry_after=retry,
        )

    def retry_after(self, waiting: int) -> int:
        """Seconds a refused request is told to wait: the time those `waiting` take at the
        pace requests were admitted lately (not the rate of turns: a large answer takes
        several), spread by up to half as much again, at most MAX_RETRY. Told too little,
        a node asks again while the line is as long and is refused again, each refusal
        costing the loop a request's reading and answer (at 5,000 nodes, bench/scale.py:
        up to 1,400 a second, more than the requests served); told the same, those
        refused together come back together."""
        base = waiting / max(self.served, MIN_SERVED)
        return max(1, min(MAX_RETRY, math.ceil(base * self._rng.uniform(1.0, 1.0 + SPREAD))))

    def _served(self, admitted: int, seconds: float) -> None:
        """Requests admitted in the last `seconds`: the pace `retry_after` counts on."""
        if seconds > 0:
            self.served += SERVED_WEIGHT * (admitted / seconds - self.served)

    def _release(self) -> None:
        """Admit waiters in arrival order as the tokens allow."""
        self._line.release(self._take)

    def note_lag(self, lag: float) -> None:
        """One look at how late the loop ran (`run`); every CONTROL seconds the rate moves."""
        self._lags.append(lag)

    def control(self, busy: float | None = None) -> None:
        """Move the rate by the share of the period the loop was `busy` (None: not
        measured) and the median lag seen since the last call (see the module docstring):
        a loop that is behind is late at most looks, while one late turn (a large answer,
        a garbage collection) is not a reason to hold every node's requests."""
        lags = sorted(self._lags)
        lag = lags[len(lags) // 2] if lags else 0.0
        self.busy = busy
        full = busy is not None and busy > BUSY_HIGH
        self.behind = lag > LAG_HIGH or full
        if self.behind:
            self.rate = max(MIN_RATE, self.rate * DECREASE)
        elif lag < LAG_LOW and self._starved and (busy is None or busy < BUSY_TARGET):
            grow = FAST if busy is not None and busy < BUSY_TARGET / 2 else INCREASE
            self.rate = min(MAX_RATE, self.rate + max(MIN_STEP, self.rate * grow))
        self._lags = []
        self._starved = bool(self._line.waiting)

    async def run(self) -> None:
        """Measure the loop's lag, move the rate, admit waiting requests: forever; say
        in the log, at most every REPORT_EVERY seconds, when requests were held."""
        if not self.metered:
            await self._run(None)
            return
        meter = LoopMeter(self._clock)
        trio.lowlevel.add_instrument(meter)
        try:
            await self._run(meter)
        finally:
            trio.lowlevel.remove_instrument(meter)

    async def _run(self, meter: LoopMeter | None) -> None:
        next_control = trio.current_time() + CONTROL
        next_report = trio.current_time() + REPORT_EVERY
        counted_at = trio.current_time()
        reported = (0, 0)
        counted = (0, 0, 0)
        worst = worst_second = 0.0
        while True:
            due = trio.current_time() + TICK
            await trio.sleep(TICK)
            now = trio.current_time()
            self.note_lag(now - due)
            worst = max(worst, now - due)
            worst_second = max(worst_second, now - due)
            if now >= counted_at + 1.0:  # each second: the pace, and the debug log
                counts = (self.admitted, self.delayed, self.refused)
                took = [c - t for c, t in zip(counts, counted, strict=True)]
                self._served(took[0] + took[1], now - counted_at)
                log.debug(
                    "admission: %.0f/s, %d waiting; in the last second %d admitted at once, "
                    "%d after waiting, %d answered busy; the loop ran up to %.0f ms late, "
                    "busy %.0f%%",
                    self.rate,
                    self._line.waiting,
                    *took,
                    worst_second * 1000,
                    100 * (self.busy or 0.0),
                )
                counted, worst_second, counted_at = counts, 0.0, now
            if now >= next_control:
                self.control(meter.busy() if meter is not None else None)
                next_control = now + CONTROL
            self._release()
            for pacer in list(self._pacers):
                pacer.release(now, hold=self.behind)
            if now >= next_report:
                held = (self.delayed - reported[0], self.refused - reported[1])
                if any(held):
                    log.info(
                        "behind on requests: %d held in the last %.0f s (%d answered busy), "
                        "%d waiting now; admitting %.0f/s; the loop ran up to %.0f ms late",
                        held[0] + held[1],
                        REPORT_EVERY,
                        held[1],
                        self._line.waiting,
                        self.rate,
                        worst * 1000,
                    )
                reported = (self.delayed, self.refused)
                worst = 0.0
                next_report = now + REPORT_EVERY


_CURRENT: ContextVar[Admission | None] = ContextVar("syncbit_admission", default=None)


@asynccontextmanager
async def step_aside() -> AsyncIterator[None]:
    """A handler's wait for something else (a long poll for changes): the answer that
    follows it is work again, and takes its turn (waiting as a new request would; after
    `max_wait`, SchedulerBusyError). Outside an admitted request (a live route, no
    admission): nothing."""
    admission = _CURRENT.get()
    yield
    if admission is not None:
        await admission._enter()


__all__ = ["LIVE_ROUTES", "Admission", "LoopMeter", "Pacer", "step_aside"]


class Pacer:
    """Answers that a burst would send at once (the long polls a generation change wakes),
    spread at most `rate` a second, in the order they came, and none while the loop is
    behind: each woken node then asks for the listing, a manifest and its plan, live
    requests the admission does not hold, so the wakes are what must wait.

    Paced (`Admission.pace`), the admission's loop hands out turns every TICK and holds
    them while its last look found the loop behind (median lag over LAG_HIGH). Without
    one (a bare `Api` in tests), turns go out on a fixed schedule (`turn`). Either way an
    answer waits at most until its own deadline (the long poll's timeout)."""

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError("need rate > 0")
        self.rate = rate
        self.interval = 1.0 / rate
        self._next = -math.inf
        self.paced = False
        self._line = _Line()
        self._tokens = 0.0
        self._refilled: float | None = None

    def turn(self, now: float) -> float:
        """Unpaced: when the next answer may go (now, or one interval after the last)."""
        at = max(now, self._next)
        self._next = at + self.interval
        return at

    async def wait(self, deadline: float) -> None:
        """Until this answer's turn, or `deadline` (trio time)."""
        now = trio.current_time()
        if not self.paced:
            await trio.sleep_until(min(self.turn(now), max(now, deadline)))
            return
        await self._line.wait(deadline)

    def release(self, now: float, hold: bool) -> None:
        """Hand out the turns due since the last call (none while `hold`)."""
        if self._refilled is not None and not hold:
            self._tokens = _refilled(self._tokens, self.rate, now - self._refilled)
        self._refilled = now
        self._line.release(self._take)

    def _take(self) -> bool:
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @property
    def waiting(self) -> int:
        return self._line.waiting
