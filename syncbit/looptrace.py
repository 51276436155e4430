"""Finding what stalls the trio loop: `StallLogger` logs each task step (a stretch between
two checkpoints) over 100 ms at debug level, and `BlockingAuditor` records every blocking
file, process or socket call made on the trio thread, with a short stack, into a file.

Both are trio instruments that only observe: they never change, delay or refuse a call.
The auditor costs nothing unless `SYNCBIT_AUDIT_BLOCKING=<file>` enables it (tests, field
diagnosis); it is no sandbox (a C extension's I/O raises no audit event and is not seen).
"""

from __future__ import annotations

import contextvars
import functools
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import trio

from syncbit.errors import ConfigError

log = logging.getLogger("syncbit.looptrace")

ENV = "SYNCBIT_AUDIT_BLOCKING"
STALL_THRESHOLD = 0.1  # seconds a task may run between checkpoints before it is logged
_STACK_DEPTH = 8  # frames kept per finding, innermost first
_ARGS_CHARS = 200  # of the call's arguments, as repr

# Captured before any wrapping: the auditor's own writes must never be audited.
_os_write = os.write
_os_get_blocking = os.get_blocking


# -- stalls ----------------------------------------------------------------------------------

# What a task is doing, for the stall log: a server's connection task sets it to the
# request it serves (and leaves it: a stretch may end just after the answer went out).
DOING: contextvars.ContextVar[str | None] = contextvars.ContextVar("syncbit_doing", default=None)


