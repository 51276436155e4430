"""The fetch layer's ports: the scheduler (digests and holders of an object's chunks,
claims on source reads, reports of bad peers and disputed chunks) and the peers (a chunk's
bytes from a holder). Protocols only: the node implements them, tests use fakes.
"""

from __future__ import annotations

from typing import Protocol

from syncbit.protocol import ChunkMap, ClaimResult
from syncbit.wire import Abort


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


class ChunkPeers(Protocol):
    """Other nodes' peer services, as the fetch layer asks them for bytes."""

    def get_into(
        self,
        address: str,
        object_id: str,
        offset: int,
        buf: memoryview,
        prefetch: bool = False,
        abort: Abort | None = None,
    ) -> None:
        """Blocking (a worker thread): fill `buf` with the object's bytes at `offset` from
        the peer at `address`. PeerBusyError when a `prefetch` transfer finds no free
        upload slot, PeerError for any other failure (`abort` fired from another thread)."""
        ...
