"""FUSE operations: translates FUSE requests into tree lookups and fetcher reads.

Read-only. Knows no network and no disk layout. Every data access goes through `read()`,
and `_fail()` is the one place where a domain error becomes an errno; nothing but
`FUSEError` ever leaves a handler.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from itertools import count
from typing import Any, ParamSpec, TypeVar

from syncbit.errors import SourceChangedError, SyncbitError
from syncbit.fetch import Fetcher, OpenFile, OpenPrefetch
from syncbit.fs.tree import Node, Tree
from syncbit.fs.wire import ENOATTR, EntryAttributes, FileInfo, FUSEError, StatvfsData
from syncbit.manifest import Manifest
from syncbit.sources.base import Source
from syncbit.trace import TraceRecorder

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("syncbit.fs")

# The root lists datasets, which come and go: the kernel may cache it only briefly.
# Everything below a dataset directory is an immutable version: cache it for long.
_ROOT_TTL = 1.0
_IMMUTABLE_TTL = 3600.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


@contextmanager
def _fail(what: str) -> Iterator[None]:
    """Map every error of a handler to FUSEError (EIO unless it already is one)."""
    try:
        yield
    except FUSEError:
        raise
    except SourceChangedError as exc:
        log.error("%s: EIO: %s", what, exc)
        raise FUSEError(errno.EIO) from exc
    except (SyncbitError, OSError) as exc:  # OSError: the cache disk (one line, no trace)
        log.error("%s: EIO: %s", what, exc)
        raise FUSEError(errno.EIO) from exc
    except Exception as exc:
        log.exception("%s: EIO: unexpected error", what)
        raise FUSEError(errno.EIO) from exc


def _counted(op: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Count a FUSE operation and its errors by errno (for /metrics)."""
    name = op.__name__

    @functools.wraps(op)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        fs = args[0]
        assert isinstance(fs, SyncbitFS)
        fs.requests[name] += 1
        try:
            return await op(*args, **kwargs)
        except FUSEError as exc:
            fs.errors[(name, errno.errorcode.get(exc.errno, str(exc.errno)))] += 1
            raise

    return wrapper


