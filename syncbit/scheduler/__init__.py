"""The scheduler: node registry, datasets and manifests, chunk digests and holders, peer choice.

Re-exports the public names of its modules; it holds no logic and starts nothing on import.
"""

from syncbit.scheduler.client import ChunkMap, Peer, SchedulerClient
from syncbit.scheduler.policy import LeastLoaded, PeerPolicy
from syncbit.scheduler.server import RESOLVE_TIMEOUT, SchedulerServer, resolve_dataset
from syncbit.scheduler.state import DatasetExistsError, NodeInfo, SchedulerState

__all__ = [
    "RESOLVE_TIMEOUT",
    "ChunkMap",
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
