"""The node's Prometheus metrics: counters the components keep (fetcher, peer server,
store, FUSE layer) and the cached dataset status, read at scrape time on the trio thread.
Never scans files or objects per scrape: every value is a counter or a cached figure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from syncbit import gctune
from syncbit.fetch import Fetcher
from syncbit.fs.kernel import Session
from syncbit.fs.ops import SyncbitFS
from syncbit.metrics import Snapshot, counter, fetch_latency, gauge, render
from syncbit.node.status import Status
from syncbit.store import ObjectStore


class Served(Protocol):
    """What the chunk server counts."""

    @property
    def bytes_served(self) -> int: ...

    @property
    def refused(self) -> int: ...


class NodeMetrics:
    """One registry per node; `render()` is the `/metrics` answer (trio thread)."""

    def __init__(
        self,
        fetcher: Fetcher,
        store: ObjectStore,
        served: Served,
        status: Status,
        fs: SyncbitFS,
        session: Callable[[], Session | None],
    ) -> None:
        self._fetcher = fetcher
        self._store = store
        self._served = served
        self._status = status
        self._fs = fs
        self._session = session
        self.registry = CollectorRegistry(auto_describe=False)
        latency = fetch_latency(self.registry)
        fetcher.on_transfer = lambda origin, s: latency.labels(origin or "unknown").observe(s)
        self.registry.register(Snapshot(self._collect))

    def render(self) -> tuple[bytes, str]:
        return render(self.registry)

    def _collect(self) -> Iterator[Metric]:
        f, usage = self._fetcher, self._store.usage(self._status.pinned())
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
        yield counter(
            "syncbit_peer_served_bytes",
            "Bytes served to other nodes.",
            {(): self._served.bytes_served},
            [],
        )
        yield counter(
            "syncbit_peer_busy_refusals",
            "Prefetch transfers this node turned away: every upload slot was taken.",
            {(): self._served.refused},
            [],
        )
        yield from _cache_metrics(usage)
        yield from _disk_metrics(usage)
        yield counter(
            "syncbit_scheduler_reader_waits",
            "Chunk-map and claim requests of reads that the scheduler did not answer in time "
            "(abandoned: the read stopped waiting; skipped: not asked, as one was lately): "
            "those reads went to the source without it.",
            {
                ("abandoned",): f.stats["scheduler_abandoned"],
                ("skipped",): f.stats["scheduler_skipped"],
            },
            ["outcome"],
        )
        yield counter(
            "syncbit_verify_failures",
            "Chunks from peers and whole files that failed verification.",
            {(): f.stats["verify_failures"]},
            [],
        )
        yield gauge(
            "syncbit_heartbeat_interval_seconds",
            "Seconds between this node's heartbeats now: its own interval, or the longer "
            "one the scheduler asks of a large cluster.",
            {(): self._status.heartbeat_interval},
            [],
        )
        yield from self._dataset_metrics()
        yield from self._fuse_metrics()
        yield from gctune.metrics()

    def _dataset_metrics(self) -> Iterator[Metric]:
        datasets = self._status.datasets()
        yield gauge(
            "syncbit_dataset_ready",
            "1 when the dataset is complete and verified here.",
            {(n,): float(ready) for n, (ready, _) in datasets.items()},
            ["dataset"],
        )
        yield gauge(
            "syncbit_dataset_cached_bytes",
            "Bytes of the dataset held here.",
            {(n,): float(held) for n, (_, held) in datasets.items()},
            ["dataset"],
        )

    def _fuse_metrics(self) -> Iterator[Metric]:
        yield counter(
            "syncbit_fuse_requests",
            "FUSE requests by operation.",
            {(op,): float(n) for op, n in self._fs.requests.items()},
            ["op"],
        )
        session = self._session()
        if session is not None:
            yield counter(
                "syncbit_fuse_passthrough_opens",
                "Opens the kernel serves from the cache file itself (FUSE passthrough).",
                {(): float(session.passthrough_opens)},
                [],
            )
        yield counter(
            "syncbit_fuse_errors",
            "FUSE requests answered with an error, by operation and errno.",
            {key: float(n) for key, n in self._fs.errors.items()},
            ["op", "errno"],
        )


def _cache_metrics(usage: dict[str, Any]) -> Iterator[Metric]:
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


def _disk_metrics(usage: dict[str, Any]) -> Iterator[Metric]:
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