class SyncbitFS:
    """The read-only /syncbit filesystem."""

    def __init__(
        self,
        tree: Tree,
        fetcher: Fetcher,
        source_for: Callable[[Manifest], Source],
        dataset_attrs: Callable[[str], dict[str, str]] | None = None,
        prefetch: OpenPrefetch | None = None,
        recorder: Callable[[Manifest], TraceRecorder | None] | None = None,
    ) -> None:
        self.tree = tree
        self.fetcher = fetcher
        self.source_for = source_for
        # Live attributes of a dataset directory (readiness, cached bytes), by dataset name.
        self.dataset_attrs = dataset_attrs
        self.prefetch = prefetch  # whole-file fetches started by opens of cold files
        # The access-trace recorder of a dataset version, if its reads are recorded.
        self.recorder = recorder
        self._recorders: dict[int, TraceRecorder] = {}  # by open handle
        self._handles: dict[int, OpenFile] = {}
        self._fh = count(1)
        self.requests: Counter[str] = Counter()  # by operation
        self.errors: Counter[tuple[str, str]] = Counter()  # by operation and errno name

    # -- attributes -------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _attr(self, node: Node) -> EntryAttributes:
        attr = EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = node.mode
        attr.st_nlink = 2 if node.is_dir else 1
        attr.st_size = node.size
        attr.st_blksize = 1 << 20
        attr.st_blocks = (node.size + 511) // 512
        ns = int(node.mtime * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = ns
        # With `default_permissions` the kernel checks these against the reader itself.
        attr.st_uid, attr.st_gid = node.uid, node.gid
        attr.attr_timeout = _ROOT_TTL if node.inode == self.tree.root.inode else _IMMUTABLE_TTL
        # A dataset's name may come to mean a new version: its root entry expires quickly.
        attr.entry_timeout = _ROOT_TTL if node.dataset_root else _IMMUTABLE_TTL
        return attr

    @_counted
    async def getattr(self, inode: int) -> EntryAttributes:
        return self._attr(self._node(inode))

    @_counted
    async def lookup(
        self,
        parent_inode: int,
        name: bytes,
    ) -> EntryAttributes:
        if name == b".":
            return self._attr(self._node(parent_inode))
        try:
            text = os.fsdecode(name)
        except UnicodeDecodeError:
            raise FUSEError(errno.ENOENT) from None
        node = self.tree.lookup(parent_inode, text)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return self._attr(node)

    @_counted
    async def access(self, inode: int, mode: int) -> bool:
        self._node(inode)
        return not mode & os.W_OK

    # -- directories ----------------------------------------------------------------------

    @_counted
    async def opendir(self, inode: int) -> int:
        if not self._node(inode).is_dir:
            raise FUSEError(errno.ENOTDIR)
        return inode

    def readdir(self, fh: int, start_id: int) -> Iterator[tuple[bytes, EntryAttributes, int]]:
        """Entries after position `start_id`, each with the position that follows it."""
        self.requests["readdir"] += 1
        node = self._node(fh)
        names = sorted((node.children or {}).items())
        # Offsets are positions in the sorted listing: stable while the version is.
        for position, (name, inode) in enumerate(names[start_id:], start_id + 1):
            yield os.fsencode(name), self._attr(self.tree.nodes[inode]), position

    # -- files ----------------------------------------------------------------------------

    @_counted
    async def open(self, inode: int, flags: int) -> FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        if flags & _WRITE_FLAGS:
            raise FUSEError(errno.EROFS)
        assert node.entry is not None and node.manifest is not None
        with _fail(f"open {node.manifest.dataset}/{node.entry.path}"):
            handle = self.fetcher.open(
                node.entry, node.manifest.chunk_size, self.source_for(node.manifest)
            )
            # Every byte here and verified: the kernel may read the object file itself.
            backing = await handle.backing_fd()
        self.fetcher.hold(handle)
        if backing is None and self.prefetch is not None:
            setting = node.manifest.source_options.get("prefetch_on_open")
            self.prefetch.opened(handle, node.manifest.chunk_size, setting)
        fh = next(self._fh)
        self._handles[fh] = handle
        recorder = self.recorder(node.manifest) if self.recorder is not None else None
        if recorder is not None:
            self._recorders[fh] = recorder
        # Content of a dataset version never changes: keep the page cache across opens.
        return FileInfo(fh=fh, keep_cache=True, backing_fd=backing)

    @_counted
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        recorder = self._recorders.get(fh)
        if recorder is not None:
            recorder.record(handle.entry.path, off, size)  # the order this reader needs
            recorder.reading += 1  # under way until it returns: not quiet meanwhile
        try:
            with _fail(f"read {handle.entry.path} @{off}+{size}"):
                return await self.fetcher.read(handle, off, size)
        finally:
            if recorder is not None:
                recorder.reading -= 1

    @_counted
    async def release(self, fh: int) -> None:
        self._recorders.pop(fh, None)
        handle = self._handles.pop(fh, None)
        if handle is not None:
            self.fetcher.release(handle)
            if self.prefetch is not None:
                self.prefetch.closed(handle)

    # -- the rest of a read-only filesystem --------------------------------------------------

    @_counted
    async def statfs(self) -> StatvfsData:
        total = sum(n.size for n in self.tree.nodes.values() if n.entry is not None)
        return StatvfsData(f_blocks=(total + 4095) // 4096, f_files=len(self.tree.nodes))

    @_counted
    async def getxattr(self, inode: int, name: bytes) -> bytes:
        value = self._xattrs(self._node(inode)).get(os.fsdecode(name))
        if value is None:
            raise FUSEError(ENOATTR)
        return value.encode()

    @_counted
    async def listxattr(self, inode: int) -> list[bytes]:
        return [k.encode() for k in self._xattrs(self._node(inode))]

    def _xattrs(self, node: Node) -> dict[str, str]:
        if node.manifest is None:
            return {}
        attrs = {
            "user.syncbit.dataset": node.manifest.dataset,
            "user.syncbit.revision": node.manifest.revision,
        }
        if node.entry is not None:
            attrs["user.syncbit.object"] = node.entry.object
        if node.dataset_root and self.dataset_attrs is not None:
            attrs.update(self.dataset_attrs(node.manifest.dataset))
        return attrs
