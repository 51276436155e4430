"""Liveness and what nodes say of themselves on each heartbeat: in memory only.

Owns each node's last heartbeat, load, cache figures, ready datasets, disk state and the
count of bad-peer reports against it, the interval each node was told to wait before its
next heartbeat, and the set of nodes up now: a heartbeat within the node's own timeout of
the injected clock. Down transitions are found from a heap of expiry times in O(log n) per
heartbeat, whenever anyone looks (`refresh`), and each transition is told to the listeners
once. Nothing here is durable: a restarted scheduler learns it all again within one
heartbeat interval. It never writes storage.

The heartbeat interval follows the cluster's size: each answer asks the node to wait
`interval()` = nodes up / `rate` seconds (jittered, at most MAX_HEARTBEAT_INTERVAL), so
all nodes together send about `rate` heartbeats a second however many there are; a node
never beats more often than its own configured interval. A node's timeout is
max(`timeout`, TIMEOUT_BEATS x the interval it was last told), fixed at that heartbeat:
when the interval grows, nobody is marked down for waiting as told; when it shrinks, a
node still waiting out a longer one keeps the deadline it was given.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from syncbit.protocol import MAX_HEARTBEAT_INTERVAL, MAX_LOOKUP_INTERVAL

LAG_TURNS = 3  # turns of the loop one request waits through (read, handle, answer)
LAG_FLOOR = 1.0  # seconds; a loop later than this is behind (less is a busy machine)
HEARTBEAT_RATE = 500.0
"""Heartbeats a second from all nodes together, by default: the interval stretches beyond
a node's own above rate nodes (1,000 nodes: 2 s; 5,000: 10 s). One scheduler process
answers ~2,000 requests a second with a whole core on a small machine; heartbeats then take
a quarter of it, and chunk reports, lookups and claims, which do not stretch, the rest."""
TIMEOUT_BEATS = 5  # heartbeats at the interval told a node may miss before it is down
JITTER = 0.1  # an interval told varies this much either way: nodes do not beat in step


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
    interval: float = 0.0  # seconds this node was told to wait before its next heartbeat
    timeout: float = 0.0  # seconds after `last_seen` it is down (0: the scheduler's)


class Liveness:
    """Which nodes are up, from heartbeats, and how often they beat (see the module
    docstring).

    Args:
        timeout: seconds without a heartbeat after which a node is down, at least.
        clock: wall-clock seconds (injectable for tests).
        rate: heartbeats a second all nodes together are asked to keep to.
        rng: draws the jitter (injectable for tests).
    """

    def __init__(
        self,
        timeout: float,
        clock: Callable[[], float],
        rate: float = HEARTBEAT_RATE,
        rng: random.Random | None = None,
    ) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"heartbeat rate must be a positive number, not {rate!r}")
        self.timeout = timeout
        self.clock = clock
        self.rate = rate
        self._rng = rng or random.Random()
        # Nodes a new scheduler instance counts as up until `_assumed_until` (`assume`).
        self._assumed = 0
        self._assumed_until = -math.inf
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
        came_up = name not in self.up
        self.up.add(name)
        # Told after it counts as up: the interval stretches for every node, this one too.
        report.interval = self._next_interval()
        report.timeout = max(self.timeout, TIMEOUT_BEATS * report.interval)
        heapq.heappush(self._expiry, (now + report.timeout, name))
        if came_up:
            self._tell(name, True)
        return came_up

    def leave(self, name: str) -> bool:
        """The node said it is stopping (a clean shutdown): down now, not after its
        timeout, so no answer names it as a peer meanwhile; its next heartbeat (a restart)
        brings it back. Whether it was up."""
        live = self.nodes.get(name)
        if live is not None:
            live.last_seen = -math.inf
        if name not in self.up:
            return False
        self.up.discard(name)
        self._tell(name, False)
        return True

    def is_up(self, name: str) -> bool:
        live = self.nodes.get(name)
        if live is None:
            return False
        return self.clock() - live.last_seen <= max(self.timeout, live.timeout) + self.grace

    # -- the heartbeat interval ----------------------------------------------------------

    def assume(self, nodes: int) -> None:
        """A new scheduler instance (a restart, a new leader) knows the registered nodes
        but not yet which are up: until every node told an interval by the one before has
        beaten (the longest timeout), it stretches intervals as if `nodes` were up, so the
        nodes heard first are not told to beat fast, all at once."""
        self._assumed = nodes
        self._assumed_until = self.clock() + self.longest_timeout()

    def longest_timeout(self) -> float:
        """The longest timeout any node can be given (at the longest interval)."""
        return max(self.timeout, TIMEOUT_BEATS * MAX_HEARTBEAT_INTERVAL)

    def size(self) -> int:
        """The nodes the interval is stretched for: those up (or assumed, see `assume`)."""
        if self._assumed and self.clock() < self._assumed_until:
            return max(len(self.up), self._assumed)
        return len(self.up)

    def interval(self) -> float:
        """Seconds between heartbeats that keeps all nodes together to `rate` a second:
        nodes / rate, at most MAX_HEARTBEAT_INTERVAL (a node's own interval is its floor)."""
        return min(MAX_HEARTBEAT_INTERVAL, self.size() / self.rate)

    def lookup_interval(self, rate: float) -> float:
        """Seconds between two chunk-map lookups of one node's parked prefetches that keep
        all nodes together to `rate` a second: nodes / rate, at most MAX_LOOKUP_INTERVAL."""
        return min(MAX_LOOKUP_INTERVAL, self.size() / rate)

    def reports_due(self) -> float:
        """Seconds within which a new scheduler instance hears from every node (each then
        reports what it holds again): two intervals as it tells them now, the registered
        nodes counted (`assume`), and never less than the timeout."""
        return max(self.timeout, 2 * self.interval())

    def told(self, name: str) -> float:
        """The interval `name` was told at its last heartbeat (0.0: never heard)."""
        live = self.nodes.get(name)
        return live.interval if live is not None else 0.0

    def _next_interval(self) -> float:
        jitter = self._rng.uniform(1.0 - JITTER, 1.0 + JITTER)
        return min(MAX_HEARTBEAT_INTERVAL, self.interval() * jitter)

    def note_lag(self, lag: float) -> None:
        """How late this scheduler's loop ran a task that was due (seconds). A node's
        heartbeat waits in the same queue, a few turns of it (read, answer): while the
        scheduler is behind, a node is given that much longer before it counts as down,
        so that no node is marked down for the scheduler's own backlog (a node that
        stopped is then seen down that much later)."""
        now = self.clock()
        lags = self._lags
        lags.append((now, max(lag, 0.0)))
        while lags and lags[0][0] < now - self.timeout:
            lags.popleft()
        self.grace = LAG_TURNS * max((lag for _, lag in lags if lag > LAG_FLOOR), default=0.0)

    def lag(self) -> float:
        """The longest a due task waited for the loop within the last `timeout` seconds."""
        return max((lag for _, lag in self._lags), default=0.0)

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


__all__ = [
    "HEARTBEAT_RATE",
    "JITTER",
    "LAG_FLOOR",
    "LAG_TURNS",
    "TIMEOUT_BEATS",
    "Liveness",
    "NodeLive",
]
