"""Local and NFS sources: `file:///dir` (walked recursively) or `file:///dir/one.file`.

Owns pinning each file to its size and mtime_ns, recording owners and modes (so the mount
is never more readable than the source), and reading ranges with `preadv` through a small
thread-safe cache of open descriptors. It never opens anything outside the process's
`file_roots` (real paths: no symlink or `..` leads out), never follows a symlink out of the
source's root, and never reads a file whose size or mtime differs from the recorded version.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import trio

from syncbit.chunks import digest, head_length, identity_digest
from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
    UnsafePathError,
)
from syncbit.manifest import FileEntry, Perm, safe_relpath
from syncbit.sources.base import Listing, Source, pinned_size, register
from syncbit.sources.fences import Fences, inside
from syncbit.wire import Abort

__all__ = ["FileSource"]

log = logging.getLogger("syncbit.sources.file")

DEFAULT_MAX_OPEN = 64
# Errors a network filesystem returns while the server is away: worth retrying.
_TEMPORARY_ERRNOS = frozenset(
    {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.ENOTCONN, errno.EHOSTDOWN}
)


@dataclass(eq=False)
class _Fd:
    fd: int
    refs: int = 0
    evicted: bool = False


class _FdCache:
    """Open descriptors by key, LRU-bounded. A descriptor is closed only once no reader
    holds it, so a concurrent `preadv` never sees its fd number reused by another file."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Fd] = OrderedDict()

    def acquire(self, key: str, opener: Callable[[], int]) -> _Fd:
        with self._lock:
            handle = self._open.get(key)
            if handle is not None:
                handle.refs += 1
                self._open.move_to_end(key)
                return handle
        fd: int = opener()  # outside the lock: an open on NFS may block for long
        to_close: list[int] = []
        with self._lock:
            handle = self._open.get(key)
            if handle is not None:
                to_close.append(fd)  # another thread opened it meanwhile: use theirs
            else:
                handle = self._open[key] = _Fd(fd)
                while len(self._open) > self.limit:
                    _, old = self._open.popitem(last=False)
                    old.evicted = True
                    if old.refs == 0:
                        to_close.append(old.fd)
            handle.refs += 1
        for stale in to_close:
            os.close(stale)
        return handle

    def release(self, handle: _Fd) -> None:
        with self._lock:
            handle.refs -= 1
            close = handle.evicted and handle.refs == 0
        if close:
            os.close(handle.fd)

    def discard(self, key: str, handle: _Fd) -> None:
        """Forget `handle` (closed when its last reader releases it)."""
        with self._lock:
            if self._open.get(key) is handle:
                del self._open[key]
                handle.evicted = True

    def close(self) -> None:
        with self._lock:
            handles = list(self._open.values())
            self._open.clear()
            for handle in handles:
                handle.evicted = True
            idle = [h.fd for h in handles if h.refs == 0]
        for fd in idle:
            os.close(fd)


