"""Source-fetch claims: which node is fetching which chunk from the source right now, and
which node may establish a chunk's digest.

This is how the cluster fetches each byte from the origin once. Before a node reads a
chunk from the source it claims it here; a second node that wants the same chunk is told
who is fetching it, waits, and takes it from that node once it holds it. Claims live in
memory only: they are leases of seconds, gone when the claimer reports the chunk, releases
it, goes down or lets the lease run out. A scheduler restart forgets them, which costs at
worst one duplicate source read per chunk in flight.

A grant also gives the node the *right to establish* the chunk's digest: the first digest
the cluster records for a chunk must come from a node that read the source because the
scheduler told it to (see `SchedulerState.add_chunks`). The right outlives the lease by a
grace period, so a slow source read or a slow disk is not refused when it reports; it ends
when the node reports the chunk or releases it. This module never decides what a digest
is, only who may say it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

ESTABLISH_GRACE = 300.0
"""Seconds after a claim's lease ends that its node may still establish the chunk's digest:
a source read granted with a 60 s lease may take minutes under load before it reaches the
disk, the index and the next chunk report."""

_SWEEP_EVERY = 30.0  # seconds between sweeps of lapsed establish rights


@dataclass(frozen=True)
class Claim:
    node: str
    expires: float


class Claims:
    """Leases on (object, chunk) source fetches and the establish rights they carry.
    Thread-safe; every call is O(chunks asked) but an occasional sweep of lapsed rights."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, grace: float = ESTABLISH_GRACE
    ) -> None:
        self.clock = clock
        self.grace = grace
        self._lock = threading.Lock()
        self._claims: dict[tuple[str, int], Claim] = {}
        self._by_object: dict[str, set[int]] = {}
        # (object, chunk) -> {node: until}: who may establish the chunk's digest.
        self._rights: dict[tuple[str, int], dict[str, float]] = {}
        self._sweep_at = 0.0

    def claim(
        self,
        node: str,
        object_id: str,
        indexes: Iterable[int],
        ttl: float,
        up: AbstractSet[str],
        establish: bool = True,
    ) -> tuple[list[int], dict[int, str]]:
        """Grant `node` the chunks nobody else (up, unexpired) is fetching.

        Returns (granted, busy) where busy maps each refused chunk to the claimer. A node
        may renew its own claim. Each granted chunk may then be established by `node`
        (unless `establish` is False: a quarantined node still reads for its own readers,
        but its word is not recorded)."""
        now = self.clock()
        granted: list[int] = []
        busy: dict[int, str] = {}
        with self._lock:
            self._sweep(now)
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
                if establish:
                    rights = self._rights.setdefault((object_id, index), {})
                    rights[node] = now + ttl + self.grace
            if not held:
                del self._by_object[object_id]
        return granted, busy

    def release(self, node: str, object_id: str, indexes: Iterable[int]) -> None:
        """`node` is done with these chunks (it reported them, or its fetch failed): its
        claims end and so does its right to establish them."""
        with self._lock:
            held = self._by_object.get(object_id)
            for index in indexes:
                key = (object_id, index)
                rights = self._rights.get(key)
                if rights is not None and rights.pop(node, None) is not None and not rights:
                    del self._rights[key]
                current = self._claims.get(key)
                if held is not None and current is not None and current.node == node:
                    del self._claims[key]
                    held.discard(index)
            if held is not None and not held:
                del self._by_object[object_id]

    def may_establish(self, node: str, object_id: str, indexes: Iterable[int]) -> set[int]:
        """The chunks among `indexes` whose digest `node` may establish now."""
        now = self.clock()
        allowed: set[int] = set()
        with self._lock:
            for index in indexes:
                rights = self._rights.get((object_id, index))
                if rights is not None and rights.get(node, 0.0) > now:
                    allowed.add(index)
        return allowed

    def active(self) -> int:
        """Claims held now (expired ones included until next looked at)."""
        with self._lock:
            return len(self._claims)

    def rights(self) -> int:
        """Establish rights held now (lapsed ones included until the next sweep)."""
        with self._lock:
            return sum(len(r) for r in self._rights.values())

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
            if object_id in self._by_object and not self._by_object[object_id]:
                del self._by_object[object_id]
        return out

    def _sweep(self, now: float) -> None:
        """Drop lapsed rights now and then (under the lock): nodes that never report."""
        if now < self._sweep_at:
            return
        self._sweep_at = now + _SWEEP_EVERY
        for key in list(self._rights):
            rights = self._rights[key]
            for node in [n for n, until in rights.items() if until <= now]:
                del rights[node]
            if not rights:
                del self._rights[key]
