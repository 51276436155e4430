"""The scheduler's Prometheus metrics, read from its state at scrape time.

Owns the metric names and what each counts; the request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

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
        "Turns/s of requests other than heartbeats admitted while the loop is behind (AIMD "
        "on how busy and how late the loop is).",
        {(): admission.rate},
        [],
    )
    if admission.busy is not None:
        yield gauge(
            "syncbit_scheduler_loop_busy_ratio",
            "Share of the last admission period the scheduler's loop ran tasks rather than "
            "waiting for I/O.",
            {(): admission.busy},
            [],
        )
    yield gauge(
        "syncbit_scheduler_admission_waiting",
        "Requests waiting to be admitted now.",
        {(): float(admission.waiting)},
        [],
    )


def _state(api: Api) -> Iterator[Metric]:
    """Counts only, each O(nodes) at most: a scrape must not hold the loop. (Built from
    `status()`, the full overview, a scrape of 5,000 nodes stalled every heartbeat behind
    it for 0.3-0.75 s on the 2-core bench.)"""
    state = api.state
    facts = state.facts
    up = sum(1 for name in facts.nodes if state.live.is_up(name))
    yield gauge(
        "syncbit_scheduler_nodes",
        "Registered nodes by liveness.",
        {("up",): up, ("down",): len(facts.nodes) - up},
        ["state"],
    )
    yield gauge(
        "syncbit_scheduler_loop_lag_seconds",
        "The longest a due task waited for the scheduler's loop within the last node_timeout "
        "(checked every second): what a request may have waited besides its own "
        "request_seconds.",
        {(): state.live.lag()},
        [],
    )
    yield gauge(
        "syncbit_scheduler_heartbeat_interval_seconds",
        "Seconds between heartbeats nodes are asked to keep to now (before jitter): nodes "
        "up / heartbeat_rate; a node's own interval is its floor.",
        {(): state.live.interval()},
        [],
    )
    yield gauge("syncbit_scheduler_datasets", "Registered datasets.", {(): len(facts.datasets)}, [])
    assigned = state.planner.current().assigned
    yield gauge(
        "syncbit_scheduler_dataset_assigned_nodes",
        "Nodes a dataset is assigned to.",
        {(name,): len(assigned.get(name, ())) for name in facts.datasets},
        ["dataset"],
    )
    yield gauge(
        "syncbit_scheduler_dataset_ready_nodes",
        "Nodes where a dataset's current revision is ready.",
        {(name,): float(len(nodes)) for name, nodes in state.ready_nodes().items()},
        ["dataset"],
    )
    yield gauge(
        "syncbit_scheduler_claims", "Source reads claimed now.", {(): state.claims.active()}, []
    )
    yield from _trust(api)


def _trust(api: Api) -> Iterator[Metric]:
    facts = api.state.facts
    quarantined = facts.quarantine
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
        {(): len(facts.disputes)},
        [],
    )
    yield gauge(
        "syncbit_scheduler_broken_files",
        "Files of current dataset revisions whose source changed under their version.",
        {(name,): len(api.state.catalog.broken_files(ds)) for name, ds in facts.datasets.items()},
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
