"""The scheduler: node registry, datasets and manifests, chunk digests and holders, peer choice.

Re-exports the public names of its modules; it holds no logic and starts nothing on import.
The names load on first use, so a client-only command (`syncbit prefetch`, `wait` in a
pod's initContainer) does not import the server, its state store and metrics.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from syncbit.scheduler.client import (
        RESOLVE_TIMEOUT,
        ChunkMap,
        ChunkUpdates,
        Peer,
        SchedulerClient,
    )
    from syncbit.scheduler.policy import LeastLoaded, PeerPolicy
    from syncbit.scheduler.server import SchedulerServer, resolve_dataset
    from syncbit.scheduler.state import DatasetExistsError, NodeInfo, SchedulerState

_WHERE = {
    "ChunkMap": "client",
    "ChunkUpdates": "client",
    "Peer": "client",
    "SchedulerClient": "client",
    "LeastLoaded": "policy",
    "PeerPolicy": "policy",
    "RESOLVE_TIMEOUT": "client",
    "SchedulerServer": "server",
    "resolve_dataset": "server",
    "DatasetExistsError": "state",
    "NodeInfo": "state",
    "SchedulerState": "state",
}

__all__ = [
    "RESOLVE_TIMEOUT",
    "ChunkMap",
    "ChunkUpdates",
    "DatasetExistsError",
    "LeastLoaded",
    "NodeInfo",
    "Peer",
    "PeerPolicy",
    "SchedulerClient",
    "SchedulerServer",
    "SchedulerState",
    "resolve_dataset",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
