"""The scheduler's durable state in LMDB: nodes, datasets (manifests), chunk digests, holders.

Every method is synchronous, runs one short transaction and is safe to call from several
threads at once; nothing here does network I/O or holds a transaction across calls.

Layout (named databases of one environment, `<state_dir>/state.lmdb`):

    nodes      node name                         -> node record (JSON, without `up`)
    datasets   dataset name                      -> manifest (JSON)
    summaries  dataset name                      -> summary (JSON; listing without parsing)
    objects    object id (32 bytes)              -> size, chunk_size (2 x u64 big-endian),
                                                    from the manifests that name the object
    digests    object id + chunk index (u32 BE)  -> 32-byte chunk digest
    holders    object id + node name             -> bitmap, bit i (little-endian) = chunk i
    targets    dataset name                      -> assignment targets (JSON list)
    meta       b"generation"                     -> u64 big-endian

Chunk facts are kept only for objects some manifest named (`put_dataset` records their
size and chunk size; they stay after the dataset is removed, since nodes still hold
them): a chunk index is then bounded by its object's size, so no report can make a
holder bitmap, a digest key or a claim larger than the datasets an admin registered.

The generation counts every change that alters what a node should hold: datasets, their
revisions, assignments and label edits. Nodes poll it and look closer only when it moves.

Concurrency: LMDB allows one writer at a time; a process-local lock serialises writers
before LMDB's own mutex so a thread never waits for it while holding the GIL. Readers never
block. Every read-modify-write happens inside one write transaction, hence atomically.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from syncbit.chunks import chunk_count
from syncbit.errors import ConfigError, NotFoundError, SchedulerError, UserError
from syncbit.manifest import Manifest
from syncbit.scheduler.policy import LeastLoaded, PeerPolicy

log = logging.getLogger("syncbit.scheduler")

_MAP_SIZE = 64 * 2**30  # virtual: LMDB grows the file only as data arrives
_OID_LEN = 32
_DIGEST_LEN = 32
_MAX_NAME_BYTES = 255  # LMDB keys are at most 511 bytes; holders keys are 32 + name
_GENERATION = b"generation"
_GEOMETRY_MIGRATED = b"objects-from-manifests"  # state written before objects came from them
_OBJECT = struct.Struct(">QQ")
MAX_CHUNK_INDEX = 2**32 - 1  # digests keys hold the index as a u32


class DatasetExistsError(UserError):
    """A dataset of that name already exists with a different source."""


@dataclass(frozen=True)
class NodeInfo:
    """One node as the scheduler sees it; `up` is derived from `last_seen` when read."""

    name: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    last_seen: float = 0.0
    load: int = 0
    cache_bytes: int = 0
    cache_size: int = 0
    reports: int = 0
    label_overrides: dict[str, str | None] = field(default_factory=dict)
    ready: dict[str, str] = field(default_factory=dict)  # dataset -> revision ready here
    pinned_bytes: int = 0
    pinned_over_budget: bool = False
    up: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def effective_labels(base: dict[str, str], overrides: dict[str, str | None]) -> dict[str, str]:
    """The daemon's own labels with operator edits applied (None removes a label)."""
    labels = dict(base)
    for key, value in overrides.items():
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    return labels


def matches(target: dict[str, Any], node: NodeInfo) -> bool:
    """Whether an assignment target names `node`: {"node": name} or {"selector": {k: v}}
    (every pair must match; an empty selector matches every node)."""
    if "node" in target:
        return bool(target["node"] == node.name)
    selector: dict[str, str] = target.get("selector", {})
    return all(node.labels.get(k) == v for k, v in selector.items())


def describe_target(target: dict[str, Any]) -> str:
    if "node" in target:
        return f"node {target['node']}"
    selector = target.get("selector", {})
    return "selector " + (",".join(f"{k}={v}" for k, v in selector.items()) or "(all nodes)")


def dataset_summary(manifest: Manifest) -> dict[str, Any]:
    """The listing entry of a dataset: everything but its files."""
    return {
        "name": manifest.dataset,
        "source": manifest.source,
        "revision": manifest.revision,
        "files": len(manifest.files),
        "size": manifest.total_size,
        "created": manifest.created,
    }


