"""The scheduler's durable state in LMDB: nodes, datasets (manifests), chunk digests, holders,
and the trust facts around digests: who established them, disputes, quarantined nodes and
broken file versions.

Every method is synchronous, runs one short transaction and is safe to call from several
threads at once; nothing here does network I/O or holds a transaction across calls.

Layout (named databases of one environment, `<state_dir>/state.lmdb`):

    nodes       node name                         -> node record (JSON, without `up`)
    datasets    dataset name                      -> manifest (JSON)
    summaries   dataset name                      -> summary (JSON; listing without parsing)
    objects     object id (32 bytes)              -> size, chunk_size (2 x u64 big-endian),
                                                     from the manifests that name the object
    digests     object id + chunk index (u32 BE)  -> 32-byte chunk digest + establisher name
    established node name + NUL + object id + chunk index -> b"" (digests a node established)
    holders     object id + node name             -> bitmap, bit i (little-endian) = chunk i
    disputes    object id + chunk index           -> dispute (JSON): a report that conflicts
    revoked     object id + chunk index           -> a digest proven false by a re-check
    quarantine  node name                         -> {"since", "reason"} (JSON)
    broken      object id                         -> {"since", "reason"} (JSON)
    notices     node name + NUL + object id       -> b"": the node must drop its copy
    targets     dataset name                      -> assignment targets (JSON list)
    traces      dataset name                      -> access trace record (JSON): revision,
                                                     node, recorded, trace (`put_trace`)
    meta        b"generation"                     -> u64 big-endian

Chunk facts are kept only for objects some manifest named (`put_dataset` records their
size and chunk size; they stay after the dataset is removed, since nodes still hold
them): a chunk index is then bounded by its object's size, so no report can make a
holder bitmap, a digest key or a claim larger than the datasets an admin registered.

The generation counts every change that alters what a node should hold or serve: datasets,
their revisions, assignments, label edits, quarantines and broken files. Nodes poll it and
look closer only when it moves.

Digest provenance (the trust rules, see README "Security and reliability"):
- A chunk's digest is recorded only from a node the scheduler granted the source read of
  that chunk (`establish` of `add_chunks`, from `Claims`); anything else is refused: not
  recorded, and the reporter is not made a holder.
- A report that disagrees with the recorded digest is never settled by counting votes: it
  opens a *dispute*, and one node that is neither the establisher nor the reporter, chosen
  at random by the scheduler, reads the chunk from the source again (`rechecks_for`,
  `check`). Its answer decides: it matches the record -> the reporter lied; it matches the
  reporter -> the establisher lied (its digests are dropped, holders told to discard);
  the source changed (matches neither, or its version check failed) -> the file's version
  is *broken*: every node refuses it until `dataset add` resolves the source again.
- A liar is *quarantined*: never offered as a peer, never a plan member, its reports and
  checks dropped, until an operator lifts it (`lift_quarantine`).

Concurrency: LMDB allows one writer at a time; a process-local lock serialises writers
before LMDB's own mutex so a thread never waits for it while holding the GIL. Readers never
block. Every read-modify-write happens inside one write transaction, hence atomically.
"""

from __future__ import annotations

import json
import logging
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from syncbit.chunks import chunk_count, identity_digest
from syncbit.diskspace import open_env
from syncbit.errors import ConfigError, NotFoundError, SchedulerError, UserError
from syncbit.manifest import Manifest, build_manifest
from syncbit.scheduler.policy import LeastLoaded, PeerPolicy

log = logging.getLogger("syncbit.scheduler")

