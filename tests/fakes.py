"""The shared fakes of the unit tests, one per interface: an in-memory source, the chunk
directory (the scheduler as the fetcher sees it), a set of peers, and a clock moved by
hand. Test files take these rather than keeping copies; a test that needs an odd
behaviour sets it on an instance, or derives for that one test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from syncbit.errors import (
    InvalidSourceError,
    PeerBusyError,
    PeerError,
    PeerUnreachableError,
    SourceChangedError,
    SourceUnavailableError,
)
from syncbit.manifest import FileEntry
from syncbit.peer import PeerClient
from syncbit.protocol import ChunkMap, ClaimResult
from syncbit.sources import Listing, Source, register
from syncbit.sources.fences import Fences
from syncbit.wire import Abort


@register
class MemSource(Source):
    """A source in memory, scheme `mem://`.

    Reading: a file's bytes are `bodies[path]`, else `data` (one body for every file).
    Each read is counted (`reads`, `bytes`, `asked`, `peak` reads at once) and may be held
    by `gate` (a threading.Event it waits up to 10 s for); it then fails with `error` if
    set, a 503 while `down`, a vanished version while `changed`.

    Listing: the `files` given; without them (a source the scheduler opens by URI) the
    Listing, or the exception, that `MemSource.listings[uri]` holds (`serving`). Across
    instances, `options_seen` and `closed` record what the scheduler passed and closed;
    `reset()` clears that shared state.
    """

    schemes = ("mem",)
    listings: ClassVar[dict[str, Listing | Exception]] = {}
    options_seen: ClassVar[list[dict[str, Any]]] = []
    closed: ClassVar[list[str]] = []

    def __init__(
        self,
        uri: str = "mem://",
        options: dict[str, Any] | None = None,
        fences: Fences | None = None,
        *,
        data: bytes = b"",
        bodies: Mapping[str, bytes] | None = None,
        files: Sequence[FileEntry] = (),
    ) -> None:
        super().__init__(uri, options, fences)
        self.data = data
        self.bodies = dict(bodies or {})
        self.files = list(files)
        self.reads = 0
        self.bytes = 0
        self.asked: list[tuple[str, int]] = []
        self.active = 0
        self.peak = 0
        self.down = False
        self.changed = False
        self.error: Exception | None = None
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        cls.listings.clear()
        cls.options_seen.clear()
        cls.closed.clear()

    @classmethod
    @contextmanager
    def serving(cls, listings: Mapping[str, Listing | Exception]) -> Iterator[None]:
        """For the block, a source opened at each URI of `listings` lists that (clean
        shared state before and after)."""
        cls.reset()
        cls.listings.update(listings)
        try:
            yield
        finally:
            cls.reset()

    async def list(self) -> Listing:
        self.options_seen.append(self.options)
        if self.files:
            return Listing(list(self.files))
        value = self.listings.get(self.uri)
        if value is None:
            raise InvalidSourceError(f"nothing at {self.uri}")
        if isinstance(value, Exception):
            raise value
        return value

    def read_into(
        self, entry: FileEntry, offset: int, buf: memoryview, abort: Abort | None = None
    ) -> None:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            if self.gate is not None:
                self.gate.wait(10)
            with self.lock:
                self.reads += 1
                self.bytes += len(buf)
                self.asked.append((entry.path, offset))
            if self.error is not None:
                raise self.error
            if self.down:
                raise SourceUnavailableError("mem: connection refused")
            if self.changed:
                raise SourceChangedError("mem: version gone")
            body = self.bodies.get(entry.path, self.data)
            buf[:] = body[offset : offset + len(buf)]
        finally:
            with self.lock:
                self.active -= 1

    def close(self) -> None:
        self.closed.append(self.uri)


class Directory:
    """The chunk directory (`fetcher.ChunkDirectory`): a settable chunk map `info`; a claim
    is granted unless a peer holds the chunk (with a digest) or another node is in
    `info.fetching` for it, like the scheduler; claims, releases, bad-peer reports and
    re-check results are recorded. Fresh, it knows nothing: every claim is granted."""

    def __init__(self) -> None:
        self.info = ChunkMap()
        self.reports: list[tuple[str, int]] = []
        self.claims: list[list[int]] = []
        self.released: list[list[int]] = []
        self.checks: list[tuple[int, str | None, str]] = []

    async def chunk_info(self, object_id: str, max_age: float = 1.0) -> ChunkMap:
        return self.info

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult:
        self.claims.append(indexes)
        held = [i for i in indexes if self.info.peers.get(i) and i in self.info.digests]
        busy = {i: self.info.fetching[i] for i in indexes if i in self.info.fetching}
        granted = [i for i in indexes if i not in busy and i not in held]
        return ClaimResult(granted=granted, busy=busy, held=held)

    async def release(self, object_id: str, indexes: list[int]) -> None:
        self.released.append(indexes)

    async def report_bad_peer(self, peer: str, object_id: str, index: int, reason: str) -> None:
        self.reports.append((peer, index))

    async def report_check(
        self, object_id: str, index: int, digest: str | None, changed: str
    ) -> str:
        self.checks.append((index, digest, changed))
        return "disputed"


class Peers(PeerClient):
    """The peer client (a `peer.PeerClient` that never connects): every peer sends `data`'s
    bytes, except the one at address "dead" (a PeerError), at "refused" (no connection:
    PeerUnreachableError) and at "evil" (the first byte flipped); addresses in `busy` turn
    prefetch transfers away (PeerBusyError); a transfer waits for `gate` when set. `calls`
    lists the addresses asked. Without `data` nobody may be asked at all."""

    def __init__(self, data: bytes | None = None) -> None:
        super().__init__()  # an idle connection pool, never used
        self.data = data
        self.calls: list[str] = []
        self.busy: set[str] = set()
        self.gate: threading.Event | None = None

    def get_into(
        self,
        address: str,
        object_id: str,
        offset: int,
        buf: memoryview,
        prefetch: bool = False,
        abort: Abort | None = None,
    ) -> None:
        if self.data is None:
            raise AssertionError(f"no peer should be asked here (asked {address})")
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(address)
        if address == "dead":
            raise PeerError("peer dead: reset mid-transfer")
        if address == "refused":
            raise PeerUnreachableError("peer refused: connect failed: connection refused")
        if prefetch and address in self.busy:
            raise PeerBusyError(f"peer {address} is busy")
        buf[:] = self.data[offset : offset + len(buf)]
        if address == "evil":
            buf[0] ^= 0xFF

    def set_token(self, token: str | None) -> None:
        return None  # nothing to authenticate against

    def close(self) -> None:
        return None  # no connections


class Clock:
    """Seconds the tests move by hand (`clock.now += 5`), from `now` (default: the wall
    clock's, for what is checked against real time, such as credentials)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now
