"""The fetch layer's view of the scheduler (`ChunkDirectory`): chunk digests and holders,
cached briefly and asked once per object however many workers want them; claims and
reports pass through. An object's whole chunk map is asked for once; after that the map
follows the scheduler's updates since its cursor (only the chunks whose answer changed,
each bounded by K), so a refresh costs what changed, never the object's size again.

A scheduler that answered "busy" (429, Retry-After) is not asked for maps, claims or
releases again before the time it gave: until then a map comes from the cache however
old, else the fetch layer hears "busy" at once (a prefetch parks, a read goes to the
source as it would without an answer). Every parked chunk re-asking every 0.1 s is what
a scheduler holding requests cannot afford. Never decides anything itself; trio thread
only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from syncbit.errors import SchedulerBusyError
from syncbit.scheduler.client import ChunkMap, ClaimResult, SchedulerClient

_CHUNK_INFO_TTL = 1.0  # seconds a chunk map is reused
_MAX_QUIET = 60.0  # seconds one busy answer may keep this node from asking
_MAX_PAGES = 16  # pages of updates one refresh asks for at most (4,096 chunks each)
T = TypeVar("T")


class SchedulerDirectory:
    """The fetcher's view of the scheduler: chunk digests and holders, cached briefly and
    fetched once per object however many workers ask at the same time."""

    def __init__(self, client: SchedulerClient, node: str) -> None:
        self.client = client
        self.node = node
        self._cache: dict[str, tuple[float, ChunkMap]] = {}
        self._pending: dict[str, trio.Event] = {}
        self._quiet_until = -1.0  # trio time before which a busy scheduler is not asked
        self.spared = 0  # requests not sent because the scheduler said it was busy

    def _quiet(self) -> SchedulerBusyError | None:
        """The error to answer with while the scheduler's Retry-After runs, else None."""
        left = self._quiet_until - trio.current_time()
        if left <= 0:
            return None
        self.spared += 1
        return SchedulerBusyError(
            f"the scheduler is busy: not asked again for {left:.1f}s", retry_after=left
        )

    async def _ask(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except SchedulerBusyError as exc:
            wait = min(_MAX_QUIET, max(0.0, exc.retry_after or 1.0))
            self._quiet_until = max(self._quiet_until, trio.current_time() + wait)
            raise

    async def chunk_info(self, object_id: str, max_age: float = _CHUNK_INFO_TTL) -> ChunkMap:
        while True:
            cached = self._cache.get(object_id)
            if cached and cached[0] + max_age > trio.current_time():
                return cached[1]
            if (busy := self._quiet()) is not None:
                if cached:
                    return cached[1]  # old, but holders rarely stop holding
                raise busy
            pending = self._pending.get(object_id)
            if pending is None:
                break
            await pending.wait()
        event = self._pending[object_id] = trio.Event()
        try:
            asked = trio.current_time()
            known = cached[1] if cached else None
            info = await self._follow(object_id, known)
            self._cache[object_id] = (asked, info)
            return info
        finally:
            del self._pending[object_id]
            event.set()

    async def _follow(self, object_id: str, known: ChunkMap | None) -> ChunkMap:
        """`known` brought up to date with the changes since its cursor (in place: callers
        only read it between awaits), else the whole map asked afresh."""
        if known is None or not known.cursor:
            return await self._ask(lambda: self.client.chunk_map(object_id, self.node))
        for _ in range(_MAX_PAGES):
            ask = functools.partial(self.client.updates, object_id, self.node, known.cursor)
            page = await self._ask(ask)
            known.apply(page)  # a reset (another scheduler's cursor) starts it over
            if not page.more:
                break
        # Else what the map says is true as of its cursor, and the next refresh goes on
        # from there: a scheduler that always says "more" costs pages, never a loop.
        return known

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult:
        if (busy := self._quiet()) is not None:
            raise busy
        return await self._ask(lambda: self.client.claim(self.node, object_id, indexes, ttl))

    async def release(self, object_id: str, indexes: list[int]) -> None:
        if (busy := self._quiet()) is not None:
            raise busy  # the claims lapse on their own (their TTL)
        await self._ask(lambda: self.client.release(self.node, object_id, indexes))

    async def report_bad_peer(self, peer: str, object_id: str, index: int, reason: str) -> None:
        await self.client.report_bad_peer(self.node, peer, object_id, index, reason)
        # Asked again next time: the scheduler offers another holder in its place, and the
        # updates since the map's cursor say so.
        cached = self._cache.get(object_id)
        if cached is not None:
            self._cache[object_id] = (-math.inf, cached[1])

    async def report_check(
        self, object_id: str, index: int, digest: str | None, changed: str
    ) -> str:
        self.forget(object_id)  # the chunk is disputed now: no stale peers
        return await self.client.check(self.node, object_id, index, digest, changed)

    def forget(self, object_id: str) -> None:
        """Ask the scheduler afresh next time (what it said of the object changed)."""
        self._cache.pop(object_id, None)
