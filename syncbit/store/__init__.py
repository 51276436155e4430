"""The node's object store: one sparse file per content object plus an LMDB chunk index.

Owns the cache directory (exclusively, through a lock file), chunk presence and digests,
RAM staging, the budget and eviction. It never talks to the network and never decides
where bytes come from. `ObjectStore` (facade.py) is the one entry; the pieces:

    index     LMDB: chunk presence and digests, object records, the node's manifests
    files     object files (descriptors, O_DIRECT, pread, unlink), lock file, marker
    staging   verified chunks in RAM, the LRU of recent ones, the chunk buffer pool
    objects   per-object presence and uses, and the counters they imply (one owner)
    budget    pins, LRU victim choice, the cache-full message (pure)
    evict     reservations, eviction, gc, discard: every removal
    write     a chunk from RAM to its file within the budget
    commit    group commit (fdatasync, then one txn); emits durable chunks
    verify    re-reading stored chunks against their digests
    read      reading sections: bytes from RAM, page cache or disk; passthrough fds
    events    the change feed (durable/removed chunks), the objects whose presence
              changed (for status), and the state-change signal
    disk      the cache filesystem's disk-full episodes
    load      the index read back at start-up

Layout: `<cache>/objects/<id[:2]>/<id>` is an ordinary file of the object's full size,
filled chunk by chunk, so a read is one `pread` and the peer service can `sendfile` from
it. `<cache>/index.lmdb` records each durable chunk's digest.

Chunk states:
- *staged*: verified bytes in a RAM buffer, readable by this process at once, pinned
  while a worker thread writes them to the object file; then kept in a small LRU.
- *written*: the write finished; readers in this process may `pread` it. In memory only.
- *durable*: the commit fdatasync'ed the object file and then indexed the chunk. Only
  durable chunks are served to peers and reported to the scheduler. After a crash a
  written-but-not-durable chunk is simply absent and is fetched again; a chunk is never
  in the index with bytes that were not durable first.

In use, by construction (an object in use is never evicted):
- `with store.reading(obj) as reader:` a read, from its presence check to the end of its
  pread or sendfile; the bytes are reached only through `reader`. A removal either takes
  the object before the section starts (the reader finds nothing) or not at all; a
  discard waits for the sections in progress before it touches the file.
- `with store.keeping(obj):` a read or prefetch waiting for the object's chunks.
- `store.hold(obj)`: a file open through the mount (evicted only as a last resort).
- the write path itself (`store_chunk`), staged chunks not yet written, chunks written
  but not yet durable, and a removal running.

Budget (`cache_size`, a hard limit): `used_bytes()` counts written chunks, reservations
of writes in progress and evicted files still being deleted, in O(1). A write reserves
its bytes first, evicting whole idle unpinned objects, least recently used first, until
it fits. Pinned objects (`set_pins`: the datasets assigned here) are never evicted by the
LRU; when they alone fill the budget the write fails with CacheFullError saying so. A
disk that fills before the budget does gets the same eviction and one retry; the index
keeps a reserve so commits and evictions succeed on a 100% full filesystem. A chunk that
cannot be stored is missing again, never indexed. `last_used` is written with the next
commit, eviction or `close`, so LRU order survives restarts.

Verification: `close` leaves a clean-shutdown marker only when the index is known to
match the files; without one, every chunk is *unverified* at start: served only after it
was re-read against its digest (a read checks it first, the daemon sweeps the rest),
never to peers nor through passthrough before that.

Concurrency (who may touch what):
- The trio thread owns all in-memory state: the object table and presence, staging, the
  budget counters, pins, the commit batch, the change feed. Methods that block say so;
  everything else is safe (and the only thing allowed) on the trio thread, which never
  opens, syncs, unlinks or commits anything itself.
- Worker threads (`trio.to_thread`, started by the store only) do the blocking I/O handed
  to them: pwrite, fdatasync then the index txn, pread, hashing, unlink and truncation,
  opening a file, the gc scan. They change no in-memory state but descriptors (under the
  file lock), the bytes in flight (space lock) and the index (index write lock).
- Peer-service threads may call `get`, `reading` (and through it open the file and
  `sendfile`), and `StoredObject.has_range`: set membership, safe under the GIL, and
  presence is cleared under the use lock.
- Locks: the *use lock* (threading) guards reading counts and a removal's claim; the
  *file lock* (threading, one per cache dir) guards opening, closing and renaming object
  files, never held across an unlink or fsync; the *space lock* the bytes of writes in
  flight against free space; the *index write lock* one LMDB write txn at a time; the
  *commit lock* (trio) keeps a removal of chunks out from between a commit's batch and
  its txn. LMDB transactions never span an `await`.
"""

from syncbit.store.events import ChangeFeed, Changes, PresenceChanges
from syncbit.store.evict import EvictResult
from syncbit.store.facade import ObjectStore
from syncbit.store.objects import Hold, StoredObject
from syncbit.store.read import BackingFile, ObjectReader
from syncbit.store.staging import ReadersRam
from syncbit.store.verify import ChunkCheck, VerifyRun

__all__ = [
    "BackingFile",
    "ChangeFeed",
    "Changes",
    "ChunkCheck",
    "EvictResult",
    "Hold",
    "ObjectReader",
    "ObjectStore",
    "PresenceChanges",
    "ReadersRam",
    "StoredObject",
    "VerifyRun",
]
