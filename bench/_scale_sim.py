"""Simulated syncbit daemons for bench/scale.py: one worker process runs a slice of the
nodes on one trio loop and prints its figures as JSON. Not part of the product.

Each node talks to the scheduler as `syncbit/daemon.py`, `fetcher.py` and `jobs.py` do
(same routes, bodies, order and cadence) but moves no bytes: a chunk "transfer" is a
sleep at the simulated link's rate. Two request mixes:

  mix       heartbeats at the interval the scheduler's answers ask for (closed loop, as
            the daemon: sleep after each answer; `syncbit.node.reporter`'s own bounds:
            never more often than every 2 s, at most 30 s), the generation long poll
            held open, and every 2 s (the data's pace, which a heartbeat interval does
            not change: the daemon's reports and lookups are loops of their own) a third
            of the nodes claim and report 8 new chunks of one shared object, and a
            chunk-map lookup at every third such tick (the whole map once, then its
            updates since the cursor, as the daemon; every time whole with
            `whole_maps`, bench --whole-maps: the issue's mix, and daemons before).
            With `obey_interval` off (bench --fixed-interval), the old mix: a heartbeat
            every 2 s whatever the answer says, the reports and lookups after each
            heartbeat.
  prefetch  the daemon's real sequence for one dataset assigned to every node: the long
            poll wakes, dataset listing, manifest, plan; a prefetch job per node (4 files
            at a time); each chunk's reader by the plan's members (chunk k -> member k mod
            N); the fetcher's lanes (6 peer transfers, the source lane's share), chunk-map
            reads cached 1 s per object (the whole map once, then its updates since the
            cursor), parked chunks polling it every 0.1 s, claims
            before source reads (followers up to 16 MiB), reports every 50 ms.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import trio
from _scale_http import Pool, RequestFailed, Stats, loads

# The real daemon's rule for the interval an answer asks for (bounds, bad values): the
# worker runs with the bench's own tree on its path.
from syncbit.node.reporter import interval_in_force, lookup_in_force
from syncbit.retry import backoff_delays

HB_ROUTE = "heartbeat"
_GENERATION_WAIT = 25.0  # daemon.py: seconds a long poll may wait
_RESYNC = 300.0  # node/sync.py: seconds at most between listings while nothing changes
_CHUNK_INFO_TTL = 1.0  # daemon.py: a chunk map is reused this long by transfers
_PARK_POLL = 0.1  # fetcher.py: parked chunks look at the chunk map this often
_REPORT_BATCH = 4096  # daemon.py: chunks per report
_FILES_AT_ONCE = 4  # jobs.py
_PREFETCH_CONCURRENCY = 6  # DaemonConfig default: the peer lane
_SOURCE_BATCH = 16 << 20  # fetcher.py: bytes one source read (and one claim) may cover
_CLAIM_TTL = 60.0  # fetcher.py: max(claim_ttl, read_deadline)
_MIX_REPORT_CHUNKS = 8
_MAX_QUIET = 60.0  # node/directory.py: seconds one busy answer may keep a node from asking
_TOLD = b'"heartbeat_interval":'
_LOOKUP_TOLD = b'"lookup_interval":'
_CURSOR = re.compile(rb'"cursor":"([^"]*)"')


def source_address(index: int) -> str:
    """A loopback address of its own per node: the scheduler's per-client connection
    limits and logs then see nodes, as in a real cluster."""
    n = index + 1
    return f"127.{10 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def chunk_digest(object_id: str, index: int) -> str:
    """The digest every node reports for a chunk (they agree: no conflicts)."""
    return hashlib.sha256(f"{object_id}:{index}".encode()).hexdigest()


def _labels(name: str, index: int) -> dict[str, str]:
    """What a Kubernetes GPU node's daemon sends (`--kubernetes` copies the Node's labels)."""
    return {
        "kubernetes.io/hostname": name,
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "p5.48xlarge",
        "topology.kubernetes.io/region": "us-east-1",
        "topology.kubernetes.io/zone": f"us-east-1{'abcd'[index % 4]}",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.memory": "81559",
        "nvidia.com/cuda.driver.major": "550",
        "feature.node.kubernetes.io/cpu-model.vendor_id": "Intel",
        "syncbit.io/pool": "gpu",
    }


def _mask(keys: Any) -> int:
    mask = 0
    for key in keys:
        mask |= 1 << int(key)
    return mask


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


@dataclass
class Info:
    """What a chunk map said, as bit masks over chunk indexes, and where its updates go on."""

    digests: int = 0
    peers: int = 0
    fetching: int = 0
    cursor: str = ""

    @classmethod
    def parse(cls, raw: bytes) -> Info:
        doc = loads(raw)
        peers = doc.get("peers") or {}
        return cls(
            _mask(doc.get("digests") or {}),
            _mask(k for k, v in peers.items() if v),
            _mask(doc.get("fetching") or {}),
            str(doc.get("cursor") or ""),
        )

    def apply(self, doc: dict[str, Any]) -> bool:
        """Fold one page of updates in (`protocol.ChunkMap.apply`); True if more follow."""
        if doc["reset"]:
            self.digests = self.peers = self.fetching = 0
        changed = _mask(doc["changed"])
        peers = doc.get("peers") or {}
        self.digests = self.digests & ~changed | _mask(doc.get("digests") or {})
        self.peers = self.peers & ~changed | _mask(k for k, v in peers.items() if v)
        self.fetching = self.fetching & ~changed | _mask(doc.get("fetching") or {})
        self.cursor = str(doc["cursor"])
        return bool(doc["more"])


@dataclass(eq=False)
class Obj:
    """One file of the dataset on one node, during its prefetch."""

    id: str
    size: int
    chunk_size: int
    base: int  # position of its chunk 0 across the dataset (the plan's split)
    chunks: int
    held: int = 0
    mine: int = 0  # chunks the plan gives this node to read from the source
    override: int = 0  # planned for another node, taken over (`Fetcher._steal`)
    src: int = 0  # queued in the source lane
    peer: int = 0  # queued in the peer lane
    parked: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    watching: bool = False

    @property
    def full(self) -> int:
        return (1 << self.chunks) - 1


class Timers:
    """Wake-ups at simulated link times, cheaper than `trio.sleep_until` each: a trio sleep
    enters, expires and cancels a cancel scope, and with ~2,000 simulated transfers a
    second per worker that was 60% of the worker's CPU (py-spy at 2,000 nodes, swarm
    phase), CPU the scheduler under test then waited for. Here a sleeper parks its task
    and one driver wakes every sleeper due, `RESOLUTION` seconds at a time."""

    RESOLUTION = 0.001  # seconds: a 16 MiB chunk at 25 Gbit/s takes ~5 ms

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list[Any]]] = []
        self._seq = itertools.count()
        self._idle: Any = None  # the driver's task while no one sleeps

    async def sleep_until(self, when: float) -> None:
        task = [trio.lowlevel.current_task()]
        heapq.heappush(self._heap, (when, next(self._seq), task))
        if self._idle is not None:
            trio.lowlevel.reschedule(self._idle)
            self._idle = None

        def abort(_: Any) -> trio.lowlevel.Abort:
            task[0] = None  # cancelled: the driver skips it
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self) -> None:
        heap = self._heap
        while True:
            if not heap:
                self._idle = trio.lowlevel.current_task()

                def abort(_: Any) -> trio.lowlevel.Abort:
                    self._idle = None
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
                continue
            now = trio.current_time()
            await trio.sleep_until(min(heap[0][0], now + self.RESOLUTION))
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                sleeper = heapq.heappop(heap)[2][0]
                if sleeper is not None:
                    trio.lowlevel.reschedule(sleeper)


class Worker:
    """A slice of the simulated nodes, and the figures they gather."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.stats = Stats(spec["w0"], spec["w1"])
        self.nodes: list[Node] = []
        self.origin_next = 0.0  # trio time the simulated origin link is free again
        self.origin_rate = float(spec["origin_rate"])
        self.link_rate = float(spec["link_rate"])
        self.counts: dict[str, int] = {
            "chunks_source": 0,
            "chunks_peer": 0,
            "digests_refused": 0,
            "digests_conflicts": 0,
            "claims_granted": 0,
            "claims_busy": 0,
            "claims_held": 0,
            "mix_skipped": 0,
        }
        self.lag: list[float] = []
        self.cpu: tuple[float, float] = (0.0, 0.0)
        self.timers = Timers()

    def epoch_to_trio(self, epoch: float) -> float:
        return float(trio.current_time()) + (epoch - time.time())

    async def run(self) -> None:
        spec = self.spec
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._lag_monitor)
            nursery.start_soon(self._cpu_monitor)
            nursery.start_soon(self.timers.run)
            first, count, total = spec["first"], spec["count"], spec["total"]
            for index in range(first, first + count):
                node = Node(self, index)
                self.nodes.append(node)
                at = spec["start_at"] + spec["ramp"] * index / max(1, total)
                await trio.sleep_until(self.epoch_to_trio(at))
                nursery.start_soon(node.run)
            await trio.sleep_until(self.epoch_to_trio(spec["end_at"]))
            nursery.cancel_scope.cancel()

    async def _lag_monitor(self) -> None:
        """How late this loop wakes a sleeper: a loop that runs late delays every node."""
        while True:
            before = trio.current_time()
            await trio.sleep(0.05)
            late = trio.current_time() - before - 0.05
            if self.stats.in_window(time.time()):
                self.lag.append(late)

    async def _cpu_monitor(self) -> None:
        await trio.sleep_until(self.epoch_to_trio(self.stats.w0))
        start = time.process_time()
        try:
            await trio.sleep_until(self.epoch_to_trio(self.stats.w1))
        finally:  # the run's end may cancel it a moment before the window's: counted then
            self.cpu = (start, time.process_time())

    async def origin_read(self, nbytes: int) -> None:
        """A source read over the simulated origin link (shared by this worker's nodes)."""
        now = trio.current_time()
        start = max(now, self.origin_next)
        self.origin_next = start + nbytes / self.origin_rate
        await self.timers.sleep_until(self.origin_next + 0.005)

    def result(self) -> dict[str, Any]:
        spec = self.spec
        held = needed = 0
        for node in self.nodes:
            for obj in node.objects.values():
                held += bin(obj.held).count("1")
            needed += node.dataset_chunks
        return {
            "routes": {k: v.to_json() for k, v in self.stats.routes.items()},
            "samples": self.stats.samples,
            "nodes": {
                n.name: {
                    "first_ok": n.first_ok,
                    "hb_sent": n.hb_sent,
                    "hb_ok": n.hb_ok,
                    "in_force": n.in_force,
                }
                for n in self.nodes
            },
            "counts": self.counts,
            "lag": [round(x, 5) for x in self.lag],
            "cpu": self.cpu[1] - self.cpu[0],
            "window": spec["w1"] - spec["w0"],
            "chunks_held": held,
            "chunks_needed": needed,
            "ready_nodes": sum(1 for n in self.nodes if n.ready),
        }


