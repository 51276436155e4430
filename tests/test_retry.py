"""The one retry policy: temporary failures are retried with backoff within a budget
(attempts or a deadline, one is required), permanent ones never; autojump clock, no sleeps."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import trio

from syncbit.errors import SourcePermanentError, SourceUnavailableError
from syncbit.retry import retry, retrying, retrying_blocking
from syncbit.sources.base import Source


class Flaky:
    """Fails with `error` the first `failures` calls, then answers "ok"."""

    def __init__(self, error: Exception, failures: int = 10**9) -> None:
        self.error = error
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


async def test_temporary_failures_are_retried_until_success(autojump_clock: trio.abc.Clock) -> None:
    call = Flaky(SourceUnavailableError("503"), failures=3)
    assert await retrying(call, Source.is_temp_failure, attempts=5) == "ok"
    assert call.calls == 4


async def test_permanent_failures_are_never_retried(autojump_clock: trio.abc.Clock) -> None:
    call = Flaky(SourcePermanentError("the server ignores Range requests"))
    with pytest.raises(SourcePermanentError):
        await retrying(call, Source.is_temp_failure, attempts=100)
    assert call.calls == 1


async def test_the_attempt_budget_ends_the_loop(autojump_clock: trio.abc.Clock) -> None:
    call = Flaky(SourceUnavailableError("503"))
    with pytest.raises(SourceUnavailableError):
        await retrying(call, Source.is_temp_failure, attempts=4)
    assert call.calls == 4


async def test_the_deadline_ends_the_loop_without_sleeping_past_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    call = Flaky(SourceUnavailableError("503"))
    deadline = trio.current_time() + 30
    with pytest.raises(SourceUnavailableError):
        await retrying(call, Source.is_temp_failure, deadline=deadline, base=0.1, cap=2.0)
    assert trio.current_time() <= deadline
    assert call.calls > 10  # kept trying within it: ~1 per second once backed off


async def test_a_loop_without_a_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        await retrying(Flaky(SourceUnavailableError("x")), Source.is_temp_failure)
    with pytest.raises(ValueError, match="budget"):
        await retrying(Flaky(SourceUnavailableError("x")), Source.is_temp_failure, deadline=1e999)


async def test_a_loop_until_cancelled_runs_at_a_bounded_rate(
    autojump_clock: trio.abc.Clock,
) -> None:
    call = Flaky(SourceUnavailableError("503"))
    with trio.move_on_after(3600):
        await retrying(call, Source.is_temp_failure, until_cancelled=True, base=1, cap=60)
    # No budget but the hour: about one call a minute once backed off, then it stops.
    assert 30 < call.calls < 200, call.calls
    permanent = Flaky(SourcePermanentError("denied"))
    with pytest.raises(SourcePermanentError):
        await retrying(permanent, Source.is_temp_failure, until_cancelled=True)
    assert permanent.calls == 1


async def test_cancelling_the_caller_ends_the_wait(autojump_clock: trio.abc.Clock) -> None:
    call = Flaky(SourceUnavailableError("503"))
    with trio.move_on_after(5):
        await retrying(call, Source.is_temp_failure, attempts=10**6, base=1, cap=60)
    calls = call.calls
    await trio.sleep(600)
    assert call.calls == calls  # nothing runs on after the caller is gone


async def test_the_decorator_uses_the_same_budget(autojump_clock: trio.abc.Clock) -> None:
    calls = [0]

    @retry(Source.is_temp_failure, attempts=3)
    async def fetch(x: int) -> int:
        calls[0] += 1
        raise SourceUnavailableError(f"down {x}")

    with pytest.raises(SourceUnavailableError, match="down 7"):
        await fetch(7)
    assert calls[0] == 3


class FlakyBlocking:
    """`Flaky` for blocking callers."""

    def __init__(self, error: Exception, failures: int = 10**9) -> None:
        self.error = error
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_the_blocking_loop_keeps_the_same_budget() -> None:
    call = FlakyBlocking(SourceUnavailableError("503"), failures=2)
    assert retrying_blocking(call, Source.is_temp_failure, attempts=3, base=0.001) == "ok"
    spent = FlakyBlocking(SourceUnavailableError("503"))
    with pytest.raises(SourceUnavailableError):
        retrying_blocking(spent, Source.is_temp_failure, attempts=3, base=0.001)
    assert spent.calls == 3
    permanent = FlakyBlocking(SourcePermanentError("denied"))
    with pytest.raises(SourcePermanentError):
        retrying_blocking(permanent, Source.is_temp_failure, until_cancelled=True)
    assert permanent.calls == 1
    with pytest.raises(ValueError, match="budget"):
        retrying_blocking(FlakyBlocking(SourceUnavailableError("x")), Source.is_temp_failure)


def test_the_blocking_loop_stops_before_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]  # a clock that moves only by the loop's sleeps
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    call = FlakyBlocking(SourceUnavailableError("503"))
    with pytest.raises(SourceUnavailableError):
        retrying_blocking(call, Source.is_temp_failure, deadline=130.0, base=0.1, cap=2.0)
    assert now[0] <= 130.0  # no sleep crossed it
    assert call.calls > 10  # kept trying within it


def test_the_blocking_loop_does_not_load_trio() -> None:
    code = "import sys, syncbit.retry, syncbit.cli.progress; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
