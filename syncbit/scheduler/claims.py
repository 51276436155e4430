"""Source-fetch claims: which node is fetching which chunk from the source right now.

This is how the cluster fetches each byte from the origin once. Before a node reads a
chunk from the source it claims it here; a second node that wants the same chunk is told
who is fetching it, waits, and takes it from that node once it holds it. Claims live in
memory only: they are leases of seconds, gone when the claimer reports the chunk, releases
it, goes down or lets the lease run out. A scheduler restart forgets them, which costs at
worst one duplicate source read per chunk in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    node: str
    expires: float


class Claims:
    """Leases on (object, chunk) source fetches. Thread-safe; every call is O(chunks asked)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._claims: dict[tuple[str, int], Claim] = {}
        self._by_object: dict[str, set[int]] = {}

    def claim(
        self,
        node: str,
        object_id: str,
        indexes: Iterable[int],
        ttl: float,
        up: AbstractSet[str],
    ) -> tuple[list[int], dict[int, str]]:
        """Grant `node` the chunks nobody else (up, unexpired) is fetching.

        Returns (granted, busy) where busy maps each refused chunk to the claimer. A node
        may renew its own claim."""
        now = self.clock()
        granted: list[int] = []
        busy: dict[int, str] = {}
        with self._lock:
            held = self._by_object.setdefault(object_id, set())
            for index in indexes:
                current = self._claims.get((object_id, index))
                if (
                    current is not None
                    and current.node != node
                    and current.expires > now
                    and current.node in up
                ):
                    busy[index] = current.node
                    continue
                self._claims[(object_id, index)] = Claim(node, now + ttl)
                held.add(index)
                granted.append(index)
        return granted, busy

    def release(self, node: str, object_id: str, indexes: Iterable[int]) -> None:
        """`node` is done with these chunks (it holds them now, or its fetch failed)."""
        with self._lock:
            held = self._by_object.get(object_id)
            if not held:
                return
            for index in indexes:
                current = self._claims.get((object_id, index))
                if current is not None and current.node == node:
                    del self._claims[(object_id, index)]
                    held.discard(index)
            if not held:
                del self._by_object[object_id]

    def active(self) -> int:
        """Claims held now (expired ones included until next looked at)."""
        with self._lock:
            return len(self._claims)

    def fetching(
        self, object_id: str, up: AbstractSet[str], requester: str | None
    ) -> dict[int, str]:
        """Chunks of an object that an up node other than `requester` is fetching now."""
        now = self.clock()
        out: dict[int, str] = {}
        with self._lock:
            for index in list(self._by_object.get(object_id, ())):
                claim = self._claims[(object_id, index)]
                if claim.expires <= now:
                    del self._claims[(object_id, index)]
                    self._by_object[object_id].discard(index)
                elif claim.node != requester and claim.node in up:
                    out[index] = claim.node
        return out
