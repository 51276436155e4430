"""The durable store on etcd (`kv.DurableStore`), for replicated schedulers.

Owns the layout of syncbit's keys under one root prefix and the encoding of values: zlib
when it pays, and split into parts when larger than one etcd request may carry (1.5 MiB
by default). It must never commit without the leader's fence when one is given, nor
return a value whose parts do not match their digest.

Layout under `root` (default `/syncbit/`):

    kv/<key>                             -> the value, encoded (below)
    meta/generation                      -> empty; its mod_revision is the generation
    blob/<sha256(key)>/<digest>/<part>   -> the parts of a large value (`part`: 6 digits)

Encoding: one tag byte, then 0 raw bytes, 1 zlib, or 2 a JSON header of a large value
{"digest", "parts", "size", "codec"}; `digest` is the SHA-256 of the (compressed) payload
the parts make up. A large value's parts are written first, one request each (immutable,
named by their digest); then one transaction writes the header, checks that the parts
are still there, and deletes every other part of that key (an earlier value's, or what a
writer that died between the two steps left). A reader reads header and parts at one
revision, so a concurrent rewrite never mixes two values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from syncbit.errors import (
    NotLeaderError,
    RevisionCompactedError,
    SchedulerError,
    StateLimitError,
    StateUnavailableError,
)
from syncbit.scheduler.etcd import (
    Compare,
    DeleteOp,
    DeleteResult,
    EtcdClient,
    EventType,
    KeyValue,
    Op,
    Order,
    PutOp,
    RangeOp,
    RangeResult,
    Target,
    Watch,
    prefix_end,
)
from syncbit.scheduler.kv import (
    DEFAULT_PAGE,
    Bumped,
    Change,
    Check,
    Commit,
    Delete,
    DurableStore,
    Entry,
    Page,
    Put,
    Resync,
    check_key,
    check_limit,
    check_prefix,
    check_writes,
)

log = logging.getLogger("syncbit.scheduler")

_RAW, _ZLIB, _PARTS = 0, 1, 2
INLINE_MAX = 64 * 1024  # larger encoded values go to parts: list pages stay small
PART_BYTES = 1024 * 1024  # one request each, well below etcd's 1.5 MiB request limit
INLINE_BUDGET = 1024 * 1024  # inline bytes per commit: the transaction is one request too
_PARTS_PER_READ = 8
MAX_TXN_OPS = 128  # etcd's --max-txn-ops default
_COMPRESS_MIN = 1024
_THREAD_MIN = 64 * 1024  # compress and hash larger values in a worker thread
_ATTEMPTS = 3  # a commit whose fresh parts another commit of the key removed is redone


def _encode(value: bytes) -> tuple[int, bytes]:
    """(codec, payload): zlib when it makes the value smaller."""
    if len(value) >= _COMPRESS_MIN:
        packed = zlib.compress(value, 6)
        if len(packed) < len(value):
            return _ZLIB, packed
    return _RAW, value


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _decode(codec: int, payload: bytes, key: str) -> bytes:
    if codec == _RAW:
        return payload
    if codec == _ZLIB:
        try:
            return zlib.decompress(payload)
        except zlib.error as exc:
            raise SchedulerError(f"state value of {key!r} is corrupt: {exc}") from exc
    raise SchedulerError(f"state value of {key!r} has an unknown encoding {codec}")


@dataclass(frozen=True, slots=True)
class _Planned:
    """One Put as it will be stored: the header value, and the parts written before."""

    key: str
    header: bytes
    digest: str = ""  # parts only
    parts: tuple[bytes, ...] = ()


class EtcdStore(DurableStore):
    """A `DurableStore` in etcd under `root`.

    Args:
        client: the etcd client.
        root: the key prefix of this syncbit cluster's state (ends with "/").
        fence: called before each commit; returns the compare that holds only while this
            replica leads (`Election.fence`), or raises NotLeaderError. None: unfenced
            (a single writer by construction, or tests).
    """

    def __init__(
        self,
        client: EtcdClient,
        root: str = "/syncbit/",
        *,
        fence: Callable[[], Compare] | None = None,
    ) -> None:
        if not root.endswith("/"):
            raise ValueError(f"etcd state root must end with '/': {root!r}")
        self.client = client
        self._root = root.encode()
        self._kv = (root + "kv/").encode()
        self._blob = (root + "blob/").encode()
        self._generation = (root + "meta/generation").encode()
        self._fence = fence

    # -- layout ------------------------------------------------------------------------------

    def _kv_key(self, key: str) -> bytes:
        return self._kv + key.encode()

    def _blobs(self, key: str) -> bytes:
        return self._blob + hashlib.sha256(key.encode()).hexdigest().encode() + b"/"

    def _parts(self, key: str, digest: str) -> bytes:
        return self._blobs(key) + digest.encode() + b"/"

    def _part(self, key: str, digest: str, index: int) -> bytes:
        return self._parts(key, digest) + b"%06d" % index

    # -- reads -------------------------------------------------------------------------------

    async def _value(self, key: str, stored: bytes, revision: int, stale_ok: bool) -> bytes:
        """The value of `key` from its stored form read at `revision` (parts read there)."""
        if not stored:
            raise SchedulerError(f"state value of {key!r} is empty: not written by syncbit")
        if stored[0] != _PARTS:
            payload = stored[1:]
            if len(payload) < _THREAD_MIN:
                return _decode(stored[0], payload, key)
            value: bytes = await trio.to_thread.run_sync(_decode, stored[0], payload, key)
            return value
        try:
            header = json.loads(stored[1:])
            digest, count, codec = str(header["digest"]), int(header["parts"]), header["codec"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SchedulerError(f"state value of {key!r} has a corrupt header") from exc
        chunks: list[bytes] = []
        after: bytes | None = None
        prefix = self._parts(key, digest)
        while len(chunks) < count:
            page = await self.client.range_prefix(
                prefix, after=after, limit=_PARTS_PER_READ, revision=revision, stale_ok=stale_ok
            )
            chunks.extend(kv.value for kv in page.kvs)
            if not page.more:
                break
            after = page.kvs[-1].key
        payload = b"".join(chunks)

        def check_and_decode() -> bytes:
            if len(chunks) != count or hashlib.sha256(payload).hexdigest() != digest:
                raise SchedulerError(
                    f"state value of {key!r} is corrupt: its parts do not match their digest"
                )
            return _decode(int(codec), payload, key)

        result: bytes = await trio.to_thread.run_sync(check_and_decode)
        return result

    async def _entry(self, kv: KeyValue, revision: int, stale_ok: bool) -> Entry:
        key = kv.key[len(self._kv) :].decode()
        return Entry(key, await self._value(key, kv.value, revision, stale_ok), kv.mod_revision)

    async def get(self, key: str, *, stale_ok: bool = False) -> Entry | None:
        check_key(key)
        raw = self._kv_key(key)
        for _ in range(_ATTEMPTS):
            found = await self.client.range(raw, limit=1, stale_ok=stale_ok)
            if not found.kvs:
                return None
            try:
                return await self._entry(found.kvs[0], found.revision, stale_ok)
            except RevisionCompactedError:
                continue  # rewritten and compacted between the two reads: read again
        raise StateUnavailableError(f"state value of {key!r} kept changing while read")

    async def list_prefix(
        self,
        prefix: str,
        *,
        after: str | None = None,
        limit: int = DEFAULT_PAGE,
        revision: int = 0,
        stale_ok: bool = False,
    ) -> Page:
        raw = self._kv + check_prefix(prefix)
        check_limit(limit)
        page = await self.client.range_prefix(
            raw,
            after=None if after is None else self._kv_key(after),
            limit=limit,
            revision=revision,
            stale_ok=stale_ok,
        )
        at = revision or page.revision
        entries = [await self._entry(kv, at, stale_ok) for kv in page.kvs]
        return Page(entries, entries[-1].key if page.more and entries else None, at)

    async def generation(self, *, stale_ok: bool = False) -> int:
        found = await self.client.range(self._generation, limit=1, stale_ok=stale_ok)
        return found.kvs[0].mod_revision if found.kvs else 0

    # -- writes ------------------------------------------------------------------------------

    async def _plan(self, writes: Sequence[Put | Delete]) -> list[_Planned | Delete]:
        """Encode every Put: inline while the commit's inline budget lasts, else parts."""
        budget = INLINE_BUDGET
        planned: list[_Planned | Delete] = []
        for write in writes:
            if isinstance(write, Delete):
                planned.append(write)
                continue
            if len(write.value) >= _THREAD_MIN:
                codec, payload = await trio.to_thread.run_sync(_encode, write.value)
            else:
                codec, payload = _encode(write.value)
            if len(payload) < INLINE_MAX and len(payload) <= budget:
                budget -= len(payload)
                planned.append(_Planned(write.key, bytes([codec]) + payload))
                continue
            digest = await trio.to_thread.run_sync(_sha256, payload)
            parts = tuple(payload[i : i + PART_BYTES] for i in range(0, len(payload), PART_BYTES))
            header = {
                "digest": digest,
                "parts": len(parts),
                "size": len(write.value),
                "codec": codec,
            }
            stored = bytes([_PARTS]) + json.dumps(header).encode()
            planned.append(_Planned(write.key, stored, digest, parts))
        return planned

    def _ops(self, plan: list[_Planned | Delete], bump: bool) -> list[Op]:
        ops: list[Op] = []
        for item in plan:
            blobs = self._blobs(item.key)
            if isinstance(item, Delete):
                ops += [DeleteOp(self._kv_key(item.key)), DeleteOp(blobs, prefix_end(blobs))]
            elif item.digest:
                mine = self._parts(item.key, item.digest)
                ops.append(PutOp(self._kv_key(item.key), item.header))
                ops.append(DeleteOp(blobs, mine))  # every other part of this key
                ops.append(DeleteOp(prefix_end(mine), prefix_end(blobs)))
            else:
                ops.append(PutOp(self._kv_key(item.key), item.header))
                ops.append(DeleteOp(blobs, prefix_end(blobs)))
        if bump:
            ops.append(PutOp(self._generation, b""))
        if len(ops) > MAX_TXN_OPS:
            raise StateLimitError(
                f"a commit of {len(plan)} keys needs {len(ops)} etcd operations; etcd allows "
                f"{MAX_TXN_OPS} per transaction (--max-txn-ops): commit fewer keys at once"
            )
        return ops

    async def commit(
        self, writes: Sequence[Put | Delete], *, checks: Sequence[Check] = (), bump: bool = False
    ) -> Commit:
        check_writes(writes, checks)
        plan = await self._plan(writes)
        ops = self._ops(plan, bump)
        for _ in range(_ATTEMPTS):
            fence = self._fence() if self._fence is not None else None
            big = [p for p in plan if isinstance(p, _Planned) and p.digest]
            for item in big:
                for index, part in enumerate(item.parts):
                    await self.client.put(self._part(item.key, item.digest, index), part)
            compares = [
                Compare.absent(self._kv_key(c.key))
                if c.revision == 0
                else Compare.modified_at(self._kv_key(c.key), c.revision)
                for c in checks
            ]
            # Parts are removed a whole value at a time: part 0 present means all are.
            compares += [
                Compare(self._part(p.key, p.digest, 0), Target.CREATE, 0, Order.NOT_EQUAL)
                for p in big
            ]
            if fence is not None:
                compares.append(fence)
            failure: list[Op] = [] if fence is None else [RangeOp(fence.key)]
            result = await self.client.txn(compares, ops, failure)
            if result.succeeded:
                deleted = sum(
                    r.deleted
                    for op, r in zip(ops, result.results, strict=True)
                    if isinstance(op, DeleteOp) and isinstance(r, DeleteResult) and not op.range_end
                )
                return Commit(True, result.revision, deleted)
            if fence is not None:
                found = result.results[0] if result.results else None
                kv = found.kvs[0] if isinstance(found, RangeResult) and found.kvs else None
                if not fence.holds(kv):
                    raise NotLeaderError("this scheduler's leadership ended before its write")
            if not big or await self._checks_failed(checks):
                return Commit(False, result.revision)
            log.info("state commit: parts removed by a concurrent commit; writing them again")
        raise StateUnavailableError("state commit kept losing its parts to concurrent commits")

    async def _checks_failed(self, checks: Sequence[Check]) -> bool:
        """Whether one of `checks` fails now (else only a large value's parts went)."""
        for check in checks:
            found = await self.client.range(self._kv_key(check.key), limit=1)
            now = found.kvs[0].mod_revision if found.kvs else 0
            if now != check.revision:
                return True
        return False

    # -- watches -----------------------------------------------------------------------------

    def watch(self, prefix: str, since: int) -> EtcdChanges:
        # Every key: the whole root, so that generation moves come in order with the
        # changes of their commits (the parts of large values are skipped).
        raw = self._root if not prefix else self._kv + check_prefix(prefix)
        return EtcdChanges(self, self.client.watch(raw, prefix_end(raw), start_revision=since + 1))

    async def aclose(self) -> None:
        """The client belongs to the caller (the election shares it): nothing to release."""


