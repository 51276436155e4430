"""Which requests the scheduler serves first when it cannot serve them all at once.

One scheduler process answers a bounded number of requests a second (one core of
Python: ~2,000 of the fleet's small ones). When thousands of nodes ask for more, an
unprotected loop slows every request alike: heartbeats wait behind chunk reports, nodes
are seen late or down, and a cluster that only needed slower bookkeeping loses its peers.
So, as Kubernetes' API priority and fairness puts node leases first, requests come in two
classes:

- **live** (heartbeats, leaving, credentials, probes, metrics, and the generation long
  poll, which waits in its handler anyway and costs nothing while it does): never held
  here. They are what says a node is alive, and a node must be able to say it however
  busy the fleet is.
- **bulk** (everything else: chunk reports and maps, claims, updates, listings, writes):
  admitted at a rate the loop keeps up with. Each node sends its next bulk request only
  once the last is answered, so holding one paces its sender, and the parked request
  costs a coroutine, not CPU. A request held longer than `max_wait` is answered 429 with
  `Retry-After` (`SchedulerBusyError`), before its client's own timeout would resend it.

The rate follows the loop's lag, additive increase and multiplicative decrease: a task
sleeps `TICK` seconds and measures how late it wakes (the time one turn of the loop takes
through every runnable task). Lag under `LAG_LOW` with requests waiting: the rate grows;
over `LAG_HIGH`: it shrinks by `DECREASE`. While fewer than `free` bulk requests are in
flight and none waits, a request is admitted at once whatever the rate: a small cluster,
or an embedded scheduler sharing its process with a daemon, is never paced.

A handler that waits for something else (the chunk updates long poll) steps out of the
requests in flight meanwhile (`step_aside`) and takes its turn again for its answer.

Single trio loop: no locks. `Admission.run` must run for parked requests to be admitted.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import trio

from syncbit.errors import SchedulerBusyError

LIVE_ROUTES = frozenset({"heartbeat", "leave", "credential", "generation", "healthz", "readyz"})
TICK = 0.02  # seconds between two looks at the loop's lag
CONTROL = 0.25  # seconds between two changes of the rate
LAG_LOW = 0.03  # a loop this late at most has room for more
LAG_HIGH = 0.1  # a loop later than this is behind: admit less
DECREASE = 0.7  # the rate's factor when the loop is behind
INCREASE = 0.05  # the rate's growth per CONTROL while there is room (at least MIN_STEP)
MIN_STEP = 10.0  # requests/s
MIN_RATE = 20.0  # requests/s: never slower than this
START_RATE = 2000.0  # requests/s: what one process answers at best
MAX_RATE = 1e6
REPORT_EVERY = 10.0  # seconds between two log lines about held requests

log = logging.getLogger("syncbit.scheduler")


@dataclass
class _Waiter:
    event: trio.Event
    admitted: bool = False


class Admission:
    """Admits bulk requests at a rate the loop keeps up with (see the module docstring).

    Args:
        free: bulk requests that may be in flight before any is paced.
        max_wait: seconds a bulk request may wait before it is answered busy.
        clock: trio's clock by default (tests use an autojump clock through trio).
    """

    def __init__(
        self,
        free: int = 32,
        max_wait: float = 5.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.free = free
        self.max_wait = max_wait
        self._clock = clock
        self.rate = START_RATE
        self.tokens = 0.0
        self.in_flight = 0
        self._queue: deque[_Waiter] = deque()
        self._lag = 0.0  # the largest lag seen since the rate last changed
        self._starved = False  # a request waited for a token since the rate last changed
        self._refilled = -math.inf
        # Counters for /metrics: admitted at once, after waiting, answered busy.
        self.admitted = 0
        self.delayed = 0
        self.refused = 0

    @staticmethod
    def is_live(route: str) -> bool:
        """Whether requests of `route` are never held (module docstring)."""
        return route in LIVE_ROUTES

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _refill(self) -> None:
        now = self._clock()
        if self._refilled > -math.inf:
            burst = max(1.0, self.rate * TICK)
            self.tokens = min(burst, self.tokens + (now - self._refilled) * self.rate)
        self._refilled = now

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold the caller until it may go on (SchedulerBusyError after `max_wait`); the
        request counts as in flight until the block ends, but for the time it spends in
        `step_aside` (a long poll's wait)."""
        await self._enter()
        token = _CURRENT.set(self)
        try:
            yield
        finally:
            _CURRENT.reset(token)
            self.in_flight -= 1

    async def _enter(self) -> None:
        """Wait for the turn; once admitted the caller counts as in flight."""
        if not self._queue and (self.in_flight < self.free or self._take()):
            self.admitted += 1
            self.in_flight += 1
        else:
            await self._wait()  # admitted: `_release` counted it in flight

    def _take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    async def _wait(self) -> None:
        waiter = _Waiter(trio.Event())
        self._queue.append(waiter)
        self._starved = True
        try:
            with trio.move_on_after(self.max_wait):
                await waiter.event.wait()
        except BaseException:
            if waiter.admitted:
                self.in_flight -= 1  # cancelled after `_release` counted it
            else:
                self._queue.remove(waiter)
            raise
        if waiter.admitted:
            self.delayed += 1
            return
        self._queue.remove(waiter)
        self.refused += 1
        retry = max(1, math.ceil(len(self._queue) / self.rate))
        raise SchedulerBusyError(
            f"the scheduler is busy ({len(self._queue)} requests waiting); try again in {retry} s",
            retry_after=retry,
        )

    def _release(self) -> None:
        """Admit waiters in arrival order as the tokens allow (and, while few are in
        flight, without one: `admit`'s rule); each counts as in flight from here."""
        queue = self._queue
        while queue and (self.in_flight < self.free or self._take()):
            waiter = queue.popleft()
            waiter.admitted = True
            waiter.event.set()
            self.in_flight += 1

    def note_lag(self, lag: float) -> None:
        """One look at how late the loop ran (`run`); every CONTROL seconds the rate moves."""
        self._lag = max(self._lag, lag)

    def control(self) -> None:
        """Move the rate by the lag seen since the last call (AIMD)."""
        if self._lag > LAG_HIGH:
            self.rate = max(MIN_RATE, self.rate * DECREASE)
        elif self._lag < LAG_LOW and self._starved:
            self.rate = min(MAX_RATE, self.rate + max(MIN_STEP, self.rate * INCREASE))
        self._lag = 0.0
        self._starved = bool(self._queue)

    async def run(self) -> None:
        """Measure the loop's lag, move the rate, admit waiting requests: forever; say
        in the log, at most every REPORT_EVERY seconds, when requests were held."""
        next_control = trio.current_time() + CONTROL
        next_report = trio.current_time() + REPORT_EVERY
        reported = (0, 0)
        worst = 0.0
        while True:
            due = trio.current_time() + TICK
            await trio.sleep(TICK)
            now = trio.current_time()
            self.note_lag(now - due)
            worst = max(worst, now - due)
            if now >= next_control:
                self.control()
                next_control = now + CONTROL
            self._release()
            if now >= next_report:
                held = (self.delayed - reported[0], self.refused - reported[1])
                if any(held):
                    log.info(
                        "behind on requests: %d held in the last %.0f s (%d answered busy), "
                        "%d waiting now; admitting %.0f/s; the loop ran up to %.0f ms late",
                        held[0] + held[1],
                        REPORT_EVERY,
                        held[1],
                        len(self._queue),
                        self.rate,
                        worst * 1000,
                    )
                reported = (self.delayed, self.refused)
                worst = 0.0
                next_report = now + REPORT_EVERY


_CURRENT: ContextVar[Admission | None] = ContextVar("syncbit_admission", default=None)


@asynccontextmanager
async def step_aside() -> AsyncIterator[None]:
    """A handler's wait for something else (a long poll for changes): out of the admitted
    requests in flight meanwhile, so that requests that only wait do not take the places
    of those that work, and back in turn (waiting as a new request would) for its answer.
    Outside an admitted request (a live route, no admission): nothing."""
    admission = _CURRENT.get()
    if admission is None:
        yield
        return
    admission.in_flight -= 1
    try:
        yield
    finally:
        try:
            await admission._enter()
        except BaseException:
            admission.in_flight += 1  # not admitted: what `admit` takes off on its way out
            raise


__all__ = ["LIVE_ROUTES", "Admission", "step_aside"]
