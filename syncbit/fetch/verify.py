"""What the fetch layer verifies of the source: a batch's chunks against recorded digests
and the file's head sample, a published whole-file SHA-256, and which objects the scheduler
found broken. Decides only pass or fail; never picks a source, never queues anything.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from syncbit.aio import first_of
from syncbit.chunks import chunk_length, digest, head_length
from syncbit.errors import SourceChangedError, SyncbitError, TransferAbortedError
from syncbit.manifest import FileEntry
from syncbit.protocol import ChunkMap
from syncbit.sources.base import Source
from syncbit.store import ObjectStore, StoredObject
from syncbit.wire import Abort

if TYPE_CHECKING:
    from syncbit.fetch.flight import Flight

log = logging.getLogger("syncbit.fetch")


@dataclass(frozen=True, slots=True)
class Disagreement:
    """A source read whose bytes may not be kept: `digest` of chunk `index` differs from
    the record, or (digest None) the file's head changed."""

    index: int
    digest: str | None
    why: str

    @property
    def error(self) -> SourceChangedError:
        return SourceChangedError(self.why)


def check_source(
    batch: Sequence[Flight], info: ChunkMap, digests: list[str], head_ok: bool
) -> Disagreement | None:
    """Why the source's bytes of a batch may not be kept, or None: the file's head must
    still match the one recorded at `dataset add`, and every chunk with a recorded digest
    match it (a chunk without one is established by this read)."""
    entry = batch[0].entry
    if not head_ok:
        why = (
            f"the first {head_length(entry.size)} bytes of {entry.path} at the source differ "
            "from those recorded at `dataset add` (the source changed under the same "
            "version facts)"
        )
        return Disagreement(batch[0].index, None, why)
    for f, got in zip(batch, digests, strict=True):
        expected = info.digests.get(f.index)
        if expected is not None and got != expected:
            return Disagreement(
                f.index,
                got,
                f"the source's bytes of chunk {f.index} of {entry.path} differ from the "
                f"recorded digest ({got[:16]} != {expected[:16]}): not served, nothing "
                "stored; the scheduler has another node re-check the source",
            )
    return None


@dataclass(eq=False)
class _HeadCheck:
    began: float  # before its request went out
    done: trio.Event = field(default_factory=trio.Event)
    ok: bool | None = None  # None once done: it failed or was cancelled


class HeadChecks:
    """Head samples shared by the source reads of one file that run at once.

    A head sample shows a change of the file made before its request went out, so one
    sample that began after a batch read began answers for that batch as well as its own
    would: every source read still sees a change of the head made before it began. With
    many streams on one file (a pull, a readahead window, several prefetches) each read
    took a second request and a second connection of its own for the sample; an origin
    that limits connections per client (nginx `limit_conn`, many mirrors) then had half
    its connections carrying 64 KiB samples. Now a read that finds a sample in flight
    that began before it waits for that one to end (or for its own batch, whichever comes
    first) and then for a sample that began after it, which the first of the waiters
    starts and all of them share. A batch takes far longer than a sample, so the answer
    is mostly there before the batch's bytes are. A sample that failed or was cancelled
    answers no one else, and a read waits for another read's sample no longer than its
    own batch plus as long again (a trickling sample would hold every read sharing it:
    each then takes its own, as before).
    """

    KEEP = 1024  # files remembered; a forgotten one just starts a fresh sample

    def __init__(self) -> None:
        self._latest: OrderedDict[str, _HeadCheck] = OrderedDict()
        self.started = 0  # samples read (for tests)

    async def after(
        self,
        key: str,
        began: float,
        read: Callable[[], Awaitable[bool]],
        batch_done: trio.Event,
    ) -> bool:
        """Whether the head of file `key` matched, as seen by a sample whose request went
        out at or after `began` (trio time); `read` takes a sample. `batch_done`: set
        when the caller's own batch read ended."""
        while True:
            check = self._latest.get(key)
            if check is not None and check.began >= began:
                if await _waited(check, began, batch_done) and check.ok is not None:
                    return check.ok
                # failed, cancelled or still out: a sample of its own
            elif check is not None and not check.done.is_set() and not batch_done.is_set():
                await first_of(check.done, batch_done)
                continue
            check = _HeadCheck(trio.current_time())
            self._latest[key] = check
            self._latest.move_to_end(key)
            while len(self._latest) > self.KEEP:
                self._latest.popitem(last=False)
            self.started += 1
            try:
                check.ok = await read()
            finally:
                check.done.set()
            return check.ok


async def _waited(check: _HeadCheck, began: float, batch_done: trio.Event) -> bool:
    """Wait for another read's sample while the batch read that `began` runs, and after
    it as long again as it took (at least a second): a sample is a small fraction of a
    batch, so one still out then trickles. Whether it ended."""
    await first_of(check.done, batch_done)
    if not check.done.is_set():
        with trio.move_on_after(max(1.0, trio.current_time() - began)):
            await check.done.wait()
    ended: bool = check.done.is_set()
    return ended


