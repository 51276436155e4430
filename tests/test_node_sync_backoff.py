"""A node whose dataset sync keeps failing while the scheduler's generation moved asks
less and less often, and never sooner than a busy scheduler's Retry-After: thousands of
nodes asking again every second would keep a busy scheduler busy (virtual clock)."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import trio
import trio.testing

from syncbit.errors import SchedulerBusyError
from syncbit.node.logs import Throttled
from syncbit.node.sync import Sync


class Polled:
    """A fake scheduler's node poll (`wait_change`) from its `wait_generation`: an older
    scheduler's answer, the generation alone."""

    async def wait_generation(self, after: int, timeout: float) -> int:
        raise NotImplementedError

    async def wait_change(self, after: int, timeout: float, node: str) -> dict[str, Any]:
        return {"generation": await self.wait_generation(after, timeout)}


class BusyScheduler(Polled):
    """The generation moved (5), and every dataset listing is answered 429."""

    def __init__(self, retry_after: float | None) -> None:
        self.retry_after = retry_after
        self.listings: list[float] = []

    async def wait_generation(self, after: int, timeout: float) -> int:
        await trio.sleep(0)
        return 5

    async def datasets(self) -> dict[str, Any]:
        self.listings.append(trio.current_time())
        raise SchedulerBusyError("the scheduler is busy", retry_after=self.retry_after)


def _sync(tmp_path: Path, client: object) -> Sync:
    """A node's dataset sync against `client`, nothing else of the node behind it."""
    nothing: Any = None
    return Sync(
        "n1",
        tmp_path,
        cast(Any, client),
        nothing,
        nothing,
        nothing,
        nothing,
        nothing,
        nothing,
        Throttled(),
    )


async def _run_loop(tmp_path: Path, client: object, seconds: float, generation: int = -1) -> None:
    """A node's dataset loop against `client` for `seconds`, from `generation` on."""
    sync = _sync(tmp_path, client)
    sync._generation = generation
    with trio.move_on_after(seconds):
        await sync.dataset_loop()


async def _listings(tmp_path: Path, retry_after: float | None, seconds: float) -> list[float]:
    client = BusyScheduler(retry_after)
    await _run_loop(tmp_path, client, seconds)
    return client.listings


