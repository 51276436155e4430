"""Helpers shared by the benchmark scripts: ports, waiting, child processes stopped by the
PID they were started with. Not part of the product."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The test servers (syncbit_testing) come with the checkout, not with syncbit: the scripts
# here import them from the repository root, and so do the children they start (`process`).
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from syncbit_testing import environ  # noqa: E402 - needs the root on the path first


def compile_bytecode() -> None:
    """Write the bytecode of the checkout's syncbit modules, as installing a wheel does.
    The benchmarks run syncbit from the checkout (an editable install); where the
    environment sets PYTHONDONTWRITEBYTECODE (CI images, this machine) every `syncbit`
    command would otherwise compile its ~30 modules from source at each start (~25 ms of
    a `pull`), while the tools it is compared with run installed, compiled packages."""
    import compileall

    compileall.compile_dir(REPO / "syncbit", quiet=1)


compile_bytecode()


def unmet(*tools: str) -> str | None:
    """Why this machine cannot run a benchmark that mounts and drops caches (root,
    /dev/fuse) with `tools` (Debian packages of the same name), or None."""
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        return "needs root and /dev/fuse"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install -y {tool})"
    return None


def workdirs(work: Path) -> tuple[Path, Path]:
    """A benchmark's logs/ and www/ (what its origin serves) under `work`, made if missing."""
    logs, www = work / "logs", work / "www"
    logs.mkdir(parents=True, exist_ok=True)
    www.mkdir(exist_ok=True)
    return logs, www


class Rounds:
    """Seconds measured per label over rounds: each printed as it comes, medians after."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}

    def note(self, label: str, seconds: float) -> None:
        self.rows.setdefault(label, []).append(seconds)
        print(f"  {label}: {seconds:.2f}s", flush=True)

    def median(self, label: str) -> float:
        return statistics.median(self.rows[label])


@contextlib.contextmanager
def nginx(conf: Path, port: int) -> Iterator[None]:
    """nginx running `conf` (listening on loopback `port`) for the block; its output next
    to the config file."""
    with process(["nginx", "-c", str(conf)], conf.with_suffix(".out")):
        wait_http(f"http://127.0.0.1:{port}/")
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=1).read()
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` (output to `log`) for the block; SIGTERM it by PID afterwards. `cwd`
    matters for `python -m`: the working directory comes first on its import path."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environ({**os.environ, **(env or {})}),
            start_new_session=True,
            cwd=cwd,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def process_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its threads (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_caches() -> None:
    """Flush dirty pages and drop the page cache (root): the next read comes from disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wait_log(path: Path, text: str, timeout: float) -> bool:
    """Wait until `text` appears in the log at `path` (False: not within `timeout`)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            if text in path.read_text(errors="replace"):
                return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def syncbit_node(
    work: Path,
    env: dict[str, str] | None = None,
    config: dict[str, object] | None = None,
    pids: list[int] | None = None,
) -> Iterator[tuple[Path, str, str]]:
    """A fresh single-node syncbit (daemon with its embedded scheduler, empty cache, its own
    mount under `work`) for the block: yields (mount, scheduler URL, daemon host:port).
    `config`: DaemonConfig keys written to a YAML file given with --config; `pids`: the
    daemon's PID is appended to it (to meter its CPU). Unmounted and stopped by PID
    afterwards."""
    import shutil
    import sys

    import yaml

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    mnt = work / "mnt"
    sched, listen = free_port(), free_port()
    argv = [sys.executable, "-m", "syncbit.cli", "daemon", "--mount", str(mnt)]
    argv += ["--cache-dir", str(work / "cache"), "--listen", f"127.0.0.1:{listen}"]
    argv += ["--scheduler-listen", f"127.0.0.1:{sched}", "--node", "bench"]
    if config:
        (work / "daemon.yaml").write_text(yaml.safe_dump(config))
        argv += ["--config", str(work / "daemon.yaml")]
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(process(argv, work / "daemon.log", env))
        if pids is not None:
            pids.append(daemon.pid)
        stack.callback(subprocess.run, ["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        wait_http(f"http://127.0.0.1:{sched}/healthz")
        # A daemon runs long before its first pull: measure one that finished starting,
        # its S3 and Hub clients warmed up (a thread at start; ~0.5 s of CPU here).
        wait_log(work / "daemon.log", "clients warmed up", timeout=20.0)
        yield mnt, f"http://127.0.0.1:{sched}", f"127.0.0.1:{listen}"