async def read_checked(
    source: Source,
    entry: FileEntry,
    first: int,
    cs: int,
    view: memoryview,
    chunks: int,
    limiter: trio.CapacityLimiter | None = None,
    abort: Abort | None = None,
    heads: HeadChecks | None = None,
) -> tuple[list[str], bool]:
    """One range read of `chunks` consecutive chunks from chunk `first` (of `cs` bytes), in
    a worker thread: their digests, and whether the file's head still matches its recorded
    sample (True when none is recorded). A batch that starts at 0 holds the head; any other
    reads the head alongside, on a second connection: in sequence it would cost a round
    trip per batch on a distant origin. A change of the head before the batch's read began
    shows; one while it was read may not. `limiter`: the worker threads to read in
    (default: trio's shared ones). `abort` ends both reads from another thread. `heads`:
    samples shared with the other reads of the file (see `HeadChecks`; None: one of its
    own)."""
    expected = entry.version.get("head")
    n = head_length(entry.size)

    def batch() -> list[str]:
        source.read_into(entry, first * cs, view, abort)
        return [digest(view[i * cs : (i + 1) * cs]) for i in range(chunks)]

    def head() -> bool:
        sample = bytearray(n)
        source.read_into(entry, 0, memoryview(sample), abort)
        return digest(sample) == expected

    if not expected or (first == 0 and len(view) >= n):
        digests = await trio.to_thread.run_sync(batch, limiter=limiter)
        return digests, not expected or digest(view[:n]) == expected
    began = trio.current_time()  # before the batch's request goes out
    batch_done = trio.Event()
    digests = []
    head_ok = False
    errors: list[SyncbitError] = []  # kept, so one failure does not cancel the other read

    async def read_batch() -> None:
        nonlocal digests
        try:
            digests = await trio.to_thread.run_sync(batch, limiter=limiter)
        except SyncbitError as exc:
            errors.insert(0, exc)  # the batch's own error is the one to report
        finally:
            batch_done.set()

    async def sample() -> bool:
        if errors:  # the batch failed: a sample would only cost the origin a request
            raise TransferAbortedError("no head sample: the batch read failed")
        ok: bool = await trio.to_thread.run_sync(head, limiter=limiter)
        return ok

    async def read_head() -> None:
        nonlocal head_ok
        try:
            if heads is None:
                head_ok = await sample()
            else:
                key = f"{entry.object}:{entry.locator}"
                head_ok = await heads.after(key, began, sample, batch_done)
        except SyncbitError as exc:
            errors.append(exc)  # after the batch's own error, which is the one raised

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_batch)
        nursery.start_soon(read_head)
    if errors:
        raise errors[0]
    return digests, head_ok


async def recheck(entry: FileEntry, chunk_size: int, source: Source, index: int) -> str:
    """Read chunk `index` of a file from the source and return its digest; nothing is
    stored. SourceChangedError when the source no longer has the recorded version (head
    sample included)."""
    buf = bytearray(chunk_length(entry.size, chunk_size, index))
    digests, head_ok = await read_checked(source, entry, index, chunk_size, memoryview(buf), 1)
    if not head_ok:
        raise SourceChangedError(
            f"source changed: the first {head_length(entry.size)} bytes of {entry.path} "
            "differ from those recorded at `dataset add`"
        )
    return digests[0]


class Broken:
    """Objects whose version is broken (the source changed under it), with why: the
    scheduler's word, from the dataset listing or a chunk map."""

    def __init__(self) -> None:
        self._why: dict[str, str] = {}

    def mark(self, object_id: str, reason: str) -> bool:
        """True if it was not known to be broken yet."""
        new = object_id not in self._why
        self._why[object_id] = reason
        return new

    def __contains__(self, object_id: str) -> bool:
        return object_id in self._why

    def refuse(self, entry: FileEntry) -> None:
        """SourceChangedError for a file whose version the cluster found broken: what is
        cached of it may be one version and what the source sends another."""
        reason = self._why.get(entry.object)
        if reason is not None:
            raise SourceChangedError(
                f"{entry.path}: this revision is broken ({reason}); run `syncbit dataset add` "
                "again to pick up the source's current content"
            )


class _Hashing:
    """A whole-file SHA-256 in progress: chunks [0, next) of one stored object hashed, with
    the digests they had then."""

    __slots__ = ("again", "busy", "digests", "discards", "h", "next", "obj")

    def __init__(self, obj: StoredObject) -> None:
        self.obj = obj
        self.discards = obj.discards
        self.h = hashlib.sha256()
        self.next = 0
        self.digests: list[str | None] = []
        self.busy = False
        self.again = False  # chunks were written while it hashed: look again