class EtcdChanges:
    """A watch on an `EtcdStore` (see `kv.ChangeStream`)."""

    def __init__(self, store: EtcdStore, watch: Watch) -> None:
        self._store = store
        self._watch = watch
        self._pending: deque[Change | Bumped | Resync] = deque()
        self._resynced = 0  # changes up to this revision are in the watcher's re-read

    async def __aenter__(self) -> EtcdChanges:
        await self._watch.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._watch.__aexit__(*exc)

    def __aiter__(self) -> EtcdChanges:
        return self

    async def __anext__(self) -> Change | Bumped | Resync:
        store = self._store
        while not self._pending:
            batch = await self._watch.__anext__()
            if batch.compacted:
                return Resync(batch.revision)
            for event in batch.events:
                kv = event.kv
                if kv.mod_revision <= self._resynced:
                    continue
                if kv.key == store._generation:
                    self._pending.append(Bumped(kv.mod_revision))
                    continue
                if not kv.key.startswith(store._kv):
                    continue  # a large value's parts: its header follows in the commit
                key = kv.key[len(store._kv) :].decode()
                if event.type is EventType.DELETE:
                    self._pending.append(Change(key, None, kv.mod_revision))
                    continue
                try:
                    value = await store._value(key, kv.value, kv.mod_revision, False)
                except RevisionCompactedError:
                    # Its parts are overwritten and compacted away: the watcher re-reads.
                    self._resynced = await store.client.revision()
                    self._pending.append(Resync(self._resynced))
                    break
                self._pending.append(Change(key, value, kv.mod_revision))
        return self._pending.popleft()
