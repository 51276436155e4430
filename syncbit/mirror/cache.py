"""The mirror's own cache of verified registry content: a directory of blobs and manifests
by digest, within a byte budget.

Owns `<root>/blobs/sha256/<hex>` (complete, verified content), `<root>/types/sha256/<hex>`
(a manifest's media type) and `<root>/tmp/` (content on its way in). A blob is written to
a temporary file while it is hashed, fsynced and renamed into place only when its sha256
matched: nothing unverified is ever under `blobs/`, and what fails is deleted and named in
the log. One fill per digest at a time (later callers wait and take its result). Eviction
unlinks the least recently used files over the budget; a reader's open descriptor keeps
its bytes readable (POSIX), so nothing in use is ever cut short. Concurrency: the index
is touched only on the trio thread between awaits; file I/O and hashing run in threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from syncbit.errors import RegistryError
from syncbit.mirror.backend import BLOB_TYPE, Content

__all__ = ["BlobCache", "CachedBlob", "Sink"]

log = logging.getLogger("syncbit.mirror.cache")

MAX_READ = 4 * 1024 * 1024  # one read of a held blob (`Blob.read`'s contract)
_HEX = re.compile(r"^[0-9a-f]{64}$")
_MEDIA_TYPE = re.compile(r"^[\x21-\x7e]{1,255}$")


def check_digest(digest: str) -> str:
    """The hex of a `sha256:<hex>` digest (ValueError for anything else)."""
    algorithm, _, hex_digest = digest.partition(":")
    if algorithm != "sha256" or not _HEX.match(hex_digest):
        raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
    return hex_digest


class Sink:
    """Where a fill writes the bytes it receives (in a worker thread): a temporary file,
    hashed as it grows, refused past `limit` bytes."""

    def __init__(self, fd: int, limit: int, what: str) -> None:
        self._fd = fd
        self._hash = hashlib.sha256()
        self.limit = limit
        self.written = 0
        self._what = what

    def write(self, data: bytes | memoryview) -> None:
        if self.written + len(data) > self.limit:
            raise RegistryError(
                f"{self._what}: the registry sends more than {self.limit} bytes (its size, or "
                "the cache's budget): rejected, nothing served",
                "SIZE_INVALID",
                502,
            )
        view = memoryview(data)
        while view:
            done = os.write(self._fd, view)
            view = view[done:]
        self._hash.update(data)
        self.written += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


# A fill: receives the Sink, writes the content into it, returns the media type of a
# manifest (None for a blob). Runs in a worker thread.
Fetch = Callable[[Sink], str | None]


@dataclass
class _Entry:
    size: int
    media_type: str | None  # None: stored as a blob, its manifest media type unknown


class CachedBlob:
    """An open, verified file of the cache (the `Blob` of the backend interface)."""

    def __init__(self, content: Content, fd: int) -> None:
        self._content = content
        self._fd = fd

    @property
    def content(self) -> Content:
        return self._content

    async def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or not 0 <= length <= MAX_READ:
            raise ValueError(f"read of {length} bytes at {offset}: out of bounds")
        data: bytes = await trio.to_thread.run_sync(os.pread, self._fd, length, offset)
        return data


class BlobCache:
    """Verified content by digest, at most `max_bytes` of it (the newest entry may exceed
    the budget alone: it is what is being served). Make with `await BlobCache.open(...)`."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._flights: dict[str, tuple[trio.Lock, int]] = {}  # hex -> (lock, waiters)
        self.total = 0

    @classmethod
    async def open(cls, root: Path, max_bytes: int) -> BlobCache:
        cache = cls(root, max_bytes)
        found = await trio.to_thread.run_sync(cache._scan)
        for hex_digest, entry in found:
            cache._index[hex_digest] = entry
            cache.total += entry.size
        await cache._evict()
        return cache

    def _dir(self, kind: str) -> Path:
        return self.root / kind / "sha256" if kind != "tmp" else self.root / "tmp"

    def _scan(self) -> list[tuple[str, _Entry]]:
        """What a previous run left: complete files (oldest first); leftovers removed."""
        for kind in ("blobs", "types", "tmp"):
            self._dir(kind).mkdir(parents=True, exist_ok=True)
        for leftover in self._dir("tmp").iterdir():
            leftover.unlink(missing_ok=True)  # a fill the last run did not finish
        found: list[tuple[float, str, _Entry]] = []
        for path in self._dir("blobs").iterdir():
            if not _HEX.match(path.name):
                continue
            stat = path.stat()
            found.append((stat.st_mtime, path.name, _Entry(stat.st_size, self._type(path.name))))
        for path in self._dir("types").iterdir():
            if not (self._dir("blobs") / path.name).exists():
                path.unlink(missing_ok=True)
        return [(hex_digest, entry) for _, hex_digest, entry in sorted(found)]

    def _type(self, hex_digest: str) -> str | None:
        try:
            text = (self._dir("types") / hex_digest).read_text("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if _MEDIA_TYPE.match(text) else None

    def lookup(self, digest: str, manifest: bool = False) -> Content | None:
        """What the cache holds for `digest` (as a manifest: only with its media type)."""
        hex_digest = check_digest(digest)
        entry = self._index.get(hex_digest)
        if entry is None or (manifest and entry.media_type is None):
            return None
        media_type = (entry.media_type if manifest else None) or BLOB_TYPE
        return Content(digest, entry.size, media_type)

    @contextlib.asynccontextmanager
    async def held(self, content: Content) -> AsyncIterator[CachedBlob | None]:
        """The cached file of `content` open for reading; None if it went meanwhile."""
        hex_digest = check_digest(content.digest)
        path = self._dir("blobs") / hex_digest
        try:
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(hex_digest)
            yield None
            return
        try:
            if hex_digest in self._index:
                self._index.move_to_end(hex_digest)
            yield CachedBlob(content, fd)
        finally:
            os.close(fd)

    async def ensure(
        self,
        digest: str,
        fetch: Fetch,
        size: int | None,
        what: str,
        manifest: bool = False,
        limiter: trio.CapacityLimiter | None = None,
        limit: int | None = None,
    ) -> Content:
        """The content of `digest`, from the cache or filled by `fetch` in a worker thread
        (under `limiter`); one fill per digest at a time, and those who wait take its
        result, or try themselves when it failed. A fill takes at most `limit` bytes
        (default: `size` when known, else the cache's budget)."""
        hex_digest = check_digest(digest)
        lock, waiters = self._flights.get(hex_digest, (trio.Lock(), 0))
        self._flights[hex_digest] = (lock, waiters + 1)
        try:
            async with lock:
                found = self.lookup(digest, manifest)
                if found is not None:
                    return found
                return await self._fill(hex_digest, fetch, size, what, limiter, limit)
        finally:
            lock, waiters = self._flights[hex_digest]
            if waiters == 1:
                del self._flights[hex_digest]
            else:
                self._flights[hex_digest] = (lock, waiters - 1)

    async def _fill(
        self,
        hex_digest: str,
        fetch: Fetch,
        size: int | None,
        what: str,
        limiter: trio.CapacityLimiter | None,
        limit: int | None = None,
    ) -> Content:
        if limit is None:
            limit = size if size is not None else self.max_bytes
        entry = await trio.to_thread.run_sync(
            self._fill_sync, hex_digest, fetch, limit, what, limiter=limiter
        )
        if size is not None and entry.size != size:
            # The digest matched, so the bytes are right and the size given was not.
            log.warning("%s: %d bytes, not the %d asked for", what, entry.size, size)
        old = self._index.pop(hex_digest, None)
        self.total += entry.size - (old.size if old else 0)
        self._index[hex_digest] = entry
        log.info("stored %s: %d bytes, sha256 verified", what, entry.size)
        await self._evict()
        return Content(f"sha256:{hex_digest}", entry.size, entry.media_type or BLOB_TYPE)

    def _fill_sync(self, hex_digest: str, fetch: Fetch, limit: int, what: str) -> _Entry:
        tmp = self._dir("tmp") / f"{hex_digest}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                sink = Sink(fd, limit, what)
                media_type = fetch(sink)
                got = sink.hexdigest()
                if got != hex_digest:
                    log.warning(
                        "rejected sha256:%s (%s): the registry's bytes hash to sha256:%s",
                        hex_digest,
                        what,
                        got,
                    )
                    raise RegistryError(
                        f"{what}: the registry's bytes do not match sha256:{hex_digest} (got "
                        f"sha256:{got}): rejected, nothing served",
                        "DIGEST_INVALID",
                        502,
                    )
                os.fsync(fd)
            finally:
                os.close(fd)
            if media_type is not None:
                self._write_type(hex_digest, media_type)
            os.rename(tmp, self._dir("blobs") / hex_digest)
            _fsync_dir(self._dir("blobs"))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _Entry(sink.written, media_type)

    def _write_type(self, hex_digest: str, media_type: str) -> None:
        if not _MEDIA_TYPE.match(media_type):
            raise ValueError(f"invalid media type {media_type[:80]!r}")
        tmp = self._dir("tmp") / f"{hex_digest}.type.{secrets.token_hex(4)}"
        try:
            with open(tmp, "w", encoding="ascii") as f:
                f.write(media_type)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self._dir("types") / hex_digest)
        finally:
            tmp.unlink(missing_ok=True)

    def _forget(self, hex_digest: str) -> None:
        entry = self._index.pop(hex_digest, None)
        if entry is not None:
            self.total -= entry.size

    async def _evict(self) -> None:
        """Least recently used entries out until the total fits the budget (the newest
        stays, alone if it must)."""
        victims = []
        while self.total > self.max_bytes and len(self._index) > 1:
            hex_digest, entry = self._index.popitem(last=False)
            self.total -= entry.size
            victims.append(hex_digest)
        if victims:
            await trio.to_thread.run_sync(self._unlink, victims)

    def _unlink(self, victims: list[str]) -> None:
        for hex_digest in victims:
            (self._dir("blobs") / hex_digest).unlink(missing_ok=True)
            (self._dir("types") / hex_digest).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
