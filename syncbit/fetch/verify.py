"""What the fetch layer verifies of the source: a batch's chunks against recorded digests
and the file's head sample, a published whole-file SHA-256, and which objects the scheduler
found broken. Decides only pass or fail; never picks a source, never queues anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from syncbit.chunks import chunk_length, digest, head_length
from syncbit.errors import SourceChangedError, SyncbitError
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


async def read_checked(
    source: Source,
    entry: FileEntry,
    first: int,
    cs: int,
    view: memoryview,
    chunks: int,
    limiter: trio.CapacityLimiter | None = None,
    abort: Abort | None = None,
) -> tuple[list[str], bool]:
    """One range read of `chunks` consecutive chunks from chunk `first` (of `cs` bytes), in
    a worker thread: their digests, and whether the file's head still matches its recorded
    sample (True when none is recorded). A batch that starts at 0 holds the head; any other
    reads the head alongside, on a second connection: in sequence it would cost a round
    trip per batch on a distant origin. A change of the head before the batch's read began
    shows; one while it was read may not. `limiter`: the worker threads to read in
    (default: trio's shared ones). `abort` ends both reads from another thread."""
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
    digests = []
    head_ok = False
    errors: list[SyncbitError] = []  # kept, so one failure does not cancel the other read

    async def read_batch() -> None:
        nonlocal digests
        try:
            digests = await trio.to_thread.run_sync(batch, limiter=limiter)
        except SyncbitError as exc:
            errors.insert(0, exc)  # the batch's own error is the one to report

    async def read_head() -> None:
        nonlocal head_ok
        try:
            head_ok = await trio.to_thread.run_sync(head, limiter=limiter)
        except SyncbitError as exc:
            errors.append(exc)

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


class WholeFile:
    """The whole-file SHA-256 a source publishes (HF LFS): checked once per object when it
    is complete; on mismatch the object is discarded so no reader gets its bytes again."""

    def __init__(self, store: ObjectStore, stats: dict[str, int]) -> None:
        self.store = store
        self.stats = stats
        self._verified: set[str] = set()
        self._verifying: set[str] = set()

    def verified(self, object_id: str) -> bool:
        return object_id in self._verified

    def verifying(self, object_id: str) -> bool:
        return object_id in self._verifying

    async def verify(self, obj: StoredObject, path: str, expected: str) -> None:
        if obj.id in self._verified or obj.id in self._verifying:
            return
        self._verifying.add(obj.id)
        try:
            got = await self.store.sha256(obj)
            if got == expected:
                self._verified.add(obj.id)
            else:
                log.error(
                    "%s: whole-file SHA-256 %s does not match the source's %s: discarding it",
                    path,
                    got[:16],
                    expected[:16],
                )
                self.stats["verify_failures"] += 1
                await self.store.discard(obj)
        finally:
            self._verifying.discard(obj.id)
            self.store.notify()  # wake `Fetcher.ensure`: verified, or discarded
