"""The node daemon's composition root: builds every component from a `DaemonConfig` before
the trio loop runs and runs them in one nursery; shutdown is cancelling it, then unmount
and flush. Holds no logic beyond wiring.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  # here, not by trio's first name lookup, on its thread
import faulthandler
import functools
import logging
import signal
import sys
import threading
from typing import Any

import trio

from syncbit import looptrace, tls
from syncbit.aio import OtherLoop
from syncbit.auth import check_exposure, read_token
from syncbit.config import DaemonConfig, SchedulerConfig
from syncbit.errors import SyncbitError
from syncbit.fetch import Fetcher, Jobs, OpenPrefetch
from syncbit.fs.kernel import Session
from syncbit.fs.mount import MOUNT_OPTIONS, clean_stale, raise_readahead
from syncbit.fs.ops import SyncbitFS
from syncbit.fs.tree import Tree
from syncbit.httpd import raise_descriptor_limit
from syncbit.kube import NodeSync
from syncbit.node.control import Control
from syncbit.node.directory import SchedulerDirectory
from syncbit.node.http import LocalApi
from syncbit.node.logs import Throttled
from syncbit.node.metrics import NodeMetrics
from syncbit.node.reporter import Reporter
from syncbit.node.sources import SourceCache, daemon_file_roots
from syncbit.node.status import Status
from syncbit.node.sync import Sync
from syncbit.node.traces import Traces
from syncbit.nodeauth import NodeCredentials
from syncbit.peer import PeerClient, PeerServer
from syncbit.scheduler.client import SchedulerClient
from syncbit.scheduler.server import SchedulerServer
from syncbit.sources.base import warm_up
from syncbit.sources.fences import Fences
from syncbit.store import ObjectStore

log = logging.getLogger("syncbit.daemon")

# Seconds a starting daemon waits for the scheduler (credentials, the dataset list) before
# it mounts: a few round trips to an answering one, far less than a request's timeout.
STARTUP_WAIT = 3.0


class Node:
    """Every component of one node, wired from a `DaemonConfig`; `run` runs them.

    Contexts: the trio thread runs FUSE requests, the fetch layer, the store's bookkeeping
    and every loop here; worker threads (`trio.to_thread`) do blocking file, mount and
    source I/O; the port runs a trio loop of its own in its thread (a coroutine per
    connection, chunks sent by worker threads of it) and hands local API requests to the
    trio thread as tasks there (`aio.OtherLoop`); an embedded scheduler runs in threads of
    its own.
    """

    # One straight list of components, each built from those before it: longer than a
    # function should be, on purpose, so the whole wiring reads in one place.
    def __init__(self, config: DaemonConfig) -> None:
        cfg = self.config = config
        # Before the cache lock: a bad token, TLS file or exposure fails start-up early.
        token = read_token(cfg.token_file)
        check_exposure("the daemon", cfg.listen, token, cfg.insecure, log)
        if cfg.scheduler is None:
            where = cfg.scheduler_listen
            check_exposure("the embedded scheduler", where, token, cfg.insecure, log)
        server_tls = tls.config_pair(cfg.tls_cert, cfg.tls_key)
        peer_tls = None
        if server_tls is not None and cfg.peer_data_tls:
            peer_tls = tls.client_context(cfg.tls_ca)
        self._closing = contextlib.ExitStack()  # what `close` releases, last built first
        self.store = ObjectStore.open(cfg.cache_dir, cfg.cache_size)
        self._closing.callback(self.store.close)
        try:
            self.credentials = NodeCredentials(cfg.node, token, cfg.cache_dir / "credential.json")
            self.peer_client = PeerClient(
                token=self.credentials.peer_token, tls_context=peer_tls, tls_name=cfg.peer_tls_name
            )
            self._closing.callback(self.peer_client.close)
            file_roots = daemon_file_roots(cfg)
            self.sources = SourceCache(cfg.source_options, fences=Fences.for_roots(file_roots))
            self._closing.callback(self.sources.close)
            # A bad kubeconfig fails start-up, before the mount.
            self.kube = NodeSync(cfg.node, kubeconfig=cfg.kubeconfig) if cfg.kubernetes else None
            # A mount point another live daemon serves is refused before this one binds a
            # port or tells the scheduler anything; a stale one is cleaned (it fails even
            # mkdir with ENOTCONN).
            clean_stale(cfg.mount)
            self.embedded = self._embedded_scheduler(file_roots)
            self.api = LocalApi()
            self.peer_server = PeerServer(
                self.store,
                cfg.listen,
                cfg.upload_slots,
                auth_required=self.credentials.required,
                tls_context=server_tls,
                plain_data=not cfg.peer_data_tls,
            )
            self.peer_server.add_routes(self.api)
            if self.credentials.verifier is not None:
                self.peer_server.set_verifier(self.credentials.verifier)
            self.peer_server.start()
            self._closing.callback(self.peer_server.stop)
            log.info("peer service on %s", self.peer_server.address)
            url = cfg.scheduler
            if self.embedded is not None:
                # This daemon talks to it over loopback: plain HTTP, whatever it serves others.
                url = f"http://{self.embedded.address}"
            assert url is not None
            self.client = SchedulerClient(url, token=self.credentials.token, ca=cfg.tls_ca)
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
                source_concurrency=cfg.source_concurrency,
            )
            self.status = Status(self.store, self.fetcher, cfg.heartbeat_interval, self._mounted)
            self.traces = Traces(cfg.node, self.client, cfg.trace_quiet, cfg.trace_max_runs)
            self.jobs = Jobs(
                cfg.node,
                self.fetcher,
                self.sources,
                self.status.is_ready,
                self.store.flush,
                self.traces.follow,
            )
            self.prefetch = OpenPrefetch(
                self.fetcher,
                enabled=cfg.prefetch_on_open,
                min_size=cfg.prefetch_on_open_min_size,
                wanted=self.jobs.needs,
            )
            self.tree = Tree()
            self.fs = SyncbitFS(
                self.tree,
                self.fetcher,
                self.sources,
                self.status.attrs,
                self.prefetch,
                self.traces.recorder,
            )
            self.session = Session(self.fs, cfg.mount, passthrough=cfg.passthrough)
            warnings = Throttled()
            self.sync = Sync(
                cfg.node,
                cfg.cache_dir,
                self.client,
                self.store,
                self.fetcher,
                self.jobs,
                self.status,
                self.tree,
                self.session,
                warnings,
            )
            self.reporter = Reporter(
                cfg.node,
                cfg.heartbeat_interval,
                cfg.cache_size,
                cfg.advertise or self.peer_server.address,
                self._labels,
                self.client,
                self.credentials,
                (self.peer_client, self.peer_server),
                self.store,
                (self.fetcher, self.directory, self.sources),
                self.status,
                self.sync,
                warnings,
            )
            self.control = Control(self.store, self.sync, self.jobs, self.status)
            self.metrics = NodeMetrics(
                self.fetcher,
                self.store,
                self.peer_server,
                self.status,
                self.fs,
                lambda: self.session,
            )
        except BaseException:
            self._closing.close()
            raise

    def _embedded_scheduler(self, file_roots: Any) -> SchedulerServer | None:
        """Without `scheduler`, this node runs its own (started here, stopped by `close`)."""
        cfg = self.config
        if cfg.scheduler is not None:
            return None
        embedded = SchedulerServer(
            SchedulerConfig(
                listen=cfg.scheduler_listen,
                state_dir=cfg.scheduler_state_dir or cfg.cache_dir / "scheduler",
                node_timeout=cfg.node_timeout,
                source_options=cfg.source_options,
                file_roots=list(file_roots),
                token_file=cfg.token_file,
                insecure=cfg.insecure,
                tls_cert=cfg.tls_cert,
                tls_key=cfg.tls_key,
            )
        )
        embedded.start()
        self._closing.callback(embedded.stop)
        log.info("embedded scheduler on %s", embedded.url)
        return embedded

    def _mounted(self) -> bool:
        return bool(self.session.initialized.is_set())

    def _labels(self) -> dict[str, str]:
        """This node's labels for the scheduler: with --kubernetes its Node's labels (so
        selectors can use topology.kubernetes.io/zone, GPU product labels, ...), overridden
        by the labels configured here."""
        node = self.kube.node_labels if self.kube is not None else {}
        return {**node, **self.config.labels}

    def close(self) -> None:
        """Stop the servers and release the sources and the cache (blocking)."""
        self._closing.close()

    async def run(self) -> None:
        """Serve until cancelled (SIGTERM/SIGINT), then unmount, flush and `close`."""
        cfg = self.config
        raise_descriptor_limit()  # peers' connections, cache files: a descriptor each
        threading.Thread(target=warm_up, name="syncbit-warm-up", daemon=True).start()
        try:
            await self.sync.load()
            await self._first_contact()
            mkdir = functools.partial(cfg.mount.mkdir, parents=True, exist_ok=True)
            await trio.to_thread.run_sync(mkdir)
            await trio.to_thread.run_sync(self.session.mount, MOUNT_OPTIONS)
            try:
                log.info("node %s: mounted at %s", cfg.node, cfg.mount)
                async with trio.open_nursery() as nursery:
                    self._serve_api(nursery)
                    nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                    await self._start_loops(nursery)
            finally:
                with trio.CancelScope(shield=True):
                    # fusermount -u may take seconds: not on the trio thread.
                    await trio.to_thread.run_sync(self.session.close)
                    log.info("unmounted %s", cfg.mount)
                    kept = await self.store.keep_staged()
                    if kept:
                        log.info("kept %d verified chunks that were still in RAM", kept)
                    await self.store.flush()
                    await self.client.aclose()
        finally:
            self.close()

    async def _first_contact(self) -> None:
        """Credentials and the scheduler's dataset list before the mount, so a node that
        starts shows the current datasets at once; but for STARTUP_WAIT seconds at most: a
        scheduler that hangs (each request would wait out its timeout) must not keep this
        node's cached data from its readers. The heartbeat and dataset loops catch up."""
        with trio.move_on_after(STARTUP_WAIT) as waited:
            await self.reporter.refresh_credentials(quiet=True)
            await self.sync.sync_datasets(quiet=True)
        if waited.cancelled_caught:
            known = ", ".join(sorted(self.sync.manifests)) or "none"
            log.warning(
                "the scheduler did not answer within %g s: mounting with the datasets this "
                "node knew (%s); following the scheduler from now on",
                STARTUP_WAIT,
                known,
            )

    def _serve_api(self, nursery: trio.Nursery) -> None:
        """Hand the port's local API requests to this loop from now on: each runs as a
        task of `nursery` (a long poll too), the port's loop awaiting its answer."""
        here = OtherLoop(nursery)
        self.api.set_control(lambda m, target, body: here.run(self.control.handle, m, target, body))
        self.api.set_probes(
            lambda: here.run_sync(self.status.readiness),
            lambda: here.run_sync(self.metrics.render),
        )

    async def _start_loops(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.store.commit_loop)
        await nursery.start(self.fetcher.run)
        self.jobs.bind(nursery)
        self.prefetch.bind(nursery)
        nursery.start_soon(self.traces.run)
        await nursery.start(self.store.disk.run)
        nursery.start_soon(self.sync.disk_loop)
        nursery.start_soon(self.control.verify_loop)
        if self.store.unverified_chunks():
            self.control.start_verify("after an unclean shutdown", only_unverified=True)
        nursery.start_soon(self.session.run)
        nursery.start_soon(self._tune_mount)
        await nursery.start(self.reporter.run)
        nursery.start_soon(self.sync.dataset_loop)
        if self.kube is not None:
            nursery.start_soon(self.kube.run, self.sync.kube_state, self.config.kubernetes_interval)
        if self.config.mirror is not None:
            await nursery.start(self._serve_mirror)

    async def _serve_mirror(self, task_status: trio.TaskStatus[list[str]]) -> None:
        """The registry mirror over this node's store, fetch layer and peers, until the
        nursery is cancelled. Imported here: only nodes that mirror load its HTTP stack."""
        from syncbit.mirror import BlobCache, UpstreamSource, serve
        from syncbit.node.mirror import NodeBlobSource

        cfg = self.config.mirror_config()
        assert cfg is not None
        node = self.config.node
        cache = await BlobCache.open(cfg.cache_dir, cfg.cache_size)
        upstream = UpstreamSource(cfg, cache)
        source = NodeBlobSource(
            cfg,
            upstream,
            self.store,
            self.fetcher,
            self.directory,
            lambda oid, size, cs: self.client.register_object(node, oid, size, cs),
            lambda: self.sync.manifests.values(),
        )
        self.reporter.shareable = source.shareable
        try:
            try:
                await serve(cfg, source, trio.Event(), task_status=task_status)
            except OSError as exc:
                why = exc.strerror or str(exc)
                raise SyncbitError(
                    f"cannot serve the registry mirror on {cfg.listen}: {why}"
                ) from None
        finally:
            with trio.CancelScope(shield=True):
                await upstream.close()
                await trio.to_thread.run_sync(source.close)

    async def _tune_mount(self) -> None:
        """Raise the mount's readahead once the kernel has applied the INIT reply (which
        caps it at 128 KiB): reads then arrive as 1 MiB requests instead of 128 KiB."""
        await self.session.initialized.wait()
        await trio.sleep(0.05)
        await trio.to_thread.run_sync(
            raise_readahead, self.config.mount, self.config.mount_readahead_kb
        )

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                await self.reporter.leave()
                scope.cancel()
                return


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

    if root is not None:
        walk(root, 0)
    sys.stderr.write("trio tasks:\n" + "\n".join(lines) + "\n")
    sys.stderr.flush()


def run(config: DaemonConfig) -> None:
    """Run a node until SIGTERM/SIGINT; raises SyncbitError for start-up failures.
    `kill -USR1 <pid>` writes every thread's stack to stderr (the log), `kill -USR2` every
    trio task and where it waits: what a stuck daemon is doing, without stopping it."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGUSR2, _dump_tasks)
    node = Node(config)
    trio.run(node.run, instruments=looptrace.instruments())
