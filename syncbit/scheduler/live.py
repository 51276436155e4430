"""Liveness and what nodes say of themselves on each heartbeat: in memory only.

Owns each node's last heartbeat, load, cache figures, ready datasets, disk state and the
count of bad-peer reports against it, and the set of nodes up now: a heartbeat within
`timeout` seconds of the injected clock. Down transitions are found from a heap of expiry
times in O(log n) per heartbeat, whenever anyone looks (`refresh`), and each transition is
told to the listeners once. Nothing here is durable: a restarted scheduler learns it all
again within one heartbeat interval. It never writes storage.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

LAG_TURNS = 3  # turns of the loop one request waits through (read, handle, answer)
LAG_FLOOR = 1.0  # seconds; a loop later than this is behind (less is a busy machine)


@dataclass
class NodeLive:
    """One node's soft state, as its last heartbeat said (`reports` is counted here)."""

    last_seen: float = 0.0
    load: int = 0
    cache_bytes: int = 0
    cache_size: int = 0
    ready: dict[str, str] = field(default_factory=dict)
    pinned_bytes: int = 0
    pinned_over_budget: bool = False
    disk_full: bool = False
    disk_free: int = 0
    reports: int = 0


class Liveness:
    """Which nodes are up, from heartbeats (see the module docstring)."""

    def __init__(self, timeout: float, clock: Callable[[], float]) -> None:
        self.timeout = timeout
        self.clock = clock
        self.nodes: dict[str, NodeLive] = {}
        self.up: set[str] = set()
        # Called with (node, up) once per transition, in the order they happen.
        self.on_change: list[Callable[[str, bool], None]] = []
        self._expiry: list[tuple[float, str]] = []  # (last_seen + timeout, node); stale ok
        # Counters that kept answers (`chunkmaps`) compare: `changes` moves whenever who
        # may be offered or how they rank may have changed (a transition, a bad-peer
        # report, a node moved: `moved`); `load_changes` whenever a beat's load differs.
        self.changes = 0
        self.load_changes = 0
        # Seconds added to the timeout while this scheduler is behind (`note_lag`).
        self.grace = 0.0
        self._lags: deque[tuple[float, float]] = deque()  # (when, lag), the last timeout s

    def beat(self, name: str, report: NodeLive) -> bool:
        """Record a heartbeat (its figures; the report count stays); whether the node
        was down (or unknown) before."""
        self.refresh()
        now = self.clock()
        old = self.nodes.get(name)
        report.last_seen = now
        report.reports = old.reports if old is not None else 0
        if old is None or old.load != report.load:
            self.load_changes += 1
        self.nodes[name] = report
        heapq.heappush(self._expiry, (now + self.timeout, name))
        if name in self.up:
            return False
        self.up.add(name)
        self._tell(name, True)
        return True

    def is_up(self, name: str) -> bool:
        live = self.nodes.get(name)
        return live is not None and self.clock() - live.last_seen <= self.timeout + self.grace

    def note_lag(self, lag: float) -> None:
        """How late this scheduler's loop ran a task that was due (seconds). A node's
        heartbeat waits in the same queue, a few turns of it (read, answer): while the
        scheduler is behind, a node is given that much longer before it counts as down,
        so that no node is marked down for the scheduler's own backlog (a node that
        stopped is then seen down that much later)."""
        now = self.clock()
        lags = self._lags
        lags.append((now, lag if lag > LAG_FLOOR else 0.0))
        while lags and lags[0][0] < now - self.timeout:
            lags.popleft()
        self.grace = LAG_TURNS * max(lag for _, lag in lags)

    def refresh(self) -> list[str]:
        """Mark the nodes whose last heartbeat is older than the timeout down; their names."""
        now = self.clock()
        down: list[str] = []
        while self._expiry and self._expiry[0][0] + self.grace < now:
            _, name = heapq.heappop(self._expiry)
            if name in self.up and not self.is_up(name):
                self.up.discard(name)
                down.append(name)
                self._tell(name, False)
        return down

    def reported(self, name: str) -> None:
        """A bad-peer report against `name` (the policy ranks it later)."""
        live = self.nodes.get(name)
        if live is None:
            live = self.nodes[name] = NodeLive()
        live.reports += 1
        self.changes += 1

    def moved(self) -> None:
        """A node now listens elsewhere: answers that named its address are stale."""
        self.changes += 1

    def _tell(self, name: str, up: bool) -> None:
        self.changes += 1
        for hook in self.on_change:
            hook(name, up)


__all__ = ["LAG_FLOOR", "LAG_TURNS", "Liveness", "NodeLive"]
