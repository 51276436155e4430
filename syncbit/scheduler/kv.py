"""The durable key-value store under the scheduler's durable facts (datasets and their
manifests, assignments, node labels, the generation), behind one small async interface.

Two implementations: `kv_lmdb.LmdbStore` (one node, the default) and `kv_etcd.EtcdStore`
(replicated schedulers). This module owns the contract and the limits both enforce; it
must never hold soft state (heartbeats, chunk holders, loads live in the leader's memory).

The contract:

- Keys are text (1-400 bytes of UTF-8, no control characters); values are bytes of at
  most `MAX_VALUE_BYTES`. Every commit gets the next store revision (a store-wide counter
  that only grows); an entry's `revision` is that of its last write.
- `commit` applies its writes atomically, and only if every `Check` holds (the key's
  revision is exactly the one given; 0 means absent): compare-and-swap on several keys.
- `bump=True` makes the commit's revision the store's new generation, in the same atomic
  step: nodes long-poll the generation and look closer only when it moves.
- `list_prefix` returns one page, never the whole prefix at once; `watch(prefix, since)`
  yields every change after revision `since`, in revision order. When that history is
  gone (etcd compacted it; LMDB keeps only recent commits, in memory) it yields
  `Resync(revision)`: re-read the prefix, then the changes after `revision` follow. A
  watch of every key (prefix "") also yields `Bumped(revision)` when a commit moved the
  generation, after that commit's changes: how a replica's copy follows the generation.
- Only the leading scheduler writes (`kv_etcd` fences writes on its election term); any
  replica reads, with `stale_ok=True` even without an etcd quorum (its member's copy).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from syncbit.errors import StateLimitError, UserError

MAX_KEY_BYTES = 400  # LMDB's key limit is 511; room for implementation prefixes
MAX_VALUE_BYTES = 64 * 2**20  # a manifest of ~200,000 files; more is refused, never cut
DEFAULT_PAGE = 100
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Entry:
    """A key, its value, and the revision of the commit that last wrote it."""

    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class Page:
    """One page of `list_prefix`: entries in key order; `next` to pass as `after` for the next
    page (None: this was the last); `revision` the store revision it was read at."""

    entries: list[Entry]
    next: str | None
    revision: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


@dataclass(frozen=True, slots=True)
class Check:
    """The commit happens only if `key` was last written at `revision` (0: it is absent)."""

    key: str
    revision: int


@dataclass(frozen=True, slots=True)
class Commit:
    """Whether every check held and the writes happened; the store revision after the
    commit; how many keys its deletes removed."""

    ok: bool
    revision: int
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    """A key written (`value`) or deleted (`value` None) at `revision`."""

    key: str
    value: bytes | None
    revision: int


@dataclass(frozen=True, slots=True)
class Bumped:
    """A commit at `revision` moved the generation (after that commit's `Change`s)."""

    revision: int


@dataclass(frozen=True, slots=True)
class Resync:
    """Changes up to `revision` were lost to the watcher: re-read the prefix (at
    `revision` where the store keeps history); what follows happened after it."""

    revision: int


class ChangeStream(Protocol):
    """An open watch: `async with store.watch(p, since) as changes: async for c in changes`."""

    async def __aenter__(self) -> ChangeStream: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def __aiter__(self) -> ChangeStream: ...

    async def __anext__(self) -> Change | Bumped | Resync: ...


class DurableStore(abc.ABC):
    """The interface (see the module docstring)."""

    @abc.abstractmethod
    async def get(self, key: str, *, stale_ok: bool = False) -> Entry | None:
        """The entry of `key`, or None."""

    @abc.abstractmethod
    async def list_prefix(
        self,
        prefix: str,
        *,
        after: str | None = None,
        limit: int = DEFAULT_PAGE,
        revision: int = 0,
        stale_ok: bool = False,
    ) -> Page:
        """One page of the entries whose key starts with `prefix` and sorts after `after`,
        at most `limit` (1-`MAX_PAGE`). `revision`: read at that store revision (the first
        page's, for one consistent view) where the store keeps history; LMDB reads the
        current state, which is at least as new."""

    @abc.abstractmethod
    async def commit(
        self, writes: Sequence[Put | Delete], *, checks: Sequence[Check] = (), bump: bool = False
    ) -> Commit:
        """Apply `writes` atomically if every check holds; `bump` makes this commit's
        revision the new generation."""

    @abc.abstractmethod
    async def generation(self, *, stale_ok: bool = False) -> int:
        """The revision of the last commit made with `bump=True` (0: none yet)."""

    @abc.abstractmethod
    def watch(self, prefix: str, since: int) -> ChangeStream:
        """Changes to keys starting with `prefix` after revision `since`."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the store; watches end."""

    async def put(self, key: str, value: bytes, *, bump: bool = False) -> int:
        """Write one key unconditionally; the revision of the write."""
        return (await self.commit([Put(key, value)], bump=bump)).revision

    async def delete(self, key: str, *, bump: bool = False) -> bool:
        """Delete one key; whether it existed."""
        return (await self.commit([Delete(key)], bump=bump)).deleted > 0

    async def __aenter__(self) -> DurableStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def check_key(key: str) -> bytes:
    """The key's bytes; UserError for an empty, overlong or control-character key."""
    raw = key.encode()
    if not key or len(raw) > MAX_KEY_BYTES or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise UserError(f"invalid state key {key!r}: 1-{MAX_KEY_BYTES} printable bytes")
    return raw


def check_prefix(prefix: str) -> bytes:
    """Like `check_key`, but the empty prefix (every key) is allowed."""
    return check_key(prefix) if prefix else b""


def check_value(key: str, value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise StateLimitError(
            f"state value of {key!r} is {len(value):,} bytes; at most {MAX_VALUE_BYTES:,} "
            "are stored"
        )


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"page limit must be 1-{MAX_PAGE}, not {limit}")
    return limit


def check_writes(writes: Sequence[Put | Delete], checks: Sequence[Check]) -> None:
    """Validate a commit's keys and values before anything is written; a key is written
    at most once per commit (etcd refuses more)."""
    seen: set[str] = set()
    for write in writes:
        check_key(write.key)
        if write.key in seen:
            raise ValueError(f"commit writes {write.key!r} twice")
        seen.add(write.key)
        if isinstance(write, Put):
            check_value(write.key, write.value)
    for check in checks:
        check_key(check.key)
        if check.revision < 0:
            raise ValueError(f"check of {check.key!r}: revision {check.revision} < 0")
