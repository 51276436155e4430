"""The scheduler's state: its composition root, nodes, datasets and assignments, status.

Wires the durable facts (`facts`, on a `DurableStore`) to the soft state (`live`,
`holders`, `claims`), the planner, the chunk directory and the trust rules, and keeps them
in step: a node going down or quarantined loses its offers and its place in plans; a
digest or dispute changing is logged into the object's updates. Everything runs on one
trio loop: methods that only read are synchronous and answer from memory; those that
write durable facts are async. A heartbeat writes nothing unless the node is new, moved
or has other labels. Nothing here speaks HTTP (`api` does).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from syncbit.errors import NotFoundError, UserError
from syncbit.protocol import PEERS_PER_CHUNK, PlanEntry
from syncbit.scheduler.catalog import Catalog
from syncbit.scheduler.claims import Claims
from syncbit.scheduler.directory import ChunkReport, Directory
from syncbit.scheduler.facts import Facts, NodeRecord, Txn
from syncbit.scheduler.holders import Holders
from syncbit.scheduler.kv import DurableStore
from syncbit.scheduler.kv_lmdb import LmdbStore
from syncbit.scheduler.live import HEARTBEAT_RATE, Liveness, NodeLive
from syncbit.scheduler.planner import Planner
from syncbit.scheduler.policy import LeastLoaded, PeerPolicy
from syncbit.scheduler.records import (
    DatasetExistsError,
    NodeInfo,
    check_name,
    describe_target,
    effective_labels,
)
from syncbit.scheduler.trust import MAX_DISPUTES, RECHECK_TIMEOUT, Trust

log = logging.getLogger("syncbit.scheduler")


TURN = 250
"""Node records a request that walks every node (the listing, the status overview) encodes
between two checkpoints: ~5 ms of the loop on the 2-core bench."""


class SchedulerState:
    """Nodes, datasets, digests and holders (see the module docstring).

    Args:
        store: the durable store of the facts (loaded by `open`).
        node_timeout: seconds without a heartbeat after which a node is down.
        clock: wall-clock seconds (injectable for tests).
        peers_per_chunk: K, the most peers any answer names for one chunk.
        policy: the peer policy (default `LeastLoaded`).
        heartbeat_rate: heartbeats a second all nodes together are asked to keep to (the
            interval each answer tells stretches with the nodes up; see `live`).
    """

    def __init__(
        self,
        store: DurableStore,
        node_timeout: float,
        clock: Callable[[], float] = time.time,
        *,
        peers_per_chunk: int = PEERS_PER_CHUNK,
        policy: PeerPolicy | None = None,
        heartbeat_rate: float = HEARTBEAT_RATE,
    ) -> None:
        self.clock = clock
        self.epoch = secrets.token_hex(8)  # this instance: nodes re-report to a new one
        self.facts = Facts(store)
        self.live = Liveness(node_timeout, clock, heartbeat_rate)
        self.claims = Claims()
        self.policy: PeerPolicy = policy or LeastLoaded()
        self.holders = Holders(peers_per_chunk, self.eligible, self._choose, self._seed)
        self.planner = Planner(self.facts, self.eligible)
        self.trust = Trust(
            self.facts, clock, self.eligible, self._up, self._drop_holders, self._trust_changed
        )
        self.chunks = Directory(
            self.facts, self.live, self.claims, self.holders, self.trust, self.policy, self.eligible
        )
        self.catalog = Catalog(self.facts, self.trust)
        self.facts.on_chunks.append(self.holders.touch)
        self.claims.on_change.append(self.holders.touch)
        self.live.on_change.append(self._liveness_changed)
        self._offers_to_move: set[str] = set()  # went down; their offers move at `tidy`

    @classmethod
    @asynccontextmanager
    async def open(
        cls, store: DurableStore, node_timeout: float, **kwargs: Any
    ) -> AsyncIterator[SchedulerState]:
        """A state whose facts are loaded from `store`; closed at the end of the block."""
        state = cls(store, node_timeout, **kwargs)
        await state.facts.load()
        # Which registered nodes are up is soft state this instance has yet to learn; until
        # it has, the interval it tells is stretched for all of them.
        state.live.assume(len(state.facts.nodes))
        try:
            yield state
        finally:
            state.close()

    def close(self) -> None:
        """No more writes; long polls answer at once."""
        self.facts.close()
        for view in self.holders.objects.values():
            view.event.set()

    # -- soft state wiring ----------------------------------------------------------------------

    def eligible(self, node: str) -> bool:
        """Up and not quarantined: may be offered as a peer, is a plan member."""
        return self.live.is_up(node) and node not in self.facts.quarantine

    def _up(self) -> set[str]:
        self.live.refresh()
        return set(self.live.up)

    def _choose(self, names: list[str], n: int) -> list[str]:
        return self.chunks.choose(names, n)

    def _seed(self, object_id: str) -> set[int]:
        obj = self.facts.objects.get(object_id)
        seeded = set(self.claims.claimed(object_id))
        seeded |= {i for o, i in self.facts.disputes if o == object_id}
        if obj is not None:
            seeded |= set(obj.digests) | set(obj.revoked)
        return seeded

    def _liveness_changed(self, node: str, up: bool) -> None:
        trusted = node not in self.facts.quarantine
        self.planner.eligibility(node, up and trusted)
        for object_id, indexes in self.claims.of_node(node).items():
            self.holders.touch(object_id, indexes)  # its claims stop (or start) counting
        if up:
            self._offers_to_move.discard(node)
            if trusted:
                self.holders.eligible_again(node)
        else:
            self._offers_to_move.add(node)
            record = self.facts.nodes.get(node)
            live = self.live.nodes.get(node)
            if record is not None:
                log.warning(
                    "node %s is down: no heartbeat for %.1fs",
                    node,
                    self.clock() - (live.last_seen if live else 0.0),
                )

    def _trust_changed(self, node: str, trusted: bool) -> None:
        if trusted and self.live.is_up(node):
            self.holders.eligible_again(node)
        elif not trusted:
            self.holders.ineligible(node)

    def _drop_holders(self, object_id: str, indexes: set[int]) -> list[str]:
        view = self.holders.objects.get(object_id)
        if view is None:
            return []
        return [n for n in list(view.masks) if self.holders.remove(n, view, sorted(indexes))]

    def tidy(self) -> None:
        """Now and then (the server calls it every second): notice nodes gone down, and
        move their offers to other holders; so no request pays for it."""
        self.live.refresh()
        moving, self._offers_to_move = self._offers_to_move, set()
        for node in sorted(moving):
            if not self.live.is_up(node):
                self.holders.ineligible(node)

    # -- nodes ----------------------------------------------------------------------------------

    async def heartbeat(
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
        """Register or refresh a node and stamp its last heartbeat (in memory); returns
        its record. Storage is written only when the node is new, moved or relabelled."""
        check_name("node", name)
        if not address:
            raise UserError(f"node {name!r} sent an empty address")
        labels = dict(labels or {})
        old = self.facts.nodes.get(name)
        if old is None or old.address != address or old.labels != labels:
            await self.facts.batched(lambda txn: self._register(txn, name, address, labels))
            if old is None:
                log.info("node %s registered at %s labels %s", name, address, labels or "{}")
            elif old.address != address:
                self.live.moved()
                log.info("node %s moved from %s to %s", name, old.address, address)
        report = NodeLive(
            load=load,
            cache_bytes=cache_bytes,
            cache_size=cache_size,
            ready=dict(ready or {}),
            pinned_bytes=pinned_bytes,
            pinned_over_budget=pinned_over_budget,
            disk_full=disk_full,
            disk_free=disk_free,
        )
        if self.live.beat(name, report) and old is not None:
            log.info("node %s is up at %s", name, address)
        return self.node(name)

    def leave(self, name: str) -> NodeInfo:
        """A node stopping cleanly: down at once (see `Liveness.leave`); its record, labels
        and assignments stay. NotFoundError if it never registered."""
        check_name("node", name)
        if name not in self.facts.nodes:
            raise NotFoundError(f"no node named {name!r}")
        if self.live.leave(name):  # its offers move to other holders at `tidy`
            log.info("node %s is leaving: down", name)
        return self.node(name)

    def _register(self, txn: Txn, name: str, address: str, labels: dict[str, str]) -> None:
        current = self.facts.nodes.get(name)
        overrides = current.label_overrides if current is not None else {}
        txn.put(f"node/{name}", NodeRecord(address, labels, overrides).encode())
        txn.after.append(lambda: self.planner.node_changed(name))

    async def edit_labels(self, name: str, set_: dict[str, str], remove: list[str]) -> NodeInfo:
        """Operator label edits on a node (`syncbit node label`): they apply on top of the
        daemon's own labels and survive its heartbeats and restarts. NotFoundError if the
        node never registered."""
        for label in [*set_, *remove]:
            if not label or any(c in label for c in "=,") or any(ord(c) < 33 for c in label):
                raise UserError(f"invalid label key {label!r}")
        async with self.facts.transaction(bump=True) as txn:
            record = self.facts.nodes.get(name)
            if record is None:
                raise NotFoundError(f"unknown node {name!r}")
            overrides = {**record.label_overrides, **set_, **dict.fromkeys(remove)}
            txn.put(f"node/{name}", NodeRecord(record.address, record.labels, overrides).encode())
        info = self.node(name)
        log.info("node %s labels now %s", name, info.labels or "{}")
        return info

    def node(self, name: str) -> NodeInfo:
        record = self.facts.nodes[name]
        live = self.live.nodes.get(name) or NodeLive()
        return NodeInfo(
            name=name,
            address=record.address,
            labels=effective_labels(record.labels, record.label_overrides),
            last_seen=live.last_seen,
            load=live.load,
            cache_bytes=live.cache_bytes,
            cache_size=live.cache_size,
            reports=live.reports,
            label_overrides=dict(record.label_overrides),
            ready=dict(live.ready),
            pinned_bytes=live.pinned_bytes,
            pinned_over_budget=live.pinned_over_budget,
            disk_full=live.disk_full,
            disk_free=live.disk_free,
            up=self.live.is_up(name),
            quarantined=self.facts.quarantine.get(name),
        )

    def nodes(self) -> list[NodeInfo]:
        """Every node ever registered, by name, with `up` computed now."""
        return [self.node(name) for name in sorted(self.facts.nodes)]

    def check_liveness(self) -> list[NodeInfo]:
        """Nodes that went down since the last look (each logged once; coming up is
        noticed, and logged, by the heartbeat itself)."""
        return [self.node(n) for n in self.live.refresh() if n in self.facts.nodes]

    def ready_nodes(self) -> dict[str, list[str]]:
        """Per dataset, the nodes (by name) where its current revision is ready, as their
        heartbeats say: O(nodes x what each says is ready)."""
        revisions = {name: ds.summary["revision"] for name, ds in self.facts.datasets.items()}
        ready: dict[str, list[str]] = {name: [] for name in revisions}
        for name in sorted(self.facts.nodes):
            live = self.live.nodes.get(name)
            for dataset, revision in live.ready.items() if live is not None else ():
                if revisions.get(dataset) == revision:
                    ready[dataset].append(name)
        return ready

    def plan(self, node: str) -> list[PlanEntry]:
        """What `node` must hold: its assigned datasets and its share of their reads."""
        self.live.refresh()
        return self.planner.plan(node)

    def plans(self) -> dict[str, list[dict[str, Any]]]:
        """Every node's plan (`plan` as JSON): for status and tests; O(nodes)."""
        return {name: [e.to_json() for e in self.plan(name)] for name in sorted(self.facts.nodes)}

    # -- datasets, assignments, chunks, trust: see `catalog`, `directory`, `trust` -------------

    def generation(self) -> int:
        """Moves with every change to what nodes must hold or may trust: datasets, their
        revisions, assignments, operator labels, quarantines, broken files."""
        return self.facts.generation

    async def wait_generation(self, after: int, timeout: float) -> int:
        """The generation once it differs from `after`, or after `timeout` seconds (a long
        poll: a coroutine, no thread); at once when the state closes."""
        return await self.facts.wait_generation(after, timeout)

    def chunk_map(self, object_id: str, requester: str | None = None) -> dict[str, Any]:
        self.live.refresh()
        return self.chunks.chunk_map(object_id, requester)

    # -- overview -------------------------------------------------------------------------------

    async def nodes_json(self, per_turn: int = TURN) -> str:
        """Every registered node's record as a JSON array: O(nodes) by nature, so encoded
        `per_turn` records at a time with a checkpoint between. In one piece, 5,000 nodes
        (3.8 MB of JSON) held the loop for 90-700 ms on the 2-core bench, and every
        heartbeat behind it waited as long. Each record is as of its slice (a few ms
        apart); a node removed meanwhile is left out."""
        names = sorted(self.facts.nodes)
        parts: list[str] = []
        for start in range(0, len(names), per_turn):
            if start:
                await trio.lowlevel.checkpoint()
            docs = [
                self.node(n).to_json()
                for n in names[start : start + per_turn]
                if n in self.facts.nodes
            ]
            if docs:
                parts.append(_compact(docs)[1:-1])
        return "[" + ",".join(parts) + "]"

    async def status_json(self, per_turn: int = TURN) -> bytes:
        """`GET /v1/status`: the nodes (`nodes_json`) and datasets; each dataset with
        `cached: {node: bytes}` over its distinct objects, its assignment `targets`, the
        nodes `assigned` it, the nodes where it is `ready` (complete and verified at its
        current revision) and its `broken` files; the `quarantined` nodes and open
        `disputes`. O(nodes x datasets): an overview, encoded a turn at a time like the
        node listing (`per_turn` nodes, or 16 times as many holder entries), which it held
        the loop for in one piece as well. Each part is as of its turn; a node or dataset
        removed meanwhile is left out."""
        self.live.refresh()
        nodes = await self.nodes_json(per_turn)
        ready = self.ready_nodes()
        planner = self.planner.current()
        turns = _Turns(per_turn)
        datasets: list[str] = []
        for name in sorted(self.facts.datasets):
            await turns.take()
            facts = self.facts.datasets.get(name)
            if facts is None:
                continue
            summary = dict(facts.summary)
            cached: dict[str, int] = {}
            for object_id in sorted({f.object.lower() for f in facts.manifest.files if f.size}):
                view = self.holders.objects.get(object_id)
                if view is None:
                    continue
                await turns.take(len(view.held) // 16)  # a holder is a small step
                for node, held in view.held.items():
                    if held:
                        cached[node] = cached.get(node, 0) + held
            summary["cached"] = cached
            summary["broken"] = self.catalog.broken_files(facts)
            summary["targets"] = list(self.facts.targets.get(name, []))
            summary["assigned"] = sorted(planner.assigned.get(name, ()))
            summary["ready"] = ready.get(name, [])
            datasets.append(_compact(summary))
        rest = _compact(
            {
                "quarantined": [{"node": k, **v} for k, v in sorted(self.facts.quarantine.items())],
                "disputes": self.trust.disputes(),
            }
        )
        return f'{{"nodes":{nodes},"datasets":[{",".join(datasets)}],{rest[1:]}'.encode()


def _compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


class _Turns:
    """Work done since the last checkpoint: `take(n)` checkpoints once `per_turn` units
    have been taken (another task runs in between)."""

    def __init__(self, per_turn: int) -> None:
        self.per_turn = max(1, per_turn)
        self.used = 0

    async def take(self, n: int = 1) -> None:
        self.used += n
        if self.used >= self.per_turn:
            self.used = 0
            await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_lmdb_state(
    state_dir: Path, node_timeout: float, **kwargs: Any
) -> AsyncIterator[SchedulerState]:
    """The single-node state: facts in `<state_dir>/kv.lmdb` (`kv_lmdb.LmdbStore`)."""
    store = await LmdbStore.open(Path(state_dir))
    try:
        async with SchedulerState.open(store, node_timeout, **kwargs) as state:
            yield state
    finally:
        await store.aclose()


__all__ = [
    "MAX_DISPUTES",
    "RECHECK_TIMEOUT",
    "TURN",
    "ChunkReport",
    "DatasetExistsError",
    "NodeInfo",
    "SchedulerState",
    "describe_target",
    "open_lmdb_state",
]
