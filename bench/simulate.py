#!/usr/bin/env python3
"""A prefetch to thousands of nodes, simulated: the scheduler's real planning and peer
choice over modelled links, no bytes and no processes.

Driven for real (imported from the `syncbit` on the import path): the plan (each node's plan
entry from a real scheduler state over N registered nodes: its share of the source reads),
the split of source reads (`RoundRobin.may_source`, the node's own: piece k from the source
by member k mod N), source claims and steals arbitrated by `Claims`, the offers of at most K
holders per piece to each requester by the scheduler's `Holders` (`--offers K`; the
simulated nodes fall in its requesters' groups, `--groups`), and peer choice by its policy
(`LeastLoaded.rank`, on the load figures of the last heartbeat). Modelled: the links and the
node's fetch loop (fetcher.py / jobs.py, as their rules read: FILES_AT_ONCE files at a time,
`prefetch_concurrency` peer transfers, the source-lane limit, a parked chunk taken from a
peer once a holder's report has been seen, the idle source lane taking over the last unread
chunk, the best 3 ranked peers shuffled, a holder serving at most `upload_slots` transfers
and answering 503 beyond, a chunk whose holders are all busy parked until the next poll).

The policy sees every holder of a piece up to 64 nodes; above, 32 consecutive holders
(in the order their reports arrived) from a random place, since main's chunk map, which
hands it every holder, costs O(holders) per chunk per lookup. `--first-k K` offers only
the first K holders of each piece, as the sched branch's bounded lookup keeps them
(syncbit/scheduler/holders.py at bd66fcc: a new holder of a chunk that offers K already
changes nothing).

Link model (`share_rates`): each node has an uplink and a downlink of `--link-rate`, the
origin an uplink of `--origin-rate`. A sender splits its uplink evenly over its transfers;
a receiver whose transfers would exceed its downlink scales them down in proportion. No
latency but `--notice` (a holder's chunk report and the others' next chunk-map poll).

A simulated piece is one manifest chunk of `--grain` bytes; by default the real 4 MiB
chunk, doubled until nodes x pieces is at most 8 million (about 50 us of CPU each, most
of it lookups that find every holder busy): 16 MiB at 1,000 nodes, 128 MiB at 10,000. A
coarser grain delivers the origin's last round later (fewer, larger pieces), so it errs on
the slow side; run one N at two grains to see the grain's own cost.

Printed: origin egress / D (target <= 1.05), time to the last ready node / the Kumar-Ross
bound (target <= 1.3), bytes uploaded per node (min, median, p99, max, max/mean), and what
the real planning cost; with `--trace S`, every S simulated seconds: nodes ready, pieces
read from the source, transfers running, nodes uploading and at their upload limit, nodes
waiting with room in their peer lane, nodes offered for some piece. `--swarm` runs
bench/swarm.py's N=8 set-up (8 nodes, 512 MiB, every link 200 Mbit/s, its default) for
comparison with its measured ratio (`--measured 1.27`).

    PYTHONPATH=$PWD python bench/simulate.py --nodes 1000,10000
    PYTHONPATH=$PWD python bench/simulate.py --swarm [--rate 400mbit] --measured 1.27
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import resource
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).parent))

from scale import parse_rate, parse_size

from syncbit.fetch.jobs import FILES_AT_ONCE
from syncbit.fetch.plan import RoundRobin
from syncbit.manifest import FileEntry, Manifest
from syncbit.scheduler.claims import Claims
from syncbit.scheduler.holders import OFFER_GROUPS, Holders, ObjectHolders
from syncbit.scheduler.policy import LeastLoaded
from syncbit.scheduler.state import NodeInfo, open_lmdb_state

GiB = 2**30
MiB = 2**20
DATASET = "sim"
CLAIM_TTL = 60.0  # the fetcher's claim lease: max(claim_ttl 30 s, read_deadline 60 s)
SPREAD_HEAD = 3  # the fetcher shuffles the best 3 ranked peers (fetcher._spread)
MAX_DELIVERIES = 8_000_000  # pieces delivered per run at the default grain


def kumar_ross(size: float, nodes: int, u_origin: float, d_node: float, u_node: float) -> float:
    """Seconds no distribution of `size` bytes to `nodes` nodes can beat (Kumar and Ross,
    2006; rates in bytes/s): the origin sends every byte at least once, every node receives
    every byte, and the nodes x size bytes delivered all leave some uplink."""
    if nodes < 1 or min(u_origin, d_node) <= 0 or u_node < 0:
        raise ValueError("need nodes >= 1 and positive rates")
    return max(size / u_origin, size / d_node, nodes * size / (u_origin + nodes * u_node))


def share_rates(src: np.ndarray, dst: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """Bytes/s of each transfer (sender `src[i]` -> receiver `dst[i]`; indexes into `up`
    and `down`): every sender's uplink split evenly over its transfers, then each
    receiver's transfers scaled down together where they would exceed its downlink."""
    if len(src) == 0:
        return np.zeros(0)
    senders = np.bincount(src, minlength=len(up))
    rate = up[src] / senders[src]
    inbound = np.bincount(dst, weights=rate, minlength=len(down))
    return rate * np.minimum(1.0, down[dst] / inbound[dst])


