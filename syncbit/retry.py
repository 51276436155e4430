"""One retry policy for the whole code base: capped exponential backoff with full jitter,
always within a budget.

Callers decide what is temporary (`is_temp_failure`, e.g. a source's); this module only
decides when to try again and when to stop. It never swallows an error: a permanent one
propagates at once, a temporary one once the budget (attempts, a deadline) is spent.
Cancelling the caller (a removed dataset, a cancelled pull) ends a wait at once.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import ParamSpec, TypeVar

import trio

P = ParamSpec("P")
T = TypeVar("T")


def backoff_delays(base: float = 0.1, cap: float = 5.0) -> Iterator[float]:
    """Endless delays: full jitter over base*2**n, never above `cap` seconds."""
    attempt = 0
    while True:
        yield random.uniform(0, min(cap, base * 2**attempt))
        attempt += 1


async def retrying(
    call: Callable[[], Awaitable[T]],
    is_temp_failure: Callable[[BaseException], bool],
    *,
    attempts: int | None = None,
    deadline: float | None = None,
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
        base, cap: the backoff (see `backoff_delays`).
        on_retry: told (error, delay) before each wait, e.g. to log it.

    Returns:
        The first successful result.

    Raises:
        The last error: a permanent one, or a temporary one once the budget is spent.
        ValueError when neither `attempts` nor `deadline` is given: no loop without a budget.
    """
    if attempts is None and (deadline is None or math.isinf(deadline)):
        raise ValueError("a retry loop needs a budget: attempts or a finite deadline")
    delays = backoff_delays(base, cap)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            if not is_temp_failure(exc):
                raise
            delay = next(delays)
            if attempts is not None and attempt >= attempts:
                raise
            if deadline is not None and trio.current_time() + delay >= deadline:
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            await trio.sleep(delay)


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