_MAP_SIZE = 64 * 2**30  # virtual: LMDB grows the file only as data arrives
_OID_LEN = 32
_DIGEST_LEN = 32
_MAX_NAME_BYTES = 255  # LMDB keys are at most 511 bytes; holders keys are 32 + name
_GENERATION = b"generation"
_GEOMETRY_MIGRATED = b"objects-from-manifests"  # state written before objects came from them
_OBJECT = struct.Struct(">QQ")
MAX_DISPUTES = 256  # open disputes; more conflicts wait (logged) until some are settled
RECHECK_TIMEOUT = 60.0  # seconds a node asked to re-check a chunk has before another is
_MAX_NOTICES = 256  # objects to discard handed to a node per heartbeat
_CHANGED = "changed"  # a dispute claim: the source no longer has the recorded version
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
    disk_full: bool = False  # its cache filesystem has no space left (new chunks not cached)
    disk_free: int = 0
    up: bool = False
    quarantined: dict[str, Any] | None = None  # {"since", "reason"}; from its own table

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChunkReport:
    """What `add_chunks` made of a report: chunks whose digest differs from the recorded
    one (a dispute is opened), and chunks refused (no digest recorded and the reporter was
    not granted the source read, or the reporter is quarantined). Neither is held."""

    conflicts: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)


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


def _is_oid(object_id: str) -> bool:
    try:
        return len(bytes.fromhex(object_id)) == _OID_LEN
    except ValueError:
        return False


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


