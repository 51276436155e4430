"""Helpers of the object store tests: object ids, their bytes, and storing an object's
chunks the way the fetcher does."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

from syncbit.chunks import chunk_length, digest
from syncbit.store import ObjectStore, StoredObject


def oid(n: int) -> str:
    """The id of test object `n`."""
    return f"{n:02x}" * 32


def content(seed: int, size: int) -> bytes:
    """The bytes of test object `seed`."""
    return random.Random(seed).randbytes(size)


async def fill(store: ObjectStore, n: int, size: int, cs: int, flush: bool = True) -> StoredObject:
    """Store every chunk of object `n` (its bytes: `content(n, size)`) as the fetcher does."""
    obj = store.object(oid(n), size, cs)
    data = content(n, size)
    for i in range(obj.chunks):
        chunk = data[i * cs : i * cs + chunk_length(size, cs, i)]
        await store.store_chunk(obj, i, memoryview(chunk), digest(chunk))
    if flush:
        await store.flush()
    return obj


@contextlib.contextmanager
def opened(path: Path, budget: int) -> Iterator[ObjectStore]:
    """A store on `path` that gives up waiting for objects in use after 0.1 s."""
    store = ObjectStore.open(path, budget)
    store.busy_wait = 0.1
    try:
        yield store
    finally:
        store.close()
