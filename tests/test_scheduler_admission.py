"""The scheduler serves heartbeats first (`scheduler.admission`): while its loop is behind,
every other request waits its turn at a rate the loop keeps up with, in arrival order,
and one held too long is answered 429 with Retry-After, which the client and the node's
chunk reports honour. A small cluster is never paced. Rate rules on trio's virtual clock;
the server rules on a real SchedulerServer whose admission is stuck at a crawl."""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from schedulerfixtures import CHUNK, TIMEOUT, any_port

from syncbit.config import SchedulerConfig
from syncbit.errors import NotFoundError, SchedulerBusyError, SchedulerError
from syncbit.scheduler import SchedulerClient, SchedulerServer
from syncbit.scheduler.admission import (
    BUSY_HIGH,
    BUSY_TARGET,
    CONTROL,
    DECREASE,
    FAST,
    INCREASE,
    LAG_HIGH,
    MAX_RETRY,
    MIN_RATE,
    MIN_STEP,
    REPORT_EVERY,
    SPREAD,
    START_RATE,
    TICK,
    TURN_BYTES,
    Admission,
    LoopMeter,
    Pacer,
    step_aside,
)

OBJ = "a" * 64


async def _enter(
    admission: Admission, name: int, log: list[tuple[int, float]], hold: float
) -> None:
    async with admission.admit():
        log.append((name, trio.current_time()))
        await trio.sleep(hold)


async def test_while_the_loop_keeps_up_requests_go_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(metered=False)  # its starting rate: what one process answers at best
    log: list[tuple[int, float]] = []
    async with trio.open_nursery() as nursery:  # no `run`: nothing would admit a waiter
        for i in range(int(START_RATE * TICK)):  # a burst of one tick's worth
            nursery.start_soon(_enter, admission, i, log, 1.0)
    assert [t for _, t in log] == [0.0] * int(START_RATE * TICK)
    assert admission.admitted == len(log) and admission.delayed == 0


def _slow(admission: Admission, rate: float) -> Admission:
    """`admission` at `rate`, its bucket empty."""
    admission.rate = rate
    admission.tokens = 0.0
    return admission


