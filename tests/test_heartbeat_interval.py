"""The heartbeat interval the scheduler sets from the cluster's size, and the node timeout
that follows it: a node told to wait longer is not marked down for waiting, one silent
past what it was told is; a restarted scheduler stretches intervals for the nodes it knows
before it has heard from them; a node obeys the interval within its bounds and ignores
values that are no interval; its readiness counts missed heartbeats at the interval in
force."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from fakes import Clock

from syncbit.node.reporter import Reporter, interval_in_force, lookup_in_force
from syncbit.node.status import Status
from syncbit.protocol import MAX_HEARTBEAT_INTERVAL, MAX_LOOKUP_INTERVAL
from syncbit.scheduler.live import JITTER, TIMEOUT_BEATS, Liveness, NodeLive
from syncbit.scheduler.state import open_lmdb_state


class NoJitter(random.Random):
    """Draws the middle of every range: intervals told exactly."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def beat_all(live: Liveness, names: list[str]) -> None:
    for name in names:
        live.beat(name, NodeLive())


NAMES = [f"n{i}" for i in range(10)]


# -- the interval --------------------------------------------------------------------------


def test_the_interval_keeps_all_nodes_together_to_the_rate() -> None:
    clock = Clock(1000.0)
    live = Liveness(10.0, clock, rate=100.0)
    nodes = [f"n{i}" for i in range(1000)]
    beat_all(live, nodes[:50])
    assert live.interval() == pytest.approx(0.5)  # 50 nodes at 100/s: under any node's own
    beat_all(live, nodes)
    assert live.interval() == pytest.approx(10.0)  # 1,000 nodes: each every 10 s
    beat_all(live, nodes)
    told = [live.told(n) for n in nodes]
    # Jittered, so that nodes do not beat in step; on average, the rate.
    assert all(10.0 * (1 - JITTER) <= t <= 10.0 * (1 + JITTER) for t in told)
    assert len(set(told)) > 900
    assert len(nodes) / (sum(told) / len(told)) == pytest.approx(100.0, rel=0.02)
    beat_all(live, [f"m{i}" for i in range(5000)])
    assert live.interval() == MAX_HEARTBEAT_INTERVAL  # 6,000 at 100/s: capped
    assert max(live.told(f"m{i}") for i in range(5000)) <= MAX_HEARTBEAT_INTERVAL


def test_a_rate_that_is_no_positive_number_is_refused() -> None:
    for rate in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="heartbeat rate"):
            Liveness(10.0, Clock(), rate=rate)


# -- liveness with a changing interval -------------------------------------------------------


def test_a_node_told_to_wait_longer_is_not_down_while_it_waits() -> None:
    clock = Clock(1000.0)
    live = Liveness(3.0, clock, rate=1.0, rng=NoJitter())  # 10 nodes at 1/s: every 10 s
    beat_all(live, NAMES)
    clock.now += 2
    beat_all(live, NAMES)
    assert all(live.told(n) == 10.0 for n in NAMES)
    clock.now += 9  # a node told 10 s is not down at 9 s (nor at 3 s, the configured timeout)
    assert live.refresh() == [] and all(live.is_up(n) for n in NAMES)
    clock.now += TIMEOUT_BEATS * 10.0 - 9  # silent for all the beats it may miss: still up
    assert live.refresh() == [] and all(live.is_up(n) for n in NAMES)
    clock.now += 0.5  # silent past its timeout: down
    assert sorted(live.refresh()) == sorted(NAMES)
    assert not any(live.is_up(n) for n in NAMES)


def test_when_the_interval_shrinks_a_node_keeps_the_deadline_it_was_given() -> None:
    clock = Clock(1000.0)
    live = Liveness(3.0, clock, rate=1.0, rng=NoJitter())
    beat_all(live, NAMES)
    beat_all(live, NAMES)  # every node told 10 s
    clock.now += 9
    live.beat("n0", NodeLive())  # told 10 s again: the others are still up
    assert live.told("n0") == 10.0
    clock.now += TIMEOUT_BEATS * 10.0 - 9 + 1  # the others' deadlines pass
    assert sorted(live.refresh()) == NAMES[1:]
    assert live.interval() == 1.0  # one node up now: the interval it asks shrinks...
    clock.now += 5
    assert live.is_up("n0")  # ...yet n0, told 10 s at its last beat, is not down for it
    live.beat("n0", NodeLive())
    assert live.told("n0") == 1.0  # told the short one now, and timed out by it
    clock.now += 3.5  # max(node_timeout 3 s, 5 x 1 s) = 5 s
    assert live.is_up("n0")
    clock.now += 2
    assert live.refresh() == ["n0"]


