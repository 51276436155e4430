"""Prefetch plans: which datasets each node must hold, and its share of their source reads.

Owns the assignment of nodes to datasets (targets matched against the nodes' labels) and,
per dataset, its members: the assigned nodes that are up and trusted, sorted. Members
split the source reads by position (the chunk at position p is read by member p % count),
so the origin sends each byte about once whatever the cluster's size. A node's plan entry
carries its index and the count, and the names only while there are few (`PlanEntry`):
an answer's size never grows with the cluster.

Cost: built from scratch when the generation moves (datasets, targets, operator labels,
quarantine), in O(nodes x targets) for that generation; kept current in O(its datasets x
log n) when one node registers, changes its own labels, comes up or goes down. It never
reads or writes storage.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from syncbit.protocol import MAX_PLAN_MEMBERS, PlanEntry
from syncbit.scheduler.facts import Facts
from syncbit.scheduler.records import effective_labels, matches


class Planner:
    """Assignments and members from `facts`; `eligible(node)`: up and not quarantined."""

    def __init__(self, facts: Facts, eligible: Callable[[str], bool]) -> None:
        self.facts = facts
        self.eligible = eligible
        self.assigned: dict[str, set[str]] = {}
        self.members: dict[str, list[str]] = {}
        self.of_node: dict[str, list[str]] = {}
        self._built_for: int | None = None

    def current(self) -> Planner:
        """Rebuilt if the generation moved since the last build."""
        if self._built_for != self.facts.generation:
            self._rebuild()
        return self

    def _rebuild(self) -> None:
        self._built_for = self.facts.generation
        self.assigned = {name: set() for name in self._planned()}
        self.members = {name: [] for name in self.assigned}
        self.of_node = {}
        for node in self.facts.nodes:
            self._assign(node)

    def _planned(self) -> list[str]:
        return sorted(d for d in self.facts.targets if d in self.facts.datasets)

    def _assign(self, node: str) -> None:
        record = self.facts.nodes.get(node)
        if record is None:
            return
        labels = effective_labels(record.labels, record.label_overrides)
        datasets = [
            name
            for name in self.assigned
            if any(matches(t, node, labels) for t in self.facts.targets.get(name, []))
        ]
        if not datasets:
            return
        self.of_node[node] = datasets
        eligible = self.eligible(node)
        for name in datasets:
            self.assigned[name].add(node)
            if eligible:
                bisect.insort(self.members[name], node)

    def node_changed(self, node: str) -> None:
        """`node` registered or its own labels changed: its assignments are made again."""
        if self._built_for != self.facts.generation:
            return  # the next look rebuilds everything anyway
        for name in self.of_node.pop(node, []):
            self.assigned[name].discard(node)
            _remove(self.members[name], node)
        self._assign(node)

    def eligibility(self, node: str, eligible: bool) -> None:
        """`node` came up or went down (or trust changed): members follow."""
        if self._built_for != self.facts.generation:
            return
        for name in self.of_node.get(node, []):
            if eligible:
                if not _contains(self.members[name], node):
                    bisect.insort(self.members[name], node)
            else:
                _remove(self.members[name], node)

    def plan(self, node: str) -> list[PlanEntry]:
        """`node`'s entries: its assigned datasets, their revisions, its share of reads."""
        self.current()
        entries: list[PlanEntry] = []
        for name in self.of_node.get(node, []):
            members = self.members[name]
            index = bisect.bisect_left(members, node)
            inside = _contains(members, node)
            count = len(members) + (0 if inside else 1)
            names: tuple[str, ...] = ()
            if count <= MAX_PLAN_MEMBERS:
                names = tuple(members if inside else [*members[:index], node, *members[index:]])
            revision = self.facts.datasets[name].summary["revision"]
            entries.append(PlanEntry(name, revision, index, count, names))
        return entries


def _contains(members: list[str], node: str) -> bool:
    index = bisect.bisect_left(members, node)
    return index < len(members) and members[index] == node


def _remove(members: list[str], node: str) -> None:
    index = bisect.bisect_left(members, node)
    if index < len(members) and members[index] == node:
        del members[index]


__all__ = ["Planner"]
