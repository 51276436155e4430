"""The fetch layer's port to the scheduler: digests and holders of an object's chunks,
claims on source reads, reports of bad peers and disputed chunks. A protocol only; the
node implements it over the scheduler client, tests with a fake.
"""

from __future__ import annotations

from typing import Protocol

from syncbit.protocol import ChunkMap, ClaimResult


class ChunkDirectory(Protocol):
    """Where the fetcher learns digests and holders, claims source reads (so the cluster
    reads each chunk from the source once), and reports bad peers."""

    async def chunk_info(self, object_id: str, max_age: float = ...) -> ChunkMap: ...

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult: ...

    async def release(self, object_id: str, indexes: list[int]) -> None: ...

    async def report_bad_peer(self, peer: str, object_id: str, index: int, reason: str) -> None: ...

    async def report_check(
        self, object_id: str, index: int, digest: str | None, changed: str
    ) -> str: ...
