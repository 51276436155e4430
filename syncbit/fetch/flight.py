"""Flights: one chunk transfer in progress, shared by every reader that needs the chunk, as
an enum state machine; the single-flight table; what a failed flight raises. Never does
I/O, never chooses where bytes come from (transfer) nor what runs next (queue).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum, IntEnum, StrEnum

import trio

from syncbit.aio import first_of
from syncbit.errors import (
    ReadDeadlineError,
    SourceChangedError,
    SourceError,
    SourcePermanentError,
    SyncbitError,
    UserError,
)
from syncbit.manifest import FileEntry
from syncbit.sources.base import Source
from syncbit.store import StoredObject


class Priority(IntEnum):
    """How urgent a chunk is; the lower, the sooner. A reader waits for FOREGROUND chunks
    and is about to for READAHEAD ones: both run from the read queue. The rest are
    background, run from the prefetch lanes: OPENED, a file a process holds open and the
    node fetches whole (`onopen`), goes before PREFETCH, a dataset warmed for later."""

    FOREGROUND = 0
    READAHEAD = 1
    OPENED = 2
    PREFETCH = 3


# This priority and the later ones are background: no reader waits on the flight, it runs
# from a prefetch lane and may wait for the plan, a peer or the scheduler.
BACKGROUND = Priority.OPENED


class State(IntEnum):
    """Where a flight is. A worker takes only QUEUED flights; DONE and FAILED are final
    (a FAILED flight may be failed again with a later cause: a carried chunk whose source
    read fails after its job abandoned it). An IntEnum only so that a move's check hashes
    in C (it runs a few times per chunk); states are never ordered."""

    QUEUED = 1  # in the read queue or a prefetch lane, waiting for a worker
    PARKED = 2  # in no queue: waits until a peer holds its chunk (or a deadline)
    RUNNING = 3  # a worker transfers it, or another flight's source read carries it
    DONE = 4  # its chunk is here (staged in RAM at least)
    FAILED = 5  # `error` says why


_MOVES: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.QUEUED, State.PARKED, State.RUNNING, State.FAILED}),
    State.PARKED: frozenset({State.QUEUED, State.PARKED, State.RUNNING, State.FAILED}),
    State.RUNNING: frozenset({State.QUEUED, State.PARKED, State.DONE, State.FAILED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset({State.FAILED}),
}


class Origin(StrEnum):
    """Where a chunk's bytes came from (metrics labels)."""

    CACHE = "cache"
    PEER = "peer"
    SOURCE = "source"


class Lane(StrEnum):
    """The queue a flight ran from: reads and readahead, or one of the prefetch lanes."""

    READ = ""
    PEER = "peer"
    SOURCE = "source"


@dataclass(eq=False, slots=True)
class Flight:
    """One chunk transfer in progress, shared by every reader that needs the chunk. Its
    state changes only through `move` and `end`, which check the transition."""

    obj: StoredObject
    entry: FileEntry
    source: Source
    index: int
    priority: Priority
    deadline: float
    state: State = State.QUEUED
    done: trio.Event = field(default_factory=trio.Event)  # set on DONE or FAILED
    error: BaseException | None = None
    last_error: str = ""  # the latest transfer failure, for a reader's deadline message
    retry_after: float = 0.0  # until then a new flight for this chunk gets one attempt
    one_shot: bool = False  # such a flight: one attempt, no retries
    bad_peers: set[str] = field(default_factory=set)
    # Prefetch of a chunk the plan gives another node: False while that node is expected
    # to read it from the source. None: this node may.
    may_source: Callable[[], bool] | None = None
    waiting_for: str = ""  # the node a parked flight waits for
    origin: Origin = Origin.CACHE
    lane: Lane = Lane.READ
    peer_ready: bool = False  # queued in the peer lane (a holder has its chunk)
    ran: bool = False  # a worker started it at least once
    scope: trio.CancelScope | None = None  # its transfer, while a worker runs it
    abandoned: str = ""  # why `Fetcher.abandon` stopped it
    # A reader joined it while a worker ran it as a background flight (its priority stays:
    # the lanes count it by that): the rest of its run serves a reader all the same.
    reader_joined: bool = False
    on_reader: Callable[[], None] | None = None  # told then (see `patience`)

    @property
    def for_reader(self) -> bool:
        """Whether a reader waits for it: foreground or readahead, or joined by a reader."""
        return self.priority < BACKGROUND or self.reader_joined

    @contextlib.contextmanager
    def telling_readers(self, callback: Callable[[], None]) -> Iterator[None]:
        """`callback` is `on_reader` for the block (what it replaced, after it)."""
        before, self.on_reader = self.on_reader, callback
        try:
            yield
        finally:
            self.on_reader = before

    @property
    def running(self) -> bool:
        return self.state is State.RUNNING

    @property
    def final(self) -> bool:
        return self.state is State.DONE or self.state is State.FAILED

    def move(self, to: State) -> None:
        """Change state; a transition the machine does not have is a bug (AssertionError)."""
        if to not in _MOVES[self.state]:
            raise AssertionError(f"flight of chunk {self.index}: {self.state.name} -> {to.name}")
        self.state = to

    def end(self) -> None:
        """Final: DONE, or FAILED when `error` is set; wakes every waiter."""
        self.move(State.FAILED if self.error is not None else State.DONE)
        self.done.set()