async def test_a_busy_scheduler_is_asked_again_after_its_retry_after(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    times = await _listings(tmp_path, 7.0, 120.0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps and min(gaps) >= 7.0
    assert len(times) <= 120 / 7 + 1


async def test_failing_syncs_are_tried_less_and_less_often(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    times = await _listings(tmp_path, None, 600.0)
    # 1 s at first, doubling (full jitter) up to 30 s: a few dozen in 10 minutes, where
    # one a second would be 600.
    assert 10 <= len(times) <= 80
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1.0
    assert max(gaps[-10:]) > 5.0


class QuietScheduler(Polled):
    """Nothing changes: every long poll runs its time (`wait`; 0: answers at once) and
    answers the generation the node has (7); the listing says so too."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.polls = 0
        self.listings: list[float] = []

    async def wait_generation(self, after: int, timeout: float) -> int:
        self.polls += 1
        await trio.sleep(min(self.wait, timeout))
        return 7

    async def datasets(self) -> dict[str, Any]:
        self.listings.append(trio.current_time())
        return {"generation": 7, "datasets": []}


async def _quiet(tmp_path: Path, client: QuietScheduler, seconds: float) -> None:
    await _run_loop(tmp_path, client, seconds, generation=7)  # synced before: it stays so


async def test_a_poll_that_times_out_unchanged_lists_nothing_but_a_resync_now_and_then(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    client = QuietScheduler(wait=25.0)
    await _quiet(tmp_path, client, 700.0)
    # A poll every 25 s, and a listing only every 300 s (not after each of ~28 polls).
    assert client.polls >= 25
    assert len(client.listings) == 2 and client.listings[0] >= 300.0
    assert client.listings[1] - client.listings[0] >= 300.0


async def test_a_scheduler_answering_at_once_unchanged_is_not_asked_in_a_tight_loop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    client = QuietScheduler(wait=0.0)
    await _quiet(tmp_path, client, 60.0)
    assert client.polls <= 60  # at least 0.5-5 s apart, not thousands


class ChangingScheduler(Polled):
    """Each long poll waits 1 s, then says the generation moved (6); the listing names
    dataset "d" at revision "r2"."""

    def __init__(self) -> None:
        self.listings = 0

    async def wait_generation(self, after: int, timeout: float) -> int:
        await trio.sleep(1.0)
        return 6

    async def datasets(self) -> dict[str, Any]:
        self.listings += 1
        raise SchedulerBusyError("not now", retry_after=30)  # the listing is not the point


async def test_a_heartbeats_plan_leaves_the_sync_to_a_following_long_poll(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A plan that names a manifest this node lacks needs a listing first; but when it
    came with a heartbeat while the long poll follows the scheduler, that poll was woken
    by the same change and brings it at the scheduler's pace (heartbeat answers are not
    paced: 5,000 nodes syncing from them at once held its loop a second behind)."""
    client = ChangingScheduler()
    sync = _sync(tmp_path, client)
    plan = {"d": {"dataset": "d", "revision": "r2", "members": []}}
    assert sync.needs_sync(plan, heard=True)  # no long poll answered yet: sync now
    assert sync.needs_sync(plan, heard=False)
    with trio.move_on_after(1.5):
        await sync.dataset_loop()  # one poll answered at the scheduler's pace
    assert sync.following
    assert not sync.needs_sync(plan, heard=True)
    assert sync.needs_sync(plan, heard=False)  # the poll's own plan refresh does sync
    assert not sync.needs_sync({}, heard=False)  # nothing assigned: nothing to list


class CarryingScheduler:
    """The first poll moves the generation to 9 and carries the listing and the node's
    plan; later polls run their time unchanged. Counts what the node asks besides."""

    def __init__(self) -> None:
        self.polls: list[tuple[int, str]] = []
        self.asked: list[str] = []
        self.carried = [{"dataset": "d", "revision": "r1", "index": 0, "count": 1}]

    async def wait_change(self, after: int, timeout: float, node: str) -> dict[str, Any]:
        self.polls.append((after, node))
        if after == 9:
            await trio.sleep(timeout)
            return {"generation": 9}
        await trio.sleep(0.5)
        listing = [{"name": "d", "revision": "r1"}]
        return {"generation": 9, "datasets": listing, "plan": self.carried}

    async def datasets(self) -> dict[str, Any]:
        self.asked.append("datasets")
        return {"generation": 9, "datasets": []}

    async def plan(self, node: str) -> dict[str, Any]:
        self.asked.append("plan")
        return {"generation": 9, "plan": []}

    async def manifest(self, name: str) -> Any:
        self.asked.append(f"manifest {name}")
        raise SchedulerBusyError("not now", retry_after=1)


async def test_a_poll_that_carries_the_listing_and_plan_is_not_followed_by_either(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """At every change each node asked for the listing and its plan after its poll: two
    requests per node that the scheduler now answers with the poll itself."""
    client = CarryingScheduler()
    sync = _sync(tmp_path, client)
    applied: list[list[dict[str, Any]]] = []

    async def apply_plan(plan: list[dict[str, Any]], heard: bool = False) -> None:
        applied.append(plan)

    sync.apply_plan = apply_plan  # type: ignore[method-assign]  # what it is given
    sync._learn_broken = lambda *_: None  # type: ignore[method-assign]
    manifest = SimpleNamespace(revision="r1", source="file:///data")
    sync.manifests = {"d": cast(Any, manifest)}  # the manifest is here: nothing to fetch
    sync._follow_jobs = lambda wanted: None  # type: ignore[method-assign]
    with trio.move_on_after(30.0):
        await sync.dataset_loop()
    assert client.polls[0] == (-1, "n1") and client.polls[1] == (9, "n1")
    assert client.asked == []  # neither the listing nor the plan asked for
    assert applied == [client.carried]
    assert sync._generation == 9