def _ask(dispute: dict[str, Any]) -> dict[str, Any]:
    """What a node asked to re-check a disputed chunk is told."""
    return {k: dispute[k] for k in ("object", "chunk", "dataset", "path")}


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
            # Survives a full filesystem (an embedded scheduler's state sits in the cache dir).
            self._env, self._reserve = open_env(
                self.state_dir / "state.lmdb", max_dbs=16, map_size=_MAP_SIZE, metasync=False
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
        self._established = self._env.open_db(b"established")
        self._disputes = self._env.open_db(b"disputes")
        self._revoked = self._env.open_db(b"revoked")
        self._quarantine = self._env.open_db(b"quarantine")
        self._broken = self._env.open_db(b"broken")
        self._notices = self._env.open_db(b"notices")
        self._traces = self._env.open_db(b"traces")
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
            self._reserve.top_up()
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

    def _node(self, raw: bytes, now: float, quarantined: bytes | None = None) -> NodeInfo:
        doc = json.loads(raw)
        doc["up"] = now - doc["last_seen"] <= self.node_timeout
        doc["labels"] = effective_labels(doc["labels"], doc.get("label_overrides", {}))
        doc["quarantined"] = json.loads(quarantined) if quarantined else None
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
        disk_full: bool = False,
        disk_free: int = 0,
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
                disk_full=disk_full,
                disk_free=disk_free,
                up=True,
            )
            doc = info.to_json()
            del doc["up"], doc["quarantined"]  # derived on every read, never stored here
            txn.put(key, json.dumps(doc).encode(), db=self._nodes)
            if old is None or old["labels"] != doc["labels"]:
                self._bump(txn, self._meta)  # assignments by selector may now match
            quarantined = txn.get(key, db=self._quarantine)
        with self._use_cond:
            was_up = self._liveness.get(name)
            self._liveness[name] = True
        if old is None:
            log.info("node %s registered at %s labels %s", name, address, info.labels or "{}")
        elif not was_up:
            log.info("node %s is up at %s", name, address)
        elif old["address"] != address:
            log.info("node %s moved from %s to %s", name, old["address"], address)
        return self._node(json.dumps(doc).encode(), now, quarantined)

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
            info = self._node(json.dumps(doc).encode(), now, txn.get(key, db=self._quarantine))
        log.info("node %s labels now %s", name, info.labels or "{}")
        return info

    def nodes(self) -> list[NodeInfo]:
        """Every node ever registered, by name, with `up` computed now."""
        now = self.clock()
        with self._read() as txn:
            return [
                self._node(raw, now, txn.get(key, db=self._quarantine))
                for key, raw in txn.cursor(db=self._nodes)
            ]

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
        A file whose content identity was found broken (its source changed under the same
        version facts) gets a new identity, so none of the old content's chunks is reused.
        """
        key = _name_key("dataset", manifest.dataset)
        manifest = self._renew_broken(manifest)
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
            self._prune_disputes(txn)
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
            txn.delete(key, db=self._traces)
            generation = self._bump(txn, self._meta)
            self._prune_disputes(txn)
        log.info("dataset %s removed (generation %d)", name, generation)

    # -- access traces ---------------------------------------------------------------------

    def put_trace(self, name: str, revision: str, record: dict[str, Any]) -> dict[str, Any]:
        """Keep `record` (already validated against revision `revision` of dataset `name`,
        with a "revision" key) unless a trace of that revision is kept: the first one
        wins; one of an older revision is replaced. Returns the record kept.
        NotFoundError for an unknown dataset, UserError when it is at another revision
        now (a node that recorded an older one)."""
        key = _name_key("dataset", name)
        with self._write() as txn:
            raw = txn.get(key, db=self._summaries)
            if raw is None:
                raise NotFoundError(f"unknown dataset {name!r}")
            current = json.loads(raw).get("revision")
            if current != revision:
                raise UserError(f"dataset {name!r} is at revision {current}, not {revision}")
            old = txn.get(key, db=self._traces)
            if old is not None:
                kept: dict[str, Any] = json.loads(old)
                if kept.get("revision") == revision:
                    return kept
            txn.put(key, json.dumps(record, separators=(",", ":")).encode(), db=self._traces)
        return record

    def get_trace(self, name: str) -> dict[str, Any] | None:
        """The trace record of `name`'s current revision; None without one (NotFoundError
        for an unknown dataset)."""
        key = _name_key("dataset", name)
        with self._read() as txn:
            raw = txn.get(key, db=self._summaries)
            if raw is None:
                raise NotFoundError(f"unknown dataset {name!r}")
            kept = txn.get(key, db=self._traces)
        if kept is None:
            return None
        record: dict[str, Any] = json.loads(kept)
        return record if record.get("revision") == json.loads(raw).get("revision") else None

    def _renew_broken(self, manifest: Manifest) -> Manifest:
        """`manifest` with every broken object id replaced by a derived, unbroken one: the
        listing of a source that changed under unchanged version facts (an ETag that lies)
        yields the old identity, whose recorded chunks hold the old bytes."""
        with self._read() as txn:
            if not txn.stat(self._broken)["entries"]:
                return manifest
            files = []
            renewed = False
            for entry in manifest.files:
                object_id = entry.object
                while _is_oid(object_id) and txn.get(_oid(object_id), db=self._broken):
                    object_id = identity_digest("after-broken", object_id)
                renewed = renewed or object_id != entry.object
                files.append(entry.model_copy(update={"object": object_id}))
        if not renewed:
            return manifest
        log.info(
            "dataset %s: files whose source changed get new content identities", manifest.dataset
        )
        return build_manifest(
            manifest.dataset,
            manifest.source,
            files,
            manifest.dirs,
            chunk_size=manifest.chunk_size,
            source_options=manifest.source_options,
        )

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
            txn.delete(key, db=self._traces)
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
            # A quarantined node still fetches for itself, but nobody waits on its reads.
            up = {n.name for n in assigned if n.up and not n.quarantined}
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
        establish: AbstractSet[int] = frozenset(),
    ) -> ChunkReport:
        """Record that `node` holds `chunks` (index, digest) of an object.

        The object must be one a manifest named (NotFoundError otherwise) and `size` and
        `chunk_size` must be its recorded ones (UserError): every index is then bounded
        by the object's size.
        A chunk without a recorded digest is recorded only if its index is in `establish`
        (the node was granted its source read, see `Claims.may_establish`), else refused.
        A digest that differs from the recorded one is a conflict and opens a dispute
        (a re-check against the source by a third node). A quarantined node's report is
        refused whole. Refused and conflicting chunks are not marked as held by `node`.
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
        report = ChunkReport()
        with self._write() as txn:
            if txn.get(nkey, db=self._quarantine) is not None:
                report.refused = [i for i, _ in parsed]
                return report  # nothing of a liar's is recorded (no log: it reports often)
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
                    if index not in establish:
                        report.refused.append(index)
                        continue
                    txn.put(dkey, raw + nkey, db=self._digests)
                    txn.put(nkey + b"\0" + dkey, b"", db=self._established)
                elif recorded[:_DIGEST_LEN] != raw:
                    if txn.get(dkey, db=self._revoked) == raw:
                        report.refused.append(index)  # bytes a re-check proved false
                        txn.put(nkey + b"\0" + oid, b"", db=self._notices)
                    else:
                        report.conflicts.append(index)
                    mask &= ~(1 << index)
                    continue
                mask |= 1 << index
            if mask != old_mask:
                if mask:
                    txn.put(hkey, _mask_bytes(mask), db=self._holders)
                else:
                    txn.delete(hkey, db=self._holders)
        if report.refused:
            log.warning(
                "node %s reported digests for chunks %s of object %s that it was not granted "
                "the source read of: refused",
                node,
                report.refused[:20],
                object_id[:16],
            )
        if report.conflicts:
            # One dispute per object settles the rest: a liar is quarantined (and its word
            # dropped), a broken version is broken as a whole.
            index = report.conflicts[0]
            claimed = next(raw for i, raw in parsed if i == index)
            self.open_dispute(node, object_id, index, claimed.hex(), "reported holding it")
        return report

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
        it and count the report against it (the policy ranks reported peers last). A
        quarantined reporter is not listened to."""
        oid = _oid(object_id)
        pkey = _name_key("node", peer)
        hkey = oid + pkey
        with self._write() as txn:
            if txn.get(_name_key("node", reporter), db=self._quarantine) is not None:
                return
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

        Returns {"digests": {index: hex}, "peers": {index: [{"node", "address"}, ...]},
        "disputed": [index, ...], "broken": reason (only if the object is broken)}: only
        chunks with a recorded digest, only nodes that are up and not quarantined, never
        `requester`, each peer list ordered by `policy` (default LeastLoaded). A disputed
        chunk has no peers until its re-check settles who was right: its readers go to the
        source, and a mismatch there fails the read rather than serve either version.
        """
        oid = _oid(object_id)
        now = self.clock()
        digests: dict[int, str] = {}
        holders: list[tuple[NodeInfo, int]] = []
        with self._read() as txn:
            for key, value in _prefix(txn, self._digests, oid):
                digests[int.from_bytes(key[_OID_LEN:], "big")] = value[:_DIGEST_LEN].hex()
            disputed = sorted(
                int.from_bytes(key[_OID_LEN:], "big")
                for key, _ in _prefix(txn, self._disputes, oid)
            )
            broken = txn.get(oid, db=self._broken)
            for key, value in _prefix(txn, self._holders, oid):
                name = key[_OID_LEN:]
                if name.decode() == requester or txn.get(name, db=self._quarantine):
                    continue
                raw = txn.get(name, db=self._nodes)
                if raw is None:
                    continue
                info = self._node(raw, now)
                if info.up:
                    holders.append((info, _mask(value)))
        rank = (policy or LeastLoaded()).rank
        refs = {n.name: {"node": n.name, "address": n.address} for n, _ in holders}
        peers: dict[int, list[dict[str, str]]] = {}
        if holders:
            withheld = set(disputed)
            for index in digests:
                if index in withheld:
                    continue
                candidates = [n for n, mask in holders if mask >> index & 1]
                if candidates:
                    peers[index] = [refs[n.name] for n in rank(candidates)]
        doc: dict[str, Any] = {"digests": digests, "peers": peers, "disputed": disputed}
        if broken is not None:
            doc["broken"] = json.loads(broken)["reason"]
        return doc

    # -- disputes, quarantine, broken versions --------------------------------------------------

    def check(
        self, node: str, object_id: str, index: int, digest: str | None, changed: str = ""
    ) -> str:
        """What `node` read from the source for chunk `index` of an object: its digest, or
        `changed` (why the source no longer has the recorded version, e.g. the file's head
        differs from the one recorded at `dataset add`). Returns the outcome:

        "dropped" (the node is quarantined), "ok" (agrees with the record, or nothing to
        compare), "disputed" (disagrees: a re-check is under way, or this report opened
        one), or, from the node asked to re-check: "reporter-lied", "establisher-lied",
        "source-changed" (the dispute is settled). Nothing here records a new digest.
        """
        nkey = _name_key("node", node)
        oid = _oid(object_id)
        raw = _digest(index, digest) if digest else None
        if raw is None and not changed:
            raise UserError("a check needs a digest or what changed")
        if not 0 <= index < 2**32:
            raise UserError(f"invalid chunk index {index}")
        dkey = oid + index.to_bytes(4, "big")
        with self._write() as txn:
            if txn.get(nkey, db=self._quarantine) is not None:
                return "dropped"
            if txn.get(oid, db=self._broken) is not None:
                return "source-changed"
            found = txn.get(dkey, db=self._disputes)
            if found is not None:
                dispute = json.loads(found)
                if dispute["checker"] != node:
                    log.info(
                        "node %s checked chunk %d of object %s under dispute; it was not "
                        "asked to: not counted",
                        node,
                        index,
                        object_id[:16],
                    )
                    return "disputed"
                return self._settle(txn, dkey, dispute, raw, changed)
            recorded = txn.get(dkey, db=self._digests)
            if not changed and (recorded is None or recorded[:_DIGEST_LEN] == raw):
                return "ok"
        claim = _CHANGED if changed else (raw or b"").hex()
        return self.open_dispute(node, object_id, index, claim, changed or "read from the source")

    def open_dispute(
        self, reporter: str, object_id: str, index: int, claim: str, reason: str
    ) -> str:
        """`reporter` says chunk `index` of an object is `claim` (a digest, or "changed"),
        against the record: ask a third node to read it from the source. Returns
        "disputed", or "ok" when there is nothing to dispute (no dataset has the object
        any more, or too many disputes are open: logged)."""
        oid = _oid(object_id)
        dkey = oid + index.to_bytes(4, "big")
        with self._read() as txn:  # cheap refusals before reading every manifest
            if next(_prefix(txn, self._disputes, oid), None) is not None:
                return "disputed"
            if txn.stat(self._disputes)["entries"] >= MAX_DISPUTES:
                log.error(
                    "node %s disputes chunk %d of object %s, but %d disputes are open "
                    "already: not recorded",
                    reporter,
                    index,
                    object_id[:16],
                    MAX_DISPUTES,
                )
                return "ok"
        where = self._locate(object_id)
        if where is None or not 0 <= index < chunk_count(where[2], where[3]):
            log.warning(
                "node %s disputes chunk %d of object %s, which no dataset has: ignored",
                reporter,
                index,
                object_id[:16],
            )
            return "ok"
        with self._write() as txn:
            if next(_prefix(txn, self._disputes, oid), None) is not None:
                return "disputed"  # one at a time per object (see `add_chunks`)
            if txn.stat(self._disputes)["entries"] >= MAX_DISPUTES:
                return "ok"  # filled up meanwhile (logged above when it is so already)
            recorded = txn.get(dkey, db=self._digests)
            dispute: dict[str, Any] = {
                "object": object_id,
                "chunk": index,
                "recorded": recorded[:_DIGEST_LEN].hex() if recorded else None,
                "establisher": recorded[_DIGEST_LEN:].decode() if recorded else "",
                "reporter": reporter,
                "claim": claim,
                "reason": reason,
                "dataset": where[0],
                "path": where[1],
                "unproven": where[4],
                "opened": self.clock(),
                "checker": None,
                "asked": 0.0,
            }
            txn.put(dkey, json.dumps(dispute).encode(), db=self._disputes)
        log.warning(
            "dispute over chunk %d of %s/%s (object %s): node %s says %s (%s), recorded %s "
            "by %s; a third node will read it from the source",
            index,
            where[0],
            where[1],
            object_id[:16],
            reporter,
            claim if claim == _CHANGED else claim[:16],
            reason,
            (dispute["recorded"] or "nothing")[:16],
            dispute["establisher"] or "(unknown)",
        )
        return "disputed"

    def _locate(self, object_id: str) -> tuple[str, str, int, int, bool] | None:
        """(dataset, path, size, chunk size, unproven) of a file whose content is
        `object_id`; unproven: its source cannot prove content (a head sample stands in)."""
        with self._read() as txn:
            for key, raw in txn.cursor(db=self._datasets):
                doc = json.loads(raw)
                for entry in doc["files"]:
                    if entry["object"] == object_id:
                        unproven = "head" in entry.get("version", {})
                        return (
                            key.decode(),
                            entry["path"],
                            entry["size"],
                            doc["chunk_size"],
                            unproven,
                        )
        return None

    def _settle(
        self,
        txn: lmdb.Transaction[bytes],
        dkey: bytes,
        dispute: dict[str, Any],
        raw: bytes | None,
        changed: str,
    ) -> str:
        """The asked node's answer decides a dispute (inside its write transaction)."""
        txn.delete(dkey, db=self._disputes)
        recorded = bytes.fromhex(dispute["recorded"]) if dispute["recorded"] else None
        claim: str = dispute["claim"]
        where = f"chunk {dispute['chunk']} of {dispute['dataset']}/{dispute['path']}"
        checker, reporter, establisher = (
            dispute["checker"],
            dispute["reporter"],
            dispute["establisher"],
        )
        if raw is not None and (raw == recorded or (recorded is None and claim == _CHANGED)):
            self._quarantine_in(txn, reporter, f"false report on {where}, re-checked by {checker}")
            return "reporter-lied"
        if raw is not None and claim != _CHANGED and raw.hex() == claim and establisher != reporter:
            assert recorded is not None  # a digest claim is only ever against a record
            self._revoke(txn, dkey, recorded, raw, checker)
            if establisher:
                self._quarantine_in(
                    txn, establisher, f"false digest for {where}, re-checked by {checker}"
                )
            else:
                log.error(
                    "%s: the recorded digest was false (established before provenance)", where
                )
            if dispute.get("unproven"):
                # The source cannot prove content: a change outside the head since the
                # establisher's read looks the same as its lie, and the file's other
                # recorded chunks may then be of the old version. Only a new resolution
                # of the source guarantees one version.
                self._break(
                    txn,
                    dkey[:_OID_LEN],
                    f"{where} differs from what {establisher or 'a node'} recorded; the source "
                    "may have changed",
                )
            return "establisher-lied"
        # Matches neither, or the establisher itself now reads otherwise: the source changed.
        if changed:
            why = changed
        elif establisher == reporter:
            why = f"{reporter} and {checker} now read other bytes than {reporter} recorded"
        else:
            why = f"{checker}'s re-read matches neither the record nor {reporter}"
        self._break(txn, dkey[:_OID_LEN], f"source changed: {why}")
        return "source-changed"

    def _revoke(
        self, txn: lmdb.Transaction[bytes], dkey: bytes, old: bytes, new: bytes, checker: str
    ) -> None:
        """Replace a digest proven false; whoever held those bytes drops them."""
        ckey = checker.encode()
        txn.put(dkey, old, db=self._revoked)
        txn.put(dkey, new + ckey, db=self._digests)
        txn.put(ckey + b"\0" + dkey, b"", db=self._established)
        index = int.from_bytes(dkey[_OID_LEN:], "big")
        self._drop_holders(txn, dkey[:_OID_LEN], {index})

    def _drop_holders(self, txn: lmdb.Transaction[bytes], oid: bytes, indexes: set[int]) -> None:
        """Clear `indexes` from every holder bitmap of an object; each holder that had any
        of them gets a notice to discard its copy of the object."""
        drop = sum(1 << i for i in indexes)
        for hkey, value in list(_prefix(txn, self._holders, oid)):
            mask = _mask(value)
            if not mask & drop:
                continue
            mask &= ~drop
            if mask:
                txn.put(hkey, _mask_bytes(mask), db=self._holders)
            else:
                txn.delete(hkey, db=self._holders)
            txn.put(hkey[_OID_LEN:] + b"\0" + oid, b"", db=self._notices)

    def _quarantine_in(self, txn: lmdb.Transaction[bytes], node: str, reason: str) -> None:
        """Quarantine `node` (inside a write transaction): its open disputes are dropped and
        every digest it established is forgotten (and the copies others took of them)."""
        nkey = _name_key("node", node)
        if txn.get(nkey, db=self._quarantine) is not None:
            return
        txn.put(
            nkey,
            json.dumps({"since": self.clock(), "reason": reason}).encode(),
            db=self._quarantine,
        )
        for dkey, raw in list(txn.cursor(db=self._disputes)):
            if json.loads(raw)["reporter"] == node:
                txn.delete(dkey, db=self._disputes)
        by_object: dict[bytes, set[int]] = {}
        prefix = nkey + b"\0"
        for ekey, _ in list(_prefix(txn, self._established, prefix)):
            dkey = ekey[len(prefix) :]
            recorded = txn.get(dkey, db=self._digests)
            if recorded is not None and recorded[_DIGEST_LEN:] == nkey:
                txn.delete(dkey, db=self._digests)
                by_object.setdefault(dkey[:_OID_LEN], set()).add(
                    int.from_bytes(dkey[_OID_LEN:], "big")
                )
            txn.delete(ekey, db=self._established)
        for oid, indexes in by_object.items():
            self._drop_holders(txn, oid, indexes)
        self._bump(txn, self._meta)  # plans leave it out
        log.error(
            "node %s quarantined: %s; %d digests it established are forgotten; lift with "
            "`syncbit node trust %s`",
            node,
            reason,
            sum(len(i) for i in by_object.values()),
            node,
        )

    def _break(self, txn: lmdb.Transaction[bytes], oid: bytes, reason: str) -> None:
        """Mark an object's version broken: every node refuses to serve it, and the
        datasets that list it say so until they are resolved again."""
        object_id = oid.hex()
        if txn.get(oid, db=self._broken) is None:
            txn.put(
                oid, json.dumps({"since": self.clock(), "reason": reason}).encode(), db=self._broken
            )
        for key, raw in list(txn.cursor(db=self._datasets)):
            doc = json.loads(raw)
            paths = [e["path"] for e in doc["files"] if e["object"] == object_id]
            summary_raw = txn.get(key, db=self._summaries)
            if not paths or summary_raw is None:
                continue
            summary = json.loads(summary_raw)
            listed = {b["path"] for b in summary.get("broken", [])}
            summary["broken"] = summary.get("broken", []) + [
                {"path": p, "object": object_id, "reason": reason} for p in paths if p not in listed
            ]
            txn.put(key, json.dumps(summary).encode(), db=self._summaries)
            log.error(
                "dataset %s: %s broken (%s); `syncbit dataset add` again picks up the source's "
                "current content",
                key.decode(),
                ", ".join(paths),
                reason,
            )
        self._bump(txn, self._meta)

    def _prune_disputes(self, txn: lmdb.Transaction[bytes]) -> None:
        """Drop disputes over objects no dataset lists any more (nobody can re-check them)."""
        if not txn.stat(self._disputes)["entries"]:
            return
        listed = {
            e["object"]
            for _, raw in txn.cursor(db=self._datasets)
            for e in json.loads(raw)["files"]
        }
        for dkey, raw in list(txn.cursor(db=self._disputes)):
            if json.loads(raw)["object"] not in listed:
                txn.delete(dkey, db=self._disputes)

    def rechecks_for(self, node: str) -> list[dict[str, Any]]:
        """The re-checks `node` is asked to do: [{"object", "chunk", "dataset", "path"}].
        Each dispute gets one checker, chosen at random among the up nodes that are neither
        its establisher nor its reporter nor quarantined, so no node can choose to be the
        judge; one that does not answer within RECHECK_TIMEOUT or goes down is replaced.
        Costs one look at an empty table when nothing is disputed (every heartbeat asks)."""
        with self._read() as txn:
            if not txn.stat(self._disputes)["entries"]:
                return []
            quarantined = {k.decode() for k, _ in txn.cursor(db=self._quarantine)}
        if node in quarantined:
            return []
        now = self.clock()
        eligible = {n.name for n in self.nodes() if n.up} - quarantined

        def stale(dispute: dict[str, Any]) -> bool:
            return dispute["checker"] not in eligible or now - dispute["asked"] > RECHECK_TIMEOUT

        with self._read() as txn:
            disputes = [json.loads(raw) for _, raw in txn.cursor(db=self._disputes)]
        if not any(stale(d) for d in disputes):
            return [_ask(d) for d in disputes if d["checker"] == node]
        asks: list[dict[str, Any]] = []
        with self._write() as txn:
            for dkey, raw in list(txn.cursor(db=self._disputes)):
                dispute = json.loads(raw)
                checker = dispute["checker"]
                if stale(dispute):
                    choices = sorted(eligible - {dispute["establisher"], dispute["reporter"]})
                    checker = secrets.choice(choices) if choices else None
                    if checker != dispute["checker"] or checker is not None:
                        dispute["checker"], dispute["asked"] = checker, now
                        txn.put(dkey, json.dumps(dispute).encode(), db=self._disputes)
                    if checker is not None:
                        log.info(
                            "asking %s to re-check chunk %d of %s/%s against the source",
                            checker,
                            dispute["chunk"],
                            dispute["dataset"],
                            dispute["path"],
                        )
                if checker == node:
                    asks.append(_ask(dispute))
        return asks

    def disputes(self) -> list[dict[str, Any]]:
        """Every open dispute (at most MAX_DISPUTES)."""
        with self._read() as txn:
            return [json.loads(raw) for _, raw in txn.cursor(db=self._disputes)]

    def quarantine(self, node: str, reason: str) -> None:
        """Quarantine `node` by hand (an operator, or a test)."""
        with self._write() as txn:
            self._quarantine_in(txn, node, reason)

    def lift_quarantine(self, node: str) -> None:
        """An operator trusts `node` again (NotFoundError if it is not quarantined). The
        digests it established were forgotten and stay so; its holdings count again."""
        nkey = _name_key("node", node)
        with self._write() as txn:
            if not txn.delete(nkey, db=self._quarantine):
                raise NotFoundError(f"node {node!r} is not quarantined")
            self._bump(txn, self._meta)
        log.warning("node %s: quarantine lifted by an operator", node)

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """Quarantined nodes (registered or not): name -> {"since", "reason"}."""
        with self._read() as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor(db=self._quarantine)}

    def broken(self) -> dict[str, dict[str, Any]]:
        """Broken objects: object id -> {"since", "reason"}."""
        with self._read() as txn:
            return {k.hex(): json.loads(v) for k, v in txn.cursor(db=self._broken)}

    def take_notices(self, node: str) -> list[str]:
        """Objects `node` must discard its copy of (their digests were proven or are
        presumed false); each is handed out once."""
        prefix = _name_key("node", node) + b"\0"
        with self._read() as txn:
            cursor = txn.cursor(db=self._notices)
            if not cursor.set_range(prefix) or not cursor.key().startswith(prefix):
                return []
        taken: list[str] = []
        with self._write() as txn:
            for key, _ in list(_prefix(txn, self._notices, prefix))[:_MAX_NOTICES]:
                taken.append(key[len(prefix) :].hex())
                txn.delete(key, db=self._notices)
        return taken

    # -- overview -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Nodes and datasets; each dataset with `cached: {node: bytes}` over its distinct
        objects (from holder bitmaps), its assignment `targets`, the nodes `assigned` it,
        the nodes where it is `ready` (complete and verified at its current revision) and
        its `broken` files; the `quarantined` nodes and open `disputes`."""
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
                broken: list[dict[str, Any]] = []
                for object_id in sorted(objects):
                    try:
                        oid = _oid(object_id)
                    except UserError:
                        continue  # not an object id this scheduler could have chunks of
                    mark = txn.get(oid, db=self._broken)
                    if mark is not None:
                        reason = json.loads(mark)["reason"]
                        broken += [
                            {"path": f.path, "object": object_id, "reason": reason}
                            for f in manifest.files
                            if f.object == object_id
                        ]
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
                summary["broken"] = broken
                targets = all_targets.get(manifest.dataset, [])
                summary["targets"] = targets
                summary["assigned"] = [n.name for n in infos if any(matches(t, n) for t in targets)]
                summary["ready"] = [
                    n.name for n in infos if n.ready.get(manifest.dataset) == manifest.revision
                ]
                datasets.append(summary)
            quarantined = [
                {"node": k.decode(), **json.loads(v)} for k, v in txn.cursor(db=self._quarantine)
            ]
            disputes = [json.loads(v) for _, v in txn.cursor(db=self._disputes)]
        return {
            "nodes": nodes,
            "datasets": datasets,
            "quarantined": quarantined,
            "disputes": disputes,
        }
