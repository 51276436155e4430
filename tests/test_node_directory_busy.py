"""A busy scheduler (429, Retry-After) is not asked for chunk maps, claims or releases
again before the time it gave (`node.directory.SchedulerDirectory`)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio

from syncbit.errors import SchedulerBusyError
from syncbit.node.directory import SchedulerDirectory
from syncbit.protocol import ChunkMap, ChunkState, ChunkUpdates, ClaimResult
from syncbit.scheduler.client import SchedulerClient


class BusyScheduler:
    """Answers 429 with Retry-After `wait` while `busy`; counts what it was asked. Its
    chunk maps carry `cursor` ("": no updates to follow)."""

    cursor = ""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.busy = True
        self.asked: list[str] = []

    def _answer(self, what: str) -> None:
        self.asked.append(what)
        if self.busy:
            raise SchedulerBusyError("scheduler busy", retry_after=self.wait)

    async def chunk_map(self, object_id: str, node: str | None = None) -> ChunkMap:
        self._answer("map")
        return ChunkMap(digests={0: "ab" * 32}, cursor=self.cursor)

    async def claim(self, node: str, object_id: str, chunks: list[int], ttl: float) -> ClaimResult:
        self._answer("claim")
        return ClaimResult(granted=chunks)

    async def release(self, node: str, object_id: str, chunks: list[int]) -> None:
        self._answer("release")


def _directory(scheduler: BusyScheduler) -> SchedulerDirectory:
    return SchedulerDirectory(cast(SchedulerClient, cast(Any, scheduler)), "n1")


async def test_nothing_is_asked_again_before_the_retry_after(autojump_clock: Any) -> None:
    scheduler = BusyScheduler(wait=3.0)
    directory = _directory(scheduler)
    with pytest.raises(SchedulerBusyError):
        await directory.claim("o1", [0, 1], 30.0)
    for _ in range(20):  # parked chunks polling every 0.1 s
        await trio.sleep(0.1)
        with pytest.raises(SchedulerBusyError) as info:
            await directory.chunk_info("o1", max_age=0.0)
        assert info.value.retry_after is not None and 0 < info.value.retry_after <= 3.0
        with pytest.raises(SchedulerBusyError):
            await directory.claim("o1", [0], 30.0)
        with pytest.raises(SchedulerBusyError):
            await directory.release("o1", [0])
    assert scheduler.asked == ["claim"] and directory.spared == 60
    scheduler.busy = False
    await trio.sleep(1.1)  # the 3 s are over
    assert (await directory.claim("o1", [0], 30.0)).granted == [0]
    assert scheduler.asked == ["claim", "claim"]


async def test_a_known_map_is_used_however_old_while_the_scheduler_is_busy(
    autojump_clock: Any,
) -> None:
    scheduler = BusyScheduler(wait=5.0)
    scheduler.busy = False
    directory = _directory(scheduler)
    known = await directory.chunk_info("o1")
    scheduler.busy = True
    await trio.sleep(2.0)  # older than its 1 s
    with pytest.raises(SchedulerBusyError):
        await directory.chunk_info("o1")  # asked: the scheduler says busy
    assert await directory.chunk_info("o1") is known  # not asked: the old map
    assert scheduler.asked == ["map", "map"]
    await trio.sleep(5.0)
    scheduler.busy = False
    assert await directory.chunk_info("o1") is not known
    assert scheduler.asked == ["map", "map", "map"]


class EndlessScheduler(BusyScheduler):
    """Answers every page of updates with "more": a bug or a hostile control plane."""

    cursor = "v.0"

    async def updates(
        self, object_id: str, node: str | None = None, cursor: str = ""
    ) -> ChunkUpdates:
        self._answer("updates")
        await trio.sleep(0.01)  # a round trip: without a bound, fail_after would fire
        seq = int(cursor.rpartition(".")[2]) + 1
        return ChunkUpdates(cursor=f"v.{seq}", more=True, chunks={seq: ChunkState()})


async def test_a_scheduler_that_always_says_more_costs_pages_not_a_loop(
    autojump_clock: Any,
) -> None:
    scheduler = EndlessScheduler(wait=1.0)
    scheduler.busy = False
    directory = _directory(scheduler)
    await directory.chunk_info("o1")
    with trio.fail_after(5):
        followed = await directory.chunk_info("o1", max_age=0.0)
    assert scheduler.asked.count("updates") == 16  # one refresh: a bounded number of pages
    assert followed.cursor == "v.16"  # and what it folded holds as of that cursor
    await directory.chunk_info("o1", max_age=0.0)
    assert scheduler.asked.count("updates") == 32 and scheduler.asked.count("map") == 1
