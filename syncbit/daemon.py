"""The node daemon's composition root: builds every component from config and runs them in
one nursery; shutdown is cancelling that nursery (SIGTERM/SIGINT), then unmount and flush.

Holds no logic of its own beyond wiring and the small control loops that keep the node in
step with the scheduler (heartbeat, dataset list, chunk reports).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import math
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from syncbit import tls
from syncbit.auth import check_exposure, read_token
from syncbit.config import DaemonConfig, SchedulerConfig
from syncbit.diskspace import is_enospc
from syncbit.errors import (
    NotFoundError,
    SourceChangedError,
    SyncbitError,
    UnauthorizedError,
    UserError,
)
from syncbit.fetcher import Fetcher
from syncbit.fs.kernel import ROOT_INODE, Session
from syncbit.fs.mount import MOUNT_OPTIONS, clean_stale, raise_readahead
from syncbit.fs.ops import SyncbitFS
from syncbit.fs.tree import Tree
from syncbit.jobs import Jobs
from syncbit.kube import NodeSync
from syncbit.manifest import Manifest, validate_dataset_name
from syncbit.metrics import Snapshot, counter, fetch_latency, gauge, render
from syncbit.nodeauth import NodeCredentials
from syncbit.peer import PeerClient, PeerServer
from syncbit.scheduler.client import ChunkMap, ClaimResult, SchedulerClient
from syncbit.scheduler.server import SchedulerServer
from syncbit.sources.base import Source, open_source, options_for
from syncbit.sources.fences import Fences, default_file_roots
from syncbit.sources.options import public_options, register_secrets
from syncbit.store import ObjectStore, StoredObject, VerifyRun

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

    async def report_check(
        self, object_id: str, index: int, digest: str | None, changed: str
    ) -> str:
        self.forget(object_id)  # the chunk is disputed now: no stale peers
        return await self.client.check(self.node, object_id, index, digest, changed)

    def forget(self, object_id: str) -> None:
        """Ask the scheduler afresh next time (what it said of the object changed)."""
        self._cache.pop(object_id, None)


@dataclass
class SourceCache:
    """One open `Source` per source URI, shared by every file of every dataset version.

    Sources open inside this node's own fences (`file_roots`) and with this node's own
    credentials (`source_options` of its config, its environment): a manifest carries
    neither, whatever the scheduler that sent it.
    """

    configured: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)
    fences: Fences = field(default_factory=Fences)

    def __post_init__(self) -> None:
        for prefix, options in self.configured.items():
            register_secrets(prefix, options)  # masked in every log line of this process

    def __call__(self, manifest: Manifest) -> Source:
        key = manifest.source + json.dumps(manifest.source_options, sort_keys=True)
        source = self.sources.get(key)
        if source is None:
            # What a manifest may not decide for this node (secrets, operator-only
            # options) comes from this node's config alone.
            given = public_options(manifest.source, manifest.source_options)
            options = options_for(manifest.source, self.configured, given)
            source = open_source(manifest.source, options, self.fences)
            self.sources[key] = source
        return source

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        self.sources.clear()


def daemon_file_roots(config: DaemonConfig) -> tuple[Path, ...]:
    """The directories this node reads `file://` datasets from: the configured ones, else
    the default for where its scheduler listens (embedded, or the one it talks to)."""
    if config.file_roots is not None:
        return tuple(config.file_roots)
    if config.scheduler is None:
        return default_file_roots(config.scheduler_listen.rpartition(":")[0].strip("[]"))
    first = config.scheduler.split(",")[0].strip()  # replicas: URL1,URL2,... (one host)
    url = first if "://" in first else f"http://{first}"
    return default_file_roots(urlsplit(url).hostname)


class Daemon:
    """Every component of one node, wired from a `DaemonConfig`."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        # Before the cache lock: a bad token, TLS file or exposure fails start-up early.
        self.token = read_token(config.token_file)
        check_exposure("the daemon", config.listen, self.token, config.insecure, log)
        if config.scheduler is None:
            where = config.scheduler_listen
            check_exposure("the embedded scheduler", where, self.token, config.insecure, log)
        self.server_tls = tls.config_pair(config.tls_cert, config.tls_key)
        peer_tls = None
        if self.server_tls is not None and config.peer_data_tls:
            peer_tls = tls.client_context(config.tls_ca)
        self.store = ObjectStore.open(config.cache_dir, config.cache_size)
        self.embedded: SchedulerServer | None = None
        self.peer_server: PeerServer | None = None
        self.credentials = NodeCredentials(
            config.node, self.token, config.cache_dir / "credential.json"
        )
        self.peer_client = PeerClient(
            token=self.credentials.peer_token, tls_context=peer_tls, tls_name=config.peer_tls_name
        )
        self.file_roots = daemon_file_roots(config)
        self.sources = SourceCache(config.source_options, fences=Fences.for_roots(self.file_roots))
        self.tree = Tree()
        self.manifests: dict[str, Manifest] = {}
        self._generation = -1
        self._warned: dict[str, float] = {}
        self.plan: dict[str, dict[str, Any]] = {}  # assigned dataset -> its plan entry
        self.plan_received = False  # until the first plan arrives, assignments are unknown
        self._over_budget_told = False
        self._heartbeat_ok = -math.inf
        self._rechecking: set[tuple[str, int]] = set()  # re-checks running (object, chunk)
        self._quarantine_told = False
        # The scheduler instance that knows what this node holds (heartbeat "epoch"): holders
        # are its soft state, so another one (a restart, a new leader) is told it all again.
        self._scheduler_epoch: str | None = None
        self.kube: NodeSync | None = None
        self.session: Session | None = None  # the FUSE mount, once mounted
        # Written when possible: a full disk leaves them unsaved until space is back.
        self._plan_unsaved = False
        self._manifests_unsaved = False
        self.verify_run: VerifyRun | None = None  # the current or last `cache verify` pass
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
                    file_roots=list(self.file_roots),
                    token_file=cfg.token_file,
                    insecure=cfg.insecure,
                    tls_cert=cfg.tls_cert,
                    tls_key=cfg.tls_key,
                )
            )
            self.embedded.start()
            # This daemon talks to it over loopback: plain HTTP, whatever it serves others.
            url = f"http://{self.embedded.address}"
            log.info("embedded scheduler on %s", self.embedded.url)
        self.peer_server = PeerServer(
            self.store,
            cfg.listen,
            cfg.upload_slots,
            auth_required=self.credentials.required,
            tls_context=self.server_tls,
            plain_data=not cfg.peer_data_tls,
        )
        if self.credentials.verifier is not None:
            self.peer_server.set_verifier(self.credentials.verifier)
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
            self.client = SchedulerClient(url, token=self.credentials.token, ca=cfg.tls_ca)
            await self._refresh_credentials(quiet=True)
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
                    await nursery.start(self.store.disk.run)
                    nursery.start_soon(self._disk_loop)
                    if self.store.unverified_chunks():
                        self._start_verify("after an unclean shutdown", only_unverified=True)
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
        yield from self._disk_metrics(usage)
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

    def _disk_metrics(self, usage: dict[str, Any]) -> Iterator[Metric]:
        """The cache filesystem and verification of what it holds."""
        yield gauge(
            "syncbit_cache_disk_full",
            "1 while the cache filesystem has no space left and nothing can be evicted: new "
            "chunks are not cached.",
            {(): float(usage["disk_full"])},
            [],
        )
        yield gauge(
            "syncbit_cache_disk_free_bytes",
            "Free bytes on the cache filesystem (last sample).",
            {(): float(usage["disk_free"])},
            [],
        )
        yield counter(
            "syncbit_cache_disk_refusals",
            "Writes (chunks, index, plan, manifests) refused for lack of space.",
            {(): float(usage["disk_refusals"])},
            [],
        )
        yield gauge(
            "syncbit_cache_unverified_chunks",
            "Cached chunks not yet re-verified since an unclean shutdown.",
            {(): float(usage["unverified"])},
            [],
        )
        yield counter(
            "syncbit_cache_verified_chunks",
            "Cached chunks re-read and found to match their digest (cache verify).",
            {(): float(usage["verified_chunks"])},
            [],
        )
        yield counter(
            "syncbit_cache_dropped_chunks",
            "Cached chunks dropped because their bytes on disk did not match their digest.",
            {(): float(usage["dropped_chunks"])},
            [],
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

    async def _control(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One node-local control request: its JSON answer. Errors are raised, and the
        peer server answers them by the one status table (`errors.HTTP_STATUS`)."""
        route, _, query = path.partition("?")
        parts = [unquote(p) for p in route.split("/") if p]
        if method == "POST" and parts == ["v1", "local", "pull"]:
            return await self.pull(validate_dataset_name(str(body.get("dataset", ""))))
        if method == "POST" and parts == ["v1", "local", "pull", "cancel"]:
            return self.cancel_pull(validate_dataset_name(str(body.get("dataset", ""))))
        if parts[:3] == ["v1", "local", "cache"]:
            return await self._cache_control(method, parts[3:], body, query)
        if method == "GET" and parts == ["v1", "local", "datasets"]:
            return {"datasets": [self.progress(n) for n in sorted(self.manifests)]}
        if method == "GET" and parts[:3] == ["v1", "local", "datasets"] and len(parts) == 4:
            # Added or updated a moment ago? A waiter's first request must see the
            # current revision. Its long polls that follow need no scheduler call:
            # `_dataset_loop` follows the generation and applies updates at once.
            validate_dataset_name(parts[3])
            wait = _wait_seconds(query)
            unknown = parts[3] not in self.manifests
            if unknown or not wait:
                await self._sync_datasets(quiet=True, force=unknown)
            return await self._progress_within(parts[3], wait)
        raise NotFoundError(f"no such endpoint {method} {path}")

    async def _cache_control(
        self, method: str, rest: list[str], body: dict[str, Any], query: str = ""
    ) -> dict[str, Any]:
        """`syncbit cache ls | evict NAME | gc | verify`."""
        if method == "GET" and not rest:
            return {"usage": self.store.usage(), "objects": self._cache_listing()}
        if method == "POST" and rest == ["evict"]:
            return await self._evict(str(body.get("dataset", "")), bool(body.get("force")))
        if method == "POST" and rest == ["gc"]:
            referenced = {f.object for m in self.manifests.values() for f in m.files}
            freed = await self.store.gc(referenced)
            return {"freed": freed, "usage": self.store.usage()}
        if method == "POST" and rest == ["verify"]:
            run = self.verify_run
            if run is None or run.done.is_set():
                run = self._start_verify("requested", only_unverified=False)
            return self._verify_doc(run)
        if method == "GET" and rest == ["verify"]:
            if self.verify_run is None:
                raise NotFoundError("no verification has run since the daemon started")
            run = self.verify_run
            with trio.move_on_after(_wait_seconds(query)):
                await run.done.wait()
            return self._verify_doc(run)
        raise NotFoundError(f"no such cache endpoint {method} /{'/'.join(rest)}")

    def _start_verify(self, reason: str, only_unverified: bool) -> VerifyRun:
        """Re-read the cached chunks against their digests in the background (one pass at
        a time); see `ObjectStore.verify`."""
        run = self.verify_run = VerifyRun(reason, only_unverified)
        if only_unverified:
            log.warning(
                "re-verifying %d cached chunks %s, in the background (a read checks a chunk "
                "first if the pass has not reached it yet)",
                self.store.unverified_chunks(),
                reason,
            )
        self._nursery.start_soon(self._verify, run)
        return run

    async def _verify(self, run: VerifyRun) -> None:
        await self.store.verify(run)
        log.info(
            "verification (%s): %d chunks of %d objects checked in %.0fs, %d dropped",
            run.reason,
            run.checked,
            run.objects,
            (run.finished or run.started) - run.started,
            len(run.dropped),
        )
        if run.dropped:
            self._resume_prefetch()  # fetch what was dropped of the assigned datasets

    def _verify_doc(self, run: VerifyRun) -> dict[str, Any]:
        """A verification pass for `syncbit cache verify`: progress, and each dropped
        chunk with the dataset files it belongs to."""
        files: dict[str, list[str]] = defaultdict(list)
        for name, manifest in sorted(self.manifests.items()):
            for entry in manifest.files:
                files[entry.object].append(f"{name}/{entry.path}")
        return {
            "reason": run.reason,
            "running": not run.done.is_set(),
            "started": run.started,
            "finished": run.finished,
            "total": run.total,
            "checked": run.checked,
            "checked_bytes": run.checked_bytes,
            "objects": run.objects,
            "dropped": [
                {"object": oid, "chunk": index, "files": files.get(oid, [])}
                for oid, index in run.dropped
            ],
            "usage": self.store.usage(),
        }

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
            if obj is None or len(obj.durable) != obj.chunks or self.fetcher.is_broken(obj.id):
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
        """Blocking; a failed write leaves the previous plan.json whole (and no tmp file)."""
        path = self.config.cache_dir / "plan.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.plan))
            tmp.replace(path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def _persist_plan(self) -> None:
        """Keep the plan on disk; on a full disk (or another write error) the daemon goes
        on with the plan in memory and saves it once it can."""
        try:
            await trio.to_thread.run_sync(self._save_plan)
        except OSError as exc:
            self._plan_unsaved = True
            self._write_failed("the plan", exc)
        else:
            self._plan_unsaved = False

    async def _persist_manifests(self) -> None:
        """Keep the manifests in the cache index (see `_persist_plan`)."""
        docs = {n: m.model_dump_json() for n, m in self.manifests.items()}
        try:
            await trio.to_thread.run_sync(self.store.save_manifests, docs)
        except OSError as exc:
            self._manifests_unsaved = True
            self._write_failed("the manifests", exc)
        else:
            self._manifests_unsaved = False

    def _write_failed(self, what: str, exc: OSError) -> None:
        if is_enospc(exc):
            self.store.disk.refused(what, exc)  # logged once per episode
        else:
            self._warn(f"saving {what} failed", exc)

    async def _disk_loop(self) -> None:
        """When space is back on the cache filesystem: save what could not be saved and
        resume the prefetches that stopped for lack of space."""
        while True:
            await self.store.disk.changed.wait()
            if self.store.disk.full:
                continue
            if self._manifests_unsaved:
                await self._persist_manifests()
            if self._plan_unsaved:
                await self._persist_plan()
            self._resume_prefetch()

    def _resume_prefetch(self) -> None:
        """Start again the assigned datasets' prefetches that stopped because the cache
        could not hold them (and any whose data is no longer all here)."""
        self.jobs.forget_full()
        for name, entry in self.plan.items():
            manifest = self.manifests.get(name)
            if manifest is not None and manifest.revision == entry["revision"]:
                self.jobs.start(manifest, "prefetch", list(entry["members"]))

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
        if changed or first or self._plan_unsaved:
            await self._persist_plan()
        if first:
            await self.store.enforce()  # a budget lowered across a restart
        for name, entry in wanted.items():
            manifest = self.manifests.get(name)
            if manifest is not None and manifest.revision == entry["revision"]:
                self.jobs.start(manifest, "prefetch", list(entry["members"]))

    # -- control loops -----------------------------------------------------------------------

    async def _refresh_credentials(self, quiet: bool = False) -> None:
        """Obtain or renew this node's credentials when due, and use them everywhere."""
        creds = self.credentials
        try:
            changed = await creds.refresh(self.client)
        except SyncbitError as exc:
            if not quiet:
                self._warn("node credentials", exc)
            return
        if changed:
            self.client.set_token(creds.token)
            self.peer_client.set_token(creds.peer_token)
            if creds.verifier is not None and self.peer_server is not None:
                self.peer_server.set_verifier(creds.verifier)

    async def _heartbeat_loop(self) -> None:
        cfg = self.config
        while True:
            assert self.peer_server is not None
            await self._refresh_credentials()
            if self.credentials.required and self.credentials.token is None:
                await trio.sleep(cfg.heartbeat_interval)  # no credential yet: nothing to send
                continue
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
                    disk_full=usage["disk_full"],
                    disk_free=usage["disk_free"],
                )
                self._heartbeat_ok = trio.current_time()
                self._heard(record)
                await self._apply_plan(list(record.get("plan", [])))
            except UnauthorizedError as exc:
                self._warn("heartbeat refused", exc)
                self.credentials.invalidate()  # expired or revoked: ask again
            except SyncbitError as exc:
                self._warn("heartbeat failed", exc)
            await trio.sleep(cfg.heartbeat_interval)

    def _heard(self, record: dict[str, Any]) -> None:
        """What the scheduler's heartbeat answer asks of this node beyond its plan: chunks
        to re-check against the source, objects to discard; and whether it is quarantined."""
        quarantined = record.get("quarantined")
        if quarantined and not self._quarantine_told:
            log.error(
                "the scheduler quarantined this node: %s (its reports are ignored and it is not "
                "offered as a peer until an operator runs `syncbit node trust %s`)",
                quarantined.get("reason"),
                self.config.node,
            )
        self._quarantine_told = bool(quarantined)
        for ask in record.get("rechecks", []):
            key = (str(ask["object"]), int(ask["chunk"]))
            if key not in self._rechecking:
                self._rechecking.add(key)
                self._nursery.start_soon(self._recheck, ask, key)
        for object_id in record.get("discard", []):
            self._nursery.start_soon(self._discard, str(object_id))
        epoch = record.get("epoch")
        if epoch and self._scheduler_epoch not in (None, epoch):
            log.info("a new scheduler instance answers: reporting every chunk held here again")
            self.store.changes.durable(_held(self.store))  # the report loop sends them
        self._scheduler_epoch = epoch or self._scheduler_epoch

    async def _recheck(self, ask: dict[str, Any], key: tuple[str, int]) -> None:
        """Read one disputed chunk from the source and tell the scheduler what it holds."""
        object_id, index = key
        try:
            manifest = self.manifests.get(str(ask["dataset"]))
            entry = None
            if manifest is not None:
                entry = next((f for f in manifest.files if f.object == object_id), None)
            if manifest is None or entry is None:
                log.info(
                    "asked to re-check %s/%s, which this node does not list",
                    ask["dataset"],
                    ask["path"],
                )
                return  # not synced yet: the scheduler asks again, or someone else
            digest: str | None = None
            changed = ""
            try:
                digest = await self.fetcher.recheck(
                    entry, manifest.chunk_size, self.sources(manifest), index
                )
            except SourceChangedError as exc:
                changed = str(exc)
            outcome = await self.client.check(self.config.node, object_id, index, digest, changed)
            log.warning(
                "re-checked chunk %d of %s/%s against the source for the scheduler: %s",
                index,
                manifest.dataset,
                entry.path,
                outcome,
            )
        except SyncbitError as exc:
            log.warning("re-check of chunk %d of object %s failed: %s", index, object_id[:16], exc)
        finally:
            self._rechecking.discard(key)

    async def _discard(self, object_id: str) -> None:
        """The scheduler found digests of this object false: drop this node's copy."""
        obj = self.store.get(object_id)
        if obj is None:
            return
        self.directory.forget(object_id)
        log.warning(
            "discarding cached object %s: the scheduler revoked digests its chunks were "
            "checked against",
            object_id[:16],
        )
        await self.store.discard(obj)

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
        self._learn_broken(listing["datasets"], wanted)
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
        await self._persist_manifests()
        log.info("datasets: %s", ", ".join(sorted(wanted)) or "(none)")

    def _learn_broken(
        self, summaries: list[dict[str, Any]], manifests: dict[str, Manifest]
    ) -> None:
        """Files the scheduler found broken (their source changed under the recorded version)
        are refused by the fetcher from now on, cached or not; each is logged once."""
        for summary in summaries:
            manifest = manifests.get(summary["name"])
            if manifest is None or manifest.revision != summary["revision"]:
                continue
            for item in summary.get("broken", []):
                if self.fetcher.mark_broken(str(item["object"]), str(item["reason"])):
                    log.error(
                        "%s/%s: this revision is broken (%s): reads fail with EIO until "
                        "`syncbit dataset add` picks up the source's current content",
                        summary["name"],
                        item["path"],
                        item["reason"],
                    )

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
        backlog = _held(self.store)
        unsent: list[tuple[StoredObject, list[int]]] = []  # removals a failed report kept
        while True:
            changes = self.store.changes.take()
            if not backlog and not unsent and not changes:
                changes = await self.store.changes.next()
            backlog.extend(changes.durable)
            removed, unsent = unsent + changes.removed, []
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
                answer = await self.client.report_chunks(
                    self.config.node, add=_group(batch), remove=remove
                )
                if answer.refused or answer.conflicts:
                    # Kept here for this node's readers; not offered to other nodes.
                    self._warn(
                        "chunk digests not recorded",
                        SyncbitError(
                            f"the scheduler refused {len(answer.refused)} chunk digests (no "
                            f"source read granted) and disputes {len(answer.conflicts)}"
                        ),
                    )
            except SyncbitError as exc:
                if isinstance(exc, UserError) and not isinstance(exc, UnauthorizedError):
                    # Refused as it is (4xx): sending it again gets the same answer forever.
                    log.warning("scheduler refused a chunk report (%s); not sending it again", exc)
                    continue
                self._warn("chunk report failed", exc)
                backlog = batch + backlog
                unsent = removed
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


def _held(store: ObjectStore) -> list[tuple[StoredObject, int, str]]:
    """Every chunk durable here, with its digest: what a scheduler is told it holds."""
    return [(obj, i, obj.digests[i]) for obj in store.objects() for i in sorted(obj.durable)]


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
