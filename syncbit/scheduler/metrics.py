"""The scheduler's Prometheus metrics, read from its state at scrape time.

Owns the metric names and what each counts; the request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric

from syncbit import gctune
from syncbit.metrics import counter, gauge

if TYPE_CHECKING:
    from syncbit.scheduler.admission import Admission
    from syncbit.scheduler.api import Api


def collect(
    api: Api | None,
    requests: dict[tuple[str, str], int],
    leading: bool = True,
    admission: Admission | None = None,
) -> Iterator[Metric]:
    """The metrics of a scheduler that answers from `api` (None: a replica that follows,
    whose metrics of nodes and datasets would be the leader's or wrong)."""
    if admission is not None:
        yield from _admission(admission)
    yield from gctune.metrics()
    yield gauge(
        "syncbit_scheduler_leader",
        "1 while this scheduler answers as the leader (always for a single scheduler).",
        {(): float(leading)},
        [],
    )
    yield counter(
        "syncbit_scheduler_requests",
        "API requests by method and route.",
        {k: float(v) for k, v in requests.items()},
        ["method", "route"],
    )
    if api is not None:
        yield from _state(api)


def _admission(admission: Admission) -> Iterator[Metric]:
    yield counter(
        "syncbit_scheduler_admitted",
        "Requests other than heartbeats by how they were admitted (scheduler.admission): "
        "at once, after waiting for the loop, or answered busy (429) after max_wait.",
        {
            ("at_once",): float(admission.admitted),
            ("delayed",): float(admission.delayed),
            ("busy",): float(admission.refused),
        },
        ["how"],
    )
    yield gauge(
        "syncbit_scheduler_admission_rate",
        "Requests/s other than heartbeats admitted while the loop is behind (AIMD on its lag).",
        {(): admission.rate},
        [],
    )
    yield gauge(
        "syncbit_scheduler_admission_waiting",
        "Requests waiting to be admitted now.",
        {(): float(admission.waiting)},
        [],
    )


def _state(api: Api) -> Iterator[Metric]:
    state = api.state
    nodes = state.nodes()
    status = state.status()
    up = sum(n.up for n in nodes)
    yield gauge(
        "syncbit_scheduler_nodes",
        "Registered nodes by liveness.",
        {("up",): up, ("down",): len(nodes) - up},
        ["state"],
    )
    yield gauge(
        "syncbit_scheduler_heartbeat_interval_seconds",
        "Seconds between heartbeats nodes are asked to keep to now (before jitter): nodes "
        "up / heartbeat_rate; a node's own interval is its floor.",
        {(): state.live.interval()},
        [],
    )
    yield gauge(
        "syncbit_scheduler_datasets", "Registered datasets.", {(): len(status["datasets"])}, []
    )
    for key, doc in (
        ("assigned", "Nodes a dataset is assigned to."),
        ("ready", "Nodes where a dataset's current revision is ready."),
    ):
        yield gauge(
            f"syncbit_scheduler_dataset_{key}_nodes",
            doc,
            {(d["name"],): len(d[key]) for d in status["datasets"]},
            ["dataset"],
        )
    yield gauge(
        "syncbit_scheduler_claims", "Source reads claimed now.", {(): state.claims.active()}, []
    )
    yield from _trust(api, status)


def _trust(api: Api, status: dict[str, Any]) -> Iterator[Metric]:
    quarantined = api.state.facts.quarantine
    yield gauge(
        "syncbit_scheduler_quarantined_nodes",
        "Nodes quarantined for a false report (not offered as peers, reports dropped).",
        {(): len(quarantined)},
        [],
    )
    yield gauge(
        "syncbit_scheduler_node_quarantined",
        "1 for each quarantined node.",
        {(name,): 1.0 for name in quarantined},
        ["node"],
    )
    yield gauge(
        "syncbit_scheduler_disputes",
        "Chunk digests under dispute, waiting for a re-check against the source.",
        {(): len(status["disputes"])},
        [],
    )
    yield gauge(
        "syncbit_scheduler_broken_files",
        "Files of current dataset revisions whose source changed under their version.",
        {(d["name"],): len(d["broken"]) for d in status["datasets"]},
        ["dataset"],
    )
    yield counter(
        "syncbit_scheduler_refused_digests",
        "Reported chunk digests not recorded: refused (no source read granted, a "
        "quarantined reporter, a revoked digest) or in conflict with the record.",
        {(k,): float(v) for k, v in api.refused.items()},
        ["reason"],
    )


__all__ = ["collect"]
