"""A real syncbit cluster on loopback: origin, scheduler and node daemons as processes.

Owns starting, watching and always cleaning up the processes and FUSE mounts it created
(by PID and by mount point, never by name). Reusable by benchmarks: nothing here imports
pytest; failures raise `HarnessError` (an AssertionError, so pytest reports it as a
failure with the relevant log tail).

    origin = Origin(root, workdir / "logs").start()
    with Cluster(workdir, origin, nodes=3) as cluster:
        cluster.add_dataset("ds", origin.url + "ds/")
        data = (cluster.nodes[0].mount / "ds" / "file").read_bytes()
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from syncbit_testing import command, environ

T = TypeVar("T")

MiB = 1024 * 1024
CHUNK_SIZE = 4 * MiB
SYNCBIT = [sys.executable, "-m", "syncbit.cli"]
HOST = "127.0.0.1"
# Debug logs of the HTTP client libraries: one line per request phase, never the evidence.
_NOISE = re.compile(r" DEBUG (httpcore|hpack)[.:]| INFO httpx: ")

# Every process started here, so a failing test can show their logs.
ALL_PROCESSES: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


class HarnessError(AssertionError):
    """The cluster did not reach the state a test asked for (with the evidence)."""


# -- small helpers --------------------------------------------------------------------------


def fuse_unavailable() -> str | None:
    """Why real mounts cannot run here, or None if they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "integration tests need root (FUSE mounts with allow_other)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def free_port(host: str = HOST) -> int:
    """A TCP port nothing uses right now, below the kernel's ephemeral range.

    A port the OS picks (bind to 0) comes from the same range as every outgoing
    connection's source port: between picking it and a server binding it, or while a
    server stopped for a restart is down, any client connection may take it ("Address
    already in use", seen in CI). Ports below the range are never handed out that way."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(max(1024, low - 16384), low)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue  # taken: another test's server
            return port
    raise HarnessError(f"no free port below {low} on {host}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


@contextlib.contextmanager
def background(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """`argv` running while the block does, stdout and stderr piped apart (text); killed
    by its PID if it is still running when the block ends, failed or not."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.05,
    evidence: Callable[[], str] | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy; HarnessError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{evidence()}" if evidence else ""
            raise HarnessError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def scrape(address: str) -> dict[str, float]:
    """A daemon's or the scheduler's `/metrics` as {'name{labels}': value} (no token:
    scrapers need none)."""
    resp = httpx.get(f"http://{address}/metrics", timeout=10, trust_env=False)
    if resp.status_code != 200 or not resp.headers["content-type"].startswith("text/plain"):
        raise HarnessError(f"/metrics of {address}: HTTP {resp.status_code} {resp.text[:200]}")
    values: dict[str, float] = {}
    for line in resp.text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def in_thread(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run `fn` in a daemon thread; HarnessError if it takes longer than `timeout`.

    Reads through a FUSE mount can block in the kernel for as long as the daemon does not
    answer; a test must fail, not hang. The thread stays blocked until the fixtures kill
    the daemon, which aborts the FUSE connection and so ends the read.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name=f"harness: {what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise HarnessError(f"{what} did not finish within {timeout:g}s")
    if error:
        raise error[0]
    return result[0]


def sha256_file(
    path: Path | str,
    block: int = MiB,
    progress: Callable[[int], None] | None = None,
) -> str:
    """SHA-256 of a file read with plain `read()` calls; `progress(bytes_so_far)` after each."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            done += n
            if progress is not None:
                progress(done)
    return digest.hexdigest()


def _unescape_mount(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    dev: str
    fstype: str


def mount_entries(path: Path | str) -> list[MountEntry]:
    """Mounts stacked at `path`, oldest first (from /proc/self/mountinfo)."""
    target = os.path.abspath(path)
    found: list[MountEntry] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 10 or _unescape_mount(fields[4]) != target:
                continue
            sep = fields.index("-", 6)
            found.append(MountEntry(int(fields[0]), fields[2], fields[sep + 1]))
    return found


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    top = os.path.abspath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                mnt = _unescape_mount(fields[4])
                if mnt == top or mnt.startswith(top + "/"):
                    found.append(mnt)
    return sorted(set(found), key=len, reverse=True)


def is_mounted(path: Path | str) -> bool:
    return bool(mount_entries(path))


def unmount_lazy(path: Path | str) -> None:
    """Detach every mount at `path` (`fusermount3 -u -z`, else `umount -l`)."""
    for _ in range(8):
        if not is_mounted(path):
            return
        done = subprocess.run(
            ["fusermount3", "-u", "-z", os.path.abspath(path)], capture_output=True, timeout=30
        )
        if done.returncode != 0:
            subprocess.run(["umount", "-l", os.path.abspath(path)], capture_output=True, timeout=30)


def fuse_mount_answers(path: Path | str) -> bool:
    """Whether a FUSE mount at `path` answers a listing. The mount table is read before
    and after the listing: a daemon that starts where a killed one left its (dead) mount
    detaches that mount before it mounts its own, and a listing between the two is the
    bare directory's, which answers too (and has none of the datasets)."""

    def fuse() -> bool:
        entries = mount_entries(path)
        return bool(entries) and entries[-1].fstype.startswith("fuse")

    return fuse() and probe_errno(path, timeout=5) == 0 and fuse()


def probe_errno(path: Path | str, timeout: float = 5.0) -> int:
    """0 if listing the directory `path` works, else its errno (ETIMEDOUT if it blocks).

    A listing, not a `stat`: the kernel answers `stat` of a FUSE mount from cached
    attributes even after its daemon died, while `opendir` always asks the daemon (and a
    dead one's mount answers ENOTCONN).
    """

    def probe() -> int:
        try:
            os.listdir(path)
            return 0
        except OSError as exc:
            return exc.errno or errno.EIO

    try:
        return in_thread(probe, timeout, f"list {path}")
    except HarnessError:
        return errno.ETIMEDOUT


# -- processes ------------------------------------------------------------------------------


class ManagedProcess:
    """One child process we started: its log file, signals by PID, cleanup."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []
        self._log_start = 0
        ALL_PROCESSES.add(self)

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        if self.alive:
            raise HarnessError(f"{self.name} is already running (pid {self.pid})")
        self.argv = argv
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**environ(), "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} start: {shlex.join(argv)}\n".encode())
            log.flush()
            self._log_start = log.tell()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the process we started (by PID); waits for death on SIGKILL."""
        if not self.alive:
            raise HarnessError(f"{self.name} is not running")
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"{self.name} (pid {self.pid}) still running after {timeout:g}s\n" + self.log_tail()
            ) from None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def log_text(self, whole: bool = False) -> str:
        """The log of the current (or last) run; `whole=True` for every run."""
        try:
            with open(self.log_path, "rb") as f:
                if not whole:
                    f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """A position in the log; `log_since(mark)` returns what was written after it."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the current run, without HTTP client chatter."""
        text = [line for line in self.log_text().splitlines() if not _NOISE.search(line)]
        text = text[-lines:]
        state = "running" if self.alive else f"exited {self.returncode}"
        return f"--- {self.name} ({state}) log tail: {self.log_path}\n" + "\n".join(text)

    def cleanup(self) -> None:
        """SIGKILL the process we started if it is still alive. Safe to call twice."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)


class Origin(ManagedProcess):
    """`python -m syncbit_testing.origin`: the dataset source, with byte counters."""

    def __init__(self, root: Path, log_dir: Path, host: str = HOST, style: str = "nginx") -> None:
        super().__init__("origin", log_dir / "origin.log")
        self.root = root
        self.host = host
        self.style = style
        self.port = 0  # chosen by the first start, kept by later ones

    @property
    def url(self) -> str:
        """Base URL with a trailing slash."""
        if not self.port:
            raise HarnessError("origin never started")
        return f"http://{self.host}:{self.port}/"

    def start(self, timeout: float = 20.0) -> Origin:
        argv = command("origin", "--root", str(self.root), "--host", self.host)
        argv += ["--port", str(self.port), "--style", self.style]
        deadline = time.monotonic() + timeout
        while True:
            self._spawn(argv)
            try:
                ready = wait_until(self._ready, timeout, "origin READY", evidence=self.log_tail)
            except HarnessError:
                # Restarting on the same port can race a socket of the old process.
                if self.port and not self.alive and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise
            self.port = ready
            return self

    def _ready(self) -> int:
        match = re.search(r"^READY (\d+)$", self.log_text(), re.M)
        if match:
            return int(match.group(1))
        if not self.alive:
            if self.port:
                return 0  # let start() retry a same-port restart
            raise HarnessError(f"origin exited before READY\n{self.log_tail()}")
        return 0

    def stop(self, timeout: float = 30.0) -> None:
        rc = self.terminate(timeout)
        if rc != 0:
            raise HarnessError(f"origin exited with {rc}\n{self.log_tail()}")

    def stats(self) -> dict[str, Any]:
        """{"bytes_served": int, "by_path": {relpath: int}} since the last reset."""
        resp = httpx.get(self.url + "__stats", timeout=10, trust_env=False)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def served(self, relpath: str | None = None) -> int:
        stats = self.stats()
        if relpath is None:
            return int(stats["bytes_served"])
        return int(stats["by_path"].get(relpath, 0))

    def reset(self) -> None:
        httpx.post(self.url + "__reset", timeout=10, trust_env=False).raise_for_status()

    def gets(self, relpath: str) -> int:
        """GET requests for the file at `relpath` since the last reset (failed ones too)."""
        return int(self.stats()["gets"].get(relpath, 0))

    def fail_reads(self, status: int | None) -> None:
        """From now on every GET of a file answers `status` (None: serve them again);
        listings and HEADs are unaffected, so datasets can still be added."""
        query = f"?status={status}" if status is not None else ""
        resp = httpx.post(self.url + "__fail_reads" + query, timeout=10, trust_env=False)
        resp.raise_for_status()


@dataclass(frozen=True)
class TlsFiles:
    """A private CA and the scheduler's and daemons' certificates (`syncbit tls init`)."""

    directory: Path

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        from syncbit import certs

        if not (directory / "ca.crt").exists():
            certs.init(directory)
        return cls(directory)

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def pair(self, who: str) -> tuple[Path, Path]:
        """(cert, key) of "scheduler" or "daemon"."""
        return self.directory / f"{who}.crt", self.directory / f"{who}.key"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


class Scheduler(ManagedProcess):
    """`syncbit scheduler` with its own state dir on a free loopback port (https:// with
    `tls`, its certificate checked against the test CA)."""

    def __init__(
        self,
        state_dir: Path,
        log_dir: Path,
        node_timeout: float | None = None,
        port: int | None = None,
        token_file: Path | None = None,
        tls: TlsFiles | None = None,
        file_roots: Iterable[Path] = (),
        extra_args: Iterable[str] = (),
    ) -> None:
        super().__init__("scheduler", log_dir / "scheduler.log")
        self.extra_args = list(extra_args)  # e.g. --state etcd://... for a replica
        self.state_dir = state_dir
        self.node_timeout = node_timeout
        self.port = port or free_port()
        self.token_file = token_file
        self.tls = tls
        self.file_roots = list(file_roots)
        headers = (
            {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file else {}
        )
        verify: ssl.SSLContext | bool = tls.context() if tls else True
        self._http = httpx.Client(
            base_url=self.url, timeout=10, trust_env=False, headers=headers, verify=verify
        )

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> Scheduler:
        argv = [*SYNCBIT, "scheduler", "--listen", f"{HOST}:{self.port}"]
        argv += ["--state-dir", str(self.state_dir), "--log-level", "debug"]
        if self.node_timeout is not None:
            argv += ["--node-timeout", str(self.node_timeout)]
        if self.token_file is not None:
            argv += ["--token-file", str(self.token_file)]
        if self.tls is not None:
            cert, key = self.tls.pair("scheduler")
            argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
        for root in self.file_roots:
            argv += ["--file-roots", str(root)]
        self._spawn(argv + self.extra_args)
        wait_until(self._healthy, timeout, "scheduler /healthz", evidence=self.log_tail)
        return self

    def _healthy(self) -> bool:
        if not self.alive:
            raise HarnessError(f"scheduler exited\n{self.log_tail()}")
        try:
            return self._http.get("/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        rc = self.terminate(timeout)
        if rc != 0:
            raise HarnessError(f"scheduler exited with {rc}\n{self.log_tail()}")

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        """One JSON API call (with `token` instead of the harness's own credential);
        HarnessError unless it answers 2xx."""
        headers = {"Authorization": f"Bearer {token}"} if token else None
        resp = self._http.request(method, path, json=body, headers=headers)
        if resp.status_code // 100 != 2:
            raise HarnessError(f"{method} {path} -> HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json() if resp.content else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def status(self) -> dict[str, Any]:
        """The `syncbit status --json` document, straight from the API."""
        result: dict[str, Any] = self.get("/v1/status")
        return result

    def close(self) -> None:
        self._http.close()


class Node(ManagedProcess):
    """`syncbit daemon` with its own cache dir, mount point and peer port."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        scheduler_url: str,
        read_deadline: float = 8.0,
        config: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        super().__init__(name, workdir / name / "daemon.log")
        self.workdir = workdir / name
        self.cache_dir = self.workdir / "cache"
        self.mount = self.workdir / "mnt"
        self.scheduler_url = scheduler_url
        self.read_deadline = read_deadline
        self.config = dict(config or {})
        self.labels = dict(labels or {})
        self.extra_args = list(extra_args)
        self.env: dict[str, str] = {}  # environment variables of the daemon's own
        self.port = free_port()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def path(self, *parts: str) -> Path:
        return self.mount.joinpath(*parts)

    def command(self) -> list[str]:
        argv = [*SYNCBIT, "daemon", "--scheduler", self.scheduler_url]
        argv += ["--listen", self.address, "--node", self.name]
        argv += ["--cache-dir", str(self.cache_dir), "--mount", str(self.mount)]
        argv += ["--read-deadline", f"{self.read_deadline:g}", "--log-level", "debug"]
        for key, value in sorted(self.labels.items()):
            argv += ["--label", f"{key}={value}"]
        if self.config:
            cfg = self.workdir / "config.yaml"
            cfg.write_text(yaml.safe_dump(self.config))
            argv += ["--config", str(cfg)]
        return argv + self.extra_args

    def start(self, wait: bool = True, timeout: float = 30.0) -> Node:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spawn(self.command(), env=self.env)
        if wait:
            self.wait_mounted(timeout)
        return self

    def wait_mounted(self, timeout: float = 30.0) -> None:
        """Until our daemon's mount answers: a FUSE mount at the mount point that can be
        listed. A stale mount left by a killed daemon answers ENOTCONN, so it never passes
        for ours (its mount id and device number may well be reused by the new mount).
        Fails with the log tail if the daemon exits first."""

        def mounted() -> bool:
            if not self.alive:
                raise HarnessError(f"{self.name} exited before mounting\n{self.log_tail()}")
            return fuse_mount_answers(self.mount)

        wait_until(
            mounted,
            timeout,
            f"{self.name} mounted at {self.mount}",
            interval=0.1,
            evidence=self.log_tail,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Clean shutdown: SIGTERM, exit code 0, mount point no longer mounted."""
        rc = self.terminate(timeout)
        if rc != 0:
            raise HarnessError(f"{self.name} exited with {rc} on SIGTERM\n{self.log_tail()}")
        if is_mounted(self.mount):
            raise HarnessError(f"{self.name} exited 0 but left {self.mount} mounted")

    def cleanup(self) -> None:
        super().cleanup()
        unmount_lazy(self.mount)

    @contextlib.contextmanager
    def restarted_with(
        self, args: Iterable[str] = (), config: dict[str, Any] | None = None
    ) -> Iterator[Node]:
        """Run the block with this daemon restarted on extra flags / config keys; the
        usual daemon again afterwards (also when the block failed or stopped it)."""
        saved_args, saved_config = self.extra_args, dict(self.config)
        if self.alive:
            self.stop()
        self.extra_args = [*saved_args, *args]
        self.config.update(config or {})
        self.start()
        try:
            yield self
        finally:
            if self.alive:
                self.stop()
            self.extra_args, self.config = saved_args, saved_config
            self.start()


# -- the dataset ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileFacts:
    size: int
    sha256: str


@dataclass
class Dataset:
    """A directory tree under the origin's root and what a reader must see of it."""

    root: Path  # the directory on disk
    name: str  # its directory name under the origin root
    files: dict[str, FileFacts] = field(default_factory=dict)  # relpath -> facts
    dirs: set[str] = field(default_factory=set)  # every directory, '' excluded

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())


def _write(path: Path, data: bytes) -> FileFacts:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return FileFacts(len(data), hashlib.sha256(data).hexdigest())


def write_random(path: Path, size: int, block: int = 16 * MiB) -> FileFacts:
    """A file of `size` random bytes (os.urandom in `block`s), with its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(block, left))
            f.write(data)
            digest.update(data)
            left -= len(data)
    return FileFacts(size, digest.hexdigest())


ODD_NAMES = ("with space.txt", "ünïcødé ✓ файл.txt", "100% #1 & more+.txt")


def build_dataset(parent: Path, name: str = "ds", big_size: int = 256 * MiB) -> Dataset:
    """The reference dataset: nested dirs, an empty file and dir, odd names, a size that is
    not a multiple of the chunk size, and one big random file."""
    root = parent / name
    ds = Dataset(root, name)
    files = {
        "README.txt": b"syncbit integration dataset\n",
        "a/b/c/deep.txt": b"deep " * 1000,
        "a/sibling.json": json.dumps({"k": list(range(100))}).encode(),
        "empty.bin": b"",
        **{f"names/{n}": n.encode() * 3 for n in ODD_NAMES},
    }
    for rel, data in files.items():
        ds.files[rel] = _write(root / rel, data)
    ds.files["odd.bin"] = write_random(root / "odd.bin", 10 * MiB + 12345)
    ds.files["big.bin"] = write_random(root / "big.bin", big_size)
    (root / "empty_dir").mkdir()
    for rel in ds.files:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            ds.dirs.add("/".join(parts[:i]))
    ds.dirs.add("empty_dir")
    return ds


def fresh_dataset(parent: Path, name: str, files: dict[str, Path | int]) -> Dataset:
    """A new dataset dir: each file a copy of a path (new inode and mtime, so a new ETag and
    a new content object nobody holds yet) or that many fresh random bytes."""
    root = parent / name
    ds = Dataset(root, name)
    for rel, what in files.items():
        target = root / rel
        if isinstance(what, int):
            ds.files[rel] = write_random(target, what)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(what, target)
            ds.files[rel] = FileFacts(target.stat().st_size, sha256_file(target))
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            ds.dirs.add("/".join(parts[:i]))
    return ds


def snapshot_tree(root: Path) -> tuple[dict[str, int], set[str], dict[str, int]]:
    """(files relpath -> size, dirs, relpath -> st_mode) of a tree, via os.walk."""
    files: dict[str, int] = {}
    dirs: set[str] = set()
    modes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        for d in dirnames:
            rel = f"{rel_dir}/{d}" if rel_dir else d
            dirs.add(rel)
            modes[rel] = os.stat(os.path.join(dirpath, d)).st_mode
        for fname in filenames:
            rel = f"{rel_dir}/{fname}" if rel_dir else fname
            st = os.stat(os.path.join(dirpath, fname))
            files[rel] = st.st_size
            modes[rel] = st.st_mode
    return files, dirs, modes


# -- the cluster ----------------------------------------------------------------------------


class Cluster:
    """A scheduler and `nodes` daemons (n1, n2, ...) sharing one origin."""

    def __init__(
        self,
        workdir: Path,
        origin: Origin,
        nodes: int = 3,
        node_timeout: float | None = 4.0,
        read_deadline: float = 8.0,
        heartbeat_interval: float = 0.5,
        labels: Callable[[int], dict[str, str]] | None = None,
        token: str | None = None,
        bootstrap: bool = False,
        tls: bool = False,
        file_roots: Iterable[Path] | None = None,
    ) -> None:
        """With `token` (the cluster secret, as a Kubernetes Secret would hold it) every
        process requires credentials; the CLI runs with an admin credential. The daemons'
        token_file holds the secret itself, or with `bootstrap` a bootstrap credential they
        trade for their own node credential. With `tls` everything speaks TLS, checked
        against a test CA; daemons share one certificate (`peer_tls_name`)."""
        self.workdir = workdir
        self.origin = origin
        # file:// datasets: under the origin's root, as if it were an NFS export.
        roots = [origin.root] if file_roots is None else list(file_roots)
        self.token_file: Path | None = None
        self.admin_token_file: Path | None = None
        self.tls = TlsFiles.make(workdir / "tls") if tls else None
        node_config: dict[str, Any] = {
            "heartbeat_interval": heartbeat_interval,
            "file_roots": list(map(str, roots)),
        }
        if token is not None:
            from syncbit.credentials import Issuer, Role

            workdir.mkdir(parents=True, exist_ok=True)
            self.token_file = workdir / "token"
            self.token_file.write_text(token + "\n")
            issuer = Issuer(token)
            self.admin_token_file = workdir / "admin.token"
            self.admin_token_file.write_text(issuer.issue(Role.ADMIN)[0] + "\n")
            node_token = self.token_file
            if bootstrap:
                node_token = workdir / "bootstrap.token"
                node_token.write_text(issuer.issue(Role.BOOTSTRAP)[0] + "\n")
            node_config["token_file"] = str(node_token)
        if self.tls is not None:
            cert, key = self.tls.pair("daemon")
            node_config |= {"tls_cert": str(cert), "tls_key": str(key)}
            node_config |= {"tls_ca": str(self.tls.ca), "peer_tls_name": "syncbit-daemon"}
        self.scheduler = Scheduler(
            workdir / "scheduler",
            workdir / "logs",
            node_timeout,
            token_file=self.token_file,
            tls=self.tls,
            file_roots=roots,
        )
        self.nodes = [
            Node(
                f"n{i}",
                workdir,
                self.scheduler.url,
                read_deadline=read_deadline,
                config=dict(node_config),
                labels=labels(i) if labels else None,
            )
            for i in range(1, nodes + 1)
        ]

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Cluster:
        try:
            self.scheduler.start()
            for node in self.nodes:
                node.start(wait=False)
            for node in self.nodes:
                node.wait_mounted()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill whatever still runs (by PID) and detach every mount. Never raises."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.cleanup()
        with contextlib.suppress(Exception):
            self.scheduler.cleanup()
        self.scheduler.close()

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def ensure_up(self) -> None:
        """Bring back whatever an earlier test stopped: origin, scheduler, every node."""
        if not self.origin.alive:
            self.origin.start()
        if not self.scheduler.alive:
            self.scheduler.start()
        down = [n for n in self.nodes if not n.alive]
        for node in down:
            node.start(wait=False)
        for node in down:
            node.wait_mounted()

    # -- the CLI ----------------------------------------------------------------------

    def cli(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        scheduler: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `syncbit ARGS [--scheduler URL]`; returns the completed process (text)."""
        argv = [*SYNCBIT, *args]
        if scheduler:
            argv += ["--scheduler", self.scheduler.url]
        if self.admin_token_file is not None:
            env = {"SYNCBIT_TOKEN_FILE": str(self.admin_token_file), **(env or {})}
        if self.tls is not None:
            env = {"SYNCBIT_TLS_CA": str(self.tls.ca), **(env or {})}
        return run_cli(argv, env=env, timeout=timeout)

    def add_dataset(self, name: str, url: str, *flags: str, timeout: float = 15.0) -> float:
        """`syncbit dataset add NAME URL [FLAGS]`, then wait until `<mnt>/NAME` is on every
        running node. Returns the seconds from the command's end until the last node
        showed it."""
        done = self.cli("dataset", "add", name, url, *flags)
        if done.returncode != 0:
            raise HarnessError(
                f"dataset add {name} {url} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
            )
        start = time.monotonic()
        for node in self.nodes:
            if node.alive:
                wait_until(
                    partial(os.path.isdir, node.path(name)),
                    timeout,
                    f"{name} to appear on {node.name}",
                    interval=0.05,
                    evidence=node.log_tail,
                )
        return time.monotonic() - start

    # -- scheduler state ----------------------------------------------------------------

    def cached(self, dataset: str) -> dict[str, int]:
        """Bytes of `dataset` the scheduler believes each node holds."""
        for ds in self.scheduler.status()["datasets"]:
            if ds["name"] == dataset:
                return {k: int(v) for k, v in ds.get("cached", {}).items()}
        raise HarnessError(f"dataset {dataset} is not in the scheduler's status")

    def wait_cached(self, node: Node, dataset: str, nbytes: int, timeout: float = 20.0) -> None:
        """Until the scheduler knows `node` holds at least `nbytes` of `dataset`."""
        wait_until(
            lambda: self.cached(dataset).get(node.name, 0) >= nbytes,
            timeout,
            f"scheduler to know {node.name} holds {nbytes} bytes of {dataset}",
            interval=0.1,
            evidence=lambda: f"cached: {self.cached(dataset)}\n{node.log_tail()}",
        )

    def node_state(self, name: str) -> dict[str, Any] | None:
        for node in self.scheduler.status()["nodes"]:
            if node["name"] == name:
                result: dict[str, Any] = node
                return result
        return None

    def wait_node_up(self, name: str, up: bool, timeout: float = 20.0) -> None:
        def check() -> bool:
            state = self.node_state(name)
            return state is not None and bool(state["up"]) == up

        wait_until(
            check,
            timeout,
            f"node {name} {'up' if up else 'down'}",
            interval=0.1,
            evidence=lambda: json.dumps(self.node_state(name)),
        )


def run_cli(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """A client command with a clean environment (no inherited SYNCBIT_SCHEDULER)."""
    base = {k: v for k, v in os.environ.items() if k != "SYNCBIT_SCHEDULER"}
    return subprocess.run(
        argv,
        env={**base, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- a peer that lies ------------------------------------------------------------------------


class CorruptPeer:
    """A test double of a node: registers with the scheduler, claims chunks with the right
    digests (or reports digests of its own), keeps heartbeating, and serves every requested
    byte flipped (`flipped()`: the bytes a poisoner would want readers to get).

    The peer wire format is the one of `syncbit.peer`: `GET /v1/objects/<object>/data` with
    `Range: bytes=a-b` -> 206.
    """

    def __init__(self, scheduler: Scheduler, name: str = "evil", token: str | None = None) -> None:
        """With `token` (e.g. a node credential of its own) every scheduler call carries it
        instead of the harness's credential."""
        self.scheduler = scheduler
        self.name = name
        self.token = token
        self.files: dict[str, Path] = {}  # object id -> the true bytes on disk
        self.requests = 0
        self.bytes_served = 0
        self._stop = threading.Event()
        self._count_lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                match = re.fullmatch(r"/v1/objects/([0-9a-f]{64})/data", self.path)
                span = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                path = peer.files.get(match.group(1)) if match else None
                if path is None or span is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                first, last = int(span.group(1)), int(span.group(2))
                with open(path, "rb") as f:
                    f.seek(first)
                    data = f.read(last - first + 1)
                size = path.stat().st_size
                bad = data.translate(_FLIP)
                with peer._count_lock:
                    peer.requests += 1
                    peer.bytes_served += len(bad)
                self.send_response(206)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(bad)))
                self.send_header("Content-Range", f"bytes {first}-{first + len(bad) - 1}/{size}")
                self.end_headers()
                self.wfile.write(bad)

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._threads: list[threading.Thread] = []

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        return self.scheduler.request(method, path, body, token=self.token)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def heartbeat(self) -> None:
        self._call(
            "PUT",
            f"/v1/nodes/{self.name}",
            {
                "address": self.address,
                "labels": {},
                "load": 0,
                "cache_bytes": 0,
                "cache_size": 1 << 40,
            },
        )

    def start(self, interval: float = 0.5) -> CorruptPeer:
        self.heartbeat()

        def beat() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(Exception):
                    self.heartbeat()

        for what, target in (("serve", self._server.serve_forever), ("heartbeat", beat)):
            thread = threading.Thread(target=target, name=f"{self.name} {what}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def claim(self, object_id: str, true_bytes: Path) -> dict[int, str]:
        """Claim every chunk of `object_id` with the digests the scheduler recorded."""
        chunks = self._call("GET", f"/v1/objects/{object_id}/chunks")
        digests = {int(i): d for i, d in _digests(chunks).items()}
        size = true_bytes.stat().st_size
        self.files[object_id] = true_bytes
        answer = self._call(
            "POST",
            f"/v1/nodes/{self.name}/chunks",
            {
                "add": [
                    {
                        "object": object_id,
                        "size": size,
                        "chunk_size": CHUNK_SIZE,
                        "chunks": [[i, d] for i, d in sorted(digests.items())],
                    }
                ],
                "remove": [],
            },
        )
        if answer.get("conflicts"):
            raise HarnessError(f"the scheduler refused the claim: {answer}")
        return digests

    def report(
        self,
        object_id: str,
        size: int,
        chunks: dict[int, str],
        remove: list[int] | None = None,
    ) -> dict[str, Any]:
        """Report holding `chunks` (index -> digest) of an object, as a node does; the
        scheduler's answer ({"conflicts", "refused"})."""
        held = [[i, d] for i, d in sorted(chunks.items())]
        add = {"object": object_id, "size": size, "chunk_size": CHUNK_SIZE, "chunks": held}
        body = {
            "add": [add] if held else [],
            "remove": [{"object": object_id, "chunks": remove}] if remove else [],
        }
        answer: dict[str, Any] = self._call("POST", f"/v1/nodes/{self.name}/chunks", body)
        return answer

    def claim_source(self, object_id: str, indexes: list[int]) -> list[int]:
        """Ask for the source reads of chunks, as a node does; the chunks granted."""
        answer = self._call(
            "POST", f"/v1/objects/{object_id}/claims", {"node": self.name, "chunks": indexes}
        )
        return [int(i) for i in answer["granted"]]

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)


_FLIP = bytes(255 - i for i in range(256))  # every bit of every byte inverted


def flipped(data: bytes) -> bytes:
    """`data` as a CorruptPeer serves it."""
    return data.translate(_FLIP)


def _digests(doc: Any) -> dict[str, str]:
    """Chunk index (a JSON key) -> digest from GET /v1/objects/<object>/chunks."""
    digests = doc.get("digests") if isinstance(doc, dict) else None
    if not isinstance(digests, dict):
        raise HarnessError(f"unexpected chunk map: {json.dumps(doc)[:500]}")
    return digests
