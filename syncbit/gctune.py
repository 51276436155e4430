"""Python's cyclic garbage collector tuned for syncbit's long-running processes (`syncbit
scheduler`, `syncbit daemon`), and its pauses counted for /metrics.

CPython collects its youngest generation every 700 net container allocations and moves
what survives two collections to the oldest, whose growth by a quarter then triggers a
full collection: a walk of every tracked object while the trio loop waits. A server whose
requests live for seconds (long polls, requests held by admission, transfers) promotes
nearly every request's objects before they die, so full collections come often and find
nothing. At 5,000 simulated nodes (`bench/scale.py`, 40 s window) the scheduler spent
~23 s of a ~3 minute run in 341 collections, 26 of them full at ~0.5 s each, and its
heartbeats' p99 was 1.0-1.5 s; with the youngest generation collected every 50,000
allocations, 25 collections in all took 2.7 s and p99 was 0.46 s. Objects alive when the
process has started (modules, configuration) are frozen out of every later collection.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import Metric

from syncbit.metrics import counter, gauge

THRESHOLDS = (50_000, 20, 10)

_counts = [0, 0, 0]
_seconds = [0.0, 0.0, 0.0]
_longest = [0.0, 0.0, 0.0]
_began = [0.0]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _began[0] = time.perf_counter()
        return
    generation = int(info["generation"])
    took = time.perf_counter() - _began[0]
    _counts[generation] += 1
    _seconds[generation] += took
    _longest[generation] = max(_longest[generation], took)


def tune() -> None:
    """For a process that has imported what it runs and is about to serve: what is alive
    now is frozen, the thresholds raised, pauses counted from here on. Idempotent."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
    gc.collect()  # counted: a full collection before the freeze
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def metrics() -> Iterator[Metric]:
    """The collector's thresholds, collections and pauses since `tune`, by generation."""
    generations = [(str(g),) for g in range(3)]
    yield gauge(
        "syncbit_gc_threshold",
        "Python's garbage collector thresholds, by generation (tuned for a server).",
        dict(zip(generations, map(float, gc.get_threshold()), strict=True)),
        ["generation"],
    )
    yield counter(
        "syncbit_gc_collections",
        "Garbage collections, by the oldest generation collected.",
        dict(zip(generations, map(float, _counts), strict=True)),
        ["generation"],
    )
    yield counter(
        "syncbit_gc_pause_seconds",
        "Seconds the process stood still in garbage collections, by generation.",
        dict(zip(generations, _seconds, strict=True)),
        ["generation"],
    )
    yield gauge(
        "syncbit_gc_longest_pause_seconds",
        "The longest garbage collection so far, by generation.",
        dict(zip(generations, _longest, strict=True)),
        ["generation"],
    )