class Node:
    """One simulated daemon."""

    def __init__(self, worker: Worker, index: int) -> None:
        spec = worker.spec
        self.w = worker
        self.index = index
        self.name = f"sim{index:05d}"
        self.source = source_address(index)
        self.address = f"{self.source}:7901"
        self.labels = _labels(self.name, index)
        self.pool = Pool(spec["host"], spec["port"], self.source, None, worker.stats, spec["conns"])
        self.timeout = float(spec["timeout"])
        self.interval = float(spec["hb_interval"])  # configured: the shortest
        self.in_force = self.interval  # what the last answer asked (when obeyed)
        self.obey = bool(spec.get("obey_interval", True))
        self.whole_maps = bool(spec.get("whole_maps", False))  # the mix's lookups
        self.mix_cursor = ""  # where the mix's lookups go on (see `_mix_lookup`)
        self.generation = -1  # daemon.py: no generation seen yet
        self.following = False  # node/sync.py: the long poll answers at the scheduler's pace
        self.manifests: dict[str, dict[str, Any]] = {}
        self.plan: dict[str, dict[str, Any]] = {}
        self._plan_tail = b""
        self.first_ok: float | None = None
        self.hb_sent = self.hb_ok = 0
        self.ready: dict[str, str] = {}
        self.objects: dict[str, Obj] = {}
        self.dataset_chunks = 0
        self.fetch: Fetch | None = None
        self._nursery: trio.Nursery | None = None

    # -- what every daemon does -------------------------------------------------------------

    async def call(self, method: str, path: str, route: str, body: Any = None, **kw: Any) -> Any:
        raw = await self.pool.call(method, path, route, body, kw.pop("timeout", self.timeout), **kw)
        return loads(raw) if raw else None

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._register()
                await self.sync_datasets(quiet=True)
                nursery.start_soon(self._dataset_loop)
                if self.w.spec["mode"] == "mix":
                    nursery.start_soon(self._mix_loop)
                else:
                    self.fetch = Fetch(self, nursery)
                    nursery.start_soon(self._heartbeat_loop)
        finally:
            self.pool.close()

    async def _register(self) -> None:
        """A daemon with a bootstrap credential in its token_file asks for its own node
        credential before its first heartbeat (and again at each tick until it has one)."""
        bootstrap = self.w.spec["bootstrap"]
        if bootstrap is None:
            return
        while True:
            try:
                doc = await self.call(
                    "POST",
                    f"/v1/nodes/{quote(self.name, safe='')}/credential",
                    "credential",
                    {},
                    token=bootstrap,
                )
                self.pool.set_token(str(doc["token"]))
                return
            except RequestFailed:
                await trio.sleep(self.interval)

    def _body(self) -> dict[str, Any]:
        held_bytes = sum(bin(o.held).count("1") * o.chunk_size for o in self.objects.values())
        return {
            "address": self.address,
            "labels": self.labels,
            "load": self.fetch.uploads if self.fetch else 0,
            "cache_bytes": held_bytes,
            "cache_size": 200 << 30,
            "ready": self.ready,
            "pinned_bytes": held_bytes if self.plan else 0,
            "pinned_over_budget": False,
            "disk_full": False,
            "disk_free": (3 << 40) - held_bytes,
        }

    async def heartbeat(self) -> None:
        began = time.time()
        counted = self.w.stats.in_window(began)
        if counted:
            self.hb_sent += 1
        try:
            raw = await self.pool.call(
                "PUT",
                f"/v1/nodes/{quote(self.name, safe='')}",
                HB_ROUTE,
                self._body(),
                self.timeout,
                lane="heartbeat",
            )
        except RequestFailed:
            return
        if self.first_ok is None:
            self.first_ok = time.time()
        if counted:
            self.hb_ok += 1
        if self.obey:
            self.in_force = interval_in_force(_told(raw), self.interval)
        if self.fetch is not None:  # node/reporter.py: the parked prefetches' lookups
            self.fetch.lookup_interval = lookup_in_force(_told(raw, _LOOKUP_TOLD))
        # The plan (every member's name: O(nodes)) is parsed only when it changed; the
        # daemon parses it every time, which costs the simulator's CPU, not the scheduler's.
        at = raw.find(b'"plan"')
        tail = raw[at:] if at >= 0 else b""
        if tail != self._plan_tail or at < 0:
            self._plan_tail = tail
            record = loads(raw)
            await self.apply_plan(list(record.get("plan", [])), heard=True)

    async def _heartbeat_loop(self) -> None:
        """The reporter's loop: the next heartbeat at the interval in force after each
        answer (a failed one is tried again after the configured interval: the mix never
        runs long enough for the daemon's back-off to matter)."""
        while True:
            await self.heartbeat()
            await trio.sleep(self.in_force)

    async def _dataset_loop(self) -> None:
        """node/sync.py `dataset_loop`: the generation long poll, then a dataset sync; a
        sync that keeps failing is tried less and less often (full jitter, 1 s doubling
        up to 30 s)."""
        failed_syncs = backoff_delays(base=1.0, cap=30.0)
        listed = trio.current_time()
        while True:
            seen: int | None = None
            doc: dict[str, Any] = {}
            if self.w.spec.get("stub"):
                # The stub answers at once: waiting here stands for a poll that times out.
                await trio.sleep(_GENERATION_WAIT)
            try:
                doc = await self.call(
                    "GET",
                    f"/v1/generation?after={self.generation}&timeout={_GENERATION_WAIT:g}"
                    f"&node={quote(self.name, safe='')}",
                    "generation (long poll)",
                    timeout=_GENERATION_WAIT + self.timeout,
                    lane="poll",
                )
                seen = int(doc["generation"])
                self.following = not self.w.spec.get("stub")
            except RequestFailed:
                self.following = False
                await trio.sleep(1.0)
            before = self.generation
            if seen == before and trio.current_time() - listed < _RESYNC:
                continue  # sync.py: nothing changed, no listing (one every 300 s)
            listed = trio.current_time()
            # sync.py: a poll that saw a change carries the listing and the plan.
            carried = isinstance(doc.get("datasets"), list) and isinstance(doc.get("plan"), list)
            await self.sync_datasets(listing=doc if carried else None)
            if self.generation != before:
                failed_syncs = backoff_delays(base=1.0, cap=30.0)
                try:
                    if not (carried and self.generation == seen):
                        doc = await self.call(
                            "GET", f"/v1/nodes/{quote(self.name, safe='')}/plan", "plan"
                        )
                    await self.apply_plan(list(doc["plan"]))
                except RequestFailed:
                    pass
            elif seen is not None and seen != before:
                await trio.sleep(max(1.0, next(failed_syncs)))

    async def sync_datasets(
        self, quiet: bool = False, force: bool = False, listing: dict[str, Any] | None = None
    ) -> None:
        try:
            if listing is None:
                listing = await self.call("GET", "/v1/datasets", "datasets")
            if listing["generation"] == self.generation and not force:
                return
            wanted: dict[str, dict[str, Any]] = {}
            for summary in listing["datasets"]:
                name = summary["name"]
                current = self.manifests.get(name)
                if current is not None and current["revision"] == summary["revision"]:
                    wanted[name] = current
                else:
                    wanted[name] = await self.call(
                        "GET", f"/v1/datasets/{quote(name, safe='')}", "manifest"
                    )
        except RequestFailed:
            return
        self.generation = int(listing["generation"])
        self.manifests = wanted

    async def apply_plan(self, plan: list[dict[str, Any]], heard: bool = False) -> None:
        """node/sync.py `apply_plan`: fetch a manifest the plan names and this node lacks
        (not for a heartbeat's plan while the long poll follows: `needs_sync`), then start
        (or refresh the members of) the prefetch job."""
        wanted = {p["dataset"]: p for p in plan}
        if not (heard and self.following) and any(
            n not in self.manifests or self.manifests[n]["revision"] != p["revision"]
            for n, p in wanted.items()
        ):
            await self.sync_datasets(force=True)
        self.plan = wanted
        if self.fetch is None:
            return
        for name, entry in wanted.items():
            manifest = self.manifests.get(name)
            if manifest is not None and manifest["revision"] == entry["revision"]:
                share = entry.get("share") or {}
                split = (int(share["index"]), int(share["count"])) if share else None
                self.fetch.start(manifest, list(entry["members"]), split)

    # -- the mix ----------------------------------------------------------------------------

    async def _mix_loop(self) -> None:
        """Heartbeats at the interval in force; every 2 s (after a heartbeat, with
        --fixed-interval) a third of the nodes claim and report 8 new chunks of the shared
        object, and a chunk-map lookup at every third tick. Reports and lookups run beside
        the heartbeat loop, as in the daemon (its report loop and fetcher are tasks of
        their own): a slow one is skipped, not queued, while it runs."""
        assert self._nursery is not None
        if self.obey:
            self._nursery.start_soon(self._heartbeat_loop)
        reporter = self.index % 3 == 0
        busy = {"report": False, "lookup": False}
        state = {"next": 0, "pending": []}
        tick = 0

        async def guarded(kind: str, job: Callable[[], Any]) -> None:
            busy[kind] = True
            try:
                await job()
            except RequestFailed:
                pass
            finally:
                busy[kind] = False

        while True:
            if not self.obey:
                await self.heartbeat()
            target = self._shared_object()
            if target is not None:
                jobs: list[tuple[str, bool, Callable[[], Any]]] = [
                    ("report", reporter, functools.partial(self._mix_report, target, state)),
                    ("lookup", tick % 3 == 2, functools.partial(self._mix_lookup, target.id)),
                ]
                for kind, due, job in jobs:
                    if not due:
                        continue
                    if busy[kind]:
                        self.w.counts["mix_skipped"] += 1
                    else:
                        self._nursery.start_soon(guarded, kind, job)
            # A node with nothing due at the next ticks sleeps through them (the same
            # requests at the same times): thousands of idle wake-ups a second cost the
            # simulator a third of its CPU (trio wakes each sleeper by cancelling it),
            # CPU this 2-core machine's scheduler under test then lacks.
            skip = 1 if reporter or not self.obey or target is None else (2 - tick) % 3 or 3
            tick += skip
            await trio.sleep(self.interval * skip)

    def _shared_object(self) -> Obj | None:
        if not self.objects:
            manifest = self.manifests.get(self.w.spec["dataset"])
            if manifest is None:
                return None
            entry = manifest["files"][0]
            chunk_size = int(manifest["chunk_size"])
            chunks = -(-int(entry["size"]) // chunk_size)
            self.objects[entry["object"]] = Obj(
                entry["object"], int(entry["size"]), chunk_size, 0, chunks
            )
        return next(iter(self.objects.values()))

    async def _mix_report(self, obj: Obj, state: dict[str, Any]) -> None:
        pending: list[int] = state["pending"]
        wanted = pending[:_MIX_REPORT_CHUNKS]
        while len(wanted) < _MIX_REPORT_CHUNKS and state["next"] < obj.chunks:
            wanted.append(state["next"])
            state["next"] += 1
        if not wanted:
            return
        claim = await self.claim(obj, wanted)
        state["pending"] = [int(i) for i in claim["busy"]]
        got = [*claim["granted"], *claim["held"]]
        if got:
            await self.report({obj: [int(i) for i in got]})

    async def _mix_lookup(self, object_id: str) -> None:
        """The mix's lookup as the daemon makes it (`SchedulerDirectory`): the whole map
        the first time, then the updates since its cursor; with --whole-maps the whole
        map every time (the daemon before it followed updates, and the issue's mix)."""
        if self.whole_maps or not self.mix_cursor:
            raw = await self._whole_map(object_id)
            # Not parsed whole (the simulated node does not act on it): the cursor is
            # among the last fields.
            found = _CURSOR.search(raw[-256:])
            self.mix_cursor = found[1].decode() if found else ""
            return
        while True:
            page = await self._updates(object_id, self.mix_cursor)
            self.mix_cursor = str(page["cursor"])
            if not page["more"]:
                return

    async def _whole_map(self, object_id: str) -> bytes:
        # scheduler/client.py `chunk_map`: the compact form, peers by name
        path = f"/v1/objects/{object_id}/chunks?node={quote(self.name, safe='')}&peers=names"
        raw: bytes = await self.pool.call("GET", path, "chunk map", None, self.timeout)
        return raw

    async def _lookup(self, object_id: str) -> Info:
        """A chunk map read in full and parsed (the prefetch acts on it)."""
        return Info.parse(await self._whole_map(object_id))

    async def _updates(self, object_id: str, cursor: str) -> dict[str, Any]:
        """One page of a chunk map's updates since `cursor` (`SchedulerDirectory`)."""
        query = f"node={quote(self.name, safe='')}&cursor={quote(cursor, safe='')}"
        raw = await self.pool.call(
            "GET", f"/v1/objects/{object_id}/updates?{query}", "chunk updates", None, self.timeout
        )
        doc: dict[str, Any] = loads(raw)
        return doc

    # -- requests the fetcher makes ---------------------------------------------------------

    async def claim(self, obj: Obj, indexes: list[int]) -> dict[str, Any]:
        doc: dict[str, Any] = await self.call(
            "POST",
            f"/v1/objects/{obj.id}/claims",
            "claim",
            {"node": self.name, "chunks": indexes, "ttl": _CLAIM_TTL},
        )
        counts = self.w.counts
        counts["claims_granted"] += len(doc["granted"])
        counts["claims_busy"] += len(doc["busy"])
        counts["claims_held"] += len(doc["held"])
        return doc

    async def release(self, obj: Obj, indexes: list[int]) -> None:
        await self.call(
            "POST",
            f"/v1/objects/{obj.id}/release",
            "release",
            {"node": self.name, "chunks": indexes},
        )

    async def report(self, chunks: dict[Obj, list[int]]) -> None:
        add = [
            {
                "object": obj.id,
                "size": obj.size,
                "chunk_size": obj.chunk_size,
                "chunks": [[i, chunk_digest(obj.id, i)] for i in indexes],
            }
            for obj, indexes in chunks.items()
        ]
        doc = await self.call(
            "POST",
            f"/v1/nodes/{quote(self.name, safe='')}/chunks",
            "chunk report",
            {"add": add, "remove": []},
        )
        self.w.counts["digests_refused"] += len(doc.get("refused", []))
        self.w.counts["digests_conflicts"] += len(doc.get("conflicts", []))


class Fetch:
    """A node's prefetch: `jobs.py` (files 4 at a time, the plan's split) and `fetcher.py`
    (lanes, parking, claims, steal, reports) over bit masks instead of flight objects."""

    def __init__(self, node: Node, nursery: trio.Nursery) -> None:
        self.node = node
        self.nursery = nursery
        self.members: list[str] = []
        self.share: tuple[int, int] | None = None  # the plan's (index, count)
        self.started: set[str] = set()
        self.active: list[Obj] = []
        self._changed = trio.Event()
        self._cache: dict[str, tuple[float, Info]] = {}
        self._pending: dict[str, trio.Event] = {}
        self.backlog: list[tuple[Obj, int]] = []
        self._durable = trio.Event()
        self.source_running = 0
        self.uploads = 0
        self.link_next = 0.0
        self._workers_started = False
        self.lookup_interval = 0.0  # told with each heartbeat (fetch/runner.py `_pause`)
        # node/directory.py: after a busy answer (429) no map, claim or release is asked
        # for before its Retry-After; maps come from the cache meanwhile, however old.
        self.quiet_until = -1.0

    def start(
        self, manifest: dict[str, Any], members: list[str], share: tuple[int, int] | None
    ) -> None:
        if members != self.members or share != self.share:
            self.members, self.share = members, share
            for obj in self.active:
                self._plan_shares(obj)
        name = manifest["dataset"]
        if name in self.started:
            return
        self.started.add(name)
        if not self._workers_started:
            self._workers_started = True
            for _ in range(_PREFETCH_CONCURRENCY):
                self.nursery.start_soon(self._lane, "peer")
            budget = max(1, _PREFETCH_CONCURRENCY // 2)
            sharers = share[1] if share is not None else len(members)
            for _ in range(max(1, -(-budget // max(1, sharers)))):
                self.nursery.start_soon(self._lane, "source")
            self.nursery.start_soon(self._report_loop)
        self.nursery.start_soon(self._job, manifest)

    def _plan_shares(self, obj: Obj) -> None:
        """Which of `obj`'s chunks this node reads from the source: position k of the
        dataset goes to member k mod N (fetch/plan.py `RoundRobin`), by the plan's share
        (index, count) when it gives one (it names no members beyond 256)."""
        me, members = self.node.name, self.members
        if self.share is not None:
            rank, count = self.share
        elif not members or me not in members:
            obj.mine = obj.full
            return
        else:
            count, rank = len(members), members.index(me)
        first = obj.base + (rank - obj.base) % count
        mine = 0
        for position in range(first, obj.base + obj.chunks, count):
            mine |= 1 << (position - obj.base)
        obj.mine = mine

    async def _job(self, manifest: dict[str, Any]) -> None:
        chunk_size = int(manifest["chunk_size"])
        limit = trio.CapacityLimiter(_FILES_AT_ONCE)
        position = 0
        objs = []
        for entry in manifest["files"]:
            chunks = -(-int(entry["size"]) // chunk_size)
            if chunks:
                obj = Obj(entry["object"], int(entry["size"]), chunk_size, position, chunks)
                objs.append(obj)
                self.node.objects[obj.id] = obj
            position += chunks
        self.node.dataset_chunks += position

        async def ensure(obj: Obj) -> None:
            async with limit:
                self._plan_shares(obj)
                missing = obj.full & ~obj.held
                obj.src = missing & obj.mine
                obj.parked = missing & ~obj.mine
                self.active.append(obj)
                self._wake()
                if obj.parked:
                    self._watch(obj)
                if missing:
                    await obj.done.wait()
                self.active.remove(obj)

        async with trio.open_nursery() as nursery:
            for obj in objs:
                nursery.start_soon(ensure, obj)
        self.node.ready[manifest["dataset"]] = manifest["revision"]

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _pick(self, lane: str) -> tuple[Obj, int] | None:
        for obj in self.active:
            mask = obj.peer if lane == "peer" else obj.src
            if mask:
                index = (mask & -mask).bit_length() - 1
                if lane == "peer":
                    obj.peer &= ~(1 << index)
                else:
                    obj.src &= ~(1 << index)
                return obj, index
        return None

    async def _lane(self, lane: str) -> None:
        while True:
            picked = self._pick(lane)
            if picked is None:
                await self._changed.wait()
                continue
            obj, index = picked
            if lane == "source":
                self.source_running += 1
            try:
                await self._transfer(obj, index, lane)
            finally:
                if lane == "source":
                    self.source_running -= 1
                self._wake()

    async def chunk_info(self, obj: Obj, max_age: float = _CHUNK_INFO_TTL) -> Info:
        """daemon.py `SchedulerDirectory.chunk_info`: cached, one request per object at a
        time; no answer is an empty map (fetcher.py `_chunk_info`)."""
        while True:
            cached = self._cache.get(obj.id)
            if cached and cached[0] + max_age > trio.current_time():
                return cached[1]
            if self.quiet():
                return cached[1] if cached else Info()
            pending = self._pending.get(obj.id)
            if pending is None:
                break
            await pending.wait()
        event = self._pending[obj.id] = trio.Event()
        try:
            asked = trio.current_time()
            info = cached[1] if cached else None
            if info is None or not info.cursor or self.node.whole_maps:
                info = await self.node._lookup(obj.id)
            else:  # the daemon follows the map's updates since its cursor
                while info.apply(await self.node._updates(obj.id, info.cursor)):
                    pass
            self._cache[obj.id] = (asked, info)
            return info
        except RequestFailed as exc:
            self.busy(exc)
            return cached[1] if cached else Info()
        finally:
            del self._pending[obj.id]
            event.set()

    def quiet(self) -> bool:
        return trio.current_time() < self.quiet_until

    def busy(self, exc: RequestFailed) -> None:
        if exc.kind == "http-429":
            wait = min(_MAX_QUIET, max(0.0, exc.retry_after or 1.0))
            self.quiet_until = max(self.quiet_until, trio.current_time() + wait)

    def _may_source(self, obj: Obj, bit: int) -> bool:
        return bool((obj.mine | obj.override) & bit)

    async def _transfer(self, obj: Obj, index: int, lane: str) -> None:
        bit = 1 << index
        if obj.held & bit:
            return
        # fetch/transfer.py `map_age`: a prefetch reuses a map for the lookup interval
        info = await self.chunk_info(obj, max(_CHUNK_INFO_TTL, self.lookup_interval))
        if info.digests & info.peers & bit:
            if lane == "source":
                obj.peer |= bit
                return
            await self._from_peer(obj)
            self._durable_now(obj, [index])
            return
        if not self._may_source(obj, bit) or info.fetching & bit:
            self._park(obj, bit)
            return
        await self._from_source(obj, index, info)

    async def _from_peer(self, obj: Obj) -> None:
        """One chunk over this node's simulated downlink (shared by its transfers)."""
        self.uploads += 1  # stands in for the peer load figure the heartbeat carries
        try:
            now = trio.current_time()
            start = max(now, self.link_next)
            self.link_next = start + obj.chunk_size / self.node.w.link_rate
            await self.node.w.timers.sleep_until(self.link_next + 0.001)
        finally:
            self.uploads -= 1
        self.node.w.counts["chunks_peer"] += 1

    async def _from_source(self, obj: Obj, index: int, info: Info) -> None:
        """fetcher.py `_from_source`: the queued chunks right after it that nobody holds or
        reads come along (one claim, one source read), as far as the claim grants them."""
        followers = []
        nxt = index + 1
        budget = _SOURCE_BATCH - obj.chunk_size
        while budget >= obj.chunk_size and nxt < obj.chunks:
            b = 1 << nxt
            if not obj.src & b or (info.peers | info.fetching) & b or not self._may_source(obj, b):
                break
            followers.append(nxt)
            budget -= obj.chunk_size
            nxt += 1
        for f in followers:
            obj.src &= ~(1 << f)
        wanted = [index, *followers]
        try:
            if self.quiet():
                raise RequestFailed("quiet")  # not asked: the scheduler said it is busy
            claim = await self.node.claim(obj, wanted)
            granted = {int(i) for i in claim["granted"]}
        except RequestFailed as exc:
            # fetch/claims.py: without an answer a prefetch parks (another node may be
            # reading the chunk: the origin's bytes twice), its followers back in line.
            self.busy(exc)
            for f in followers:
                obj.src |= 1 << f
            self._park(obj, 1 << index)
            return
        run = []
        if index in granted:
            for f in followers:
                if f not in granted:
                    break
                run.append(f)
        for f in followers[len(run) :]:
            obj.src |= 1 << f
        unused = sorted(granted - {index} - set(run)) if index in granted else sorted(granted)
        if unused and not self.quiet():
            try:
                await self.node.release(obj, unused)
            except RequestFailed as exc:
                self.busy(exc)
        if index not in granted:
            self._park(obj, 1 << index)
            return
        batch = [index, *run]
        await self.node.w.origin_read(obj.chunk_size * len(batch))
        self.node.w.counts["chunks_source"] += len(batch)
        self._durable_now(obj, batch)

    def _durable_now(self, obj: Obj, indexes: list[int]) -> None:
        for i in indexes:
            obj.held |= 1 << i
            self.backlog.append((obj, i))
        self._durable.set()
        if obj.held == obj.full:
            obj.done.set()

    def _park(self, obj: Obj, bit: int) -> None:
        obj.parked |= bit
        self._watch(obj)

    def _watch(self, obj: Obj) -> None:
        if not obj.watching:
            obj.watching = True
            self.nursery.start_soon(self._watch_parked, obj)

    async def _watch_parked(self, obj: Obj) -> None:
        """fetcher.py `_watch_parked`: one chunk-map look per object every 0.1 s while any
        of its chunks wait; ready ones go to the peer lane, orphaned ones to the source."""
        try:
            while obj.parked:
                watched = sum(1 for o in self.active if o.watching)
                await trio.sleep(max(_PARK_POLL, self.lookup_interval * watched))
                if not obj.parked:
                    break
                info = await self.chunk_info(obj, max_age=_PARK_POLL / 2)
                parked = obj.parked & ~obj.held
                ready = parked & info.peers
                free = parked & ~ready & ~info.fetching & (obj.mine | obj.override)
                if self.quiet():
                    # The daemon queues these and its quiet directory turns each claim
                    # down at once, without a request: the simulator skips that round,
                    # which the scheduler never sees, and its CPU.
                    free = 0
                obj.peer |= ready
                obj.src |= free
                obj.parked = parked & ~ready & ~free
                if ready or free:
                    self._wake()
                self._steal(obj, info)
        finally:
            obj.watching = False

    def _steal(self, obj: Obj, info: Info) -> None:
        """fetcher.py `_steal`: an idle source lane takes the last chunk planned for
        another node that nobody holds or reads."""
        if self.source_running or any(o.src for o in self.active):
            return
        spare = obj.parked & ~obj.mine & ~info.peers & ~info.fetching
        if spare:
            bit = 1 << (spare.bit_length() - 1)
            obj.override |= bit
            obj.parked &= ~bit
            obj.src |= bit
            self._wake()

    async def _report_loop(self) -> None:
        """daemon.py `_report_loop`: what became durable, in batches, every 50 ms."""
        while True:
            if not self.backlog:
                await self._durable.wait()
            self._durable = trio.Event()
            batch, self.backlog = self.backlog[:_REPORT_BATCH], self.backlog[_REPORT_BATCH:]
            grouped: dict[Obj, list[int]] = {}
            for obj, index in batch:
                grouped.setdefault(obj, []).append(index)
            try:
                await self.node.report(grouped)
            except RequestFailed as exc:
                if exc.kind.startswith("http-4") and exc.kind != "http-429":
                    continue  # refused as it is: the daemon does not send it again
                # node/reporter.py: sent again, after the busy scheduler's Retry-After
                self.backlog = batch + self.backlog
                await trio.sleep(max(1.0, exc.retry_after or 0.0))
            else:
                await trio.sleep(0.05)


def _told(raw: bytes, key: bytes = _TOLD) -> Any:
    """The answer's "heartbeat_interval" (or `key`; None if it has none, or not a number):
    found without parsing the whole answer, whose plan the simulator parses only when it
    changed."""
    at = raw.find(key)
    if at < 0:
        return None
    tail = raw[at + len(key) : at + len(key) + 40].lstrip()
    end = 0
    while end < len(tail) and tail[end : end + 1] in b"0123456789.eE+-":
        end += 1
    try:
        return float(tail[:end])
    except ValueError:
        return None


def main() -> None:
    """Worker entry: the spec as JSON on stdin, the figures as JSON on stdout."""
    worker = Worker(json.loads(sys.stdin.buffer.read()))
    trio.run(worker.run)
    sys.stdout.write(json.dumps(worker.result()))


__all__ = ["Worker", "chunk_digest", "main", "source_address"]
