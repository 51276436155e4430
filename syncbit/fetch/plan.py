"""Who reads the source: a named policy per prefetch gives each chunk one reader in the
cluster; from the running plans, how many source reads this node runs at once and which
chunk planned elsewhere it takes over. Pure: no I/O, no waiting, no queueing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from syncbit.fetch.flight import Flight, State
from syncbit.protocol import ChunkMap


class SourcePlan(Protocol):
    """A named policy: which member of a prefetch reads each chunk from the source."""

    name: str

    @property
    def sharers(self) -> int:
        """How many nodes share the source reads."""
        ...

    def may_source(self, position: int) -> bool:
        """Whether this node reads the chunk at `position` (across the dataset) itself."""
        ...


@dataclass(eq=False)
class RoundRobin:
    """Chunk k of the dataset, counted across its files in manifest order, belongs to
    member k mod N (members sorted): the origin sends each byte about once however many
    nodes prefetch. `share` (index, count), when the scheduler gives one, says the same
    without naming the members (it stops naming them in large clusters): this node reads
    the chunks k with k mod count == index. With neither, or when this node is not a
    member, it reads anything."""

    node: str
    members: list[str] = field(default_factory=list)
    name: str = "round-robin"
    share: tuple[int, int] | None = None

    @property
    def sharers(self) -> int:
        if self.share is not None:
            return max(1, self.share[1])
        return max(1, len(self.members))

    def may_source(self, position: int) -> bool:
        if self.share is not None:
            index, count = self.share
            return position % count == index
        members = self.members
        if not members or self.node not in members:
            return True
        return members[position % len(members)] == self.node


class Plans:
    """The plans of the prefetches running on this node (their jobs add and remove them)."""

    def __init__(self) -> None:
        self._plans: set[SourcePlan] = set()

    def add(self, plan: SourcePlan) -> None:
        self._plans.add(plan)

    def discard(self, plan: SourcePlan) -> None:
        self._plans.discard(plan)

    def sharers(self) -> int:
        """Nodes sharing the source reads: the largest running plan's (1 with none)."""
        return max((p.sharers for p in self._plans), default=1)


def source_limit(concurrency: int, sharers: int, streams: int = 1) -> int:
    """Prefetch source reads at once on this node: the `streams` the sources in use take
    now (adapted to what they deliver; each read still waits for its own source's limit),
    or about `concurrency / 2`, whichever is more, shared across the whole plan, at least
    one per node. Peers can forward a chunk only once it is complete, and streams that
    share the origin's link each run slower: with many streams per node the origin's last
    chunks all land at once, each on one holder the other nodes queue on."""
    budget = max(1, concurrency // 2, streams)
    return max(1, -(-budget // max(1, sharers)))


def takeover(parked: Mapping[int, Flight], info: ChunkMap) -> Flight | None:
    """Once this node's share of a prefetch's source reads is done: the parked chunk
    planned for another node that nobody holds or reads yet, the last such chunk (owners
    read their share from the front), or None. Nodes finish their shares seconds apart,
    and the origin's link is the swarm's scarcest: it must not wait on the slowest node's
    last reads. The claim still gives each chunk one reader."""
    best: Flight | None = None
    for index, flight in parked.items():
        if (
            flight.may_source is not None
            and flight.state is State.PARKED
            and not info.peers.get(index)
            and index not in info.fetching
            and (best is None or index > best.index)
        ):
            best = flight
    return best
