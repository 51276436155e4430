"""The fetch layer: makes chunks present, from peers when they hold them, else the source.

Owns flights (single-flight per chunk), their queue and lanes, the source plan, peer and
source transfers with verification, readahead, limits and the pull/prefetch jobs. It never
serves FUSE itself, never reaches past the store's facade, and never trusts a peer's bytes
without a digest the scheduler recorded from a source fetch. `Fetcher` is the one entry;
the pieces:

    flight     a chunk transfer as an enum state machine; the single-flight table
    queue      reads first, then the prefetch lanes (peer-ready, the rest) and their
               limits; parked flights
    runner     workers, settling each attempt, writing staged chunks, watching parked
               flights until a peer holds their chunk
    transfer   one attempt: peers (verified) then the source; stages what arrives
    hedge      a peer transfer slower than recent ones (`syncbit.hedging.Hedging`) asked
               of the next holder too; the first right answer wins, the other aborted
    source_race  the same for a source read (sources whose reads `Abort` ends: HTTP,
               HF): a straggler's range asked again on a second stream
    claims     which queued chunks a source read brings along; the cluster-wide claim
    verify     source bytes against the record, the head sample, whole-file digests,
               broken revisions
    plan       who reads the source (a named policy per prefetch), the source-read
               limit, takeover of chunks planned elsewhere
    streams    source reads at once per source, adapted to what it delivers
               (`fetch_control.SourceConcurrency`); Retry-After waits
    readahead  the window of a sequential reader (it grows with the source's streams)
    limiter    the prefetch bandwidth cap
    handle     the open file handed to fs/, with its passthrough capability
    served     bytes served to readers by origin (metrics)
    directory  the ports: the scheduler and the peers, as the fetch layer uses them
    jobs       pulls and prefetches of whole datasets
    onopen     an open of a cold file fetches it whole in the background

A flight moves QUEUED -> RUNNING -> DONE or FAILED; RUNNING -> QUEUED (a claim not
granted, a chunk for the peer lane) or PARKED (another node reads it, its holders are
busy, the plan gives it elsewhere); PARKED -> QUEUED when a holder has it or nobody reads
it; a queued or parked flight FAILED when its job abandons it (a reader's at its deadline).
Results are `State`s, `Park`s and enums; failures are syncbit errors.

Trust: a peer's bytes are checked against the recorded digest as they arrive (transfer);
the source's against the record where there is one and the file's head sample on every
source read (verify): a mismatch fails the read, stores nothing and is reported, so the
scheduler has a third node re-check it. An object marked broken (its source changed under
the same version) is never read, cached or not; a published whole-file SHA-256 is checked
before a file counts as ready.

Concurrency: everything here runs on the trio thread but the blocking reads, which go to
worker threads (`trio.to_thread`): a peer's `get_into` plus its digest, a source's
`read_into` plus the batch's digests (in `Streams.threads`, not trio's shared ones). Those
touch only the buffer they fill; a buffer is taken from and given back to the store's pool
on the trio thread.
"""

from syncbit.fetch.directory import ChunkDirectory, ChunkPeers
from syncbit.fetch.fetcher import Fetcher
from syncbit.fetch.flight import Priority
from syncbit.fetch.handle import OpenFile
from syncbit.fetch.jobs import Job, JobKind, Jobs, JobState
from syncbit.fetch.onopen import OpenPrefetch
from syncbit.fetch.plan import Plans, RoundRobin, SourcePlan
from syncbit.fetch.verify import read_checked

__all__ = [
    "ChunkDirectory",
    "ChunkPeers",
    "Fetcher",
    "Job",
    "JobKind",
    "JobState",
    "Jobs",
    "OpenFile",
    "OpenPrefetch",
    "Plans",
    "Priority",
    "RoundRobin",
    "SourcePlan",
    "read_checked",
]
