"""The cache index (LMDB): chunk presence and digests, object records, the manifests a
node keeps for restarts. Blocking, for worker threads; short write txns, one at a time,
that succeed on a full disk (`syncbit.diskspace.open_env`). Knows no files, RAM or budget.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from syncbit.diskspace import IndexReserve, is_enospc, open_env

log = logging.getLogger("syncbit.store")

_MAP_SIZE = 1 << 36  # virtual; LMDB grows the file only as needed
_NAMES = ("objects", "chunks", "manifests")


def _chunk_key(object_id: str, index: int) -> bytes:
    """Chunk keys sort by object, then index: an object's chunks are one key range."""
    return bytes.fromhex(object_id) + index.to_bytes(4, "big")


@dataclass(frozen=True)
class ObjectRecord:
    """An object as the index keeps it."""

    id: str
    size: int
    chunk_size: int
    last_used: float

    def key(self) -> bytes:
        return bytes.fromhex(self.id)

    def value(self) -> bytes:
        doc = {"size": self.size, "chunk_size": self.chunk_size, "last_used": self.last_used}
        return json.dumps(doc).encode()


@dataclass(frozen=True)
class Contents:
    """What `Index.load` read: object records and (object id, chunk, digest) per chunk."""

    objects: list[ObjectRecord]
    chunks: list[tuple[str, int, str]]


class Index:
    """The LMDB environment of one cache dir. Build with `Index.open()`."""

    def __init__(self, env: lmdb.Environment, reserve: IndexReserve) -> None:
        self._env = env
        self._reserve = reserve
        self._write_lock = threading.Lock()
        # All handles before any thread: `open_db` starts its own transaction and, racing
        # a write transaction in another thread, deadlocked on the GIL.
        self._dbs = {name: env.open_db(name.encode()) for name in _NAMES}
        # The index may not match the files (a txn that removes chunks failed): no
        # clean-shutdown marker then, so the next start re-verifies everything.
        self.unclean = False

    @classmethod
    def open(cls, path: Path) -> Index:
        """Raises DiskFullError when the filesystem has no room to create it."""
        env, reserve = open_env(path, max_dbs=4, map_size=_MAP_SIZE, metasync=False)
        return cls(env, reserve)

    @contextlib.contextmanager
    def _write(self) -> Iterator[lmdb.Transaction]:
        with self._write_lock:
            with self._env.begin(write=True) as txn:
                yield txn
            self._reserve.top_up()  # the commit may have used part of the reserve

    def load(self) -> Contents:
        objects_db, chunks_db = self._dbs["objects"], self._dbs["chunks"]
        records, chunks = [], []
        with self._env.begin() as txn:
            for key, value in txn.cursor(db=objects_db):
                meta = json.loads(value)
                records.append(
                    ObjectRecord(
                        key.hex(), meta["size"], meta["chunk_size"], meta.get("last_used", 0.0)
                    )
                )
            for key, value in txn.cursor(db=chunks_db):
                chunks.append((key[:-4].hex(), int.from_bytes(key[-4:], "big"), value.hex()))
        return Contents(records, chunks)

    def commit(
        self, chunks: Iterable[tuple[str, int, str]], records: Iterable[ObjectRecord]
    ) -> None:
        """One txn: object records (new or touched) and durable chunks with digests."""
        chunks_db = self._dbs["chunks"]
        with self._write() as txn:
            self._put_records(txn, records)
            for object_id, index, digest in chunks:
                txn.put(_chunk_key(object_id, index), bytes.fromhex(digest), db=chunks_db)

    def put_records(self, records: Iterable[ObjectRecord]) -> None:
        with self._write() as txn:
            self._put_records(txn, records)

    def _put_records(self, txn: lmdb.Transaction, records: Iterable[ObjectRecord]) -> None:
        objects_db = self._dbs["objects"]
        for record in records:
            txn.put(record.key(), record.value(), db=objects_db)

    def delete_objects(self, object_ids: list[str], records: Iterable[ObjectRecord]) -> None:
        """One txn: forget these objects and their chunks (eviction), and write the
        records of other objects touched since the last commit."""
        objects_db = self._dbs["objects"]
        gone = set(object_ids)
        with self._write() as txn:
            for object_id in object_ids:
                self._delete_chunks(txn, object_id)
                txn.delete(bytes.fromhex(object_id), db=objects_db)
            self._put_records(txn, [r for r in records if r.id not in gone])

    def delete_chunks(self, object_ids: Iterable[str]) -> None:
        """One txn: forget every chunk of these objects; their records stay."""
        with self._write() as txn:
            for object_id in object_ids:
                self._delete_chunks(txn, object_id)

    def delete_chunk(self, object_id: str, index: int) -> None:
        with self._write() as txn:
            txn.delete(_chunk_key(object_id, index), db=self._dbs["chunks"])

    def _delete_chunks(self, txn: lmdb.Transaction, object_id: str) -> None:
        prefix = bytes.fromhex(object_id)
        cursor = txn.cursor(db=self._dbs["chunks"])
        if not cursor.set_range(prefix):
            return
        while cursor.key()[:-4] == prefix:
            if not cursor.delete():
                break

    def delete_orphan_chunks(self) -> int:
        """Chunk entries whose object has no record (gc); how many went."""
        objects_db = self._dbs["objects"]
        orphans = 0
        with self._write() as txn:
            cursor = txn.cursor(db=self._dbs["chunks"])
            if cursor.first():
                while cursor.key():
                    if txn.get(cursor.key()[:-4], db=objects_db) is None:
                        orphans += 1
                        if not cursor.delete():
                            break
                    elif not cursor.next():
                        break
        return orphans

    # -- manifests known to the node (so a restart serves without the scheduler) -----------

    def save_manifests(self, manifests: dict[str, str]) -> None:
        """Replace the stored manifest JSON documents (name -> JSON). Raises OSError
        (ENOSPC on a full disk) when they cannot be written."""
        db = self._dbs["manifests"]
        try:
            with self._write() as txn:
                txn.drop(db, delete=False)
                for name, doc in manifests.items():
                    txn.put(name.encode(), doc.encode(), db=db)
        except lmdb.Error as exc:
            code = errno.ENOSPC if is_enospc(exc) else errno.EIO
            raise OSError(code, f"cannot save the manifests in the cache index: {exc}") from exc

    def load_manifests(self) -> dict[str, str]:
        with self._env.begin() as txn:
            return {k.decode(): v.decode() for k, v in txn.cursor(db=self._dbs["manifests"])}

    def close(self) -> None:
        """Sync and close; a failed sync is logged and leaves the index `unclean`."""
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            log.warning("cannot sync the cache index: %s", exc)
            self.unclean = True
        self._env.close()
