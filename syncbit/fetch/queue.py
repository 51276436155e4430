"""The order flights run in: reads and readahead first, then prefetch in two lanes (flights
a peer can serve now, and the rest) each under its limit; parked flights wait outside every
queue. Never transfers anything, never decides who reads the source (plan) nor waits.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import trio

from syncbit.fetch.flight import BACKGROUND, Flight, Lane, State

_Heap = list[tuple[int, int, Flight]]


class FlightQueue:
    """Reads and readahead go first. Prefetch runs in two lanes of its own: flights a peer
    can serve now (up to `peer_limit` at once) and the rest, mostly source reads (up to
    `source_limit()`); chunks a plan gives to other nodes wait parked, outside both, until
    a peer has them. Separate lanes keep this node's share of the origin's bytes flowing
    while peer transfers run, and the source reads from starving the peer transfers. With
    more workers than both lanes a reader always finds a free one.

    A flight may have stale heap entries (it was queued again, or taken along by another
    flight's source read): an entry counts only while its flight is QUEUED at a priority
    of that queue."""

    def __init__(self, peer_limit: int, source_limit: Callable[[], int]) -> None:
        self.peer_limit = peer_limit
        self.source_limit = source_limit
        self._reads: _Heap = []
        self._lanes: dict[Lane, _Heap] = {Lane.PEER: [], Lane.SOURCE: []}
        self._running = {Lane.PEER: 0, Lane.SOURCE: 0}
        self._seq = itertools.count()
        # Set and replaced at every push and freed lane slot: what idle workers wait on.
        self.changed = trio.Event()
        # Flights parked while another node reads their chunk from the source, by object.
        self._parked: dict[str, dict[int, Flight]] = {}

    # -- queueing --------------------------------------------------------------------------

    def push(self, flight: Flight, peer_ready: bool = False) -> bool:
        """Queue a flight: a read's, or a prefetch in its lane (peer-ready or the rest).
        False, and nothing queued, for a prefetch the plan gives to another node: the
        caller parks it (queued in the source lane it would wait behind this node's own
        source reads, and peers would learn of the other nodes' chunks in bursts)."""
        if flight.priority < BACKGROUND:
            heap = self._reads
        elif not peer_ready and flight.may_source is not None and not flight.may_source():
            return False
        else:
            heap = self._lanes[Lane.PEER if peer_ready else Lane.SOURCE]
        self.unpark(flight)
        flight.move(State.QUEUED)
        flight.peer_ready = peer_ready
        heapq.heappush(heap, (int(flight.priority), next(self._seq), flight))
        self.wake()
        return True

    def take(self) -> Flight | None:
        """The most urgent runnable flight, now RUNNING in its lane (`flight.lane`), or
        None: every queue is empty or at its limit."""
        reads = self._reads
        while reads:
            flight = heapq.heappop(reads)[2]
            if flight.state is State.QUEUED and flight.priority < BACKGROUND:
                return self._begin(flight, Lane.READ)
        for lane, heap in self._lanes.items():
            if not heap:
                continue  # every worker wake-up comes here: skip the limit's job scan
            limit = self.peer_limit if lane is Lane.PEER else self.source_limit()
            while heap and self._running[lane] < limit:
                flight = heapq.heappop(heap)[2]
                if flight.state is State.QUEUED and flight.priority >= BACKGROUND:
                    return self._begin(flight, lane)
        return None

    def _begin(self, flight: Flight, lane: Lane) -> Flight:
        flight.move(State.RUNNING)
        flight.lane = lane
        if lane is not Lane.READ:
            self._running[lane] += 1
        return flight

    def done_running(self, flight: Flight) -> None:
        """A worker finished with the flight (whatever came of it): its lane has room."""
        if flight.lane is not Lane.READ:
            self._running[flight.lane] -= 1
            self.wake()

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def source_lane_idle(self) -> bool:
        """No prefetch source read running or queued here."""
        return not self._running[Lane.SOURCE] and not any(
            f.state is State.QUEUED and f.priority >= BACKGROUND
            for _, _, f in self._lanes[Lane.SOURCE]
        )

    # -- parked flights ----------------------------------------------------------------------

    def park(self, flight: Flight, holder: str) -> None:
        """Hold a flight in no queue, until `push` (or a failure) takes it out."""
        flight.move(State.PARKED)
        flight.waiting_for = holder
        self._parked.setdefault(flight.obj.id, {})[flight.index] = flight

    def parked(self, object_id: str) -> dict[int, Flight]:
        """The flights parked for an object (live: the watcher prunes it)."""
        return self._parked.get(object_id, {})

    def unpark(self, flight: Flight) -> None:
        """Forget a parked flight (failed or abandoned, or no longer parked)."""
        parked = self._parked.get(flight.obj.id)
        if parked is not None and parked.get(flight.index) is flight:
            del parked[flight.index]

    def drop_object_if_idle(self, object_id: str) -> None:
        if not self._parked.get(object_id):
            self._parked.pop(object_id, None)

    # -- for the debug log -----------------------------------------------------------------

    def describe(self) -> dict[str, int]:
        return {
            "reads": len(self._reads),
            "peer_running": self._running[Lane.PEER],
            "peer_queued": len(self._lanes[Lane.PEER]),
            "source_running": self._running[Lane.SOURCE],
            "source_queued": len(self._lanes[Lane.SOURCE]),
            "parked": sum(len(p) for p in self._parked.values()),
        }
