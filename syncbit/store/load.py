"""Start-up: the index read into the object table; chunks of missing or short object
files forgotten, every chunk unverified after an unclean shutdown. Blocking, once, inside
`ObjectStore.open`; never trusts an index entry whose file cannot hold its bytes.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import lmdb

from syncbit.diskspace import size_text
from syncbit.store.events import ChangeFeed
from syncbit.store.files import CacheDir
from syncbit.store.index import Index
from syncbit.store.objects import ObjectTable, StoredObject

log = logging.getLogger("syncbit.store")


def load(
    table: ObjectTable, cache: CacheDir, index: Index, feed: ChangeFeed, clean: bool, budget: int
) -> None:
    """Fill `table` from `index`; lost chunks go on `feed` as removed (the scheduler hears
    it with the first report). `clean`: the last run shut down cleanly."""
    contents = index.load()
    objects: dict[str, StoredObject] = {}
    for record in contents.objects:
        file = cache.file(record.id, record.size)
        obj = table.create(record.id, record.size, record.chunk_size, file)
        obj.last_used = record.last_used
        objects[record.id] = obj
    chunks: dict[StoredObject, list[tuple[int, str]]] = defaultdict(list)
    for object_id, chunk, digest in contents.chunks:
        known = objects.get(object_id)
        if known is not None:
            chunks[known].append((chunk, digest))
    lost = [obj for obj in chunks if not _file_holds(obj)]
    _forget(lost, index)
    for obj in lost:
        gone = sorted(chunk for chunk, _ in chunks.pop(obj))
        log.warning(
            "object %s: its file %s is missing or short; its %d chunks are fetched again "
            "when needed",
            obj.id[:12],
            obj.path,
            len(gone),
        )
        feed.removed(obj, gone)
    for obj, held in chunks.items():
        for chunk, digest in held:
            table.loaded(obj, chunk, digest, verified=clean)
    count = sum(len(held) for held in chunks.values())
    if count and not clean:
        log.warning(
            "cache %s was not shut down cleanly: its %d chunks are re-read and checked "
            "against their digests before they are used",
            cache.root,
            count,
        )
    log.info(
        "cache %s: %d objects, %d chunks present (%s of a %s budget)",
        cache.root,
        len(table),
        count,
        size_text(table.held),
        size_text(budget),
    )


def _file_holds(obj: StoredObject) -> bool:
    """Whether the object's file exists at full size: opened anew, a missing or short file
    would read as zeros where the index promised verified bytes."""
    try:
        return obj.path.stat().st_size >= obj.size
    except FileNotFoundError:
        return False


def _forget(lost: list[StoredObject], index: Index) -> None:
    if not lost:
        return
    try:
        index.delete_chunks([obj.id for obj in lost])
    except lmdb.Error as exc:  # forgotten here all the same; the next start looks again
        log.warning("cannot remove the lost chunks from the index: %s", exc)
        index.unclean = True
