"""Peer choice: the small, pluggable policy that orders the nodes holding a chunk.

Owns only the ranking of candidates it is handed; it never reads scheduler state, never
filters candidates (liveness and "not the requester" are decided before it is called).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from syncbit.scheduler.state import NodeInfo


class PeerPolicy(Protocol):
    """Orders the candidate holders of one chunk, best first."""

    def rank(self, candidates: list[NodeInfo]) -> list[NodeInfo]:
        """Return the same nodes in the order a fetcher should try them."""
        ...


class LeastLoaded:
    """Lowest load (transfers in progress) first, then fewest bad-peer reports.

    Ties are broken at random on every call, so equally loaded peers share the chunks of
    one object instead of the first one by name serving them all.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def rank(self, candidates: list[NodeInfo]) -> list[NodeInfo]:
        if len(candidates) < 2:
            return list(candidates)
        rnd = self._rng.random
        return sorted(candidates, key=lambda n: (n.load, n.reports, rnd()))
