"""The fetch layer: makes chunks present, from peers when they hold them, else the source.

Owns flights (single-flight per chunk), their queue and lanes, the source plan, peer and
source transfers with verification, readahead, limits and the pull/prefetch jobs. It never
serves FUSE itself, never reaches into the store's layout (the store's facade only), and
never trusts a peer's bytes without a digest the scheduler recorded from a source fetch.
"""

from syncbit.fetch.directory import ChunkDirectory, ChunkPeers
from syncbit.fetch.fetcher import Fetcher
from syncbit.fetch.flight import Priority
from syncbit.fetch.handle import OpenFile
from syncbit.fetch.jobs import Job, Jobs
from syncbit.fetch.plan import Plans, RoundRobin, SourcePlan
from syncbit.fetch.verify import read_checked

__all__ = [
    "ChunkDirectory",
    "ChunkPeers",
    "Fetcher",
    "Job",
    "Jobs",
    "OpenFile",
    "Plans",
    "Priority",
    "RoundRobin",
    "SourcePlan",
    "read_checked",
]