@dataclass(eq=False, slots=True)
class Staged:
    """A chunk a transfer made readable from RAM, still to be written to disk."""

    flight: Flight
    view: memoryview
    digest: str


@dataclass(frozen=True, slots=True)
class Park:
    """A transfer that must not run now: wait parked until a peer holds the chunk
    (`holder` is reading it, or is planned to), or, `peer_lane`, run in the peer lane."""

    holder: str = ""
    peer_lane: bool = False


class Joined(Enum):
    """What `FlightTable.join` did: the caller queues a NEW or RAISED flight."""

    NEW = "new"
    RAISED = "raised"  # a more urgent reader joined a flight no worker runs yet
    JOINED = "joined"


class FlightTable:
    """The flights in progress, one per chunk (single-flight), and failures kept briefly
    (`failure_ttl` seconds: the kernel retries a failed readahead page at once, and that
    retry must fail now, not after another deadline)."""

    def __init__(self, read_deadline: float, failure_ttl: float) -> None:
        self.read_deadline = read_deadline
        self.failure_ttl = failure_ttl
        self._flights: dict[tuple[str, int], Flight] = {}
        self._failure = trio.Event()  # set and replaced whenever a flight fails

    def __len__(self) -> int:
        return len(self._flights)

    def __iter__(self) -> Iterator[Flight]:
        return iter(list(self._flights.values()))

    def get(self, object_id: str, index: int) -> Flight | None:
        return self._flights.get((object_id, index))

    def join(
        self,
        obj: StoredObject,
        entry: FileEntry,
        source: Source,
        index: int,
        prio: Priority,
        may_source: Callable[[int], bool] | None = None,
    ) -> tuple[Flight, Joined]:
        """The flight of a chunk: the one in progress, or a new one (after a failure kept
        a moment ago: one attempt, no new deadline's worth of retrying, since the kernel
        retries a failed readahead page at once; a source that came back still answers)."""
        key = (obj.id, index)
        flight = self._flights.get(key)
        now = trio.current_time()
        deadline = now + self.read_deadline
        if flight is not None and flight.final:
            if now < flight.retry_after:
                deadline = now
            flight = None
        if flight is None:
            flight = Flight(obj, entry, source, index, prio, deadline)
            flight.one_shot = deadline <= now
            if may_source is not None and prio >= BACKGROUND:
                flight.may_source = functools.partial(may_source, index)
            self._flights[key] = flight
            return flight, Joined.NEW
        if prio < flight.priority and flight.state is not State.RUNNING:
            flight.priority = prio
            if prio < BACKGROUND:
                flight.may_source = None  # a reader needs it now: no waiting for a plan
            # (An open file's fetch goes ahead of the queued prefetch but still leaves a
            # chunk the plan gives another node to that node: the origin's bytes once.)
            return flight, Joined.RAISED
        if prio < BACKGROUND and not flight.for_reader:
            # A running background flight: a reader needs it now, so no waiting for a plan
            # or an unanswered scheduler from here on.
            flight.reader_joined = True
            flight.may_source = None
            if flight.on_reader is not None:
                flight.on_reader()
        return flight, Joined.JOINED

    def finish(self, flight: Flight) -> None:
        """End a flight (DONE, or FAILED if it has an error); a new one may start for its
        chunk at once."""
        key = (flight.obj.id, flight.index)
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.end()
        if flight.error is not None:
            self._signal_failure()

    def keep_failure(self, flight: Flight) -> None:
        """End a failed flight but keep it until `retry_after`: a new flight for its chunk
        meanwhile makes one attempt only."""
        flight.retry_after = trio.current_time() + self.failure_ttl
        flight.end()
        self._signal_failure()

    def _signal_failure(self) -> None:
        self._failure.set()
        self._failure = trio.Event()

    async def done_or_failure(self, done: trio.Event) -> None:
        """Until `done` is set or any flight fails (failures are rare: the caller then
        looks whether one of its own flights failed)."""
        await first_of(done, self._failure)


def raise_for(flight: Flight) -> None:
    """A failed flight's error, as a fresh exception per waiter (one flight may fail many
    readers): a lost version (or access a person must fix) is SourceChangedError, any
    other source error that was not worth a retry SourcePermanentError, the rest (a
    temporary failure that outlasted its deadline, an abandoned flight)
    ReadDeadlineError."""
    error = flight.error
    if error is None:
        return
    kind: type[SyncbitError] = ReadDeadlineError
    if isinstance(error, SourceChangedError | UserError):
        kind = SourceChangedError
    elif isinstance(error, SourceError) and not flight.source.is_temp_failure(error):
        kind = SourcePermanentError
    raise kind(str(error)) from error


def is_temp_failure(source: Source, exc: BaseException) -> bool:
    """Whether a chunk transfer that failed with `exc` is worth another attempt: source
    errors as the source classifies them, a person's mistake (UserError) never, other
    syncbit errors (a peer or the scheduler failing) always; anything else (a bug) never."""
    if isinstance(exc, SourceError):
        return source.is_temp_failure(exc)
    return isinstance(exc, SyncbitError) and not isinstance(exc, UserError)