def spread(values: list[float]) -> dict[str, float]:
    """min, median, p99, max, and max / mean of per-node figures."""
    ordered = sorted(values)
    mean = sum(ordered) / len(ordered)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "min": ordered[0],
        "p50": pct(0.5),
        "p99": pct(0.99),
        "max": ordered[-1],
        "max_over_mean": ordered[-1] / mean if mean else float("nan"),
    }


@dataclass
class Params:
    nodes: int
    size: int = 100 * GiB
    files: int = 20
    grain: int = 4 * MiB
    origin_rate: float = 10e9 / 8
    link_rate: float = 25e9 / 8
    peer_lane: int = 6  # fetcher prefetch_concurrency
    upload_slots: int = 4  # a node serves this many prefetch transfers; the rest get 503
    park_poll: float = 0.1  # a parked chunk (every holder busy) is tried again after this
    notice: float = 0.15  # report round trip + the watcher's park_poll (0.1 s)
    hb_interval: float = 2.0
    candidates: int = 0  # holders handed to the policy per lookup (0: all of them)
    first_k: int = 0  # >0: only the first K holders of a piece are ever offered
    offers: int = 0  # >0: the scheduler's real `Holders` offers at most this many per piece
    groups: int = OFFER_GROUPS  # --offers: the requesters' groups (`Holders`, lists per piece)
    dt_max: float = 0.05
    dt_min: float = 0.002  # a slot freed inside a step is refilled at the step's end
    seed: int = 1
    time_limit: float = 0.0  # simulated seconds before giving up (0: 10x the bound)
    trace: bool = False  # note what the nodes do at every heartbeat (`Sample`)


# -- the scheduler's side, for real -------------------------------------------------------------


def make_manifest(p: Params) -> Manifest:
    per_file = p.size // p.files
    sizes = [per_file] * (p.files - 1) + [p.size - per_file * (p.files - 1)]
    files = [
        FileEntry(path=f"model-{i:05d}.safetensors", size=s, object=f"{i:064x}", locator=f"f{i}")
        for i, s in enumerate(sizes)
    ]
    return Manifest(
        dataset=DATASET, source="file:///sim", revision="r1", chunk_size=p.grain, files=files
    )


