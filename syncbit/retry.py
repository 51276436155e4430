"""One retry policy for the whole code base: capped exponential backoff with full jitter,
always within a budget.

Callers decide what is temporary (`is_temp_failure`, e.g. a source's); this module only
decides when to try again and when to stop. It never swallows an error: a permanent one
propagates at once, a temporary one once the budget (attempts, a deadline) is spent.
Cancelling the caller (a removed dataset, a cancelled pull) ends a wait at once. The same
policy runs in trio tasks (`retrying`, `@retry`) and in the blocking CLI
(`retrying_blocking`), which must not import trio (it costs a command ~0.1 s).
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def backoff_delays(base: float = 0.1, cap: float = 5.0) -> Iterator[float]:
    """Endless delays: full jitter over base*2**n, never above `cap` seconds."""
    attempt = 0
    while True:
        yield random.uniform(0, min(cap, base * 2**attempt))
        attempt += 1


class _Budget:
    """When a retry loop tries again: the wait after each failure, within the budget."""

    def __init__(
        self,
        is_temp_failure: Callable[[BaseException], bool],
        attempts: int | None,
        deadline: float | None,
        until_cancelled: bool,
        backoff: tuple[float, float],
        on_retry: Callable[[Exception, float], None] | None,
        now: Callable[[], float],
    ) -> None:
        bounded = attempts is not None or (deadline is not None and not math.isinf(deadline))
        if not bounded and not until_cancelled:
            raise ValueError("a retry loop needs a budget: attempts or a finite deadline")
        self.is_temp_failure = is_temp_failure
        self.attempts = attempts
        self.deadline = deadline
        self.delays = backoff_delays(*backoff)
        self.on_retry = on_retry
        self.now = now
        self.failed = 0

    def wait_after(self, exc: Exception) -> float:
        """Seconds to wait before the next attempt; raises `exc` when there is none (a
        permanent error, or the budget is spent)."""
        self.failed += 1
        if not self.is_temp_failure(exc):
            raise exc
        delay = next(self.delays)
        if self.attempts is not None and self.failed >= self.attempts:
            raise exc
        if self.deadline is not None and self.now() + delay >= self.deadline:
            raise exc
        if self.on_retry is not None:
            self.on_retry(exc, delay)
        return delay


async def retrying(
    call: Callable[[], Awaitable[T]],
    is_temp_failure: Callable[[BaseException], bool],
    *,
    attempts: int | None = None,
    deadline: float | None = None,
    until_cancelled: bool = False,
    base: float = 0.1,
    cap: float = 5.0,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> T:
    """`await call()` until it succeeds, retrying temporary failures with backoff.

    Args:
        call: one attempt.
        is_temp_failure: whether an error is worth another attempt; any other error
            propagates at once.
        attempts: at most this many calls in all.
        deadline: `trio.current_time()` after which no retry starts (no sleep crosses it).
        until_cancelled: no attempt or time budget: only success, a permanent error or the
            caller's cancellation end the loop (work that lasts as long as its reason, such
            as a prefetch while its dataset stays assigned); `cap` bounds its rate.
        base, cap: the backoff (see `backoff_delays`).
        on_retry: told (error, delay) before each wait, e.g. to log it.

    Returns:
        The first successful result.

    Raises:
        The last error: a permanent one, or a temporary one once the budget is spent.
        ValueError when there is no budget (neither `attempts` nor a finite `deadline`)
        and `until_cancelled` does not say so on purpose.
    """
    import trio  # here: `retrying_blocking`'s callers (the CLI) must not load trio

    budget = _Budget(
        is_temp_failure,
        attempts,
        deadline,
        until_cancelled,
        (base, cap),
        on_retry,
        trio.current_time,
    )
    while True:
        try:
            return await call()
        except Exception as exc:
            await trio.sleep(budget.wait_after(exc))


def retrying_blocking(
    call: Callable[[], T],
    is_temp_failure: Callable[[BaseException], bool],
    *,
    attempts: int | None = None,
    deadline: float | None = None,
    until_cancelled: bool = False,
    base: float = 0.1,
    cap: float = 5.0,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> T:
    """`retrying` for blocking code (the CLI): `deadline` is on `time.monotonic()`, the
    waits are `time.sleep`, and an interrupt (Ctrl-C, SIGTERM) is the cancellation."""
    budget = _Budget(
        is_temp_failure, attempts, deadline, until_cancelled, (base, cap), on_retry, time.monotonic
    )
    while True:
        try:
            return call()
        except Exception as exc:
            time.sleep(budget.wait_after(exc))


def retry(
    is_temp_failure: Callable[[BaseException], bool],
    attempts: int = 5,
    base: float = 0.1,
    cap: float = 5.0,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Retry an async function on temporary failures, at most `attempts` calls in all."""

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await retrying(
                functools.partial(fn, *args, **kwargs),
                is_temp_failure,
                attempts=attempts,
                base=base,
                cap=cap,
            )

        return wrapper

    return decorate