def test_the_backlog_grace_still_applies_to_a_stretched_timeout() -> None:
    clock = Clock(1000.0)
    live = Liveness(3.0, clock, rate=1.0, rng=NoJitter())
    beat_all(live, NAMES)
    beat_all(live, NAMES)
    live.note_lag(4.0)  # the scheduler's loop ran 4 s late
    clock.now += TIMEOUT_BEATS * 10.0 + 1
    assert live.refresh() == []  # the grace comes on top of the node's own timeout


async def test_lookups_of_parked_prefetches_keep_all_nodes_to_the_lookup_rate(
    tmp_path: Path,
) -> None:
    """Each heartbeat answer tells the node how long to wait between chunk-map lookups for
    its parked prefetches: nodes / lookup_rate, at most MAX_LOOKUP_INTERVAL (every node
    every 0.1 s is 10 x nodes x objects requests a second)."""
    from syncbit.scheduler.api import Api
    from syncbit.scheduler.chunkapi import Call

    async with open_lmdb_state(tmp_path / "s", 10.0, clock=Clock(1000.0)) as state:
        api = Api(state, 4, lambda *_: pytest.fail("no listing"), lookup_rate=2.0)

        async def beat(name: str) -> dict[str, Any]:
            body = json.dumps({"address": "127.0.0.1:1"}).encode()
            answer = await api.call("heartbeat", Call("PUT", ["v1", "nodes", name], {}, body, None))
            doc: dict[str, Any] = json.loads(answer)
            return doc

        assert (await beat("n0"))["lookup_interval"] == pytest.approx(0.5)  # 1 node at 2/s
        for i in range(1, 8):
            await beat(f"n{i}")
        assert (await beat("n0"))["lookup_interval"] == pytest.approx(4.0)  # 8 nodes
        for i in range(8, 100):
            await beat(f"n{i}")
        assert (await beat("n0"))["lookup_interval"] == MAX_LOOKUP_INTERVAL


@pytest.mark.parametrize(
    ("told", "expected"),
    [
        (4.0, 4.0),
        (0, 0.0),
        (-1.0, 0.0),
        (1e9, MAX_LOOKUP_INTERVAL),
        (math.nan, 0.0),
        (math.inf, 0.0),
        ("4", 0.0),
        (True, 0.0),
        (None, 0.0),  # an older scheduler: the fetcher's own poll
    ],
)
def test_the_node_keeps_to_the_lookup_interval_within_bounds(told: Any, expected: float) -> None:
    assert lookup_in_force(told) == expected


async def test_a_restarted_scheduler_stretches_intervals_for_the_nodes_it_knows(
    tmp_path: Path,
) -> None:
    clock = Clock(1000.0)
    nodes = [f"n{i}" for i in range(40)]
    async with open_lmdb_state(tmp_path / "s", 3.0, clock=clock, heartbeat_rate=4.0) as state:
        for name in nodes:
            await state.heartbeat(name, "127.0.0.1:1")
        assert state.live.interval() == 10.0
    # A restart (or a new leader): liveness is soft state, nobody is up yet.
    clock.now += 60
    async with open_lmdb_state(tmp_path / "s", 3.0, clock=clock, heartbeat_rate=4.0) as state:
        assert state.live.up == set()
        await state.heartbeat("n0", "127.0.0.1:1")
        # The first node heard is told to wait as long as if all 40 registered nodes were
        # up (not the 0.25 s that one node up would give), so the nodes it hears from first
        # do not come back every 2 s, all of them, before it has counted them.
        assert state.live.told("n0") >= 10.0 * (1 - JITTER)
        assert state.live.is_up("n0")
        clock.now += 9.0  # told ~10 s: not down at 9 s
        state.tidy()
        assert state.live.is_up("n0")
        # A new leader grants no claim until the nodes had two such intervals to report
        # what they hold again (not the 3 s node timeout: they were told ~10 s).
        assert state.live.reports_due() == 20.0
        # Once every node told by the last instance has had its chance, the nodes up count.
        clock.now += state.live.longest_timeout()
        await state.heartbeat("n0", "127.0.0.1:1")
        assert state.live.interval() == pytest.approx(0.25)
        assert state.live.reports_due() == 3.0