@register
class FileSource(Source):
    """A local or NFS directory tree (or one file) named by a `file:///abs/path` URI.

    Options: `max_open_files` (descriptors kept open between reads). Every entry carries
    the owner and mode of its file, and the listing those of its directories; a
    directory above the source that not everyone may pass narrows them further.
    """

    schemes = ("file",)

    def __init__(
        self, uri: str, options: dict[str, Any] | None = None, fences: Fences | None = None
    ) -> None:
        super().__init__(uri, options, fences)
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise InvalidSourceError(
                f"invalid file source {uri!r}: only local paths (file:///path) are supported"
            )
        path = unquote(parts.path, errors="surrogateescape")
        if not path.startswith("/"):
            raise InvalidSourceError(f"invalid file source {uri!r}: the path must be absolute")
        self.path = os.path.abspath(path)
        self.fences.check_file(self.path, uri)
        self._fds = _FdCache(int(self.options.get("max_open_files", DEFAULT_MAX_OPEN)))
        self._root_real: str | None = None

    # -- listing ---------------------------------------------------------------------------

    async def list(self) -> Listing:
        listing: Listing = await trio.to_thread.run_sync(self._list_blocking)
        return listing

    def _list_blocking(self) -> Listing:
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            raise InvalidSourceError(f"nothing at {self.uri}: {self.path} does not exist") from None
        except OSError as exc:
            raise _map_oserror(exc, self.path, listing=True) from exc
        # Again now: the path may have become a symlink out of the roots since it was named.
        real = self.fences.check_file(self.path, self.uri)
        try:
            above = _reach_mask(st.st_uid, _parents(os.path.dirname(real), "/"))
            if stat.S_ISREG(st.st_mode):
                name = _checked_name(os.path.basename(self.path), self.path)
                return Listing(files=[_entry(name, self.path, real, st, above)])
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidSourceError(f"{self.path} is neither a regular file nor a directory")
            listing = _walk(real)
        except OSError as exc:
            raise _map_oserror(exc, getattr(exc, "filename", None) or real, True) from exc
        listing.dir_perms[""] = _perm(st, above)
        return listing

    # -- reads -----------------------------------------------------------------------------

    def read_into(
        self, entry: FileEntry, offset: int, buf: memoryview, abort: Abort | None = None
    ) -> None:
        want = len(buf)
        if want == 0:
            return
        pinned_size(entry, offset, want)  # a range outside the pinned size is a bug
        path = self._path_of(entry)
        try:
            handle = self._fds.acquire(entry.locator, lambda: self._open(entry, path))
        except FileNotFoundError:
            raise self._changed(entry, path, "the file is gone") from None
        except OSError as exc:
            raise _map_oserror(exc, path) from exc
        try:
            st = os.fstat(handle.fd)
            if st.st_nlink == 0:
                # Deleted or renamed over since it was opened: the descriptor still reads
                # the old bytes, but no new open could, so report it now, consistently.
                self._fds.discard(entry.locator, handle)
                raise self._changed(entry, path, "the file is gone")
            if not _same_version(st, entry.version):
                self._fds.discard(entry.locator, handle)
                raise self._changed(entry, path, f"now size={st.st_size} mtime_ns={st.st_mtime_ns}")
            done = 0
            while done < want:
                n = os.preadv(handle.fd, [buf[done:]], offset + done)
                if n == 0:
                    self._fds.discard(entry.locator, handle)
                    raise self._changed(entry, path, f"ends after {offset + done} bytes")
                done += n
        except OSError as exc:
            raise _map_oserror(exc, path) from exc
        finally:
            self._fds.release(handle)

    def close(self) -> None:
        self._fds.close()

    def _path_of(self, entry: FileEntry) -> str:
        if os.path.isabs(entry.locator):
            if entry.locator != self.path:
                raise SourceError(f"{entry.locator} is not part of source {self.uri}")
            return self.path
        return os.path.join(self.path, safe_relpath(entry.locator))

    def _open(self, entry: FileEntry, path: str) -> int:
        real = self.fences.check_file(path, self.uri)
        if entry.locator != self.path:
            if self._root_real is None:
                self._root_real = os.path.realpath(self.path)
            if not inside(self._root_real, real):
                # A symlink was swapped to point out of the root since the listing.
                raise self._changed(entry, path, "it now leads outside the source root")
        # O_NOFOLLOW: a swap of the last component between the check and the open fails.
        return os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)

    @staticmethod
    def _changed(entry: FileEntry, path: str, why: str) -> SourceChangedError:
        version = entry.version
        return SourceChangedError(
            f"source changed: {path} no longer has version size={version.get('size')} "
            f"mtime_ns={version.get('mtime_ns')} ({why})"
        )


def _same_version(st: os.stat_result, version: dict[str, str]) -> bool:
    return str(st.st_size) == version.get("size") and str(st.st_mtime_ns) == version.get("mtime_ns")


def _map_oserror(
    exc: OSError, path: str, listing: bool = False
) -> SourceError | InvalidSourceError:
    what = "list" if listing else "read"
    reason = exc.strerror or str(exc)
    if exc.errno in _TEMPORARY_ERRNOS:
        return SourceUnavailableError(f"cannot {what} {path}: {reason}")
    if listing:
        return InvalidSourceError(f"cannot list {path}: {reason}")
    return SourceError(f"cannot read {path}: {reason}")


def _checked_name(name: str, where: str) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"unsafe file name {name!r} at {where!r}: not valid UTF-8") from None
    return safe_relpath(name)


