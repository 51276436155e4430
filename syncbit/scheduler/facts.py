"""The scheduler's durable facts, mirrored in memory, and the one path that writes them to
the `DurableStore` (`kv.py`: LMDB on one node, etcd for replicas).

Durable: datasets (their manifests), registered objects, assignment targets, node
registrations (address, the daemon's labels, operator label edits), quarantined nodes,
broken objects, open disputes, and chunk digests with who established them
(`objects.py`). Each decides what a node may hold, serve or be trusted with, and none of
it can be asked of the nodes again after a restart. Liveness, loads, holders and claims
are soft state: never here.

Reads never touch storage. A write is a transaction: its body reads the mirror and stages
puts and deletes, the commit writes them, and only then `apply` updates the mirror; the
same `apply` loads the state at start (and can follow another writer's changes through
`DurableStore.watch`). One transaction at a time (a trio lock), so read-modify-write is
atomic. `batched` joins the small writes that arrive while a commit runs into the next
one (group commit): a registration storm or a swarm's first digests cost a few commits,
not one each. A transaction larger than one store commit may carry is split in order.

Keys: dataset/<name> (manifest JSON), object/<id> (the geometry of an object no manifest
names, registered by a node's registry mirror), trace/<name> (the access trace of the
dataset's revision, `traces.py`), targets/<name>, node/<name>, quarantine/<node>,
broken/<object>, dispute/<object>/<chunk>, digests/<object>/<block> (`objects.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from syncbit.errors import SchedulerError
from syncbit.manifest import Manifest
from syncbit.scheduler.kv import MAX_PAGE, Delete, DurableStore, Put
from syncbit.scheduler.objects import (
    DIGESTS,
    Draft,
    ObjectFacts,
    block_geometry,
    parse_block_key,
)
from syncbit.scheduler.records import dataset_summary, is_oid

log = logging.getLogger("syncbit.scheduler")

T = TypeVar("T")
MAX_COMMIT_KEYS = 48  # etcd: two operations per key, at most 128 per transaction
# Datasets load before registrations: a manifest's geometry wins over a registration's.
_PREFIXES = (
    "dataset/",
    "object/",
    "targets/",
    "node/",
    "quarantine/",
    "broken/",
    "dispute/",
    "trace/",
    DIGESTS,
)


@dataclass
class NodeRecord:
    """What is durable about a node: where it said it listens, its own labels, and the
    operator's edits on top (None removes a label)."""

    address: str
    labels: dict[str, str] = field(default_factory=dict)
    label_overrides: dict[str, str | None] = field(default_factory=dict)

    def encode(self) -> bytes:
        doc = {
            "address": self.address,
            "labels": self.labels,
            "label_overrides": self.label_overrides,
        }
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class DatasetFacts:
    raw: bytes  # the manifest as stored and served
    manifest: Manifest
    summary: dict[str, Any]


class Txn:
    """The writes of one transaction, staged in order; `bump`: the commit moves the
    generation; `after`: what to do once it is applied (soft state that follows)."""

    def __init__(self, facts: Facts, bump: bool) -> None:
        self.facts = facts
        self.bump = bump
        self.writes: dict[str, bytes | None] = {}
        self.after: list[Callable[[], None]] = []
        self._drafts: dict[str, Draft] = {}

    def put(self, key: str, value: bytes) -> None:
        self.writes[key] = value

    def delete(self, key: str) -> None:
        self.writes[key] = None

    def draft(self, object_id: str) -> Draft:
        """Staged changes to an object's chunk facts (it must be known: `facts.objects`)."""
        draft = self._drafts.get(object_id)
        if draft is None:
            draft = self._drafts[object_id] = Draft(object_id, self.facts.objects[object_id])
        return draft

    def _flush(self) -> None:
        for draft in self._drafts.values():
            self.writes.update(draft.encoded())
        self._drafts.clear()


