"""How long a chunk a reader waits for may wait for the scheduler (`ReaderPatience`).

The scheduler only makes a read better (a peer instead of the source, one node reading
the source instead of several); the source can always serve it. A scheduler that takes
requests and never answers (a wedged process, a path that drops its answers) must then
not hold a read for a request's timeout (10 s, longer than the read deadline): the read
stops waiting after a fraction of its deadline and goes to the source without a map or a
claim, and for a while after that readers do not ask at all. Background chunks (prefetch,
a file fetched whole on open) wait as before: they must not read what another node may be
reading already. Trio thread only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from syncbit.errors import SchedulerError
from syncbit.fetch.flight import Flight

T = TypeVar("T")

log = logging.getLogger("syncbit.fetch")


class ReaderPatience:
    """Bounds a reader's wait for the scheduler; remembers that it did not answer.

    Args:
        limit: seconds a reader's request waits at most (less when its deadline is near:
            a quarter of what is left, so the source read keeps most of it).
        memory: seconds after a reader gave up during which readers do not ask (each
            would wait its patience out again); any answer ends that at once.
    """

    def __init__(self, limit: float, stats: dict[str, int], memory: float = 5.0) -> None:
        self.limit = limit
        self.memory = memory
        # Trio time a reader last stopped waiting, unanswered since (-inf: answered).
        self._gave_up = -math.inf
        # The fetcher's counters: "scheduler_abandoned", requests a reader stopped waiting
        # for, and "scheduler_skipped", those not made because one did lately.
        self.stats = stats
        for key in ("scheduler_abandoned", "scheduler_skipped"):
            self.stats.setdefault(key, 0)

    def of(self, flight: Flight) -> float:
        """Seconds `flight` may wait for an answer: unbounded unless a reader waits."""
        if not flight.for_reader:
            return math.inf
        left: float = flight.deadline - trio.current_time()
        return max(0.05, min(self.limit, left / 4.0))

    async def ask(self, flight: Flight, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`'s answer, or SchedulerError when a reader's patience ran out (now, or
        lately and nothing was answered since)."""
        patience = self.of(flight)
        if math.isfinite(patience) and trio.current_time() - self._gave_up < self.memory:
            self.stats["scheduler_skipped"] += 1
            raise SchedulerError("the scheduler did not answer a reader in time lately")
        with trio.CancelScope(deadline=trio.current_time() + patience) as scope:

            def reader_joined() -> None:  # a background flight's wait gets a reader's bound
                scope.deadline = min(scope.deadline, trio.current_time() + self.of(flight))

            with flight.telling_readers(reader_joined):
                return await self._answered(call)
        if self._gave_up == -math.inf:
            log.warning(
                "the scheduler did not answer a read in time: reads go to the source without "
                "it until it answers again"
            )
        self._gave_up = trio.current_time()
        self.stats["scheduler_abandoned"] += 1
        raise SchedulerError("the scheduler did not answer in time for a reader")

    async def _answered(self, call: Callable[[], Awaitable[T]]) -> T:
        result = await call()
        if self._gave_up != -math.inf:
            self._gave_up = -math.inf
            log.info("the scheduler answers again")
        return result