def held_bytes(mask: int, size: int, chunk_size: int) -> int:
    """Bytes covered by the set bits of `mask` in an object of `size` bytes."""
    count = chunk_count(size, chunk_size)
    mask &= (1 << count) - 1
    total = mask.bit_count() * chunk_size
    if count and mask >> (count - 1) & 1:
        total -= count * chunk_size - size  # the last chunk is short
    return total


def _oid(object_id: str) -> bytes:
    try:
        raw = bytes.fromhex(object_id)
    except ValueError:
        raw = b""
    if len(raw) != _OID_LEN:
        raise UserError(f"invalid object id {object_id!r}: expected {2 * _OID_LEN} hex digits")
    return raw


def _digest(index: int, value: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != _DIGEST_LEN:
        raise UserError(f"invalid digest {value!r} for chunk {index}: expected 64 hex digits")
    return raw


def _name_key(kind: str, name: str) -> bytes:
    raw = name.encode()
    if not name or len(raw) > _MAX_NAME_BYTES or any(ord(c) < 32 for c in name):
        raise UserError(f"invalid {kind} name {name!r}: 1-{_MAX_NAME_BYTES} printable bytes")
    return raw


def _mask(raw: bytes | None) -> int:
    return int.from_bytes(raw, "little") if raw else 0


def _mask_bytes(mask: int) -> bytes:
    return mask.to_bytes((mask.bit_length() + 7) // 8, "little")


def _prefix(
    txn: lmdb.Transaction[bytes], db: lmdb._Database, prefix: bytes
) -> Iterator[tuple[bytes, bytes]]:
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if not key.startswith(prefix):
            return
        yield key, value


class SchedulerState:
    """Nodes, datasets, digests and holders, persisted in `state_dir`.

    Args:
        state_dir: directory of the LMDB environment; created if missing.
        node_timeout: seconds without a heartbeat after which a node is down.
        clock: wall-clock seconds (injectable for tests).
    """

    def __init__(
        self,
        state_dir: Path,
        node_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.node_timeout = node_timeout
        self.clock = clock
        self._write_lock = threading.Lock()
        # Wakes `wait_generation` callers once a write that bumped the generation commits.
        self._generation_cond = threading.Condition()
        self._bumped = False  # under _write_lock: the current write bumped the generation
        self._use_cond = threading.Condition()
        self._active = 0
        self._closed = False
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(
                str(self.state_dir / "state.lmdb"), max_dbs=16, map_size=_MAP_SIZE, metasync=False
            )
        except (OSError, lmdb.Error) as exc:
            raise ConfigError(f"cannot open scheduler state in {self.state_dir}: {exc}") from exc
        self._nodes = self._env.open_db(b"nodes")
        self._datasets = self._env.open_db(b"datasets")
        self._summaries = self._env.open_db(b"summaries")
        self._objects = self._env.open_db(b"objects")
        self._digests = self._env.open_db(b"digests")
        self._holders = self._env.open_db(b"holders")
        self._meta = self._env.open_db(b"meta")
        self._targets = self._env.open_db(b"targets")
        self._register_stored_objects()
        # Last liveness seen per node, only to log up/down transitions once.
        self._liveness = {n.name: n.up for n in self.nodes()}

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _use(self) -> Iterator[None]:
        """Count an operation in flight so `close` never pulls the environment from under it."""
        with self._use_cond:
            if self._closed:
                raise SchedulerError("scheduler state is closed")
            self._active += 1
        try:
            yield
        finally:
            with self._use_cond:
                self._active -= 1
                if not self._active:
                    self._use_cond.notify_all()

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction[bytes]]:
        with self._use(), self._env.begin() as txn:
            yield txn

    @contextmanager
    def _write(self) -> Iterator[lmdb.Transaction[bytes]]:
        with self._use(), self._write_lock:
            self._bumped = False
            with self._env.begin(write=True) as txn:
                yield txn
            if self._bumped:  # committed: waiters may now read the new generation
                with self._generation_cond:
                    self._generation_cond.notify_all()

    def close(self) -> None:
        """Wait for operations in flight, then close the environment. Idempotent."""
        with self._use_cond:
            if self._closed:
                return
            self._closed = True
        with self._generation_cond:  # not under _use_cond: a waiter takes them the other way
            self._generation_cond.notify_all()  # long polls answer now
        with self._use_cond:
            self._use_cond.wait_for(lambda: self._active == 0)
        self._env.close()

    def __enter__(self) -> SchedulerState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _node(self, raw: bytes, now: float) -> NodeInfo:
        doc = json.loads(raw)
        doc["up"] = now - doc["last_seen"] <= self.node_timeout
        doc["labels"] = effective_labels(doc["labels"], doc.get("label_overrides", {}))
        return NodeInfo(**doc)

    def _register_stored_objects(self) -> None:
        """Once per state dir: record the objects of manifests stored before objects were
        recorded from manifests, so their chunks stay reportable."""
        with self._write() as txn:
            if txn.get(_GEOMETRY_MIGRATED, db=self._meta) is not None:
                return
            for _, raw in txn.cursor(db=self._datasets):
                self._register_objects(txn, Manifest.model_validate_json(raw))
            txn.put(_GEOMETRY_MIGRATED, b"1", db=self._meta)

    def _register_objects(self, txn: lmdb.Transaction[bytes], manifest: Manifest) -> None:
        """Record the size and chunk size of every object `manifest` names. A record that
        disagrees came from reports before any manifest named the object (or a manifest
        of another chunk size): the manifest wins, and the chunk facts recorded against
        the other layout are dropped."""
        for entry in manifest.files:
            if not entry.size:
                continue
            try:
                oid = _oid(entry.object)
            except UserError:
                continue  # not an object id this scheduler could have chunks of
            packed = _OBJECT.pack(entry.size, manifest.chunk_size)
            known = txn.get(oid, db=self._objects)
            if known == packed:
                continue
            if known is not None:
                was = _OBJECT.unpack(known)
                log.warning(
                    "object %s was recorded with size %d and chunk size %d; dataset %s "
                    "says %d and %d: its chunk records are dropped",
                    entry.object[:16],
                    was[0],
                    was[1],
                    manifest.dataset,
                    entry.size,
                    manifest.chunk_size,
                )
                for db in (self._digests, self._holders):
                    for key in [k for k, _ in _prefix(txn, db, oid)]:
                        txn.delete(key, db=db)
            txn.put(oid, packed, db=self._objects)

    def object_geometry(self, object_id: str) -> tuple[int, int] | None:
        """(size, chunk size) of an object a manifest named, else None."""
        oid = _oid(object_id)
        with self._read() as txn:
            known = txn.get(oid, db=self._objects)
        if known is None:
            return None
        size, chunk_size = _OBJECT.unpack(known)
        return int(size), int(chunk_size)

    def _bump(self, txn: lmdb.Transaction[bytes], db: lmdb._Database) -> int:
        self._bumped = True
        raw = txn.get(_GENERATION, db=db)
        generation = (int.from_bytes(raw, "big") if raw else 0) + 1
        txn.put(_GENERATION, generation.to_bytes(8, "big"), db=db)
        return generation

    # -- nodes --------------------------------------------------------------------------------

    def heartbeat(
        self,
        name: str,
        address: str,
        labels: dict[str, str] | None = None,
        load: int = 0,
        cache_bytes: int = 0,
        cache_size: int = 0,
        ready: dict[str, str] | None = None,
        pinned_bytes: int = 0,
        pinned_over_budget: bool = False,
    ) -> NodeInfo:
        """Register or refresh a node and stamp `last_seen`; returns its record (labels as
        the daemon configured them, with operator edits from `edit_labels` on top)."""
        key = _name_key("node", name)
        if not address:
            raise UserError(f"node {name!r} sent an empty address")
        now = self.clock()
        with self._write() as txn:
            raw = txn.get(key, db=self._nodes)
            old = json.loads(raw) if raw else None
            overrides = old.get("label_overrides", {}) if old else {}
            info = NodeInfo(
                name=name,
                address=address,
                labels=dict(labels or {}),
                last_seen=now,
                load=load,
                cache_bytes=cache_bytes,
                cache_size=cache_size,
                reports=old["reports"] if old else 0,
                label_overrides=overrides,
                ready=dict(ready or {}),
                pinned_bytes=pinned_bytes,
                pinned_over_budget=pinned_over_budget,
                up=True,
            )
            doc = info.to_json()
            del doc["up"]  # derived on every read, never stored
            txn.put(key, json.dumps(doc).encode(), db=self._nodes)
            if old is None or old["labels"] != doc["labels"]:
                self._bump(txn, self._meta)  # assignments by selector may now match
        with self._use_cond:
            was_up = self._liveness.get(name)
            self._liveness[name] = True
        if old is None:
            log.info("node %s registered at %s labels %s", name, address, info.labels or "{}")
        elif not was_up:
            log.info("node %s is up at %s", name, address)
        elif old["address"] != address:
            log.info("node %s moved from %s to %s", name, old["address"], address)
        return self._node(json.dumps(doc).encode(), now)

    def edit_labels(self, name: str, set_: dict[str, str], remove: list[str]) -> NodeInfo:
        """Operator label edits on a node (`syncbit node label`): they apply on top of the
        daemon's own labels and survive its heartbeats and restarts. NotFoundError if the
        node never registered."""
        key = _name_key("node", name)
        for label in [*set_, *remove]:
            if not label or any(c in label for c in "=,") or any(ord(c) < 33 for c in label):
                raise UserError(f"invalid label key {label!r}")
        now = self.clock()
        with self._write() as txn:
            raw = txn.get(key, db=self._nodes)
            if raw is None:
                raise NotFoundError(f"unknown node {name!r}")
            doc = json.loads(raw)
            overrides: dict[str, str | None] = doc.get("label_overrides", {})
            overrides.update(set_)
            overrides.update({k: None for k in remove})
            doc["label_overrides"] = overrides
            txn.put(key, json.dumps(doc).encode(), db=self._nodes)
            self._bump(txn, self._meta)
            info = self._node(json.dumps(doc).encode(), now)
        log.info("node %s labels now %s", name, info.labels or "{}")
        return info

    def nodes(self) -> list[NodeInfo]:
        """Every node ever registered, by name, with `up` computed now."""
        now = self.clock()
        with self._read() as txn:
            return [self._node(raw, now) for _, raw in txn.cursor(db=self._nodes)]

    def check_liveness(self) -> list[NodeInfo]:
        """Nodes whose up/down state changed since the last look (each logged once)."""
        changed: list[NodeInfo] = []
        for node in self.nodes():
            with self._use_cond:
                was_up = self._liveness.get(node.name)
                self._liveness[node.name] = node.up
            if was_up is not None and was_up != node.up:
                changed.append(node)
                if node.up:
                    log.info("node %s is up at %s", node.name, node.address)
                else:
                    log.warning(
                        "node %s is down: no heartbeat for %.1fs",
                        node.name,
                        self.clock() - node.last_seen,
                    )
        return changed

    # -- datasets -----------------------------------------------------------------------------

    def put_dataset(self, manifest: Manifest) -> tuple[dict[str, Any], bool]:
        """Store a resolved dataset version; returns (summary, changed).

        The same name with the same revision changes nothing; a new revision of the same
        source replaces the old one; a different source is refused (DatasetExistsError).
        """
        key = _name_key("dataset", manifest.dataset)
        summary = dataset_summary(manifest)
        with self._write() as txn:
            raw = txn.get(key, db=self._summaries)
            old = json.loads(raw) if raw else None
            if old is not None and old["source"] != manifest.source:
                raise DatasetExistsError(
                    f"dataset {manifest.dataset} already exists with source {old['source']}; "
                    "remove it first"
                )
            if old is not None and old["revision"] == manifest.revision:
                return old, False
            txn.put(key, manifest.model_dump_json().encode(), db=self._datasets)
            txn.put(key, json.dumps(summary).encode(), db=self._summaries)
            self._register_objects(txn, manifest)
            generation = self._bump(txn, self._meta)
        if old is None:
            log.info(
                "dataset %s added: revision %s, %d files, %d bytes from %s (generation %d)",
                manifest.dataset,
                manifest.revision,
                summary["files"],
                summary["size"],
                manifest.source,
                generation,
            )
        else:
            log.info(
                "dataset %s updated: revision %s -> %s, %d files, %d bytes (generation %d)",
                manifest.dataset,
                old["revision"],
                manifest.revision,
                summary["files"],
                summary["size"],
                generation,
            )
        return summary, True

    def get_dataset_json(self, name: str) -> bytes:
        """The stored manifest document of `name`, as JSON bytes (NotFoundError if unknown)."""
        key = _name_key("dataset", name)
        with self._read() as txn:
            raw = txn.get(key, db=self._datasets)
        if raw is None:
            raise NotFoundError(f"unknown dataset {name!r}")
        return bytes(raw)

    def get_dataset(self, name: str) -> Manifest:
        """The manifest of `name` (NotFoundError if unknown)."""
        return Manifest.model_validate_json(self.get_dataset_json(name))

    def summary(self, name: str) -> dict[str, Any]:
        """The listing entry of dataset `name` (NotFoundError if unknown)."""
        key = _name_key("dataset", name)
        with self._read() as txn:
            raw = txn.get(key, db=self._summaries)
        if raw is None:
            raise NotFoundError(f"unknown dataset {name!r}")
        doc: dict[str, Any] = json.loads(raw)
        return doc

    def datasets(self) -> list[dict[str, Any]]:
        """Summaries of every dataset, by name."""
        with self._read() as txn:
            return [json.loads(raw) for _, raw in txn.cursor(db=self._summaries)]

    def generation(self) -> int:
        """A counter bumped by every change to the set of datasets or their revisions."""
        with self._read() as txn:
            raw = txn.get(_GENERATION, db=self._meta)
        return int.from_bytes(raw, "big") if raw else 0

    def wait_generation(self, after: int, timeout: float) -> int:
        """The generation once it differs from `after`, or after `timeout` seconds (a
        long poll: nodes see new datasets, assignments and labels at once, not on their
        next poll). Blocking: for the HTTP server's request threads."""
        deadline = time.monotonic() + timeout
        with self._generation_cond:
            while True:
                generation = self.generation()
                left = deadline - time.monotonic()
                if generation != after or left <= 0 or self._closed:
                    return generation
                self._generation_cond.wait(left)

    def remove_dataset(self, name: str) -> None:
        """Forget a dataset (NotFoundError if unknown). Chunk facts stay: nodes still hold them."""
        key = _name_key("dataset", name)
        with self._write() as txn:
            if not txn.delete(key, db=self._summaries):
                raise NotFoundError(f"unknown dataset {name!r}")
            txn.delete(key, db=self._datasets)
            txn.delete(key, db=self._targets)
            generation = self._bump(txn, self._meta)
        log.info("dataset %s removed (generation %d)", name, generation)

    # -- assignments --------------------------------------------------------------------------

    def add_targets(self, name: str, targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Assign dataset `name` to more nodes: each target is {"node": n} or
        {"selector": {k: v}}; nodes that register later match too. Returns all targets."""
        key = _name_key("dataset", name)
        for target in targets:
            if "node" in target:
                _name_key("node", str(target["node"]))
        with self._write() as txn:
            if txn.get(key, db=self._summaries) is None:
                raise NotFoundError(f"unknown dataset {name!r}")
            raw = txn.get(key, db=self._targets)
            current: list[dict[str, Any]] = json.loads(raw) if raw else []
            added = [t for t in targets if t not in current]
            if added:
                current.extend(added)
                txn.put(key, json.dumps(current).encode(), db=self._targets)
                generation = self._bump(txn, self._meta)
        for target in added:
            log.info(
                "dataset %s assigned to %s (generation %d)",
                name,
                describe_target(target),
                generation,
            )
        return current

    def remove_targets(
        self, name: str, targets: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        """Drop assignment targets of `name` (None: all of them); returns what is left.
        NotFoundError when a given target is not assigned."""
        key = _name_key("dataset", name)
        with self._write() as txn:
            if txn.get(key, db=self._summaries) is None:
                raise NotFoundError(f"unknown dataset {name!r}")
            raw = txn.get(key, db=self._targets)
            current: list[dict[str, Any]] = json.loads(raw) if raw else []
            drop = current if targets is None else targets
            for target in drop:
                if target not in current:
                    raise NotFoundError(
                        f"dataset {name} is not assigned to {describe_target(target)}"
                    )
            left = [t for t in current if t not in drop]
            if left:
                txn.put(key, json.dumps(left).encode(), db=self._targets)
            else:
                txn.delete(key, db=self._targets)
            generation = self._bump(txn, self._meta)
        log.info(
            "dataset %s unassigned from %s (generation %d)",
            name,
            ", ".join(describe_target(t) for t in drop) or "nothing",
            generation,
        )
        return left

    def targets(self) -> dict[str, list[dict[str, Any]]]:
        """Every dataset's assignment targets."""
        with self._read() as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor(db=self._targets)}

    def plans(self) -> dict[str, list[dict[str, Any]]]:
        """What every node must hold: per node, per assigned dataset, its revision and the
        sorted up nodes assigned it (`members`, the node itself always included). Members
        split the source fetches between them (each chunk from the source by one member,
        by position), so the origin sends each byte once. One pass for all nodes: the API
        serves every heartbeat from one such result (see `Api.plan`)."""
        nodes = self.nodes()
        summaries = {d["name"]: d for d in self.datasets()}
        plans: dict[str, list[dict[str, Any]]] = {n.name: [] for n in nodes}
        for dataset, targets in sorted(self.targets().items()):
            if dataset not in summaries:
                continue
            assigned = [n for n in nodes if any(matches(t, n) for t in targets)]
            up = {n.name for n in assigned if n.up}
            for node in assigned:
                plans[node.name].append(
                    {
                        "dataset": dataset,
                        "revision": summaries[dataset]["revision"],
                        "members": sorted(up | {node.name}),
                    }
                )
        return plans

    # -- chunks -------------------------------------------------------------------------------

    def add_chunks(
        self,
        node: str,
        object_id: str,
        size: int,
        chunk_size: int,
        chunks: list[tuple[int, str]],
    ) -> list[int]:
        """Record that `node` holds `chunks` (index, digest) of an object; returns conflicts.

        The object must be one a manifest named (NotFoundError otherwise) and `size` and
        `chunk_size` must be its recorded ones (UserError): every index is then bounded
        by the object's size. The first digest recorded for a chunk wins. A different
        digest for a known chunk is a conflict: returned, logged, and the chunk is not
        marked as held by `node`.
        """
        nkey = _name_key("node", node)
        oid = _oid(object_id)
        if size < 0 or chunk_size <= 0:
            raise UserError(f"object {object_id}: invalid size {size} / chunk size {chunk_size}")
        count = chunk_count(size, chunk_size)
        parsed: list[tuple[int, bytes]] = []
        for index, value in chunks:
            if not 0 <= index < count:
                raise UserError(
                    f"object {object_id}: chunk {index} out of range (object has {count})"
                )
            parsed.append((index, _digest(index, value)))
        conflicts: list[int] = []
        with self._write() as txn:
            known = txn.get(oid, db=self._objects)
            if known is None:
                raise NotFoundError(f"unknown object {object_id}: no dataset names it")
            if _OBJECT.unpack(known) != (size, chunk_size):
                was = _OBJECT.unpack(known)
                raise UserError(
                    f"object {object_id} is known with size {was[0]} and chunk size {was[1]}, "
                    f"not {size} and {chunk_size}"
                )
            hkey = oid + nkey
            mask = old_mask = _mask(txn.get(hkey, db=self._holders))
            for index, raw in parsed:
                dkey = oid + index.to_bytes(4, "big")
                recorded = txn.get(dkey, db=self._digests)
                if recorded is None:
                    txn.put(dkey, raw, db=self._digests)
                elif recorded != raw:
                    conflicts.append(index)
                    mask &= ~(1 << index)
                    continue
                mask |= 1 << index
            if mask != old_mask:
                if mask:
                    txn.put(hkey, _mask_bytes(mask), db=self._holders)
                else:
                    txn.delete(hkey, db=self._holders)
        if conflicts:
            log.warning(
                "node %s reported digests for object %s that differ from the recorded ones: "
                "chunks %s (not marked as held)",
                node,
                object_id[:16],
                conflicts[:20],
            )
        return conflicts

    def remove_chunks(self, node: str, object_id: str, indexes: list[int]) -> None:
        """`node` no longer holds chunks `indexes` of an object."""
        hkey = _oid(object_id) + _name_key("node", node)
        with self._write() as txn:
            mask = old_mask = _mask(txn.get(hkey, db=self._holders))
            for index in indexes:
                if 0 <= index < old_mask.bit_length():  # a bit beyond is not set anyway
                    mask &= ~(1 << index)
            if mask == old_mask:
                return
            if mask:
                txn.put(hkey, _mask_bytes(mask), db=self._holders)
            else:
                txn.delete(hkey, db=self._holders)

    def report_bad_peer(
        self, reporter: str, peer: str, object_id: str, index: int, reason: str
    ) -> None:
        """`reporter` could not get a good chunk from `peer`: stop handing that chunk out from
        it and count the report against it (the policy ranks reported peers last)."""
        oid = _oid(object_id)
        pkey = _name_key("node", peer)
        hkey = oid + pkey
        with self._write() as txn:
            mask = _mask(txn.get(hkey, db=self._holders))
            if index >= 0 and mask >> index & 1:
                mask &= ~(1 << index)
                if mask:
                    txn.put(hkey, _mask_bytes(mask), db=self._holders)
                else:
                    txn.delete(hkey, db=self._holders)
            raw = txn.get(pkey, db=self._nodes)
            if raw is not None:
                doc = json.loads(raw)
                doc["reports"] = doc.get("reports", 0) + 1
                txn.put(pkey, json.dumps(doc).encode(), db=self._nodes)
        log.warning(
            "node %s reported peer %s for chunk %d of object %s: %s",
            reporter,
            peer,
            index,
            object_id[:16],
            reason or "(no reason)",
        )

    def chunk_map(
        self, object_id: str, requester: str | None = None, policy: PeerPolicy | None = None
    ) -> dict[str, Any]:
        """Digests of an object's known chunks and, per chunk, the up peers that hold it.

        Returns {"digests": {index: hex}, "peers": {index: [{"node", "address"}, ...]}}:
        only chunks with a recorded digest, only nodes that are up, never `requester`,
        each peer list ordered by `policy` (default LeastLoaded).
        """
        oid = _oid(object_id)
        now = self.clock()
        digests: dict[int, str] = {}
        holders: list[tuple[NodeInfo, int]] = []
        with self._read() as txn:
            for key, value in _prefix(txn, self._digests, oid):
                digests[int.from_bytes(key[_OID_LEN:], "big")] = value.hex()
            for key, value in _prefix(txn, self._holders, oid):
                name = key[_OID_LEN:].decode()
                if name == requester:
                    continue
                raw = txn.get(key[_OID_LEN:], db=self._nodes)
                if raw is None:
                    continue
                info = self._node(raw, now)
                if info.up:
                    holders.append((info, _mask(value)))
        rank = (policy or LeastLoaded()).rank
        refs = {n.name: {"node": n.name, "address": n.address} for n, _ in holders}
        peers: dict[int, list[dict[str, str]]] = {}
        if holders:
            for index in digests:
                candidates = [n for n, mask in holders if mask >> index & 1]
                if candidates:
                    peers[index] = [refs[n.name] for n in rank(candidates)]
        return {"digests": digests, "peers": peers}

    # -- overview -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Nodes and datasets; each dataset with `cached: {node: bytes}` over its distinct
        objects (from holder bitmaps), its assignment `targets`, the nodes `assigned` it and
        the nodes where it is `ready` (complete and verified at its current revision)."""
        infos = self.nodes()
        nodes = [n.to_json() for n in infos]
        all_targets = self.targets()
        datasets: list[dict[str, Any]] = []
        with self._read() as txn:
            for _, raw in txn.cursor(db=self._datasets):
                manifest = Manifest.model_validate_json(raw)
                summary = dataset_summary(manifest)
                objects = {f.object: f.size for f in manifest.files if f.size}
                cached: dict[str, int] = {}
                for object_id in sorted(objects):
                    try:
                        oid = _oid(object_id)
                    except UserError:
                        continue  # not an object id this scheduler could have chunks of
                    known = txn.get(oid, db=self._objects)
                    if known is None:
                        continue
                    size, chunk_size = _OBJECT.unpack(known)
                    for hkey, value in _prefix(txn, self._holders, oid):
                        held = held_bytes(_mask(value), size, chunk_size)
                        if held:
                            name = hkey[_OID_LEN:].decode()
                            cached[name] = cached.get(name, 0) + held
                summary["cached"] = cached
                targets = all_targets.get(manifest.dataset, [])
                summary["targets"] = targets
                summary["assigned"] = [n.name for n in infos if any(matches(t, n) for t in targets)]
                summary["ready"] = [
                    n.name for n in infos if n.ready.get(manifest.dataset) == manifest.revision
                ]
                datasets.append(summary)
        return {"nodes": nodes, "datasets": datasets}
