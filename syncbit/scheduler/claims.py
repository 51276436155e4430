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
is, only who may say it. It runs on the scheduler's trio loop only (no locks), and tells
`on_change` of every chunk whose source reader changed, so chunk updates can say it.
"""

from __future__ import annotations

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
    Every call is O(chunks asked), but an occasional sweep of lapsed rights."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, grace: float = ESTABLISH_GRACE
    ) -> None:
        self.clock = clock
        self.grace = grace
        self._by_object: dict[str, dict[int, Claim]] = {}
        # (object, chunk) -> {node: until}: who may establish the chunk's digest.
        self._rights: dict[tuple[str, int], dict[str, float]] = {}
        self._sweep_at = 0.0
        self._inherited_until = 0.0
        self._settle_until = 0.0
        self.on_change: list[Callable[[str, list[int]], None]] = []

    def inherit(self, settle: float = 0.0) -> None:
        """This state succeeds another scheduler's (a new leader's term): the grants it
        made are unknown here, yet nodes are reading what it granted and will report it.
        For the grace period, a chunk nobody claims here may be established by the node
        that reports it: no more than that node would get by claiming the chunk first,
        which is what it did, from the predecessor. For the first `settle` seconds no
        claim is granted (`settling`): the nodes report again what they hold and read
        first, so that nobody reads those chunks from the source a second time."""
        now = self.clock()
        self._inherited_until = now + self.grace
        self._settle_until = now + settle

    def settling(self) -> bool:
        """Whether claims wait for the nodes' reports (see `inherit`)."""
        return self.clock() < self._settle_until

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
        self._sweep(now)
        granted: list[int] = []
        busy: dict[int, str] = {}
        held = self._by_object.setdefault(object_id, {})
        changed: list[int] = []
        for index in indexes:
            current = held.get(index)
            if (
                current is not None
                and current.node != node
                and current.expires > now
                and current.node in up
            ):
                busy[index] = current.node
                continue
            if current is None or current.node != node:
                changed.append(index)
            held[index] = Claim(node, now + ttl)
            granted.append(index)
            if establish:
                self._rights.setdefault((object_id, index), {})[node] = now + ttl + self.grace
        if not held:
            del self._by_object[object_id]
        self._tell(object_id, changed)
        return granted, busy

    def release(self, node: str, object_id: str, indexes: Iterable[int]) -> None:
        """`node` is done with these chunks (it reported them, or its fetch failed): its
        claims end and so does its right to establish them."""
        held = self._by_object.get(object_id, {})
        changed: list[int] = []
        for index in indexes:
            key = (object_id, index)
            rights = self._rights.get(key)
            if rights is not None and rights.pop(node, None) is not None and not rights:
                del self._rights[key]
            current = held.get(index)
            if current is not None and current.node == node:
                del held[index]
                changed.append(index)
        if object_id in self._by_object and not held:
            del self._by_object[object_id]
        self._tell(object_id, changed)

    def may_establish(self, node: str, object_id: str, indexes: Iterable[int]) -> set[int]:
        """The chunks among `indexes` whose digest `node` may establish now."""
        now = self.clock()
        inherited = now < self._inherited_until
        held = self._by_object.get(object_id, {})
        allowed: set[int] = set()
        for index in indexes:
            rights = self._rights.get((object_id, index), {})
            claim = held.get(index)
            unclaimed = claim is None or claim.expires <= now
            if rights.get(node, 0.0) > now or (inherited and unclaimed):
                allowed.add(index)
        return allowed

    def active(self) -> int:
        """Claims held now (expired ones included until next looked at)."""
        return sum(len(held) for held in self._by_object.values())

    def rights(self) -> int:
        """Establish rights held now (lapsed ones included until the next sweep)."""
        return sum(len(r) for r in self._rights.values())

    def fetching(
        self, object_id: str, up: AbstractSet[str], requester: str | None
    ) -> dict[int, str]:
        """Chunks of an object that an up node other than `requester` is fetching now."""
        self.expire(object_id)
        return {
            index: claim.node
            for index, claim in self._by_object.get(object_id, {}).items()
            if claim.node != requester and claim.node in up
        }

    def reader(self, object_id: str, index: int) -> str | None:
        """Who holds the (unexpired, as of the last `expire`) claim on one chunk."""
        claim = self._by_object.get(object_id, {}).get(index)
        return None if claim is None else claim.node

    def claimed(self, object_id: str) -> list[int]:
        return sorted(self._by_object.get(object_id, ()))

    def expire(self, object_id: str) -> float | None:
        """Drop the object's lapsed claims (told as changes); when the next one lapses."""
        held = self._by_object.get(object_id)
        if not held:
            return None
        now = self.clock()
        lapsed = [index for index, claim in held.items() if claim.expires <= now]
        for index in lapsed:
            del held[index]
        if not held:
            del self._by_object[object_id]
        self._tell(object_id, lapsed)
        return min((c.expires for c in held.values()), default=None)

    def of_node(self, node: str) -> dict[str, list[int]]:
        """The chunks `node` claims, by object (when it goes down, they stop counting)."""
        return {
            object_id: [i for i, c in held.items() if c.node == node]
            for object_id, held in self._by_object.items()
            if any(c.node == node for c in held.values())
        }

    def _tell(self, object_id: str, indexes: list[int]) -> None:
        if indexes:
            for hook in self.on_change:
                hook(object_id, indexes)

    def _sweep(self, now: float) -> None:
        """Drop lapsed rights now and then: nodes that never report."""
        if now < self._sweep_at:
            return
        self._sweep_at = now + _SWEEP_EVERY
        for key in list(self._rights):
            rights = self._rights[key]
            for node in [n for n, until in rights.items() if until <= now]:
                del rights[node]
            if not rights:
                del self._rights[key]


__all__ = ["ESTABLISH_GRACE", "Claim", "Claims"]
