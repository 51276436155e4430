"""Prometheus metrics of the daemon and the scheduler.

Most values already exist as counters on the components (bytes by origin in the fetcher,
bytes served by the peer service, cache usage in the store, request counts in the FUSE
layer); collectors read them at scrape time, so the data path pays nothing for metrics.
Only chunk fetch latency is observed as it happens, into a histogram per origin.
Every process owns its own registry: two daemons in one test process never mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Chunk transfers take from a millisecond (a peer on the same rack) to a minute (a slow
# origin at the read deadline).
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition text of a registry and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def fetch_latency(registry: CollectorRegistry) -> Histogram:
    """Seconds per chunk transfer, labelled by where the bytes came from (peer, source)."""
    return Histogram(
        "syncbit_chunk_fetch_seconds",
        "Time to fetch one chunk (or one coalesced source read), by origin.",
        ["origin"],
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )


# An API request takes from well under a millisecond (a heartbeat) to a minute (a long poll
# held to its timeout).
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def request_latency(registry: CollectorRegistry) -> Histogram:
    """Seconds from a request's head read to its answer ready, by route (a scheduler's)."""
    return Histogram(
        "syncbit_scheduler_request_seconds",
        "Time from a request's head to its answer (admission wait, body and handler "
        "included; not the time it queued before the loop read it: see loop_lag), by route.",
        ["route"],
        buckets=_REQUEST_BUCKETS,
        registry=registry,
    )


def counter(name: str, doc: str, values: dict[tuple[str, ...], float], labels: list[str]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def gauge(name: str, doc: str, values: dict[tuple[str, ...], float], labels: list[str]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


class Snapshot(Collector):
    """A collector built from a function that returns metric families at scrape time."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()

    def describe(self) -> list[Any]:
        return []  # unchecked: families are only known at scrape time
