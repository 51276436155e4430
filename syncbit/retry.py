"""One retry policy for the whole code base: capped exponential backoff with full jitter.

Callers decide what is temporary (`is_temp_failure`); this module only decides when to try
again. It never swallows a permanent error.
"""

from __future__ import annotations

import functools
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
            delays = backoff_delays(base, cap)
            for attempt in range(1, attempts + 1):
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    if attempt == attempts or not is_temp_failure(exc):
                        raise
                    await trio.sleep(next(delays))
            raise AssertionError("unreachable")

        return wrapper

    return decorate
