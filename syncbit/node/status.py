"""What the node tells about its datasets (ready, bytes held, xattrs, pinned bytes) and
`/readyz`, kept up to date from store and fetch events: a question costs O(changed
objects), never a scan of every file. Never changes a dataset, plan or chunk; trio thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import trio

from syncbit.manifest import Manifest
from syncbit.store import PresenceChanges, StoredObject


class Objects(Protocol):
    """What status reads of the store (`ObjectStore`)."""

    @property
    def presence(self) -> PresenceChanges: ...

    def get(self, object_id: str) -> StoredObject | None: ...


class FetchMarks(Protocol):
    """What the fetch layer knows of an object beyond its chunks."""

    def is_broken(self, object_id: str) -> bool: ...

    def is_verified(self, object_id: str) -> bool: ...


@dataclass
class _Dataset:
    """One dataset version's cached status."""

    manifest: Manifest
    objects: frozenset[str]  # its distinct non-empty objects
    wants_sha: frozenset[str]  # those whose source published a whole-file SHA-256
    size: int  # bytes of its distinct objects
    present: int = 0  # bytes of them written here
    unready: set[str] = field(default_factory=set)  # objects not yet ready for it


class Status:
    """Ready datasets and held bytes, cached. A dataset version is *ready* when every
    non-empty object of it is whole and durable here, not broken, and whole-file verified
    where its source published a SHA-256.

    Args:
        store: tells which objects changed (`store.presence`).
        marks: the fetch layer's broken and verified marks.
        heartbeat_interval: `/readyz` fails after three missed heartbeats (and 5 s), at
            this interval until a heartbeat answer says which is in force (`heard`).
        mounted: whether the FUSE mount answers.
    """

    def __init__(
        self,
        store: Objects,
        marks: FetchMarks,
        heartbeat_interval: float,
        mounted: Callable[[], bool],
    ) -> None:
        self._store = store
        self._marks = marks
        self._heartbeat_interval = heartbeat_interval
        self._mounted = mounted
        self._datasets: dict[str, _Dataset] = {}
        self._by_object: dict[str, set[str]] = {}  # object -> datasets holding it
        # Object -> its written bytes as counted in `present` and `pinned`: every object
        # of a dataset listed or pinned, and only those.
        self._held: dict[str, int] = {}
        # Complete objects waiting for their whole-file check: the fetch layer says when
        # one passes only by a wake-up, so these few are looked at on every refresh.
        self._awaiting: set[str] = set()
        self._dirty: set[str] = set()  # objects to look at again (a broken mark)
        # The pinned objects (`set_pins`): their sizes, and the bytes of them held here.
        self._pin_sizes: dict[str, int] = {}
        self._pin_size = 0
        self._pinned_held = 0
        self._assigned: frozenset[str] = frozenset()
        self._heartbeat_ok = -math.inf

    # -- what changed (told by the node's loops) -----------------------------------------

    def set_datasets(self, manifests: Mapping[str, Manifest]) -> None:
        """The dataset versions this node lists now. O(files) of the new versions only."""
        for name in list(self._datasets):
            if manifests.get(name) is not self._datasets[name].manifest:
                self._drop(name)
        for name, manifest in manifests.items():
            if name not in self._datasets:
                self._add(name, manifest)

    def set_assigned(self, names: Iterable[str]) -> None:
        self._assigned = frozenset(names)

    def set_pins(self, sizes: Mapping[str, int]) -> None:
        """The objects pinned in the store now (object -> size). O(pinned objects)."""
        self._refresh()
        for oid in self._pin_sizes.keys() - sizes.keys():
            if oid not in self._by_object:
                del self._held[oid]
        self._pin_sizes = dict(sizes)
        for oid in self._pin_sizes:
            if oid not in self._held:
                self._held[oid] = _written(self._store.get(oid))
        self._pinned_held = sum(self._held[oid] for oid in self._pin_sizes)
        self._pin_size = sum(self._pin_sizes.values())

    def object_changed(self, object_id: str) -> None:
        """Look at the object again at the next question (a mark of the fetch layer)."""
        self._dirty.add(object_id)

    def heard(self, interval: float | None = None) -> None:
        """The scheduler answered a heartbeat now; `interval`: the seconds until the next
        one now in force (the scheduler stretches it in a large cluster), which `/readyz`
        counts three of from here on."""
        self._heartbeat_ok = trio.current_time()
        if interval is not None:
            self._heartbeat_interval = interval

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between this node's heartbeats now (as the scheduler last asked)."""
        return self._heartbeat_interval

    # -- questions ---------------------------------------------------------------------------

    def ready(self, name: str) -> bool:
        self._refresh()
        dataset = self._datasets.get(name)
        return dataset is not None and not dataset.unready

    def present(self, name: str) -> int:
        """Bytes of the dataset held here (0 for one not listed)."""
        self._refresh()
        dataset = self._datasets.get(name)
        return dataset.present if dataset is not None else 0

    def size(self, name: str) -> int:
        dataset = self._datasets.get(name)
        return dataset.size if dataset is not None else 0

    def pinned(self) -> tuple[int, int]:
        """(bytes held of the pinned objects, bytes they need when whole): what
        `ObjectStore.usage` takes so that it counts nothing itself."""
        self._refresh()
        return self._pinned_held, self._pin_size

    def ready_datasets(self) -> dict[str, str]:
        """Dataset -> revision for every dataset version ready here (for the scheduler)."""
        self._refresh()
        return {n: d.manifest.revision for n, d in self._datasets.items() if not d.unready}

    def datasets(self) -> dict[str, tuple[bool, int]]:
        """Dataset -> (ready, bytes held), for metrics."""
        self._refresh()
        return {n: (not d.unready, d.present) for n, d in self._datasets.items()}

    def is_ready(self, manifest: Manifest) -> bool:
        """Whether this version of a dataset is ready here: cached for the version listed,
        else found by looking at each of its objects."""
        dataset = self._datasets.get(manifest.dataset)
        if dataset is not None and dataset.manifest is manifest:
            return self.ready(manifest.dataset)
        probe = _dataset(manifest)
        return all(self._ok(self._store.get(oid), probe) for oid in probe.objects)

    def attrs(self, name: str) -> dict[str, str]:
        """Extended attributes of /<mount>/<dataset>, for scripts (`getfattr`)."""
        if name not in self._datasets:
            return {}
        return {
            "user.syncbit.ready": "1" if self.ready(name) else "0",
            "user.syncbit.cached_bytes": str(self.present(name)),
            "user.syncbit.assigned": "1" if name in self._assigned else "0",
        }

    def readiness(self) -> tuple[bool, str]:
        """`/readyz`: the mount answers and the scheduler heard from this node lately."""
        if not self._mounted():
            return False, "not mounted yet"
        quiet = trio.current_time() - self._heartbeat_ok
        if quiet > 3 * self._heartbeat_interval + 5:
            return False, f"no answer from the scheduler for {quiet:.0f}s"
        return True, "ok"

    # -- the cache ---------------------------------------------------------------------------

    def _add(self, name: str, manifest: Manifest) -> None:
        dataset = self._datasets[name] = _dataset(manifest)
        for oid in dataset.objects:
            self._by_object.setdefault(oid, set()).add(name)
            obj = self._store.get(oid)
            self._held.setdefault(oid, _written(obj))
            dataset.present += self._held[oid]
            self._judge(oid, obj, dataset)

    def _drop(self, name: str) -> None:
        dataset = self._datasets.pop(name)
        for oid in dataset.objects:
            names = self._by_object[oid]
            names.discard(name)
            if not names:
                del self._by_object[oid]
                self._awaiting.discard(oid)
                if oid not in self._pin_sizes:
                    del self._held[oid]

    def _refresh(self) -> None:
        """Bring the cache up to date with what changed since the last question."""
        changed = {obj.id for obj in self._store.presence.take()}
        changed |= self._dirty | self._awaiting
        self._dirty = set()
        for oid in changed:
            if oid not in self._held:
                continue  # neither in a dataset listed nor pinned
            obj = self._store.get(oid)
            held = _written(obj)
            delta, self._held[oid] = held - self._held[oid], held
            if oid in self._pin_sizes:
                self._pinned_held += delta
            self._awaiting.discard(oid)
            for name in self._by_object.get(oid, ()):
                dataset = self._datasets[name]
                dataset.present += delta
                self._judge(oid, obj, dataset)

    def _judge(self, oid: str, obj: StoredObject | None, dataset: _Dataset) -> None:
        if self._ok(obj, dataset):
            dataset.unready.discard(oid)
            return
        dataset.unready.add(oid)
        whole = obj is not None and _whole(obj)
        if whole and oid in dataset.wants_sha and not self._marks.is_broken(oid):
            self._awaiting.add(oid)  # only its whole-file check is missing

    def _ok(self, obj: StoredObject | None, dataset: _Dataset) -> bool:
        if obj is None or not _whole(obj) or self._marks.is_broken(obj.id):
            return False
        return obj.id not in dataset.wants_sha or self._marks.is_verified(obj.id)


def _dataset(manifest: Manifest) -> _Dataset:
    entries = [f for f in manifest.files if f.size]
    return _Dataset(
        manifest,
        objects=frozenset(f.object for f in entries),
        wants_sha=frozenset(f.object for f in entries if f.version.get("sha256")),
        size=sum({f.object: f.size for f in manifest.files}.values()),
    )


def _whole(obj: StoredObject) -> bool:
    return len(obj.durable) == obj.chunks


def _written(obj: StoredObject | None) -> int:
    return obj.bytes_in(obj.written) if obj is not None else 0