async def test_beyond_them_requests_go_in_arrival_order_at_the_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = _slow(Admission(max_wait=60, metered=False), 10.0)
    log: list[tuple[int, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        async with trio.open_nursery() as requests:
            for i in range(40):
                requests.start_soon(_enter, admission, i, log, 0.0)
                await trio.sleep(0)  # arrive in this order
        nursery.cancel_scope.cancel()
    assert [name for name, _ in log] == list(range(40))
    # 10/s at first, growing by at most MIN_STEP (or 5%) each CONTROL while the loop has
    # room: the 40th goes after more than a second, not at once.
    first_second = sum(1 for _, t in log if t <= 1.0)
    assert first_second <= 10 + 4 * MIN_STEP * 1.0 + 2
    assert log[-1][1] > 1.0
    assert admission.delayed == 40 and admission.waiting == 0


async def test_a_large_answer_costs_the_turns_of_its_size(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An answer of 40 KiB costs 10 turns: at 10/s (growing while the loop has room) the
    next request waits for the bucket to refill as after 10 small ones, not 0.1 s."""
    admission = _slow(Admission(max_wait=60, metered=False), 10.0)
    admission.tokens = 1.0
    log: list[tuple[int, float]] = []
    await _enter(admission, 0, log, 0.0)  # admitted at once: the bucket's one token
    admission.charge(10 * TURN_BYTES)
    admission.charge(100)  # a small answer costs its one turn, no more
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        await _enter(admission, 1, log, 0.0)
        nursery.cancel_scope.cancel()
    assert log[0] == (0, 0.0)
    # 9 turns owed, then one to take: 10 at 10/s, then 20/s, then 30/s after 0.5 s.
    assert 0.5 <= log[1][1] <= 1.2


async def test_a_request_held_past_max_wait_is_told_when_to_come_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = _slow(Admission(max_wait=2.0, metered=False), 1.0)
    admission.control = lambda busy=None: None  # type: ignore[method-assign]  # stuck at its rate
    busy: list[SchedulerBusyError] = []
    log: list[tuple[int, float]] = []

    async def one(i: int) -> None:
        try:
            await _enter(admission, i, log, 0.0)
        except SchedulerBusyError as exc:
            busy.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        async with trio.open_nursery() as requests:
            for i in range(10):
                requests.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert 1 <= len(log) <= 3  # one a second for 2 s
    assert len(busy) == 10 - len(log)
    assert all(exc.retry_after is not None and exc.retry_after >= 1 for exc in busy)
    assert "busy" in str(busy[0]) and "\n" not in str(busy[0])
    assert admission.refused == len(busy) and admission.waiting == 0


async def test_a_waiter_cancelled_leaves_no_trace(autojump_clock: trio.testing.MockClock) -> None:
    admission = _slow(Admission(max_wait=60, metered=False), 1.0)
    log: list[tuple[int, float]] = []
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(_enter, admission, i, log, 0.0)
        await trio.sleep(1)
        assert admission.waiting == 5
        nursery.cancel_scope.cancel()  # the clients are gone
    assert admission.waiting == 0 and not log


async def test_a_long_poll_takes_its_turn_again_for_its_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = _slow(Admission(max_wait=60, metered=False), 1.0)
    admission.tokens = 1.0  # for the poll
    admission.control = lambda busy=None: None  # type: ignore[method-assign]  # stuck at its rate
    log: list[tuple[str, float]] = []
    changed = trio.Event()

    async def long_poll() -> None:
        async with admission.admit():
            log.append(("poll starts", trio.current_time()))
            async with step_aside():
                await changed.wait()
            log.append(("poll answers", trio.current_time()))

    async def other(i: int) -> None:
        async with admission.admit():
            log.append((f"other {i}", trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.run)
        nursery.start_soon(long_poll)
        await trio.sleep(0.1)
        for i in range(3):
            nursery.start_soon(other, i)
            await trio.sleep(0.01)  # arrive in this order
        changed.set()  # the poll's answer is due: after the three already waiting
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [name for name, _ in log] == [
        "poll starts",
        "other 0",
        "other 1",
        "other 2",
        "poll answers",
    ]
    assert log[-1][1] >= 3.5  # a token a second


async def test_a_long_poll_cancelled_while_it_waits_leaves_no_trace() -> None:
    admission = Admission()
    with trio.move_on_after(0.05):
        async with admission.admit(), step_aside():
            await trio.sleep_forever()
    assert admission.admitted == 1 and admission.waiting == 0
    async with step_aside():  # outside an admitted request: nothing to take a turn for
        pass
    assert admission.admitted == 1


async def test_held_requests_are_told_in_the_log_now_and_then(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    admission = _slow(Admission(max_wait=60, metered=False), 5.0)
    log: list[tuple[int, float]] = []
    with caplog.at_level(logging.INFO, logger="syncbit.scheduler"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admission.run)
            for i in range(20):
                nursery.start_soon(_enter, admission, i, log, 0.0)
            await trio.sleep(REPORT_EVERY * 2.5)  # then nothing more is held: no more lines
            nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if "behind on requests" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "20 held in the last 10 s (0 answered busy), 0 waiting now" in lines[0]


def test_the_rate_shrinks_when_the_loop_is_behind_and_grows_back_while_wanted() -> None:
    admission = Admission()
    admission.rate = 1000.0
    admission.note_lag(LAG_HIGH * 2)
    admission.control()
    assert admission.rate == pytest.approx(1000.0 * DECREASE)
    for _ in range(100):
        admission.note_lag(LAG_HIGH * 2)
        admission.control()
    assert admission.rate == MIN_RATE  # never below
    admission.note_lag(0.0)
    admission.control()
    assert admission.rate == MIN_RATE  # nobody waited: no reason to grow
    admission._starved = True
    admission.control()
    assert admission.rate == MIN_RATE + MIN_STEP
    # Between the thresholds: held where it is.
    admission._starved = True
    admission.note_lag((LAG_HIGH + 0.03) / 2)
    admission.control()
    assert admission.rate == MIN_RATE + MIN_STEP
    assert CONTROL > 0
    # One late turn among many on time (a large answer, a collection): held where it is.
    admission.rate = 1000.0
    for lag in (0.001, 0.002, LAG_HIGH * 5, 0.001, 0.002):
        admission.note_lag(lag)
    admission.control()
    assert admission.rate == 1000.0


def test_those_refused_together_are_told_to_come_back_apart() -> None:
    """Told the time the line takes at the pace requests were admitted lately (not the
    rate of turns, which large answers take several of), spread so that those refused
    together do not come back together."""
    admission = Admission(rng=random.Random(7))
    admission.rate = 800.0  # turns: answers of ~32 KiB take 8 each
    for _ in range(30):
        admission._served(100, 1.0)
    assert admission.served == pytest.approx(100.0, rel=0.01)
    told = [admission.retry_after(4800) for _ in range(200)]
    assert min(told) >= 48 and max(told) <= math.ceil(48 * (1 + SPREAD))
    assert max(told) - min(told) >= 48 * SPREAD * 0.8  # spread over ~24 s, not one
    assert admission.retry_after(0) == 1  # never "now"
    assert admission.retry_after(10**6) == MAX_RETRY


def test_a_busy_loop_stops_the_growth_and_a_full_one_shrinks_the_rate() -> None:
    """Lag alone rises only once the loop is full: the share of the time it runs tasks
    stops the rate's growth at BUSY_TARGET and shrinks it past BUSY_HIGH, however
    punctual the loop still is; a loop well under the target grows back faster."""
    admission = Admission()
    admission.rate = 1000.0
    admission._starved = True
    admission.control(busy=(BUSY_TARGET + BUSY_HIGH) / 2)
    assert admission.rate == 1000.0 and not admission.behind  # room left, but not much
    admission._starved = True
    admission.control(busy=BUSY_HIGH + 0.05)
    assert admission.rate == pytest.approx(1000.0 * DECREASE) and admission.behind
    admission.rate = 1000.0
    admission._starved = True
    admission.control(busy=BUSY_TARGET - 0.05)
    assert admission.rate == pytest.approx(1000.0 * (1 + INCREASE))
    admission.rate = 1000.0
    admission._starved = True
    admission.control(busy=BUSY_TARGET / 4)
    assert admission.rate == pytest.approx(1000.0 * (1 + FAST))
    assert admission.busy == BUSY_TARGET / 4
    # Punctual and idle, but late at most looks: the lag still rules.
    admission.rate = 1000.0
    admission.note_lag(LAG_HIGH * 2)
    admission.control(busy=0.1)
    assert admission.rate == pytest.approx(1000.0 * DECREASE)


def test_the_loop_meter_counts_the_time_outside_io_waits() -> None:
    now = [0.0]
    meter = LoopMeter(lambda: now[0])
    assert meter.busy() is None  # no time has passed
    now[0] = 1.0  # a second of running tasks
    meter.before_io_wait(0.0)
    now[0] = 1.5  # half a second in a wait
    meter.after_io_wait(0.0)
    now[0] = 2.0
    assert meter.busy() == pytest.approx(0.75)
    meter.before_io_wait(1.0)
    now[0] = 3.0
    meter.after_io_wait(1.0)
    assert meter.busy() == pytest.approx(0.0)


def test_a_real_loop_spinning_reads_busy_and_a_sleeping_one_idle() -> None:
    """On trio's own clock, with the meter installed as `Admission.run` installs it."""

    async def measure(spin: bool) -> float | None:
        meter = LoopMeter()
        trio.lowlevel.add_instrument(meter)
        try:
            meter.busy()
            end = trio.current_time() + 0.3
            while trio.current_time() < end:
                if spin:
                    time.sleep(0.01)  # a task holding the loop, as a long handler does
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.sleep(0.05)
            return meter.busy()
        finally:
            trio.lowlevel.remove_instrument(meter)

    busy = trio.run(measure, True)
    idle = trio.run(measure, False)
    assert busy is not None and busy > 0.8
    assert idle is not None and idle < 0.2


# -- on a real scheduler ----------------------------------------------------------------------


class Crawl(Admission):
    """A scheduler whose loop is taken to be behind for good: one request other than a
    heartbeat every 4 s."""

    def __init__(self, max_wait: float) -> None:
        super().__init__(max_wait=max_wait)
        _slow(self, 0.25)

    def control(self, busy: float | None = None) -> None:
        self._lag = 0.0


@pytest.fixture
def crawling(tmp_path: Path) -> SchedulerConfig:
    return any_port(
        SchedulerConfig(state_dir=tmp_path / "state", node_timeout=TIMEOUT, chunk_size=CHUNK)
    )


async def test_heartbeats_and_what_a_node_must_hold_are_answered_while_others_wait(
    crawling: SchedulerConfig,
) -> None:
    admission = Crawl(max_wait=30)
    with SchedulerServer(crawling, admission=admission) as server:
        async with SchedulerClient(server.url) as client:
            await client.heartbeat("n1", address="127.0.0.1:1")  # the first token goes here
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(client.chunk_map, OBJ, "n1")
                with trio.fail_after(20):
                    while server.call(lambda: admission.waiting) < 2:
                        await trio.sleep(0.05)
                for _ in range(5):
                    await client.heartbeat("n1", address="127.0.0.1:1")
                # What a node needs to know what to hold is never held either.
                assert (await client.datasets())["datasets"] == []
                assert (await client.plan("n1"))["plan"] == []
                with pytest.raises(NotFoundError):
                    await client.manifest("nothing-here")
                # All answered, and the chunk maps sent before them still wait.
                assert server.call(lambda: admission.waiting) >= 1
                nursery.cancel_scope.cancel()


async def test_a_large_answer_is_charged_to_the_bulk_that_follows(
    crawling: SchedulerConfig,
) -> None:
    """The scheduler charges each admitted answer by its size (`Admission.charge`): the
    listing of 100 nodes leaves the bucket a turn short per 4 KiB past the first, a small
    answer costs its one turn."""
    admission = Crawl(max_wait=30)  # 0.25 turns a second: what refills meanwhile is small
    admission.tokens = 2.0  # two requests may go at once
    with SchedulerServer(crawling, admission=admission) as server:
        async with SchedulerClient(server.url) as client:
            assert await client.assignments() == {}  # small: one turn
            assert server.call(lambda: admission.tokens) == pytest.approx(1.0, abs=0.25)
            for i in range(100):  # heartbeats are never held nor charged
                await client.heartbeat(f"n{i:02d}", address=f"127.0.0.1:{i + 1}")
            assert server.call(lambda: admission.tokens) == pytest.approx(1.0, abs=0.25)
            async with httpx.AsyncClient(base_url=server.url) as raw:
                listing = await raw.get("/v1/nodes")
            assert listing.status_code == 200 and len(listing.json()["nodes"]) == 100
            owed = len(listing.content) / TURN_BYTES  # its turn and the size's
            assert owed > 5
            assert server.call(lambda: admission.tokens) < 1.5 - owed


async def test_paced_wakes_wait_while_the_admissions_loop_is_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The admission's loop hands out the wakes' turns (`Admission.pace`), none while it
    found the loop behind."""
    admission = Admission()
    admission.control = lambda busy=None: None  # type: ignore[method-assign]  # as set below
    pacer = Pacer(rate=1000.0)
    admission.pace(pacer)
    answered: list[float] = []

    async def wake() -> None:
        await pacer.wait(trio.current_time() + 60.0)
        answered.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        admission.behind = True
        nursery.start_soon(admission.run)
        nursery.start_soon(wake)
        await trio.sleep(5.0)
        assert answered == [] and pacer.waiting == 1
        admission.behind = False
        await trio.sleep(0.1)
        assert len(answered) == 1 and answered[0] >= 5.0
        nursery.cancel_scope.cancel()


async def test_a_request_held_too_long_is_answered_429_with_retry_after(
    crawling: SchedulerConfig,
) -> None:
    admission = Crawl(max_wait=0.5)
    with SchedulerServer(crawling, admission=admission) as server:
        async with httpx.AsyncClient(base_url=server.url) as raw:
            answers = []
            async with trio.open_nursery() as nursery:

                async def get() -> None:
                    answers.append(await raw.get(f"/v1/objects/{OBJ}/chunks?node=n1"))

                for _ in range(4):
                    nursery.start_soon(get)
        busy = [a for a in answers if a.status_code == 429]
        assert busy, [a.status_code for a in answers]
        assert all(a.status_code in (200, 429) for a in answers)
        answer = busy[0]
        assert answer.json()["kind"] == "SchedulerBusyError"
        assert int(answer.headers["retry-after"]) >= 1
        async with SchedulerClient(server.url) as client:
            errors: list[SchedulerError] = []

            async def ask() -> None:
                try:
                    await client.chunk_map(OBJ, "n1")
                except SchedulerError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(ask)
        assert errors and all(isinstance(e, SchedulerBusyError) for e in errors)
        told = errors[0]
        assert isinstance(told, SchedulerBusyError)
        assert told.status == 429 and told.retry_after is not None
        assert math.isfinite(told.retry_after) and told.retry_after >= 1
