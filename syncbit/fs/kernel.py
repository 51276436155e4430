"""The FUSE kernel protocol on trio: mount, read requests from /dev/fuse, write replies.

Speaks the wire protocol itself (struct layouts from linux/fuse.h, protocol 7.40+ where the
kernel offers it) instead of going through libfuse, for one reason: passthrough. A file
whose bytes are all in the cache is opened with FOPEN_PASSTHROUGH on its object file, and
the kernel then serves every read, readahead and mmap fault of that open file straight
from the cache file (its own page cache, large folios) without a round trip to us. Warm
and hot reads run at the local disk's and page cache's speed, and the bytes sit in the
page cache once instead of twice. libfuse learnt passthrough in 3.17 and pyfuse3 not at
all; Debian 12 has 3.14. Files still being fetched use the ordinary cached READ path.

Knows no datasets: it calls an `Operations` object (see `fs.ops`) for every request. The
protocol's data (layouts, opcodes, records, the `Operations` protocol) is `fs.wire`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path

import trio

from syncbit.errors import SyncbitError
from syncbit.fs.wire import (  # the protocol data (package-private names included)
    _ACCESS,
    _ASYNC_READ,
    _ATTR_OUT,
    _BACKING_CLOSE,
    _BACKING_MAP,
    _BACKING_OPEN,
    _BIG_WRITES,
    _BUFFER,
    _DESTROY,
    _DO_READDIRPLUS,
    _FOPEN_KEEP_CACHE,
    _FOPEN_PASSTHROUGH,
    _GETATTR,
    _GETXATTR,
    _GETXATTR_OP,
    _IN,
    _INIT,
    _INIT_EXT,
    _INIT_IN,
    _INIT_OUT,
    _LISTXATTR,
    _LOOKUP,
    _MAX_PAGES,
    _MAX_PAGES_WANTED,
    _MNT_DETACH,
    _NO_REPLY,
    _NOTIFY_INVAL_ENTRY,
    _NOTIFY_INVAL_ENTRY_CODE,
    _OPEN,
    _OPEN_IN,
    _OPEN_OUT,
    _OPENDIR,
    _OUT,
    _PARALLEL_DIROPS,
    _PASSTHROUGH2,
    _READ,
    _READ_IN,
    _READDIR,
    _READDIRPLUS,
    _READDIRPLUS_AUTO,
    _RELEASE,
    _RELEASE_IN,
    _RELEASEDIR,
    _STATFS,
    _STATFS_OP,
    _WRITES,
    FileInfo,
    FUSEError,
    Operations,
    _dirent,
    _entry,
    _timeout,
)

log = logging.getLogger("syncbit.fs")

_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)


def _mount_syscall(fd: int, target: str, options: str) -> None:
    data = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},{options}"
    flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    if _libc.mount(b"syncbit", target.encode(), b"fuse.syncbit", flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mount_fusermount(target: str, options: str) -> int:
    """Mount through the setuid helper (not root): it hands back the /dev/fuse fd."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        opts = f"ro,fsname=syncbit,subtype=syncbit,{options}"
        proc = subprocess.run(
            ["fusermount3", "-o", opts, "--", target],
            env=env,
            pass_fds=[theirs.fileno()],
            capture_output=True,
            timeout=30,
        )
        theirs.close()  # ours: without the helper's end, recv below sees EOF, never hangs
        if proc.returncode != 0:
            raise OSError(errno.EPERM, proc.stderr.decode(errors="replace").strip())
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise OSError(errno.EIO, "fusermount3 sent no file descriptor")
        return fds[0]
    finally:
        ours.close()
        theirs.close()  # closing twice is a no-op


