"""Peer choice: the small, pluggable policy that orders the nodes holding a chunk.

Owns only the ranking of the candidates it is handed; it never reads scheduler state and
never filters candidates (liveness, trust and "not the requester" are decided before it
is called). The scheduler offers at most K holders per chunk (`holders.Holders`): this
policy picks them when there is a choice, and orders them for every answer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """What the policy sees of a node (a `NodeInfo` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def load(self) -> int: ...

    @property
    def reports(self) -> int: ...


C = TypeVar("C", bound=Candidate)


class PeerPolicy(Protocol):
    """Orders the candidate holders of one chunk, best first: by `key`, lower first;
    candidates with equal keys in random order, so that equally good peers share the
    chunks of an object instead of one of them serving them all (spread)."""

    @property
    def rng(self) -> random.Random: ...

    def key(self, candidate: Candidate) -> tuple[int, ...]:
        """The candidate's rank as a sort key (computed once per node per answer)."""
        ...

    def rank(self, candidates: Sequence[C]) -> list[C]:
        """Return the same nodes in the order a fetcher should try them."""
        ...


class LeastLoaded:
    """Lowest load (transfers in progress) first, then fewest bad-peer reports; ties at
    random on every call."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def key(self, candidate: Candidate) -> tuple[int, ...]:
        return (candidate.load, candidate.reports)

    def rank(self, candidates: Sequence[C]) -> list[C]:
        if len(candidates) < 2:
            return list(candidates)
        rnd = self.rng.random
        return sorted(candidates, key=lambda n: (*self.key(n), rnd()))


__all__ = ["Candidate", "LeastLoaded", "PeerPolicy"]