def real_plan(
    p: Params, names: list[str], manifest: Manifest
) -> tuple[list[RoundRobin], dict[str, Any]]:
    """Every node registered, the dataset added and assigned to all in a real scheduler
    state; its plan entries (timed) give each node its share of the source reads, as the
    node's fetch layer takes them (`RoundRobin`)."""

    async def plan() -> tuple[dict[str, Any], float, int]:
        with tempfile.TemporaryDirectory(prefix="syncbit-sim-") as tmp:
            async with open_lmdb_state(Path(tmp), 1e9, clock=lambda: 1000.0) as state:
                for i, name in enumerate(names):
                    address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7901"
                    await state.heartbeat(name, address)
                await state.catalog.put_dataset(manifest)
                await state.catalog.add_targets(DATASET, [{"selector": {}}])
                rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                began = time.perf_counter()
                entries = {name: state.plan(name) for name in names}
                took = time.perf_counter() - began
                grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
        return entries, took, grew

    entries, took, grew = trio.run(plan)
    plans = []
    named = 0
    for name in names:
        (entry,) = entries[name]
        named += len(entry.members)
        plans.append(RoundRobin(name, list(entry.members), share=(entry.index, entry.count)))
    cost = {"plans_s": took, "plans_member_entries": named, "plans_peak_rss_growth": grew * 1024}
    return plans, cost


# -- the simulation -----------------------------------------------------------------------------


@dataclass
class Sample:
    """What the nodes do at one moment (`--trace`)."""

    t: float
    ready: int  # nodes with every piece
    sourced: int  # pieces whose source read began
    source_reads: int  # running
    peer_transfers: int  # running
    uploading: int  # nodes serving at least one transfer
    slots_full: int  # nodes serving `upload_slots` transfers (the next asker gets 503)
    wanting: int  # nodes not ready whose peer lane has room
    offered: int  # nodes the scheduler offers for at least one piece (--offers)
    median_holders: int  # holders of the median piece among those read from the source


@dataclass
class Result:
    params: dict[str, Any]
    pieces: int
    bound_s: float
    last_ready_s: float
    first_ready_s: float
    origin_bytes: float
    uploads: dict[str, float]
    plan_cost: dict[str, Any]
    source_reads: int = 0
    steals: int = 0
    busy: int = 0  # peer transfers that found every holder's upload slots taken
    claims_lapsed: int = 0  # source reads that outlasted their claim's lease
    stuck: bool = False
    wall_s: float = 0.0
    ready: list[float] = field(default_factory=list)
    trace: list[Sample] = field(default_factory=list)

    @property
    def egress_ratio(self) -> float:
        return self.origin_bytes / self.params["size"]

    @property
    def time_ratio(self) -> float:
        return self.last_ready_s / self.bound_s