def _entry(path: str, locator: str, real: str, st: os.stat_result, mask: int = 0o7777) -> FileEntry:
    size, mtime_ns = st.st_size, st.st_mtime_ns
    version = {"size": str(size), "mtime_ns": str(mtime_ns)}
    # Size and mtime can stay while the bytes change (a rewrite in place that restores the
    # mtime): the head sample, checked on every source read, catches most such changes.
    head = _head_sample(real, size)
    if head:
        version["head"] = head
    return FileEntry(
        path=path,
        size=size,
        mode=stat.S_IMODE(st.st_mode) & mask,
        uid=st.st_uid,
        gid=st.st_gid,
        object=identity_digest("file", real, str(size), str(mtime_ns), str(st.st_ino), head),
        locator=locator,
        version=version,
    )


def _perm(st: os.stat_result, mask: int = 0o7777) -> Perm:
    return Perm(mode=stat.S_IMODE(st.st_mode) & mask, uid=st.st_uid, gid=st.st_gid)


def _parents(directory: str, stop: str) -> Iterable[os.stat_result]:
    """The stat of `directory` and of each directory above it, up to `stop` (exclusive
    unless it is `/`)."""
    current = directory
    while True:
        if current == stop and stop != "/":
            return
        yield os.stat(current)
        if current in ("/", stop):
            return
        current = os.path.dirname(current)


def _reach_mask(uid: int, passed: Iterable[os.stat_result]) -> int:
    """The permission bits an object owned by `uid` may keep on the mount, where the
    directories `passed` on its way at the source are not: all of them when everyone may
    pass each (`--x--x--x`), only the owner's when one of them only its owner (being
    `uid`) may pass, none otherwise. Stricter than the kernel where groups decide, never
    looser."""
    mask = 0o7777
    for st in passed:
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o111 == 0o111:
            continue
        mask &= 0o700
        if st.st_uid != uid or not mode & stat.S_IXUSR:
            return 0
    return mask


def _head_sample(real: str, size: int) -> str:
    """Digest of the first `head_length(size)` bytes of a file; "" for an empty file, or
    one this process may not read (its nodes may; they then read it unchecked)."""
    n = head_length(size)
    if not n:
        return ""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.info("no head sample of %s: %s", real, exc.strerror or exc)
        return ""
    try:
        data = os.pread(fd, n, 0)
    except OSError as exc:
        log.info("no head sample of %s: %s", real, exc.strerror or exc)
        return ""
    finally:
        os.close(fd)
    return digest(data) if len(data) == n else ""


def _walk(root: str) -> Listing:
    """Every regular file and directory under the real path `root`.

    Symlinks are followed only when their target stays inside `root`; a directory link back
    to one of its own ancestors (a loop) is skipped.
    """
    root_st = os.stat(root)
    files: list[FileEntry] = []
    dirs: list[str] = []
    perms: dict[str, Perm] = {}
    # (real directory, relative prefix, (dev, ino) of the directories above it)
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
        (root, "", frozenset({(root_st.st_dev, root_st.st_ino)}))
    ]
    while stack:
        directory, prefix, ancestors = stack.pop()
        with os.scandir(directory) as it:
            items = sorted(it, key=lambda e: e.name)
        for item in items:
            rel = safe_relpath(prefix + _checked_name(item.name, item.path))
            target = item.path
            linked = item.is_symlink()
            if linked:
                target = os.path.realpath(item.path)
                if not inside(root, target):
                    log.info("skipping %s: the symlink leads outside %s", item.path, root)
                    continue
            try:
                st = os.stat(target)
                # A link shows its target where the link is: the directories between the
                # root and the target, which the mount does not show, still count.
                mask = (
                    _reach_mask(st.st_uid, _parents(os.path.dirname(target), root))
                    if linked
                    else 0o7777
                )
            except FileNotFoundError:
                continue  # removed while we walked, or a dangling link
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    log.info("skipping %s: a symlink loop", item.path)
                    continue
                dirs.append(rel)
                perms[rel] = _perm(st, mask)
                stack.append((target, rel + "/", ancestors | {key}))
            elif stat.S_ISREG(st.st_mode):
                files.append(_entry(rel, rel, target, st, mask))
    return Listing(files=sorted(files, key=lambda e: e.path), dirs=sorted(dirs), dir_perms=perms)
