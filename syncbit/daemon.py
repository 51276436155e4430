"""The node daemon's composition root: builds every component from config and runs them in
one nursery; shutdown is cancelling that nursery (SIGTERM/SIGINT), then unmount and flush.

Holds no logic of its own beyond wiring and the small control loops that keep the node in
step with the scheduler (heartbeat, dataset list, chunk reports).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import math
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from syncbit.auth import read_token
from syncbit.config import DaemonConfig, SchedulerConfig
from syncbit.errors import NotFoundError, SyncbitError, UnauthorizedError, UserError
from syncbit.fetcher import Fetcher
from syncbit.fs.kernel import ROOT_INODE, Session
from syncbit.fs.mount import MOUNT_OPTIONS, clean_stale, raise_readahead
from syncbit.fs.ops import SyncbitFS
from syncbit.fs.tree import Tree
from syncbit.jobs import Jobs
from syncbit.kube import NodeSync
from syncbit.manifest import Manifest
from syncbit.metrics import Snapshot, counter, fetch_latency, gauge, render
from syncbit.peer import PeerClient, PeerServer
from syncbit.scheduler.client import ChunkMap, ClaimResult, SchedulerClient
from syncbit.scheduler.server import SchedulerServer
from syncbit.sources.base import Source, open_source, options_for
from syncbit.store import ObjectStore, StoredObject

log = logging.getLogger("syncbit.daemon")

_CHUNK_INFO_TTL = 1.0
_GENERATION_WAIT = 25.0  # seconds a long poll for a new scheduler generation may wait
_REPORT_BATCH = 4096
_PROGRESS_WAIT_MAX = 60.0  # seconds `GET /v1/local/datasets/NAME?wait=S` may hold a request
_PROGRESS_RECHECK = 1.0  # changes nothing announces (a failed pull, a new plan) show this soon


class SchedulerDirectory:
    """The fetcher's view of the scheduler: chunk digests and holders, cached briefly and
    fetched once per object however many workers ask at the same time."""

    def __init__(self, client: SchedulerClient, node: str) -> None:
        self.client = client
        self.node = node
        self._cache: dict[str, tuple[float, ChunkMap]] = {}
        self._pending: dict[str, trio.Event] = {}

    async def chunk_info(self, object_id: str, max_age: float = _CHUNK_INFO_TTL) -> ChunkMap:
        while True:
            cached = self._cache.get(object_id)
            if cached and cached[0] + max_age > trio.current_time():
                return cached[1]
            pending = self._pending.get(object_id)
            if pending is None:
                break
            await pending.wait()
        event = self._pending[object_id] = trio.Event()
        try:
            info = await self.client.chunk_map(object_id, self.node)
            self._cache[object_id] = (trio.current_time(), info)
            return info
        finally:
            del self._pending[object_id]
            event.set()

    async def claim(self, object_id: str, indexes: list[int], ttl: float) -> ClaimResult:
        return await self.client.claim(self.node, object_id, indexes, ttl)

    async def release(self, object_id: str, indexes: list[int]) -> None:
        await self.client.release(self.node, object_id, indexes)

    async def report_bad_peer(self, peer: str, object_id: str, index: int, reason: str) -> None:
        self._cache.pop(object_id, None)
        await self.client.report_bad_peer(self.node, peer, object_id, index, reason)


@dataclass
class SourceCache:
    """One open `Source` per source URI, shared by every file of every dataset version."""

    configured: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)

    def __call__(self, manifest: Manifest) -> Source:
        key = manifest.source + json.dumps(manifest.source_options, sort_keys=True)
        source = self.sources.get(key)
        if source is None:
            options = options_for(manifest.source, self.configured, manifest.source_options)
            source = open_source(manifest.source, options)
            self.sources[key] = source
        return source

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        self.sources.clear()


class Daemon:
    """Every component of one node, wired from a `DaemonConfig`."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.token = read_token(config.token_file)  # before the cache lock: fail early
        self.store = ObjectStore.open(config.cache_dir, config.cache_size)
        self.embedded: SchedulerServer | None = None
        self.peer_server: PeerServer | None = None
        self.peer_client = PeerClient(token=self.token)
        self.sources = SourceCache(config.source_options)
        self.tree = Tree()
        self.manifests: dict[str, Manifest] = {}
        self._generation = -1
        self._warned: dict[str, float] = {}
        self.plan: dict[str, dict[str, Any]] = {}  # assigned dataset -> its plan entry
        self.plan_received = False  # until the first plan arrives, assignments are unknown
        self._over_budget_told = False
        self._heartbeat_ok = -math.inf
        self.kube: NodeSync | None = None
        self.session: Session | None = None  # the FUSE mount, once mounted
        if config.kubernetes:  # a bad kubeconfig fails start-up, before the mount
            self.kube = NodeSync(config.node, kubeconfig=config.kubeconfig)

    def _start_services(self) -> str:
        cfg = self.config
        url = cfg.scheduler
        if url is None:
            state_dir = cfg.scheduler_state_dir or cfg.cache_dir / "scheduler"
            self.embedded = SchedulerServer(
                SchedulerConfig(
                    listen=cfg.scheduler_listen,
                    state_dir=state_dir,
                    node_timeout=cfg.node_timeout,
                    source_options=cfg.source_options,
                    token_file=cfg.token_file,
                )
            )
            self.embedded.start()
            url = self.embedded.url
            log.info("embedded scheduler on %s", url)
        self.peer_server = PeerServer(self.store, cfg.listen, self.token, cfg.upload_slots)
        self.peer_server.start()
        log.info("peer service on %s", self.peer_server.address)
        return url

    @property
    def advertise(self) -> str:
        assert self.peer_server is not None
        return self.config.advertise or self.peer_server.address

    async def run(self) -> None:
        cfg = self.config
        try:
            # First: a mount point another live daemon serves is refused before this one
            # binds a port or tells the scheduler anything; a stale one is cleaned (it
            # fails even mkdir with ENOTCONN).
            await trio.to_thread.run_sync(clean_stale, cfg.mount)
            url = self._start_services()
            self.client = SchedulerClient(url, token=self.token)
            self.directory = SchedulerDirectory(self.client, cfg.node)
            self.fetcher = Fetcher(
                self.store,
                self.directory,
                self.peer_client,
                workers=cfg.fetch_workers,
                read_deadline=cfg.read_deadline,
                readahead_chunks=cfg.readahead_chunks,
                prefetch_concurrency=cfg.prefetch_concurrency,
                prefetch_bandwidth=cfg.prefetch_bandwidth,
            )
            self.jobs = Jobs(cfg.node, self.fetcher, self.sources, self.is_ready, self.store.flush)
            self._load_local_manifests()
            self._load_plan()
            self._pin()  # before any write can make room: the last plan's data stays
            await self._sync_datasets(quiet=True)
            fs = self.fs = SyncbitFS(self.tree, self.fetcher, self.sources, self.dataset_attrs)
            self._setup_metrics()
            cfg.mount.mkdir(parents=True, exist_ok=True)
            session = self.session = Session(fs, cfg.mount, passthrough=cfg.passthrough)
            session.mount(MOUNT_OPTIONS)
            try:
                log.info("node %s: mounted at %s", cfg.node, cfg.mount)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    token = trio.lowlevel.current_trio_token()
                    assert self.peer_server is not None
                    self.peer_server.set_control(
                        lambda m, path, body: trio.from_thread.run(
                            self._control, m, path, body, trio_token=token
                        )
                    )
                    self.peer_server.set_probes(
                        lambda: trio.from_thread.run_sync(self._readiness, trio_token=token),
                        lambda: trio.from_thread.run_sync(render, self.registry, trio_token=token),
                    )
                    nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                    await nursery.start(self.store.commit_loop)
                    await nursery.start(self.fetcher.run)
                    self.jobs.bind(nursery)
                    nursery.start_soon(session.run)
                    nursery.start_soon(self._tune_mount)
                    nursery.start_soon(self._heartbeat_loop)
                    nursery.start_soon(self._dataset_loop)
                    nursery.start_soon(self._report_loop)
                    if self.kube is not None:
                        nursery.start_soon(self.kube.run, self._kube_state, cfg.kubernetes_interval)
            finally:
                session.close(unmount=True)
                log.info("unmounted %s", cfg.mount)
                with trio.CancelScope(shield=True):
                    kept = await self.store.keep_staged()
                    if kept:
                        log.info("kept %d verified chunks that were still in RAM", kept)
                    await self.store.flush()
                    await self.client.aclose()
        finally:
            self._close()

    # -- health and metrics ------------------------------------------------------------------

    def _readiness(self) -> tuple[bool, str]:
        """`/readyz`: the mount answers and the scheduler heard from this node lately."""
        if self.session is None or not self.session.initialized.is_set():
            return False, "not mounted yet"
        quiet = trio.current_time() - self._heartbeat_ok
        if quiet > 3 * self.config.heartbeat_interval + 5:
            return False, f"no answer from the scheduler for {quiet:.0f}s"
        return True, "ok"

    def _setup_metrics(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        latency = fetch_latency(self.registry)
        self.fetcher.on_transfer = lambda origin, s: latency.labels(origin or "unknown").observe(s)
        self.registry.register(Snapshot(self._collect))

    def _collect(self) -> Iterator[Metric]:
        """Node metrics, read from the components at scrape time (trio thread)."""
        f, usage = self.fetcher, self.store.usage()
        yield counter(
            "syncbit_read_bytes",
            "Bytes served to readers through the mount, by where their chunk came from.",
            {(k,): float(v) for k, v in f.read_bytes.items()},
            ["origin"],
        )
        yield counter(
            "syncbit_fetched_bytes",
            "Bytes brought into the cache, by origin.",
            {("peer",): f.stats["peer"], ("source",): f.stats["source"]},
            ["origin"],
        )
        assert self.peer_server is not None
        yield counter(
            "syncbit_peer_served_bytes",
            "Bytes served to other nodes.",
            {(): self.peer_server.bytes_served},
            [],
        )
        yield counter(
            "syncbit_peer_busy_refusals",
            "Prefetch transfers this node turned away: every upload slot was taken.",
            {(): self.peer_server.refused},
            [],
        )
        yield gauge(
            "syncbit_cache_bytes",
            "Cache bytes used, pinned (held of assigned datasets), and the budget.",
            {(k,): usage[k] for k in ("used", "pinned", "budget")},
            ["kind"],
        )
        yield gauge(
            "syncbit_cache_pinned_over_budget",
            "1 when the datasets assigned here need more than the cache budget.",
            {(): float(usage["pinned_over_budget"])},
            [],
        )
        yield counter("syncbit_evictions", "Objects evicted.", {(): usage["evictions"]}, [])
        yield counter("syncbit_evicted_bytes", "Bytes evicted.", {(): usage["evicted_bytes"]}, [])
        yield counter(
            "syncbit_verify_failures",
            "Chunks from peers and whole files that failed verification.",
            {(): f.stats["verify_failures"]},
            [],
        )
        yield gauge(
            "syncbit_dataset_ready",
            "1 when the dataset is complete and verified here.",
            {(n,): float(self.is_ready(m)) for n, m in self.manifests.items()},
            ["dataset"],
        )
        yield gauge(
            "syncbit_dataset_cached_bytes",
            "Bytes of the dataset held here.",
            {(n,): float(self._present(m)) for n, m in self.manifests.items()},
            ["dataset"],
        )
        yield counter(
            "syncbit_fuse_requests",
            "FUSE requests by operation.",
            {(op,): float(n) for op, n in self.fs.requests.items()},
            ["op"],
        )
        if self.session is not None:
            yield counter(
                "syncbit_fuse_passthrough_opens",
                "Opens the kernel serves from the cache file itself (FUSE passthrough).",
                {(): float(self.session.passthrough_opens)},
                [],
            )
        yield counter(
            "syncbit_fuse_errors",
            "FUSE requests answered with an error, by operation and errno.",
            {key: float(n) for key, n in self.fs.errors.items()},
            ["op", "errno"],
        )

    async def _tune_mount(self) -> None:
        """Raise the mount's readahead once the kernel has applied the INIT reply (which
        caps it at 128 KiB): reads then arrive as 1 MiB requests instead of 128 KiB."""
        assert self.session is not None
        await self.session.initialized.wait()
        await trio.sleep(0.05)
        await trio.to_thread.run_sync(
            raise_readahead, self.config.mount, self.config.mount_readahead_kb
        )

    def _close(self) -> None:
        if self.peer_server is not None:
            self.peer_server.stop()
        if self.embedded is not None:
            self.embedded.stop()
        self.peer_client.close()
        self.sources.close()
        self.store.close()

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                scope.cancel()
                return

    def _warn(self, what: str, exc: BaseException) -> None:
        """Log a recurring control-plane failure at most every 30 s."""
        now = time.monotonic()
        if now - self._warned.get(what, 0.0) > 30:
            self._warned[what] = now
            log.warning("%s: %s", what, exc)

    # -- node-local control: pull, progress, readiness ----------------------------------------

    async def _control(
        self, method: str, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        route, _, query = path.partition("?")
        parts = [unquote(p) for p in route.split("/") if p]
        try:
            if method == "POST" and parts == ["v1", "local", "pull"]:
                return 200, await self.pull(str(body.get("dataset", "")))
            if method == "POST" and parts == ["v1", "local", "pull", "cancel"]:
                return 200, self.cancel_pull(str(body.get("dataset", "")))
            if parts[:3] == ["v1", "local", "cache"]:
                return 200, await self._cache_control(method, parts[3:], body)
            if method == "GET" and parts == ["v1", "local", "datasets"]:
                return 200, {"datasets": [self.progress(n) for n in sorted(self.manifests)]}
            if method == "GET" and parts[:3] == ["v1", "local", "datasets"] and len(parts) == 4:
                # Added or updated a moment ago? A waiter's first request must see the
                # current revision. Its long polls that follow need no scheduler call:
                # `_dataset_loop` follows the generation and applies updates at once.
                wait = _wait_seconds(query)
                unknown = parts[3] not in self.manifests
                if unknown or not wait:
                    await self._sync_datasets(quiet=True, force=unknown)
                return 200, await self._progress_within(parts[3], wait)
        except NotFoundError as exc:
            return 404, {"error": str(exc)}
        except UserError as exc:
            return 400, {"error": str(exc)}
        return 404, {"error": f"no such endpoint {method} {path}"}

    async def _cache_control(
        self, method: str, rest: list[str], body: dict[str, Any]
    ) -> dict[str, Any]:
        """`syncbit cache ls | evict NAME | gc`."""
        if method == "GET" and not rest:
            return {"usage": self.store.usage(), "objects": self._cache_listing()}
        if method == "POST" and rest == ["evict"]:
            return await self._evict(str(body.get("dataset", "")), bool(body.get("force")))
        if method == "POST" and rest == ["gc"]:
            referenced = {f.object for m in self.manifests.values() for f in m.files}
            freed = await self.store.gc(referenced)
            return {"freed": freed, "usage": self.store.usage()}
        raise NotFoundError(f"no such cache endpoint {method} /{'/'.join(rest)}")

    def _cache_listing(self) -> list[dict[str, Any]]:
        """The store's objects, each with the dataset files it backs."""
        files: dict[str, list[str]] = defaultdict(list)
        for name, manifest in sorted(self.manifests.items()):
            for entry in manifest.files:
                files[entry.object].append(f"{name}/{entry.path}")
        return [{**row, "files": files.get(row["id"], [])} for row in self.store.listing()]

    async def _evict(self, name: str, force: bool) -> dict[str, Any]:
        manifest = self.manifests.get(name)
        if manifest is None:
            raise NotFoundError(f"no dataset {name!r} on this node")
        if name in self.plan and not force:
            raise UserError(
                f"{name} is assigned to this node (pinned): remove the assignment with "
                "`syncbit prefetch --remove`, or evict anyway with --force (it is fetched again)"
            )
        keep = {
            f.object
            for other, m in self.manifests.items()
            if other != name and other in self.plan
            for f in m.files
        }
        ids = {f.object for f in manifest.files} - keep
        result = await self.store.evict(ids)
        if name in self.plan:
            self.jobs.stop(name)  # forced: fetch it again from scratch
            self.jobs.start(manifest, "prefetch", list(self.plan[name]["members"]))
        return {
            "dataset": name,
            "freed": result.freed,
            "evicted": len(result.evicted),
            "in_use": len(result.skipped),
            "shared": len({f.object for f in manifest.files} & keep),
        }

    async def pull(self, name: str) -> dict[str, Any]:
        """Start bringing every byte of dataset `name` here (idempotent); its progress."""
        await self._sync_datasets(force=True)  # it may have been added a moment ago
        manifest = self.manifests.get(name)
        if manifest is None:
            raise NotFoundError(f"no dataset {name!r} on this node's scheduler")
        self.jobs.start(manifest, "pull")
        return self.progress(name)

    def cancel_pull(self, name: str) -> dict[str, Any]:
        """`syncbit pull --cancel NAME`: stop the pull of `name` here (what it brought
        stays); its progress. An assignment is not a pull: `syncbit prefetch --remove`."""
        job = self.jobs.jobs.get(name)
        if job is None or job.done:
            raise NotFoundError(f"no pull of {name!r} is running on this node")
        if job.kind != "pull":
            raise UserError(
                f"{name} is assigned to this node, not pulled: remove the assignment with "
                "`syncbit prefetch --remove`"
            )
        self.jobs.cancel(name, f"cancelled by `syncbit pull --cancel {name}`")
        return self.progress(name)

    def is_ready(self, manifest: Manifest) -> bool:
        """Every byte of this dataset version is here, durable, and whole-file verified
        where the source published a digest: what `syncbit wait` waits for."""
        for entry in manifest.files:
            if not entry.size:
                continue
            obj = self.store.get(entry.object)
            if obj is None or len(obj.durable) != obj.chunks:
                return False
            if entry.version.get("sha256") and not self.fetcher.is_verified(obj.id):
                return False
        return True

    def _present(self, manifest: Manifest) -> int:
        present = 0
        for oid in {f.object for f in manifest.files if f.size}:
            obj = self.store.get(oid)
            if obj is not None:
                present += obj.bytes_in(obj.written)
        return present

    def progress(self, name: str) -> dict[str, Any]:
        """How much of a dataset this node holds: the document `pull` and `wait` poll."""
        manifest = self.manifests.get(name)
        if manifest is None:
            raise NotFoundError(f"no dataset {name!r} on this node")
        job = self.jobs.jobs.get(name)
        if job is not None and job.manifest.revision != manifest.revision:
            job = None
        ready = self.is_ready(manifest)
        return {
            "dataset": name,
            "revision": manifest.revision,
            "files": len(manifest.files),
            "size": sum({f.object: f.size for f in manifest.files}.values()),
            "present_bytes": self._present(manifest),
            "ready": ready,
            "complete": ready,  # the name `syncbit pull` has always read
            "assigned": name in self.plan,
            "pulling": job is not None and not job.done,
            "error": job.error if job else None,
            "cancelled": job is not None and job.cancelled,
        }

    async def _progress_within(self, name: str, wait: float) -> dict[str, Any]:
        """`progress(name)` once the dataset is ready here (or its pull failed for good), or
        after `wait` seconds: a long poll, so `syncbit wait` returns the moment the data is
        ready without polling the daemon (and, through it, the scheduler) several times a
        second. Wakes on every chunk commit, verification and discard."""
        with trio.move_on_after(wait):
            while True:
                doc = self.progress(name)
                if doc["ready"] or (doc["error"] and not doc["pulling"]):
                    return doc
                with trio.move_on_after(_PROGRESS_RECHECK):
                    await self.store.written_event.wait()
        return self.progress(name)

    def dataset_attrs(self, name: str) -> dict[str, str]:
        """Extended attributes of /<mount>/<dataset>, for scripts (`getfattr`)."""
        manifest = self.manifests.get(name)
        if manifest is None:
            return {}
        return {
            "user.syncbit.ready": "1" if self.is_ready(manifest) else "0",
            "user.syncbit.cached_bytes": str(self._present(manifest)),
            "user.syncbit.assigned": "1" if name in self.plan else "0",
        }

    def ready_datasets(self) -> dict[str, str]:
        """Dataset -> revision for every dataset version ready here (for the scheduler)."""
        return {n: m.revision for n, m in self.manifests.items() if self.is_ready(m)}

    def labels(self) -> dict[str, str]:
        """This node's labels for the scheduler: with --kubernetes its Node's labels (so
        selectors can use topology.kubernetes.io/zone, GPU product labels, ...), overridden
        by the labels configured here."""
        node = self.kube.node_labels if self.kube is not None else {}
        return {**node, **self.config.labels}

    def _kube_state(self) -> tuple[set[str], set[str] | None]:
        """What the Node's labels should say: datasets ready here that this node was asked
        to hold (assigned, or pulled); and the assignments, None until the first plan."""
        wanted = set(self.plan) | set(self.jobs.jobs)
        ready = {n for n in self.ready_datasets() if n in wanted}
        return ready, (set(self.plan) if self.plan_received else None)

    # -- assignments -------------------------------------------------------------------------

    def _pin(self) -> None:
        """Assigned datasets' objects are never evicted; the plan is kept on disk so a
        restart without the scheduler still knows what not to evict."""
        sizes: dict[str, int] = {}
        for name, entry in self.plan.items():
            manifest = self.manifests.get(name)
            if manifest is not None and manifest.revision == entry["revision"]:
                sizes.update({f.object: f.size for f in manifest.files if f.size})
        self.store.set_pins(sizes, sizes)
        usage = self.store.usage()
        if usage["pinned_over_budget"] and not self._over_budget_told:
            log.warning(
                "assigned datasets need %d bytes, more than the cache budget of %d: they "
                "cannot all stay cached (raise --cache-size or assign less)",
                usage["pinned_size"],
                usage["budget"],
            )
        self._over_budget_told = usage["pinned_over_budget"]

    def _save_plan(self) -> None:
        path = self.config.cache_dir / "plan.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.plan))
        tmp.replace(path)

    def _load_plan(self) -> None:
        try:
            self.plan = json.loads((self.config.cache_dir / "plan.json").read_text())
        except (OSError, ValueError):
            self.plan = {}

    async def _apply_plan(self, plan: list[dict[str, Any]]) -> None:
        """Prefetch what the scheduler assigned here; stop what it no longer does."""
        wanted = {p["dataset"]: p for p in plan}
        if any(
            n not in self.manifests or self.manifests[n].revision != p["revision"]
            for n, p in wanted.items()
        ):
            await self._sync_datasets(force=True)
        for name in set(self.plan) - set(wanted):
            self.jobs.stop(name)
        first = not self.plan_received
        changed = wanted != self.plan
        self.plan = wanted
        self.plan_received = True
        if changed or first:
            self._pin()
            await trio.to_thread.run_sync(self._save_plan)
        if first:
            await self.store.enforce()  # a budget lowered across a restart
        for name, entry in wanted.items():
            manifest = self.manifests.get(name)
            if manifest is not None and manifest.revision == entry["revision"]:
                self.jobs.start(manifest, "prefetch", list(entry["members"]))

    # -- control loops -----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        cfg = self.config
        while True:
            assert self.peer_server is not None
            usage = self.store.usage()
            try:
                record = await self.client.heartbeat(
                    cfg.node,
                    address=self.advertise,
                    labels=self.labels(),
                    load=self.peer_server.load,
                    cache_bytes=self.store.cached_bytes(),
                    cache_size=cfg.cache_size,
                    ready=self.ready_datasets(),
                    pinned_bytes=usage["pinned_size"],
                    pinned_over_budget=usage["pinned_over_budget"],
                )
                self._heartbeat_ok = trio.current_time()
                await self._apply_plan(list(record.get("plan", [])))
            except SyncbitError as exc:
                self._warn("heartbeat failed", exc)
            await trio.sleep(cfg.heartbeat_interval)

    def _load_local_manifests(self) -> None:
        """Datasets this node knew before a restart: readable even with no scheduler."""
        for name, doc in self.store.load_manifests().items():
            try:
                self.manifests[name] = Manifest.model_validate_json(doc)
            except ValueError as exc:
                log.warning("ignoring stored manifest of %s: %s", name, exc)
        self.tree.update(self.manifests)

    async def _dataset_loop(self) -> None:
        """Follow the scheduler's generation with a long poll: a dataset added, an
        assignment or a label change reaches this node at once (prefetch starts within
        milliseconds of `syncbit prefetch`, not at the next poll)."""
        while True:
            seen: int | None = None
            try:
                seen = await self.client.wait_generation(self._generation, _GENERATION_WAIT)
            except SyncbitError:
                await trio.sleep(1.0)  # unreachable, or a scheduler without the long poll
            generation = self._generation
            await self._sync_datasets()
            if self._generation != generation:  # datasets, assignments or labels changed
                try:
                    await self._apply_plan((await self.client.plan(self.config.node))["plan"])
                except SyncbitError as exc:
                    self._warn("plan refresh failed", exc)
            elif seen is not None and seen != generation:
                await trio.sleep(1.0)  # changed, but the sync failed: not in a tight loop

    async def _sync_datasets(self, quiet: bool = False, force: bool = False) -> None:
        try:
            listing = await self.client.datasets()
            if listing["generation"] == self._generation and not force:
                return
            wanted: dict[str, Manifest] = {}
            for summary in listing["datasets"]:
                name = summary["name"]
                current = self.manifests.get(name)
                if current is not None and current.revision == summary["revision"]:
                    wanted[name] = current
                else:
                    wanted[name] = await self.client.manifest(name)
        except SyncbitError as exc:
            if not quiet:
                self._warn("dataset sync failed", exc)
            return
        self._generation = listing["generation"]
        if wanted.keys() == self.manifests.keys() and all(
            wanted[n].revision == self.manifests[n].revision for n in wanted
        ):
            return
        self._follow_jobs(wanted)
        self.manifests = wanted
        changed = self.tree.update(wanted)
        if self.session is not None:  # else: not mounted yet, nothing cached
            for name in changed:
                self.session.invalidate_entry(ROOT_INODE, name.encode())
        docs = {n: m.model_dump_json() for n, m in wanted.items()}
        await trio.to_thread.run_sync(self.store.save_manifests, docs)
        log.info("datasets: %s", ", ".join(sorted(wanted)) or "(none)")

    def _follow_jobs(self, wanted: dict[str, Manifest]) -> None:
        """Jobs follow the datasets: a removed dataset's job stops at once, whatever its
        kind (no request reaches its source after `dataset rm`); a pull of a dataset that
        got a new revision goes on with that revision (prefetch follows the plan)."""
        for name, job in list(self.jobs.jobs.items()):
            manifest = wanted.get(name)
            if manifest is None:
                self.jobs.cancel(name, f"dataset {name} was removed", forget=True)
            elif job.kind == "pull" and not job.done and manifest.revision != job.manifest.revision:
                self.jobs.start(manifest, "pull")

    async def _report_loop(self) -> None:
        """Tell the scheduler which chunks became durable here (with their digests)."""
        backlog: list[tuple[StoredObject, int, str]] = [
            (obj, i, obj.digests[i]) for obj in self.store.objects() for i in sorted(obj.durable)
        ]
        while True:
            if not backlog and not self.store.newly_removed:
                await self.store.durable_event.wait()
            self.store.durable_event = trio.Event()
            backlog.extend(self.store.newly_durable)
            self.store.newly_durable.clear()
            removed, self.store.newly_removed = self.store.newly_removed, []
            # Say what is true now: a chunk evicted and fetched again since the last report
            # is held (added, not removed); one evicted after it became durable is not.
            backlog = [b for b in backlog if b[1] in b[0].durable]
            batch, backlog = backlog[:_REPORT_BATCH], backlog[_REPORT_BATCH:]
            remove = [
                {"object": o.id, "chunks": gone}
                for o, idx in removed
                if (gone := [i for i in idx if i not in o.durable])
            ]
            try:
                await self.client.report_chunks(self.config.node, add=_group(batch), remove=remove)
            except SyncbitError as exc:
                if isinstance(exc, UserError) and not isinstance(exc, UnauthorizedError):
                    # Refused as it is (4xx): sending it again gets the same answer forever.
                    log.warning("scheduler refused a chunk report (%s); not sending it again", exc)
                    continue
                self._warn("chunk report failed", exc)
                backlog = batch + backlog
                self.store.newly_removed = removed + self.store.newly_removed
                await trio.sleep(1.0)
            else:
                if batch or remove:
                    log.debug(
                        "reported %d chunks held, %d objects lost chunks", len(batch), len(remove)
                    )
                await trio.sleep(0.05)  # batch what arrives meanwhile


def _wait_seconds(query: str) -> float:
    """The `wait=S` of a progress request: 0 (answer at once) when absent."""
    values = parse_qs(query).get("wait")
    if not values:
        return 0.0
    try:
        wait = float(values[-1])
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= _PROGRESS_WAIT_MAX:  # also rejects nan
        raise UserError(f"wait must be 0-{_PROGRESS_WAIT_MAX:g} seconds, not {values[-1]!r}")
    return wait


def _group(batch: list[tuple[StoredObject, int, str]]) -> list[dict[str, Any]]:
    by_object: dict[StoredObject, list[list[Any]]] = defaultdict(list)
    for obj, index, digest in batch:
        by_object[obj].append([index, digest])
    return [
        {"object": o.id, "size": o.size, "chunk_size": o.chunk_size, "chunks": chunks}
        for o, chunks in by_object.items()
    ]


def _dump_tasks(signum: int, frame: object) -> None:
    """`kill -USR2 <pid>`: every trio task and where it waits, to stderr (the log)."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        where = []
        coro: Any = task.coro
        while coro is not None:
            frame_ = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame_ is not None:
                where.append(f"{frame_.f_code.co_name}:{frame_.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        lines.append(f"{'  ' * depth}{task.name} @ {' > '.join(where)}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(root, 0)
    sys.stderr.write("trio tasks:\n" + "\n".join(lines) + "\n")
    sys.stderr.flush()


def run(config: DaemonConfig) -> None:
    """Run a node until SIGTERM/SIGINT; raises SyncbitError for start-up failures.
    `kill -USR1 <pid>` writes every thread's stack to stderr (the log), `kill -USR2` every
    trio task and where it waits: what a stuck daemon is doing, without stopping it."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGUSR2, _dump_tasks)
    daemon = Daemon(config)
    trio.run(daemon.run)
