"""The objects a node stores: what it holds of each (chunks written, durable, digests,
unverified) and who uses it. This module makes every change to presence and use, and keeps
the counters they imply; nothing here does I/O or decides policy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import trio

from syncbit.chunks import chunk_count, chunk_length
from syncbit.store.events import PresenceChanges
from syncbit.store.index import ObjectRecord

if TYPE_CHECKING:
    from syncbit.store.files import ObjectFile
    from syncbit.store.staging import Staging


class StoredObject:
    """One content object: its file, and which of its chunks this node holds. Read-only
    outside `ObjectTable` (but `last_used`, the LRU order, which `touch` sets)."""

    __slots__ = (
        "_digests",
        "_discards",
        "_durable",
        "_keeping",
        "_opened",
        "_reading",
        "_removals",
        "_removing",
        "_staging",
        "_unstored",
        "_unverified",
        "_writes",
        "_written",
        "chunk_size",
        "file",
        "id",
        "last_used",
        "size",
    )

    def __init__(
        self, object_id: str, size: int, chunk_size: int, file: ObjectFile, staging: Staging
    ) -> None:
        self.id = object_id
        self.size = size
        self.chunk_size = chunk_size
        self.file = file
        self.last_used = 0.0  # epoch seconds
        self._staging = staging
        self._written: set[int] = set()  # readable here (durable ones included)
        self._durable: set[int] = set()  # in the index; served to peers
        self._digests: dict[int, str] = {}
        self._unverified: set[int] = set()  # durable, not re-read since an unclean shutdown
        self._unstored: dict[int, str] = {}  # fetched but not stored: chunk -> why
        self._discards = 0  # bumped when the content is thrown away
        self._removals = 0  # bumped when the content goes, thrown away or evicted
        # In use (see `ObjectTable.busy`): reads in progress (under the use lock: peer
        # threads read too), keeps, files open through the mount, writes in flight.
        self._reading = 0
        self._keeping = 0
        self._opened = 0
        self._writes = 0
        self._removing: trio.Event | None = None  # an eviction or discard running

    def __repr__(self) -> str:
        return f"StoredObject({self.id[:12]}, {len(self._written)}/{self.chunks} chunks)"

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    @property
    def written(self) -> AbstractSet[int]:
        return self._written

    @property
    def durable(self) -> AbstractSet[int]:
        return self._durable

    @property
    def digests(self) -> Mapping[int, str]:
        return self._digests

    @property
    def unverified(self) -> AbstractSet[int]:
        return self._unverified

    @property
    def unstored(self) -> Mapping[int, str]:
        """Chunks fetched but not stored, with why: for the reader that finds them missing."""
        return self._unstored

    @property
    def discards(self) -> int:
        """How often the content was thrown away (failed verification): a change tells a
        waiter that what it waited for is gone."""
        return self._discards

    @property
    def removals(self) -> int:
        """How often the content left the cache (evicted or thrown away): what was checked
        of the content before a change is not known of the content now."""
        return self._removals

    @property
    def opened(self) -> int:
        """Files open through the mount on this object (see `ObjectStore.hold`)."""
        return self._opened

    @property
    def complete(self) -> bool:
        return len(self._written) == self.chunks

    def has(self, index: int) -> bool:
        """Readable by this process (staged in RAM or written to the object file)."""
        return index in self._written or self._staging.holds(self, index)

    def has_range(self, offset: int, length: int) -> bool:
        """True if every chunk covering [offset, offset+length) is durable and verified
        (peer service; any thread)."""
        if length <= 0:
            return True
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size
        durable, unverified = self._durable, self._unverified
        return all(i in durable and i not in unverified for i in range(first, last + 1))

    def bytes_in(self, indexes: AbstractSet[int]) -> int:
        """Bytes covered by a set of this object's chunks, in O(1): every chunk is full
        but the last."""
        if not indexes:
            return 0
        last = self.chunks - 1
        short = self.chunk_size - chunk_length(self.size, self.chunk_size, last)
        return len(indexes) * self.chunk_size - (short if last in indexes else 0)

    def held_bytes(self) -> int:
        return self.bytes_in(self._durable)

    def record(self) -> ObjectRecord:
        return ObjectRecord(self.id, self.size, self.chunk_size, self.last_used)


@dataclass(frozen=True)
class Taken:
    """What a removal took from an object: bytes it held and the chunks now gone."""

    held: int
    durable: list[int]  # chunks the index (and so the scheduler) had
    chunks: list[int]  # every chunk it held, durable or not


class Reading:
    """`with table.reading(obj):` a read of the object's bytes in progress (any thread):
    no removal takes the object meanwhile, and a discard waits before touching its file."""

    __slots__ = ("_lock", "obj")

    def __init__(self, lock: threading.Lock, obj: StoredObject) -> None:
        self._lock = lock
        self.obj = obj

    def __enter__(self) -> Self:
        with self._lock:
            self.obj._reading += 1
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            self.obj._reading -= 1


class Keeping:
    """`with table.keeping(obj):` the object must stay (a read waiting for its chunks, a
    prefetch between them): never evicted meanwhile. Trio thread."""

    __slots__ = ("obj",)

    def __init__(self, obj: StoredObject) -> None:
        self.obj = obj

    def __enter__(self) -> StoredObject:
        self.obj._keeping += 1
        return self.obj

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.obj._keeping -= 1


class Hold:
    """A file open through the mount on an object (`ObjectStore.hold`): its object is
    evicted only when nothing else can go. `release()` once, when the file closes."""

    __slots__ = ("_obj",)

    def __init__(self, obj: StoredObject) -> None:
        self._obj: StoredObject | None = obj
        obj._opened += 1

    def release(self) -> None:
        obj = self._obj
        if obj is not None:
            obj._opened -= 1
            self._obj = None
            if obj._opened == 0:  # RAM kept for its readers goes back to the LRU
                obj._staging.unwant(obj)


class ObjectTable:
    """Every object record, its presence and its uses, with the counters they imply:
    `held` (bytes written), `durable_bytes` and `unverified` (chunks)."""

    def __init__(self, staging: Staging) -> None:
        self._staging = staging
        self._objects: dict[str, StoredObject] = {}
        self._use_lock = threading.Lock()  # reading counts, and a removal's claim
        self._touched: set[StoredObject] = set()  # last_used not yet in the index
        self.held = 0
        self.durable_bytes = 0
        self.unverified = 0
        self.presence = PresenceChanges()  # objects whose held chunks changed

    # -- records ---------------------------------------------------------------------------

    def get(self, object_id: str) -> StoredObject | None:
        """Any thread."""
        return self._objects.get(object_id)

    def __iter__(self) -> Iterator[StoredObject]:
        return iter(list(self._objects.values()))

    def __len__(self) -> int:
        return len(self._objects)

    def create(self, object_id: str, size: int, chunk_size: int, file: ObjectFile) -> StoredObject:
        obj = self._objects[object_id] = StoredObject(
            object_id, size, chunk_size, file, self._staging
        )
        return obj

    def touch(self, obj: StoredObject) -> None:
        """Used now: in memory only, written to the index with the next commit."""
        obj.last_used = time.time()
        self._touched.add(obj)

    def take_touched(self, extra: AbstractSet[StoredObject] = frozenset()) -> list[ObjectRecord]:
        """Index records of `extra` and of objects touched since the last call that still
        have one (durable chunks, not being removed); forgets the touches."""
        objs = set(extra) | {o for o in self._touched if o._durable and o._removing is None}
        self._touched.clear()
        return [obj.record() for obj in objs]

    # -- presence ----------------------------------------------------------------------------

    def loaded(self, obj: StoredObject, index: int, digest: str, verified: bool) -> None:
        """A chunk the index holds, at start-up."""
        self.add_written(obj, index, digest)
        self.add_durable(obj, index)
        if not verified:
            obj._unverified.add(index)
            self.unverified += 1

    def add_written(self, obj: StoredObject, index: int, digest: str) -> None:
        if index not in obj._written:
            obj._written.add(index)
            self.held += chunk_length(obj.size, obj.chunk_size, index)
            self.presence.mark(obj)
        obj._digests[index] = digest
        obj._unstored.pop(index, None)

    def add_durable(self, obj: StoredObject, index: int) -> None:
        if index in obj._written and index not in obj._durable:
            obj._durable.add(index)
            self.durable_bytes += chunk_length(obj.size, obj.chunk_size, index)
            self.presence.mark(obj)

    def unstored(self, obj: StoredObject, index: int, cause: str) -> None:
        obj._unstored[index] = cause

    def verified(self, obj: StoredObject, index: int) -> None:
        if index in obj._unverified:
            obj._unverified.discard(index)
            self.unverified -= 1

    def forget(self, obj: StoredObject, index: int) -> bool:
        """One chunk is gone (its bytes did not reach the disk, or do not match): missing
        again. False if it was not held."""
        if index not in obj._written:
            return False
        length = chunk_length(obj.size, obj.chunk_size, index)
        with self._use_lock:
            obj._written.discard(index)
            if index in obj._durable:
                obj._durable.discard(index)
                self.durable_bytes -= length
        self.held -= length
        self.presence.mark(obj)
        obj._digests.pop(index, None)
        self.verified(obj, index)
        return True

    # -- uses ------------------------------------------------------------------------------

    @property
    def use_lock(self) -> threading.Lock:
        """Guards the reading counts and a removal's claim (see `Reading`)."""
        return self._use_lock

    def readers(self, obj: StoredObject) -> int:
        return obj._reading

    def busy(self, obj: StoredObject, writing: AbstractSet[StoredObject]) -> bool:
        """In use: reads, keeps or writes in progress, staged chunks not yet written
        (`writing`: `Staging.writing_objects()`), chunks written but not yet durable,
        a removal running. Such an object is never evicted."""
        return (
            obj._reading > 0
            or obj._keeping > 0
            or obj._writes > 0
            or obj._removing is not None
            or len(obj._written) != len(obj._durable)
            or obj in writing
        )

    def removing(self, obj: StoredObject) -> trio.Event | None:
        """The running removal's event (set when it ends), or None."""
        return obj._removing

    def begin_write(self, obj: StoredObject) -> None:
        obj._writes += 1

    def end_write(self, obj: StoredObject) -> None:
        obj._writes -= 1

    def claim(self, obj: StoredObject, writing: AbstractSet[StoredObject] | None) -> Taken | None:
        """Take an object's content for removal: its presence is cleared at once, under the
        use lock, so a reader in another thread either holds it first or finds nothing.
        With `writing` (an eviction), only an idle object is taken (else None); without
        (a discard), any. The caller ends the removal with `release`."""
        with self._use_lock:
            if writing is not None and self.busy(obj, writing):
                return None
            obj._removing = trio.Event()
            taken = Taken(obj.bytes_in(obj._written), sorted(obj._durable), sorted(obj._written))
            durable = obj.bytes_in(obj._durable)
            obj._written.clear()
            obj._durable.clear()
        self.held -= taken.held
        self.durable_bytes -= durable
        self.presence.mark(obj)
        self.unverified -= len(obj._unverified)
        obj._unverified.clear()
        obj._digests.clear()
        obj._unstored.clear()
        self._touched.discard(obj)
        obj._removals += 1
        if writing is None:
            obj._discards += 1
        self._staging.drop(obj)
        return taken

    def release(self, obj: StoredObject) -> None:
        """The removal `claim` began has ended: writes to the object may go on."""
        done, obj._removing = obj._removing, None
        if done is not None:
            done.set()