class Sim:
    """One prefetch of one dataset to every node (see the module docstring)."""

    def __init__(self, p: Params) -> None:
        self.p = p
        self.rng = random.Random(p.seed)
        self.policy = LeastLoaded(random.Random(p.seed + 1))
        self.t = 0.0
        self.claims = Claims(clock=lambda: self.t)
        n = p.nodes
        self.names = [f"node{i:05d}" for i in range(n)]
        self.manifest = make_manifest(p)
        # pieces: (file, object, index within the object), in manifest position order
        self.piece_file: list[int] = []
        self.piece_obj: list[tuple[str, int]] = []
        self.piece_size: list[int] = []
        self.file_pieces: list[range] = []
        for f, entry in enumerate(self.manifest.files):
            count = -(-entry.size // p.grain)
            first = len(self.piece_file)
            for i in range(count):
                self.piece_file.append(f)
                self.piece_obj.append((entry.object, i))
                self.piece_size.append(min(p.grain, entry.size - i * p.grain))
            self.file_pieces.append(range(first, first + count))
        self.P = len(self.piece_file)
        self.jobs, self.plan_cost = real_plan(p, self.names, self.manifest)
        self.up = set(self.names)
        self.index_of = {name: i for i, name in enumerate(self.names)}
        # The scheduler's own bounded offers (syncbit/scheduler/holders.py), when asked.
        self.offers = Holders(
            p.offers,
            lambda name: True,
            lambda names, n: names[:n],
            rng=random.Random(p.seed + 2),
            groups=p.groups,
        )
        self.group = [self.offers.group_of(name) for name in self.names]
        self.offer_views: dict[str, ObjectHolders] = {}
        for entry in self.manifest.files:
            count = -(-entry.size // p.grain)
            self.offer_views[entry.object] = self.offers.view(
                entry.object, entry.size, p.grain, count
            )
        members = self.jobs[0].sharers
        budget = max(1, p.peer_lane // 2)  # the fetcher's source-lane rule (_source_limit)
        self.src_limit = max(1, -(-budget // max(1, members)))
        self.own: list[deque[int]] = [
            deque(k for k in range(self.P) if job.may_source(k)) for job in self.jobs
        ]
        self.held = [bytearray(self.P) for _ in range(n)]
        self.inflight = [bytearray(self.P) for _ in range(n)]
        self.have = [0] * n
        self.ready = [math.inf] * n
        self.next_file = [0] * n
        self.file_left = [[len(r) for r in self.file_pieces] for _ in range(n)]
        self.file_nodes: list[set[int]] = [set() for _ in self.file_pieces]
        self.peer_heap: list[list[int]] = [[] for _ in range(n)]
        self.peer_running = [0] * n
        self.src_running = [0] * n
        self.uploads_now = [0] * n
        self.uploaded = [0.0] * n
        self.visible: list[list[int]] = [[] for _ in range(self.P)]
        self.sourced = bytearray(self.P)  # a source read of the piece began somewhere
        self.sourced_count = 0  # pieces with `sourced` set: all of them, nothing to steal
        # The offered holders of each piece for each requesters' group as node indexes
        # (--offers), made again only when the scheduler's `Holders` changes them
        # (`_notice`, the only caller of add).
        self.offered_idx: list[dict[int, list[int]]] = [{} for _ in range(self.P)]
        self.unsourced: list[list[int]] = [list(r) for r in self.file_pieces]
        self.notices: list[tuple[float, int, int]] = []  # (visible at, piece, holder)
        self.retries: list[tuple[float, int, int]] = []  # (at, node, piece): holders were busy
        self.busy = 0
        self.infos: list[NodeInfo] = []
        self.trace: list[Sample] = []
        self.dirty: set[int] = set(range(n))
        self.origin = n  # the sender index of a source read
        # transfers begun since the last step (src, dst, piece, bytes, began); the running
        # ones are numpy arrays in `run`, rated by share_rates every step
        self.begun: list[tuple[int, int, int, float, float]] = []
        self.origin_bytes = 0.0
        self.source_reads = self.steals = self.claims_lapsed = 0
        for node in range(n):
            for _ in range(FILES_AT_ONCE):
                self._start_file(node)

    # -- a node's fetch loop (modelled on fetcher.py / jobs.py) --------------------------------

    def _start_file(self, node: int) -> None:
        f = self.next_file[node]
        if f >= len(self.file_pieces):
            return
        self.next_file[node] = f + 1
        self.file_nodes[f].add(node)
        heap = self.peer_heap[node]
        for k in self.file_pieces[f]:
            if self.visible[k]:
                heapq.heappush(heap, k)

    def _refill(self, node: int) -> None:
        held, inflight = self.held[node], self.inflight[node]
        own = self.own[node]
        while self.src_running[node] < self.src_limit and own:
            k = own[0]
            if self.piece_file[k] >= self.next_file[node]:
                break  # its file has not started here yet
            own.popleft()
            if held[k] or inflight[k] or self.visible[k]:
                continue  # visible: the peer lane takes it (pushed when it became visible)
            if self.sourced[k] or not self._claim(node, k):
                continue  # another node took it over: it arrives as a peer's
            self._begin(self.origin, node, k)
        if self.src_running[node] == 0 and not self._own_pending(node):
            self._steal(node)
        heap = self.peer_heap[node]
        while self.peer_running[node] < self.p.peer_lane and heap:
            k = heapq.heappop(heap)
            if held[k] or inflight[k]:
                continue
            peer = self._choose_peer(node, k)
            if peer is None:
                # Parked until the watcher's next poll; the worker spent this attempt on
                # 503s, so the node tries no further chunk now (its next event wakes it).
                self.busy += 1
                heapq.heappush(self.retries, (self.t + self.p.park_poll, node, k))
                break
            self._begin(peer, node, k)

    def _own_pending(self, node: int) -> bool:
        own = self.own[node]
        return bool(own) and self.piece_file[own[0]] < self.next_file[node]

    def _steal(self, node: int) -> None:
        """The idle source lane reads the last piece of the started files that nobody
        holds or reads (fetcher._steal), if the claim is granted."""
        if self.sourced_count == self.P:
            return  # every piece is read from the source or held: nothing left to take
        for f in range(self.next_file[node] - 1, -1, -1):
            if node not in self.file_nodes[f]:
                continue  # complete here
            pending = self.unsourced[f]
            while pending and (self.sourced[pending[-1]] or self.visible[pending[-1]]):
                pending.pop()
            for k in reversed(pending):
                if self.held[node][k] or self.inflight[node][k]:
                    continue
                if self.sourced[k] or self.visible[k] or not self._claim(node, k):
                    return
                self.steals += 1
                self._begin(self.origin, node, k)
                return

    def _claim(self, node: int, k: int) -> bool:
        obj, index = self.piece_obj[k]
        granted, _ = self.claims.claim(self.names[node], obj, [index], CLAIM_TTL, self.up)
        return bool(granted)

    def _choose_peer(self, node: int, k: int) -> int | None:
        """The first holder, in the policy's order with the best 3 shuffled, that has a
        free upload slot (a busy one answers 503 and the next is tried); None: all busy."""
        holders = self.visible[k]
        if self.p.offers:
            group = self.group[node]
            cached = self.offered_idx[k].get(group)
            if cached is None:
                obj, index = self.piece_obj[k]
                offered = self.offer_views[obj].offers(index, group)
                cached = self.offered_idx[k][group] = [self.index_of[name] for name in offered]
            holders = cached
        elif self.p.first_k:
            holders = holders[: self.p.first_k]  # in the order their reports arrived
        cap = self.p.candidates
        if cap and len(holders) > cap:
            # `cap` consecutive holders (arrival order) from a random place: a cheap sample
            start = self.rng.randrange(len(holders))
            holders = holders[start : start + cap] + holders[: max(0, start + cap - len(holders))]
        slots, busy = self.p.upload_slots, self.uploads_now
        for h in holders:
            if busy[h] < slots:
                break
        else:
            return None  # every one answers 503, whatever the order (spares the ranking)
        ranked = self.policy.rank([self.infos[h] for h in holders])
        head = ranked[:SPREAD_HEAD]
        self.rng.shuffle(head)
        for info in head + ranked[SPREAD_HEAD:]:
            peer = int(info.address)
            if self.uploads_now[peer] < self.p.upload_slots:
                return peer
        return None

    def _begin(self, src: int, dst: int, k: int) -> None:
        self.inflight[dst][k] = 1
        if src == self.origin:
            self.src_running[dst] += 1
            self.sourced_count += not self.sourced[k]
            self.sourced[k] = 1
            self.source_reads += 1
            self.origin_bytes += self.piece_size[k]
        else:
            self.peer_running[dst] += 1
            self.uploads_now[src] += 1
        self.begun.append((src, dst, k, float(self.piece_size[k]), self.t))

    def _done(self, src: int, dst: int, k: int, began: float, at: float) -> None:
        self.inflight[dst][k] = 0
        self.held[dst][k] = 1
        self.have[dst] += 1
        if src == self.origin:
            self.src_running[dst] -= 1
            obj, index = self.piece_obj[k]
            if at - began > CLAIM_TTL:
                self.claims_lapsed += 1
            self.claims.release(self.names[dst], obj, [index])
        else:
            self.peer_running[dst] -= 1
            self.uploads_now[src] -= 1
            self.uploaded[src] += self.piece_size[k]
        heapq.heappush(self.notices, (at + self.p.notice, k, dst))
        f = self.piece_file[k]
        left = self.file_left[dst]
        left[f] -= 1
        if left[f] == 0:
            self.file_nodes[f].discard(dst)
            self._start_file(dst)
        if self.have[dst] == self.P:
            self.ready[dst] = at
        self.dirty.add(dst)

    def _notice(self, k: int, holder: int) -> None:
        first = not self.visible[k]
        self.visible[k].append(holder)
        if self.p.offers:
            obj, index = self.piece_obj[k]
            self.offers.add(self.names[holder], self.offer_views[obj], [index])
            self.offered_idx[k].clear()
        if first:
            f = self.piece_file[k]
            for node in self.file_nodes[f]:
                if not self.held[node][k] and not self.inflight[node][k]:
                    heapq.heappush(self.peer_heap[node], k)
                    self.dirty.add(node)

    def _heartbeat(self) -> None:
        """What the scheduler's policy sees: each node's load as of its last heartbeat
        (the address field carries the node's index here)."""
        self.infos = [
            NodeInfo(name, str(i), load=self.uploads_now[i], up=True)
            for i, name in enumerate(self.names)
        ]
        if self.p.trace:
            self.trace.append(self._sample())

    def _sample(self) -> Sample:
        p, uploads = self.p, self.uploads_now
        holders = sorted(len(v) for v in self.visible if v)
        return Sample(
            t=self.t,
            ready=sum(r < math.inf for r in self.ready),
            sourced=self.sourced_count,
            source_reads=sum(self.src_running),
            peer_transfers=sum(self.peer_running),
            uploading=sum(u > 0 for u in uploads),
            slots_full=sum(u >= p.upload_slots for u in uploads),
            wanting=sum(
                r == math.inf and running < p.peer_lane
                for r, running in zip(self.ready, self.peer_running, strict=True)
            ),
            offered=len(self.offers.places),
            median_holders=holders[len(holders) // 2] if holders else 0,
        )

    # -- the clock ------------------------------------------------------------------------------

    def run(self) -> Result:
        p = self.p
        began = time.perf_counter()
        up = np.full(p.nodes + 1, p.link_rate)
        up[self.origin] = p.origin_rate
        down = np.full(p.nodes, p.link_rate)
        bound = kumar_ross(p.size, p.nodes, p.origin_rate, p.link_rate, p.link_rate)
        limit = p.time_limit or 10 * bound
        src = dst = piece = np.zeros(0, dtype=np.int64)
        rem = start = np.zeros(0)
        next_hb = 0.0
        while self.t <= limit:
            while self.notices and self.notices[0][0] <= self.t:
                _, k, holder = heapq.heappop(self.notices)
                self._notice(k, holder)
            while self.retries and self.retries[0][0] <= self.t:
                _, node, k = heapq.heappop(self.retries)
                heapq.heappush(self.peer_heap[node], k)
                self.dirty.add(node)
            if self.t >= next_hb:
                self._heartbeat()
                next_hb = self.t + p.hb_interval
            for node in sorted(self.dirty):
                self._refill(node)
            self.dirty.clear()
            if self.begun:
                new = list(zip(*self.begun, strict=True))
                self.begun.clear()
                src = np.concatenate([src, np.array(new[0], dtype=np.int64)])
                dst = np.concatenate([dst, np.array(new[1], dtype=np.int64)])
                piece = np.concatenate([piece, np.array(new[2], dtype=np.int64)])
                rem = np.concatenate([rem, np.array(new[3])])
                start = np.concatenate([start, np.array(new[4])])
            if not len(src):
                waits = [q[0][0] for q in (self.notices, self.retries) if q]
                if not waits:
                    break  # nothing moves and nothing will: done (or stuck)
                self.t = min(waits)
                continue
            rate = share_rates(src, dst, up, down)
            finish = rem / rate
            dt = min(float(finish.min()), p.dt_max, next_hb - self.t)
            for queue in (self.notices, self.retries):
                if queue:
                    dt = min(dt, queue[0][0] - self.t)
            dt = max(dt, p.dt_min)
            rem = rem - rate * dt
            over = rem <= 1.0
            if over.any():
                for i in np.flatnonzero(over):
                    at = self.t + float(finish[i])
                    self._done(int(src[i]), int(dst[i]), int(piece[i]), float(start[i]), at)
                keep = ~over
                src, dst, piece, rem, start = (
                    src[keep],
                    dst[keep],
                    piece[keep],
                    rem[keep],
                    start[keep],
                )
            self.t += dt
        finite = [r for r in self.ready if r < math.inf]
        return Result(
            params=asdict(p),
            pieces=self.P,
            bound_s=bound,
            last_ready_s=max(self.ready),
            first_ready_s=min(finite) if finite else math.inf,
            origin_bytes=self.origin_bytes,
            uploads=spread(self.uploaded),
            plan_cost=self.plan_cost,
            source_reads=self.source_reads,
            steals=self.steals,
            busy=self.busy,
            claims_lapsed=self.claims_lapsed,
            stuck=len(finite) < p.nodes,
            wall_s=time.perf_counter() - began,
            ready=sorted(self.ready),
            trace=self.trace,
        )


# -- command line ---------------------------------------------------------------------------------


def _offered(p: dict[str, Any]) -> str:
    k, sample = p["first_k"], p["candidates"]
    if p.get("offers"):
        groups = p.get("groups", 1)
        return f"the scheduler's offers (holders.py), {p['offers']} per piece to {groups} groups"
    pool = f"the first {k} holders" if k else "all holders"
    return f"{pool}, {sample} at random of them" if sample and not 0 < k <= sample else pool


def report(r: Result, measured: float | None = None, every: float = 0.0) -> None:
    p = r.params
    u = r.uploads
    print(
        f"-- {p['nodes']:,} nodes, {p['size'] / GiB:g} GiB in {r.pieces:,} pieces of "
        f"{p['grain'] / MiB:g} MiB, origin {p['origin_rate'] * 8 / 1e9:g} Gbit/s, links "
        f"{p['link_rate'] * 8 / 1e9:g} Gbit/s, peers offered "
        f"{_offered(p)}, notice {p['notice']:g}s"
    )
    if r.stuck:
        print(f"   STUCK: not every node was ready after {r.last_ready_s:.0f} simulated s")
    print(
        f"   origin egress / D {r.egress_ratio:.3f} ({r.source_reads:,} source reads, "
        f"{r.steals:,} taken over by idle nodes, {r.claims_lapsed} outlasted their claim; "
        f"{r.busy:,} peer lookups found every holder busy)"
    )
    print(
        f"   last node ready {r.last_ready_s:.1f} s / Kumar-Ross bound {r.bound_s:.1f} s = "
        f"{r.time_ratio:.3f} (first ready {r.first_ready_s:.1f} s)"
    )
    print(
        f"   uploaded per node: min {u['min'] / GiB:.1f} GiB, median {u['p50'] / GiB:.1f}, "
        f"p99 {u['p99'] / GiB:.1f}, max {u['max'] / GiB:.1f} GiB, max/mean "
        f"{u['max_over_mean']:.2f}"
    )
    c = r.plan_cost
    print(
        f"   real plans(): {c['plans_s']:.2f} s, {c['plans_member_entries']:,} member entries "
        f"(peak RSS grew {c['plans_peak_rss_growth'] / MiB:.0f} MiB); simulated in {r.wall_s:.0f} s"
    )
    if measured:
        diff = (r.time_ratio - measured) / measured * 100
        print(f"   bench/swarm.py measured {measured:.2f}x T_min: simulated {diff:+.0f}% off")
    if every > 0 and r.trace:
        print_trace(r.trace, p["nodes"], every)


def print_trace(trace: list[Sample], nodes: int, every: float) -> None:
    """One line per `every` simulated seconds: where the time goes."""
    print(
        f"   {'t':>6} {'ready':>7} {'sourced':>7} {'src':>5} {'peer':>7} {'uploading':>9} "
        f"{'full':>7} {'wanting':>7} {'offered':>7} {'holders':>7}   (of {nodes:,} nodes)"
    )
    due = 0.0
    for i, s in enumerate(trace):
        if s.t < due and i < len(trace) - 1:
            continue
        due = s.t + every
        print(
            f"   {s.t:6.1f} {s.ready:7,} {s.sourced:7,} {s.source_reads:5,} {s.peer_transfers:7,} "
            f"{s.uploading:9,} {s.slots_full:7,} {s.wanting:7,} {s.offered:7,} "
            f"{s.median_holders:7,}"
        )


def node_counts(text: str) -> list[int]:
    """'1000,10000' -> [1000, 10000]; each count at least 1."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"not a list of node counts >= 1: {text!r}")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--nodes", type=node_counts, default="1000,10000", help="comma-separated node counts"
    )
    ap.add_argument("--size", type=parse_size, default=parse_size("100GiB"), help="dataset D")
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--grain", type=parse_size, default=None, help="bytes per simulated piece")
    ap.add_argument("--origin-rate", type=parse_rate, default=parse_rate("10gbit"))
    ap.add_argument("--link-rate", type=parse_rate, default=parse_rate("25gbit"))
    ap.add_argument("--rate", type=parse_rate, default=None, help="every link (--swarm)")
    ap.add_argument("--candidates", type=int, default=None, help="holders offered (0: all)")
    ap.add_argument(
        "--first-k",
        type=int,
        default=0,
        help="offer only the first K holders of each piece, kept while they stay (the "
        "bounded lookup of the sched branch, syncbit/scheduler/holders.py, as its rule reads)",
    )
    ap.add_argument(
        "--offers",
        type=int,
        default=0,
        help="offer at most K holders per piece as the scheduler does, by its own code "
        "(syncbit/scheduler/holders.py: spread over the nodes, else a sample of the holders)",
    )
    ap.add_argument(
        "--groups",
        type=int,
        default=OFFER_GROUPS,
        help="--offers: requesters' groups, each offered its own K holders per piece once "
        "a piece has more than K (a power of two; 1: every requester the same K)",
    )
    ap.add_argument("--notice", type=float, default=0.15, help="seconds until a holder is seen")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--swarm", action="store_true", help="bench/swarm.py's N=8 set-up")
    ap.add_argument("--measured", type=float, default=None, help="swarm.py's ratio to compare")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument(
        "--trace",
        type=float,
        default=0.0,
        help="print what the nodes do every this many simulated seconds (0: not at all)",
    )
    args = ap.parse_args(argv)
    args.counts = args.nodes
    if args.swarm:
        args.counts = [8]
        if args.size == parse_size("100GiB"):
            args.size = parse_size("512MiB")
        args.files = 1  # swarm.py's dataset is one file
        rate = args.rate or parse_rate("200mbit")  # bench/swarm.py's default
        args.origin_rate = args.link_rate = rate
    elif args.rate:
        args.origin_rate = args.link_rate = args.rate
    if args.files < 1:
        ap.error("--files must be >= 1")
    return args


def default_grain(size: int, nodes: int, budget: int = MAX_DELIVERIES) -> int:
    """The real 4 MiB chunk, doubled until nodes x pieces fits `budget` (the simulation
    costs about 30 us per piece delivered)."""
    grain = 4 * MiB
    while nodes * -(-size // grain) > budget and grain < size:
        grain *= 2
    return grain


def params_for(args: argparse.Namespace, nodes: int) -> Params:
    grain = args.grain or default_grain(args.size, nodes)
    candidates = args.candidates
    if candidates is None:
        candidates = 0 if nodes <= 64 else 32
    return Params(
        nodes=nodes,
        size=args.size,
        files=args.files,
        grain=grain,
        origin_rate=args.origin_rate,
        link_rate=args.link_rate,
        candidates=candidates,
        first_k=args.first_k,
        offers=args.offers,
        groups=args.groups,
        notice=args.notice,
        seed=args.seed,
        trace=args.trace > 0,
    )


def main() -> int:
    args = parse_args()
    results = []
    for nodes in args.counts:
        result = Sim(params_for(args, nodes)).run()
        report(result, args.measured, args.trace)
        results.append(result)
        if args.json:
            docs = [
                {**asdict(r), "egress_ratio": r.egress_ratio, "time_ratio": r.time_ratio}
                for r in results
            ]
            args.json.write_text(json.dumps(docs, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