# trio 0.22 has no type information (its Instrument is Any to mypy); later ones do.
class StallLogger(trio.abc.Instrument):  # type: ignore[misc, unused-ignore]
    """Logs (debug) every task step that ran longer than `threshold` seconds: the task's
    name, how long, how much of it the thread ran on a CPU (a long step with little CPU
    waited for one: the machine's load, not the task's work), and where it waits now
    (just after the stretch). `clock` and `cpu_clock` are injectable for tests."""

    def __init__(
        self,
        threshold: float = STALL_THRESHOLD,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.threshold = threshold
        self.logger = logger
        self.clock = clock
        self.cpu_clock = cpu_clock
        self._began = 0.0
        self._cpu_began = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = self.clock()
        self._cpu_began = self.cpu_clock()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = self.clock() - self._began
        if took > self.threshold:
            doing = task.context.get(DOING)
            self.logger.debug(
                "trio loop stalled: task %s%s ran %.0f ms (%.0f ms of it on a CPU) without a "
                "checkpoint (now at %s)",
                task.name,
                f" ({doing})" if doing else "",
                took * 1000,
                (self.cpu_clock() - self._cpu_began) * 1000,
                _await_point(task),
            )


def _await_point(task: trio.lowlevel.Task) -> str:
    """The innermost frame outside trio that `task` waits in, as `function:line` ("?"
    once it finished)."""
    where = "?"
    coro: Any = task.coro
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None and _TRIO_DIR not in frame.f_code.co_filename:
            where = f"{frame.f_code.co_name}:{frame.f_lineno}"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where


_TRIO_DIR = os.path.dirname(trio.__file__) + os.sep


# -- blocking calls --------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One blocking call seen on the trio thread: the audit event (or wrapped `os`
    function), its arguments (repr, cut short), the trio task, and the innermost frames
    as `file:line function`."""

    event: str
    args: str
    task: str
    stack: tuple[str, ...]

    def __str__(self) -> str:
        frames = "\n".join(f"    {frame}" for frame in self.stack)
        return f"{self.event}{self.args} in task {self.task}\n{frames}"

    def called_from(self, where: str) -> bool:
        """Whether `where` is on the recorded stack: a function name, or `file.py name`
        (the file by its path's end)."""
        file, _, name = where.rpartition(" ")
        for frame in self.stack:
            place, _, function = frame.rpartition(" ")
            if function == name and place.rpartition(":")[0].endswith(file):
                return True
        return False


def read_findings(path: Path) -> list[Finding]:
    """The findings an auditor wrote to `path` (none if it does not exist)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    findings = []
    for line in lines:
        doc = json.loads(line)
        findings.append(Finding(doc["event"], doc["args"], doc["task"], tuple(doc["stack"])))
    return findings


def _blocking_socket(args: tuple[Any, ...]) -> bool:
    sock = args[0] if args else None
    return not isinstance(sock, socket.socket) or sock.getblocking()


def _resolves(args: tuple[Any, ...]) -> bool:
    """getaddrinfo of a name (a DNS lookup); a numeric address is answered at once."""
    host = args[0] if args else None
    if host is None:
        return False
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    try:
        ipaddress.ip_address(str(host).partition("%")[0])
    except ValueError:
        return True
    return False


def _opens_path(args: tuple[Any, ...]) -> bool:
    return bool(args) and not isinstance(args[0], int)  # open(fd) wraps a descriptor


def _sleeps(args: tuple[Any, ...]) -> bool:
    return bool(args) and isinstance(args[0], int | float) and args[0] > 0


def _waits_for_lock(args: tuple[Any, ...]) -> bool:
    import fcntl

    return len(args) > 1 and isinstance(args[1], int) and not args[1] & fcntl.LOCK_NB


def _always(args: tuple[Any, ...]) -> bool:
    return True


# Audit events that block (on the disk, another process, the network or the clock), with
# a test of the arguments where some calls of that event do not block.
_EVENTS: dict[str, Callable[[tuple[Any, ...]], bool]] = {
    "open": _opens_path,
    "time.sleep": _sleeps,  # Python 3.12 on
    "fcntl.flock": _waits_for_lock,
    "fcntl.lockf": _waits_for_lock,
    "socket.connect": _blocking_socket,
    "socket.sendto": _blocking_socket,
    "socket.sendmsg": _blocking_socket,
    "socket.getaddrinfo": _resolves,
    **dict.fromkeys(
        [
            *(f"os.{n}" for n in ("listdir", "scandir", "fwalk", "remove", "rename", "rmdir")),
            *(f"os.{n}" for n in ("mkdir", "truncate", "chmod", "chown", "utime", "link")),
            *(f"os.{n}" for n in ("symlink", "listxattr", "getxattr", "setxattr", "lockf")),
            *(f"os.{n}" for n in ("removexattr", "system", "exec", "posix_spawn", "spawn")),
            *(f"os.{n}" for n in ("fork", "forkpty")),
            *(f"shutil.{n}" for n in ("copyfile", "copymode", "copystat", "copytree")),
            *(f"shutil.{n}" for n in ("rmtree", "move", "chown", "make_archive")),
            "shutil.unpack_archive",
            "subprocess.Popen",
            "tempfile.mkstemp",
            "tempfile.mkdtemp",
            "glob.glob",
            "glob.glob/2",
            "sqlite3.connect",
            "urllib.Request",
            "socket.gethostbyname",
            "socket.gethostbyname_ex",
            "socket.gethostbyaddr",
            "socket.getnameinfo",
        ],
        _always,
    ),
}


def _blocking_fd(args: tuple[Any, ...]) -> bool:
    """A read or write on a descriptor in blocking mode (a file, a blocking pipe or
    socket); the FUSE device and trio's own descriptors are non-blocking."""
    try:
        return bool(args) and _os_get_blocking(args[0])
    except (OSError, TypeError):
        return False


def _may_wait_on_disk(args: tuple[Any, ...]) -> bool:
    """preadv without RWF_NOWAIT (with it, the kernel answers from the page cache or
    refuses at once)."""
    return not (len(args) > 3 and args[3] & getattr(os, "RWF_NOWAIT", 0))


# Functions that block but raise no audit event (on Python 3.11): wrapped while an
# auditor is attached (callers look them up as `os.stat`, `time.sleep` at call time).
_WRAPPED: dict[tuple[ModuleType, str], Callable[[tuple[Any, ...]], bool]] = {
    **dict.fromkeys(
        [
            *((os, n) for n in ("stat", "lstat", "access", "statvfs", "fstatvfs", "fsync")),
            *((os, n) for n in ("fdatasync", "pread", "pwrite", "pwritev", "sendfile")),
            *((os, n) for n in ("posix_fallocate", "copy_file_range")),
        ],
        _always,
    ),
    (os, "preadv"): _may_wait_on_disk,
    **dict.fromkeys([(os, n) for n in ("read", "write", "readv", "writev")], _blocking_fd),
    (time, "sleep"): _sleeps,  # an audit event from Python 3.12 on: recorded once either way
}

_active: BlockingAuditor | None = None
_hook_installed = False


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    auditor = _active
    if auditor is None:
        return
    blocks = _EVENTS.get(event)
    if blocks is not None:
        auditor.seen(event, args, blocks)


class BlockingAuditor(trio.abc.Instrument):  # type: ignore[misc, unused-ignore]  # as above
    """Records blocking calls made on the thread that runs trio, one JSON line each into
    `path` (the same call from the same place once). Attaches itself when trio starts
    (`before_run`) or when `attach()` is called on the trio thread; one auditor is
    attached at a time. Calls in worker threads (`trio.to_thread`) and other threads are
    not recorded: there they are where they belong."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._thread: int | None = None
        self._busy = False  # recording now: what the recording itself does is not audited
        self._seen: set[tuple[str, tuple[str, ...]]] = set()
        self._originals: dict[tuple[ModuleType, str], Callable[..., Any]] = {}

    def before_run(self) -> None:
        self.attach()

    def after_run(self) -> None:
        self.detach()

    def attach(self) -> None:
        """Audit the calling thread (the trio thread) from now on."""
        global _active, _hook_installed
        if _active is not None and _active is not self:
            raise RuntimeError("another BlockingAuditor is attached")
        self._thread = threading.get_ident()
        _active = self
        if not _hook_installed:
            sys.addaudithook(_audit_hook)  # for the life of the process: none can be removed
            _hook_installed = True
        for (module, name), blocks in _WRAPPED.items():
            original = getattr(module, name, None)
            if original is not None and (module, name) not in self._originals:
                self._originals[module, name] = original
                setattr(module, name, self._wrap(f"{module.__name__}.{name}", original, blocks))

    def detach(self) -> None:
        global _active
        for (module, name), original in self._originals.items():
            setattr(module, name, original)
        self._originals.clear()
        if _active is self:
            _active = None
        self._thread = None

    def close(self) -> None:
        self.detach()
        os.close(self._fd)

    def _wrap(
        self, name: str, original: Callable[..., Any], blocks: Callable[[tuple[Any, ...]], bool]
    ) -> Callable[..., Any]:
        @functools.wraps(original)
        def audited(*args: Any, **kwargs: Any) -> Any:
            self.seen(name, args, blocks)
            return original(*args, **kwargs)

        return audited

    def seen(
        self, event: str, args: tuple[Any, ...], blocks: Callable[[tuple[Any, ...]], bool]
    ) -> None:
        """An event or wrapped call: recorded if it happens on the trio thread and blocks."""
        if self._busy or threading.get_ident() != self._thread:
            return
        self._busy = True
        try:
            if blocks(args):
                self._record(event, args)
        finally:
            self._busy = False

    def _record(self, event: str, args: tuple[Any, ...]) -> None:
        stack = tuple(_frames(sys._getframe(1)))
        if (event, stack) in self._seen:
            return
        self._seen.add((event, stack))
        try:
            task = trio.lowlevel.current_task().name
        except RuntimeError:
            task = "(no task)"
        doc = {"event": event, "args": _short(args), "task": task, "stack": stack}
        _os_write(self._fd, (json.dumps(doc) + "\n").encode())


def _frames(frame: FrameType | None) -> Iterator[str]:
    """The innermost `_STACK_DEPTH` frames outside this module and the import machinery
    (an import shows as the `<module>` frames and their importer), as `file:line
    function`; no source lines: reading them would be file I/O of its own."""
    kept = 0
    while frame is not None and kept < _STACK_DEPTH:
        code = frame.f_code
        if code.co_filename != __file__ and not code.co_filename.startswith("<frozen importlib"):
            yield f"{_short_path(code.co_filename)}:{frame.f_lineno} {code.co_name}"
            kept += 1
        frame = frame.f_back


def _short_path(filename: str) -> str:
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in filename:
            return filename.rpartition(marker)[2]
    parts = Path(filename).parts
    for root in ("syncbit", "syncbit_testing", "tests", "integration"):
        if root in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(root) - 1 :])
    return filename


def _short(args: Sequence[Any]) -> str:
    text = repr(tuple(args))
    return text if len(text) <= _ARGS_CHARS else text[: _ARGS_CHARS - 3] + "..."


def instruments(
    env: Mapping[str, str] = os.environ, logger: logging.Logger = log, audit: bool = True
) -> list[trio.abc.Instrument]:
    """The instruments a long-running trio program (the daemon, the scheduler) runs with:
    the stall log when `logger` logs debug, the auditor when `SYNCBIT_AUDIT_BLOCKING`
    names a file and `audit` (the daemon's loop: one auditor per process; ConfigError
    when that file cannot be written)."""
    found: list[trio.abc.Instrument] = []
    if logger.isEnabledFor(logging.DEBUG):
        found.append(StallLogger(logger=logger))
    target = env.get(ENV) if audit else None
    if target:
        try:
            found.append(BlockingAuditor(Path(target)))
        except OSError as exc:
            raise ConfigError(f"{ENV}={target}: cannot write there: {exc.strerror}") from None
        logger.warning("auditing blocking calls on the trio thread into %s", target)
    return found