class WholeFile:
    """The whole-file SHA-256 a source publishes (HF LFS, a registry blob's digest),
    computed as the object's chunks are written, in file order, so the check ends with the
    download instead of re-reading the whole file after it. Once every chunk is hashed the
    digest is compared; a mismatch is confirmed by hashing the file again from its start
    (the running hash skips nothing it may not: see `_complete`) before the object is
    discarded, so no reader gets its bytes again."""

    KEEP = 256  # objects hashed part-way remembered; one forgotten starts again at 0

    def __init__(self, store: ObjectStore, stats: dict[str, int]) -> None:
        self.store = store
        self.stats = stats
        # Object id -> the object and its removals when it was verified: a later content
        # (the object evicted or recreated, and fetched again) is verified anew.
        self._verified: dict[str, tuple[StoredObject, int]] = {}
        self._verifying: set[str] = set()
        self._hashing: dict[str, _Hashing] = {}  # insertion order: oldest first

    def verified(self, object_id: str) -> bool:
        mark = self._verified.get(object_id)
        if mark is None:
            return False
        obj, removals = mark
        if self.store.get(object_id) is obj and obj.removals == removals:
            return True
        del self._verified[object_id]  # that content is gone: this one is not checked
        return False

    def verifying(self, object_id: str) -> bool:
        return object_id in self._verifying

    async def verify(self, obj: StoredObject, path: str, expected: str) -> None:
        """Hash what is written of the object from where the last call stopped (a call
        while another hashes it only tells that one to look again); once every chunk is
        hashed, mark it verified or discard it."""
        if self.verified(obj.id):
            return
        state = self._hashing.get(obj.id)
        if state is None or state.obj is not obj or state.discards != obj.discards:
            if state is not None and state.busy:
                state.again = True  # the busy one finds the object changed and starts over
                return
            state = self._start(obj)
        if state.busy:
            state.again = True
            return
        state.busy = True
        self._verifying.add(obj.id)
        try:
            with self.store.keeping(obj):  # no eviction under the hash
                state = await self._advance(state, path, expected)
        finally:
            state.busy = False
            self._verifying.discard(obj.id)
            self.store.notify()  # wake `Fetcher.ensure`: verified, or discarded

    def _start(self, obj: StoredObject) -> _Hashing:
        self._hashing.pop(obj.id, None)
        while len(self._hashing) >= self.KEEP:
            oldest = next((k for k, v in self._hashing.items() if not v.busy), None)
            if oldest is None:
                break
            del self._hashing[oldest]
        state = self._hashing[obj.id] = _Hashing(obj)
        return state

    async def _advance(self, state: _Hashing, path: str, expected: str) -> _Hashing:
        """Hash on while chunks follow in order; the state it ended with (busy, as the one
        it was given: the caller ends that)."""
        obj = state.obj
        while True:
            state.again = False
            if state.discards != obj.discards:  # the content was thrown away: start over
                state = self._start(obj)
                state.busy = True  # so no other call hashes the new state meanwhile
            end = state.next
            while end < obj.chunks and end in obj.written:
                end += 1
            if end > state.next:
                # The digests the chunks have as they are hashed: `_complete` compares them
                # with the ones the file has at the end.
                state.digests.extend(obj.digests.get(i) for i in range(state.next, end))
                await self.store.hash_chunks(obj, state.h, state.next, end)
                state.next = end
            if state.next >= obj.chunks and state.discards == obj.discards:
                await self._complete(state, path, expected)
                return state
            if not state.again:
                return state

    async def _complete(self, state: _Hashing, path: str, expected: str) -> None:
        """Every chunk hashed: decide. The running hash stands only if every chunk is still
        there with the digest it had when hashed (a chunk evicted and fetched again
        meanwhile would have another if its bytes differ) and nothing was discarded; a
        mismatch is checked once more on the whole file before it condemns the object. A
        chunk gone since it was hashed decides nothing: the object is hashed again from
        its start once it is whole."""
        obj = state.obj
        try:
            now = [obj.digests.get(i) for i in range(obj.chunks)]
            if None in now:
                return
            got = state.h.hexdigest()
            if got != expected or now != state.digests:
                got = await self.store.sha256(obj)
            if obj.discards != state.discards:
                return  # thrown away meanwhile: a later call starts over
            if got == expected:
                self._verified[obj.id] = (obj, obj.removals)
                return
            log.error(
                "%s: whole-file SHA-256 %s does not match the source's %s: discarding it",
                path,
                got[:16],
                expected[:16],
            )
            self.stats["verify_failures"] += 1
            await self.store.discard(obj)
        finally:
            if self._hashing.get(obj.id) is state:
                del self._hashing[obj.id]
