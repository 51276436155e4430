"""The fetch layer: makes chunks present, from peers when they hold them, else the source.

Owns flights (single-flight per chunk), their queue and lanes, the source plan, peer and
source transfers with verification, readahead, limits and the pull/prefetch jobs. It never
serves FUSE itself, never reaches into the store's layout (the store's facade only), and
never trusts a peer's bytes without a digest the scheduler recorded from a source fetch.
"""

from syncbit.fetch.fetcher import ChunkDirectory, Fetcher, OpenFile, Priority, read_checked
from syncbit.fetch.jobs import Job, Jobs

__all__ = [
    "ChunkDirectory",
    "Fetcher",
    "Job",
    "Jobs",
    "OpenFile",
    "Priority",
    "read_checked",
]