@dataclass(eq=False)
class _Queued:
    prepare: Callable[[Txn], Any]
    bump: bool
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class Facts:
    """The mirror (public attributes: read them, never assign them) and its writes."""

    def __init__(self, store: DurableStore) -> None:
        self.store = store
        self.datasets: dict[str, DatasetFacts] = {}
        self.targets: dict[str, list[dict[str, Any]]] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.quarantine: dict[str, dict[str, Any]] = {}
        self.broken: dict[str, dict[str, Any]] = {}
        self.disputes: dict[tuple[str, int], dict[str, Any]] = {}
        self.objects: dict[str, ObjectFacts] = {}
        self.registered: set[str] = set()  # objects no manifest named, registered by nodes
        self.traces: dict[str, dict[str, Any]] = {}  # dataset -> its access trace record
        self.generation = 0
        # Called with (object id, chunk indexes) when an object's chunk facts (digests,
        # disputes) changed, and with no indexes when the object changed as a whole.
        self.on_chunks: list[Callable[[str, set[int]], None]] = []
        self._lock = trio.Lock()
        self._queue: list[_Queued] = []
        self._committing = False
        self._bumped = trio.Event()
        self.closed = False

    # -- loading and applying -----------------------------------------------------------------

    async def load(self) -> None:
        """Read every fact from the store (at start)."""
        for prefix in _PREFIXES:
            after: str | None = None
            while True:
                limit = 50 if prefix == "dataset/" else MAX_PAGE  # manifests can be large
                page = await self.store.list_prefix(prefix, after=after, limit=limit)
                for entry in page.entries:
                    self.apply(entry.key, entry.value)
                if page.next is None:
                    break
                after = page.next
        self.generation = await self.store.generation()

    def apply(self, key: str, value: bytes | None) -> None:
        """Make the mirror say what the store says of `key` (None: deleted)."""
        kind, _, rest = key.partition("/")
        try:
            if kind == "dataset":
                self._apply_dataset(rest, value)
            elif kind == "object":
                self._apply_registration(rest, value)
            elif kind == "trace":
                _set(self.traces, rest, None if value is None else json.loads(value))
            elif kind == "targets":
                _set(self.targets, rest, None if value is None else json.loads(value))
            elif kind == "node":
                record = None if value is None else NodeRecord(**json.loads(value))
                _set(self.nodes, rest, record)
            elif kind in ("quarantine", "broken"):
                table = self.quarantine if kind == "quarantine" else self.broken
                _set(table, rest, None if value is None else json.loads(value))
                if kind == "broken":
                    self._changed(rest, set())
            elif kind == "dispute":
                object_id, _, index = rest.partition("/")
                doc = None if value is None else json.loads(value)
                _set(self.disputes, (object_id, int(index)), doc)
                self._changed(object_id, {int(index)})
            elif kind + "/" == DIGESTS:
                self._apply_block(key, value)
            else:
                log.warning("scheduler state: ignoring unknown key %r", key)
        except (ValueError, TypeError, KeyError) as exc:
            raise SchedulerError(f"scheduler state: unreadable value of {key!r}: {exc}") from exc

    def _apply_dataset(self, name: str, value: bytes | None) -> None:
        if value is None:
            self.datasets.pop(name, None)
            return
        manifest = Manifest.model_validate_json(value)
        self.datasets[name] = DatasetFacts(bytes(value), manifest, dataset_summary(manifest))
        for entry in manifest.files:
            if entry.size and is_oid(entry.object):
                self._geometry(entry.object.lower(), entry.size, manifest.chunk_size)

    def _apply_registration(self, object_id: str, value: bytes | None) -> None:
        """An object no manifest named, registered with its geometry (a registry blob a
        node's mirror serves); a geometry already known (a manifest's) stands."""
        if value is None:
            self.registered.discard(object_id)
            return
        doc = json.loads(value)
        self.registered.add(object_id)
        if object_id not in self.objects:
            self._geometry(object_id, int(doc["size"]), int(doc["chunk_size"]))

    def _geometry(self, object_id: str, size: int, chunk_size: int) -> ObjectFacts:
        """The object's facts, made anew when another geometry wins (its chunk facts, of
        the other layout, are dropped: the transaction that says so deletes them too)."""
        obj = self.objects.get(object_id)
        if obj is None or (obj.size, obj.chunk_size) != (size, chunk_size):
            if obj is not None:
                obj.clear()
            obj = self.objects[object_id] = ObjectFacts(size, chunk_size)
            self._changed(object_id, set())
        return obj

    def _apply_block(self, key: str, value: bytes | None) -> None:
        object_id, block = parse_block_key(key)
        obj = self.objects.get(object_id)
        if obj is None:
            if value is None:
                return
            obj = self._geometry(object_id, *block_geometry(value))
        changed = obj.apply_block(block, value)
        if changed:
            self._changed(object_id, changed)

    def _changed(self, object_id: str, indexes: set[int]) -> None:
        for hook in self.on_chunks:
            hook(object_id, indexes)

    # -- writing ------------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self, *, bump: bool = False) -> AsyncIterator[Txn]:
        """`async with facts.transaction() as txn:` read the mirror and stage writes; at
        the end of the block they are committed, then applied. Nothing is written when
        the block raises."""
        async with self._lock:
            self.check_open()
            txn = Txn(self, bump)
            yield txn
            txn._flush()
            await self._commit(txn)
        for action in txn.after:
            action()

    async def batched(self, prepare: Callable[[Txn], T], *, bump: bool = False) -> T:
        """Run `prepare(txn)` in the next group commit and return its result once the
        commit is durable (or raise what the commit raised). `prepare` must not await."""
        item = _Queued(prepare, bump)
        self._queue.append(item)
        if not self._committing:
            self._committing = True
            try:
                with trio.CancelScope(shield=True):  # the others wait on this commit too
                    await self._drain()
            finally:
                self._committing = False
        await item.done.wait()
        if item.error is not None:
            raise item.error
        result: T = item.result
        return result

    async def _drain(self) -> None:
        while self._queue:
            items, self._queue = self._queue, []
            try:
                async with self.transaction(bump=any(i.bump for i in items)) as txn:
                    for item in items:
                        try:
                            item.result = item.prepare(txn)
                        except Exception as exc:  # that request's own error
                            item.error = exc
            except Exception as exc:
                for item in items:
                    item.error = item.error or exc
            for item in items:
                item.done.set()

    async def _commit(self, txn: Txn) -> None:
        if not txn.writes and not txn.bump:
            return
        keys = list(txn.writes)
        parts = [keys[i : i + MAX_COMMIT_KEYS] for i in range(0, len(keys), MAX_COMMIT_KEYS)]
        parts = parts or [[]]
        with trio.CancelScope(shield=True):  # a commit that began is applied, always
            for n, part in enumerate(parts):
                bump = txn.bump and n == len(parts) - 1
                writes = [
                    Put(k, v) if (v := txn.writes[k]) is not None else Delete(k) for k in part
                ]
                result = await self.store.commit(writes, bump=bump)
                for key in part:
                    self.apply(key, txn.writes[key])
                if bump:
                    self.generation = result.revision
                    self._bumped.set()
                    self._bumped = trio.Event()

    # -- the generation -----------------------------------------------------------------------

    async def wait_generation(self, after: int, timeout: float) -> int:
        """The generation once it is no longer `after`, or after `timeout` seconds, or at
        once when the facts are closed (the server is stopping)."""
        with trio.move_on_after(timeout):
            while self.generation == after and not self.closed:
                await self._bumped.wait()
        return self.generation

    def follow_generation(self, generation: int) -> None:
        """The generation another writer's commit made (a replica following the leader)."""
        if generation != self.generation:
            self.generation = generation
            self._bumped.set()
            self._bumped = trio.Event()

    def close(self) -> None:
        """Refuse further writes; long polls answer now."""
        self.closed = True
        self._bumped.set()

    def check_open(self) -> None:
        if self.closed:
            raise SchedulerError("scheduler state is closed")

    # -- lookups ------------------------------------------------------------------------------

    def locate(self, object_id: str) -> tuple[str, str, int, int, bool] | None:
        """(dataset, path, size, chunk size, unproven) of a file whose content is
        `object_id`; unproven: its source cannot prove content (a head sample stands in)."""
        for name, facts in self.datasets.items():
            for entry in facts.manifest.files:
                if entry.object.lower() == object_id:
                    unproven = "head" in entry.version
                    return name, entry.path, entry.size, facts.manifest.chunk_size, unproven
        return None


def _set(table: dict[Any, Any], key: Any, value: Any) -> None:
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value


__all__ = ["MAX_COMMIT_KEYS", "DatasetFacts", "Facts", "NodeRecord", "Txn"]