class Session:
    """One FUSE mount served by `ops` until unmounted or closed."""

    def __init__(
        self,
        ops: Operations,
        mountpoint: Path,
        *,
        passthrough: bool = True,
        use_helper: bool = False,
    ) -> None:
        self.ops = ops
        self.want_passthrough = passthrough
        self.mountpoint = str(mountpoint.absolute())
        self.use_helper = use_helper or os.geteuid() != 0
        self.fd = -1
        self.initialized = trio.Event()
        self.passthrough = False  # negotiated at INIT
        self.kernel_passthrough = False  # the kernel offered it
        self._buf = bytearray(_BUFFER)
        # inode -> [open handles, backing id or 0]: the kernel wants every open of an inode
        # in one mode (all passthrough on the same backing file, or all cached).
        self._modes: dict[int, list[int]] = {}
        self._fh_inode: dict[int, int] = {}
        self.passthrough_opens = 0

    # -- mount and unmount -------------------------------------------------------------

    def mount(self, options: str = "allow_other,default_permissions") -> None:
        try:
            if self.use_helper:
                fd = _mount_fusermount(self.mountpoint, options)
            else:
                fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
                try:
                    _mount_syscall(fd, self.mountpoint, options)
                except OSError:
                    os.close(fd)
                    raise
        except OSError as exc:
            raise SyncbitError(f"cannot mount at {self.mountpoint}: {exc.strerror or exc}") from exc
        os.set_blocking(fd, False)
        self.fd = fd

    def close(self, unmount: bool = True) -> None:
        """Unmount (lazily: open files fail from now on) and close the device."""
        if self.fd < 0:
            return
        if unmount:
            if self.use_helper:
                subprocess.run(
                    ["fusermount3", "-u", "-z", "--", self.mountpoint],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            elif _libc.umount2(self.mountpoint.encode(), _MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
                    log.warning("unmount %s: %s", self.mountpoint, os.strerror(err))
        os.close(self.fd)  # the connection goes, and its backing files with it
        self.fd = -1

    # -- serving -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve requests until the filesystem is unmounted (or the task is cancelled)."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    request = self._receive()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.fd)
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EINTR, errno.ENOENT):  # interrupted before read
                        continue
                    if exc.errno == errno.ENODEV:  # unmounted
                        log.info("%s was unmounted", self.mountpoint)
                        nursery.cancel_scope.cancel()
                        return
                    raise
                opcode = request[1]
                if opcode == _INIT:
                    self._init(request)
                elif opcode not in _NO_REPLY:
                    nursery.start_soon(self._serve, request)
                # A queue that never empties must not starve the other tasks (and the
                # handlers just started) of the event loop.
                await trio.lowlevel.checkpoint()

    def _receive(self) -> tuple[int, int, int, int, bytes]:
        n = os.readv(self.fd, [self._buf])
        _, opcode, unique, nodeid, *_ = _IN.unpack_from(self._buf)
        return (unique, opcode, nodeid, n, bytes(memoryview(self._buf)[_IN.size : n]))

    def _reply(self, unique: int, error: int, *parts: bytes | memoryview) -> bool:
        size = _OUT.size + sum(len(p) for p in parts)
        try:
            os.writev(self.fd, [_OUT.pack(size, -error, unique), *parts])
            return True
        except OSError as exc:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted.
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.warning("FUSE reply failed: %s", exc)
            return False

    def _init(self, request: tuple[int, int, int, int, bytes]) -> None:
        unique, _, _, _, body = request
        major, minor, max_readahead, flags, flags2 = _INIT_IN.unpack_from(body.ljust(20, b"\0"))
        if major != 7 or minor < 31:
            log.error("kernel FUSE protocol %d.%d is too old (7.31+ needed)", major, minor)
            self._reply(unique, errno.EPROTO)
            return
        want = _ASYNC_READ | _BIG_WRITES | _DO_READDIRPLUS | _READDIRPLUS_AUTO
        want |= _PARALLEL_DIROPS | _MAX_PAGES | _INIT_EXT
        want &= flags
        want2 = 0
        stack_depth = 0
        # Passthrough needs CAP_SYS_ADMIN: never offered when mounted through the helper.
        offered = flags & _INIT_EXT and flags2 & _PASSTHROUGH2
        if offered and self.want_passthrough and not self.use_helper:
            want2 |= _PASSTHROUGH2
            stack_depth = 1  # backing files on a plain filesystem (ext4, xfs, ...)
        self.passthrough = bool(want2 & _PASSTHROUGH2)
        self.kernel_passthrough = bool(offered)
        reply = _INIT_OUT.pack(
            7,
            min(minor, 40),
            max_readahead,
            want,
            16,
            12,
            4096,
            1,
            _MAX_PAGES_WANTED,
            0,
            want2,
            stack_depth,
        )
        self._reply(unique, 0, reply)
        log.info("FUSE protocol 7.%d, passthrough %s", minor, "on" if self.passthrough else "off")
        self.initialized.set()

    async def _serve(self, request: tuple[int, int, int, int, bytes]) -> None:
        unique, opcode, nodeid, _, body = request
        try:
            parts = await self._dispatch(opcode, nodeid, body)
        except FUSEError as exc:
            self._reply(unique, exc.errno)
        except Exception:
            log.exception("FUSE opcode %d: unexpected error", opcode)
            self._reply(unique, errno.EIO)
        else:
            if not self._reply(unique, 0, *parts) and opcode == _OPEN:
                # The opener was interrupted: the kernel never saw this handle, and will
                # send no RELEASE for it.
                (fh,) = struct.unpack_from("<Q", parts[0])
                await self.ops.release(fh)
                self._released(fh)

    async def _dispatch(self, opcode: int, nodeid: int, body: bytes) -> list[bytes | memoryview]:
        ops = self.ops
        if opcode == _READ:  # the hot path: first
            fh, offset, size = _READ_IN.unpack_from(body)
            return [await ops.read(fh, offset, size)]
        if opcode == _LOOKUP:
            return [_entry(await ops.lookup(nodeid, body.split(b"\0", 1)[0]))]
        if opcode == _GETATTR:
            attr = await ops.getattr(nodeid)
            valid, nsec = _timeout(attr.attr_timeout)
            return [_ATTR_OUT.pack(valid, nsec, 0), attr.pack()]
        if opcode == _OPEN:
            flags, _ = _OPEN_IN.unpack_from(body)
            return [self._opened(nodeid, await ops.open(nodeid, flags))]
        if opcode == _RELEASE:
            (fh,) = _RELEASE_IN.unpack_from(body)
            await ops.release(fh)
            self._released(fh)
            return []
        if opcode == _OPENDIR:
            return [_OPEN_OUT.pack(await ops.opendir(nodeid), 0, 0)]
        if opcode in (_READDIR, _READDIRPLUS):
            fh, offset, size = _READ_IN.unpack_from(body)
            return [self._readdir(fh, offset, size, plus=opcode == _READDIRPLUS)]
        if opcode == _RELEASEDIR:
            return []
        if opcode == _STATFS_OP:
            s = await ops.statfs()
            return [
                _STATFS.pack(
                    s.f_blocks,
                    s.f_bfree,
                    s.f_bavail,
                    s.f_files,
                    s.f_ffree,
                    s.f_bsize,
                    s.f_namemax,
                    s.f_frsize,
                    0,
                )
            ]
        if opcode == _GETXATTR_OP:
            size, _ = _GETXATTR.unpack_from(body)
            name = body[_GETXATTR.size :].split(b"\0", 1)[0]
            return self._sized(await ops.getxattr(nodeid, name), size)
        if opcode == _LISTXATTR:
            size, _ = _GETXATTR.unpack_from(body)
            return self._sized(b"".join(n + b"\0" for n in await ops.listxattr(nodeid)), size)
        if opcode == _ACCESS:
            (mask,) = struct.unpack_from("<I", body)
            if not await ops.access(nodeid, mask):
                raise FUSEError(errno.EACCES)
            return []
        if opcode == _DESTROY:
            return []
        if opcode in _WRITES:
            raise FUSEError(errno.EROFS)
        raise FUSEError(errno.ENOSYS)  # FLUSH, FSYNC, locks, ...: the kernel stops asking

    @staticmethod
    def _sized(value: bytes, size: int) -> list[bytes | memoryview]:
        if size == 0:  # the caller asks how big
            return [_GETXATTR.pack(len(value), 0)]
        if len(value) > size:
            raise FUSEError(errno.ERANGE)
        return [value]

    def _readdir(self, fh: int, offset: int, size: int, plus: bool) -> bytes:
        out = bytearray()
        for name, attr, next_offset in self.ops.readdir(fh, offset):
            record = _dirent(attr.st_ino, next_offset, name, attr.st_mode)
            if plus:
                record = _entry(attr) + record
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    # -- passthrough ---------------------------------------------------------------------

    def _opened(self, inode: int, info: FileInfo) -> bytes:
        """The OPEN reply: passthrough when the ops offer a backing file and every other open
        of this inode is passthrough too (the kernel refuses mixed modes with EIO)."""
        mode = self._modes.get(inode)
        if mode is None:
            backing = 0
            if info.backing_fd is not None and self.passthrough:
                backing = self._open_backing(info.backing_fd)
            mode = self._modes[inode] = [0, backing]
        mode[0] += 1
        self._fh_inode[info.fh] = inode
        if mode[1]:
            self.passthrough_opens += 1
            return _OPEN_OUT.pack(info.fh, _FOPEN_PASSTHROUGH, mode[1])
        return _OPEN_OUT.pack(info.fh, _FOPEN_KEEP_CACHE if info.keep_cache else 0, 0)

    def _released(self, fh: int) -> None:
        inode = self._fh_inode.pop(fh, None)
        mode = self._modes.get(inode) if inode is not None else None
        if mode is None:
            return
        mode[0] -= 1
        if mode[0] == 0:
            del self._modes[inode]  # type: ignore[arg-type]
            if mode[1]:
                self._close_backing(mode[1])

    def _open_backing(self, fd: int) -> int:
        arg = ctypes.create_string_buffer(_BACKING_MAP.pack(fd, 0, 0), _BACKING_MAP.size)
        backing = _libc.ioctl(self.fd, _BACKING_OPEN, arg)
        if backing > 0:
            return int(backing)
        # No CAP_SYS_ADMIN, a cache on a stacked filesystem (overlayfs: ELOOP), a kernel
        # without it: none of that gets better, so say it once and stop asking.
        log.warning(
            "FUSE passthrough unavailable (%s): the daemon serves every read",
            os.strerror(ctypes.get_errno()),
        )
        self.passthrough = False
        return 0

    def _close_backing(self, backing: int) -> None:
        arg = ctypes.c_uint32(backing)
        if _libc.ioctl(self.fd, _BACKING_CLOSE, ctypes.byref(arg)) != 0:
            log.debug("closing backing id %d: %s", backing, os.strerror(ctypes.get_errno()))

    # -- notifications --------------------------------------------------------------------

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Make the kernel forget a directory entry (a dataset got a new version). From a
        thread: the kernel may hold the directory lock for a LOOKUP that waits for us."""
        if self.fd < 0 or not self.initialized.is_set():
            return
        message = _NOTIFY_INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
        header = _OUT.pack(_OUT.size + len(message), _NOTIFY_INVAL_ENTRY_CODE, 0)
        fd = os.dup(self.fd)  # the thread's own: the session may close before it runs

        def send() -> None:
            try:
                os.writev(fd, [header, message])
            except OSError as exc:  # ENOENT: the kernel had nothing cached
                if exc.errno != errno.ENOENT:
                    log.debug("invalidate %r: %s", name, exc)
            finally:
                os.close(fd)

        threading.Thread(target=send, name="fuse-notify", daemon=True).start()
