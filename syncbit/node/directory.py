"""The fetch layer's view of the scheduler (`ChunkDirectory`): chunk digests and holders,
cached briefly and asked once per object however many workers want them; claims and
reports pass through. Never decides anything itself; trio thread only.
"""

from __future__ import annotations

import trio

from syncbit.scheduler.client import ChunkMap, ClaimResult, SchedulerClient

_CHUNK_INFO_TTL = 1.0  # seconds a chunk map is reused


class SchedulerDirectory:
    """The fetcher's view of the scheduler: chunk digests and holders, cached briefly and
    fetched once per object however many workers ask at the same time."""

    def __init__(self, client: SchedulerClient, node: str) -> None:
        self.client = client
        self.node = node
        self._cache: dict[str, tuple[float, ChunkMap]] = {}
        self._pending: dict[str, trio.Event] = {}

    async def chunk_info(self, object_id: str, max_age: float = _CHUNK_INFO_TTL) -> ChunkMap:
        while True:
            cached = self._cache.get(object_id)
            if cached and cached[0] + max_age > trio.current_time():
                return cached[1]
            pending = self._pending.get(object_id)
            if pending is None:
                break
            await pending.wait()
        event = self._pending[object_id] = trio.Event()
        try:
            info = await self.client.chunk_map(object_id, self.node)
            self._cache[object_id] = (trio.current_time(), info)
            return info
        finally:
            del self._pending[object_id]
            event.set()

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult:
        return await self.client.claim(self.node, object_id, indexes, ttl)

    async def release(self, object_id: str, indexes: list[int]) -> None:
        await self.client.release(self.node, object_id, indexes)

    async def report_bad_peer(self, peer: str, object_id: str, index: int, reason: str) -> None:
        self._cache.pop(object_id, None)
        await self.client.report_bad_peer(self.node, peer, object_id, index, reason)

    async def report_check(
        self, object_id: str, index: int, digest: str | None, changed: str
    ) -> str:
        self.forget(object_id)  # the chunk is disputed now: no stale peers
        return await self.client.check(self.node, object_id, index, digest, changed)

    def forget(self, object_id: str) -> None:
        """Ask the scheduler afresh next time (what it said of the object changed)."""
        self._cache.pop(object_id, None)