# -- the node --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("told", "expected"),
    [
        (10.0, 10.0),  # obeyed
        (7, 7.0),
        (1.0, 2.0),  # never more often than configured
        (0, 2.0),  # no interval: ignored
        (-5.0, 2.0),
        (math.nan, 2.0),
        (math.inf, 2.0),
        (-math.inf, 2.0),
        (1e300, MAX_HEARTBEAT_INTERVAL),  # never longer than the cap
        (MAX_HEARTBEAT_INTERVAL + 1, MAX_HEARTBEAT_INTERVAL),
        ("10", 2.0),  # not a number
        (True, 2.0),
        (None, 2.0),  # an older scheduler says nothing
        ([10], 2.0),
        ({"s": 10}, 2.0),
    ],
)
def test_the_node_obeys_the_interval_within_bounds(told: Any, expected: float) -> None:
    assert interval_in_force(told, 2.0) == expected


def test_a_node_configured_slower_than_the_cap_keeps_its_own() -> None:
    assert interval_in_force(1e9, 120.0) == 120.0
    assert interval_in_force(5.0, 120.0) == 120.0


class _Answers:
    """The scheduler as the reporter's heartbeat sees it: each answer asks for the next
    interval of `told` (the last repeats); the trio times of the heartbeats."""

    def __init__(self, told: list[Any]) -> None:
        self.told = told
        self.times: list[float] = []

    async def heartbeat(self, node: str, **body: Any) -> dict[str, Any]:
        self.times.append(trio.current_time())
        told = self.told[min(len(self.times), len(self.told)) - 1]
        return {"plan": [], "heartbeat_interval": told, "lookup_interval": 3.5}


class _Quiet:
    """What the heartbeat reads of the node's other parts: nothing to tell."""

    required = False
    token = None
    load = 0

    async def refresh(self, client: Any) -> bool:
        return False

    def usage(self, pinned: Any) -> dict[str, Any]:
        return {"pinned_size": 0, "pinned_over_budget": False, "disk_full": False, "disk_free": 1}

    def cached_bytes(self) -> int:
        return 0

    async def apply_plan(self, plan: list[Any], heard: bool = False) -> None:
        return None

    def warn(self, what: str, exc: Exception) -> None:
        raise AssertionError(f"{what}: {exc}")


class _StatusSeen(Status):
    """The node's real status; what the heartbeat asks of the store, nothing."""

    def pinned(self) -> tuple[int, int]:
        return 0, 0

    def ready_datasets(self) -> dict[str, str]:
        return {}


def _reporter(answers: _Answers, status: Status) -> Reporter:
    quiet: Any = _Quiet()
    return Reporter(
        "n1",
        2.0,
        0,
        "127.0.0.1:1",
        dict,
        answers,  # type: ignore[arg-type]
        quiet,
        (quiet, quiet),
        quiet,
        (quiet, quiet, quiet),
        status,
        quiet,
        quiet,
    )


@pytest.mark.parametrize(
    ("told", "gaps"),
    [
        ([10.0], [10.0, 10.0, 10.0]),
        ([10.0, 4.0], [10.0, 4.0, 4.0]),  # the interval shrinks: the node follows
        ([0, -1, math.nan, 1e9], [2.0, 2.0, 2.0, MAX_HEARTBEAT_INTERVAL]),
    ],
)
def test_the_reporter_waits_as_the_answers_ask(told: list[Any], gaps: list[float]) -> None:
    answers = _Answers(told)

    class _Empty:
        presence: Any = None

        def get(self, object_id: str) -> None:
            return None

    status = _StatusSeen(_Empty(), _Quiet(), 2.0, lambda: True)  # type: ignore[arg-type]
    reporter = _reporter(answers, status)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reporter._heartbeat_loop, nursery)
            await trio.sleep(sum(gaps) + 0.5)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    seen = [b - a for a, b in itertools.pairwise(answers.times)]
    assert seen == pytest.approx(gaps)
    assert reporter.in_force == gaps[-1]
    assert reporter._fetcher.lookup_interval == 3.5  # passed on to the parked prefetches


def test_readiness_counts_missed_heartbeats_at_the_interval_in_force() -> None:
    class _Empty:
        presence: Any = None

        def get(self, object_id: str) -> None:
            return None

    async def main() -> None:
        status = Status(_Empty(), _Quiet(), 2.0, lambda: True)  # type: ignore[arg-type]
        status.heard(20.0)  # the scheduler asked for a heartbeat every 20 s
        await trio.sleep(3 * 2.0 + 6)  # three configured intervals missed: not three told
        assert status.readiness() == (True, "ok")
        await trio.sleep(3 * 20.0 + 5 - 12 - 1)
        assert status.readiness() == (True, "ok")
        await trio.sleep(2)
        ready, why = status.readiness()
        assert not ready and why == "no answer from the scheduler for 66s"
        status.heard(2.0)  # the interval shrank again: three of 2 s count from here
        await trio.sleep(3 * 2.0 + 6)
        assert status.readiness()[0] is False

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
