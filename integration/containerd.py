"""containerd as a real client of registries and registry mirrors, for tests and benchmarks.

Owns: Debian's `containerd` as a process with its own root, state, sockets and config in
a work directory (the CRI plugin off: `ctr` is the client), `ctr` calls against it (pull
with a hosts directory, check, mount a pulled image's snapshot), the `hosts.toml` that
points containerd at a mirror with the registry as the fallback, and the standalone
registry mirror (`python -m syncbit.mirror`) as a process. Everything is stopped by the
PID started and every mount detached, also on failure. Nothing here imports pytest;
failures raise `HarnessError`.

    with Containerd(tmp / "ctrd") as ctrd, MirrorProcess(tmp / "mirror", [reg.host]) as m:
        hosts = write_hosts_toml(tmp / "hosts", reg.host, reg.url, [m.url])
        ctrd.pull(f"{reg.host}/team/app:v1", hosts)
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from integration.cluster import (
    HOST,
    Cluster,
    HarnessError,
    ManagedProcess,
    Node,
    Scheduler,
    free_port,
    mounts_under,
    unmount_lazy,
    wait_until,
)
from syncbit.chunks import identity_digest
from syncbit.mirror.hosts import hosts_toml

MIRROR = [sys.executable, "-m", "syncbit.mirror"]

# Plugins that need what a test machine may lack (block devices, special filesystems, a
# CNI setup): off, so that containerd starts the same everywhere.
_DISABLED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
]
_CHECK = re.compile(
    r"^(?P<ref>\S+)\s+(?P<type>\S+)\s+(?P<digest>sha256:[0-9a-f]{64})\s+"
    r"(?P<status>\S+(?: \(\d+/\d+\))?)\s+(?P<size>.+?)\s+(?P<unpacked>true|false)\s*$"
)


def containerd_unavailable() -> str | None:
    """Why containerd cannot run here (a missing tool, or not root), else None."""
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install containerd)"
    if os.geteuid() != 0:
        return "containerd needs root (snapshots are mounts)"
    return None


@dataclass(frozen=True)
class ImageCheck:
    """One line of `ctr images check`: the image's digest, its content status (`complete
    (3/3)`) and whether its layers are unpacked into snapshots."""

    ref: str
    digest: str
    status: str
    unpacked: bool

    @property
    def complete(self) -> bool:
        return self.status.startswith("complete")


class Containerd(ManagedProcess):
    """`containerd` with everything of its own under `workdir` (its sockets in a short
    temporary directory: a unix socket path has at most 107 bytes)."""

    def __init__(
        self,
        workdir: Path,
        snapshotter: str = "native",
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        super().__init__(f"containerd {workdir.name}", workdir / "containerd.log")
        self.workdir = workdir
        self.snapshotter = snapshotter
        # How its commands run: containerd and `ctr` (which fetches in ctr 1.6) inside a
        # network namespace, say (bench/netns.py's `Host.argv`); the socket is a file.
        self.wrap = wrap or (lambda argv: argv)
        self.root = workdir / "root"
        self.state = workdir / "state"
        self._sockets = Path(tempfile.mkdtemp(prefix="sbctrd-"))
        self.address = str(self._sockets / "containerd.sock")

    def _config(self) -> str:
        disabled = ", ".join(f'"{p}"' for p in _DISABLED)
        return (
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            f"disabled_plugins = [{disabled}]\n"
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.address}.ttrpc"\n'
            "[debug]\n"
            '  level = "info"\n'
            "[metrics]\n"
            '  address = ""\n'
        )

    def start(self, timeout: float = 60.0) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.toml"
        config.write_text(self._config())
        self._spawn(self.wrap(["containerd", "--config", str(config)]))
        wait_until(self._ready, timeout, f"{self.name} to answer", evidence=self.log_tail)
        return self

    def _ready(self) -> bool:
        if not self.alive:
            raise HarnessError(f"{self.name} exited at start\n{self.log_tail()}")
        done = subprocess.run(
            self.wrap(["ctr", "--address", self.address, "version"]),
            capture_output=True,
            timeout=30,
        )
        return done.returncode == 0

    def ctr(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.wrap(self.ctr_argv(*args)),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def ctr_argv(self, *args: str) -> list[str]:
        """`ctr` against this containerd (not wrapped)."""
        return ["ctr", "--address", self.address, *args]

    def _ok(self, *args: str, timeout: float = 300.0) -> str:
        done = self.ctr(*args, timeout=timeout)
        if done.returncode != 0:
            raise HarnessError(f"ctr {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def pull(self, ref: str, hosts_dir: Path, *flags: str) -> str:
        """`ctr images pull --hosts-dir DIR ref` (unpacked into the snapshotter)."""
        return self._ok(*self._pull_args(ref, hosts_dir, *flags))

    def pull_argv(self, ref: str, hosts_dir: Path, *flags: str) -> list[str]:
        """The command line of `pull`, wrapped, for a caller that runs it itself."""
        return self.wrap(self.ctr_argv(*self._pull_args(ref, hosts_dir, *flags)))

    def _pull_args(self, ref: str, hosts_dir: Path, *flags: str) -> list[str]:
        hosts = ["--hosts-dir", str(hosts_dir), "--snapshotter", self.snapshotter]
        return ["images", "pull", *hosts, *flags, ref]

    def check(self, ref: str) -> ImageCheck:
        """What `ctr images check` says about `ref`."""
        out = self._ok("images", "check", "--snapshotter", self.snapshotter, f"name=={ref}")
        for line in out.splitlines()[1:]:
            match = _CHECK.match(line)
            if match and match["ref"] == ref:
                unpacked = match["unpacked"] == "true"
                return ImageCheck(ref, match["digest"], match["status"], unpacked)
        raise HarnessError(f"ctr images check does not list {ref}:\n{out}")

    def remove(self, ref: str) -> None:
        """The image and (by containerd's synchronous GC) its content and snapshots."""
        self._ok("images", "rm", "--sync", ref)

    @contextlib.contextmanager
    def mounted(self, ref: str, target: Path) -> Iterator[Path]:
        """The image's unpacked root filesystem mounted read-only at `target`."""
        target.mkdir(parents=True, exist_ok=True)
        self._ok("images", "mount", "--snapshotter", self.snapshotter, ref, str(target))
        try:
            yield target
        finally:
            done = self.ctr("images", "unmount", "--rm", str(target))
            if done.returncode != 0:
                unmount_lazy(target)

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive:
            self.terminate(timeout)

    def cleanup(self) -> None:
        for mount in mounts_under(self.workdir):  # deepest first
            unmount_lazy(mount)
        super().cleanup()
        shutil.rmtree(self._sockets, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def write_hosts_toml(hosts_dir: Path, registry: str, server: str, mirrors: list[str]) -> Path:
    """`<hosts_dir>/<registry>/hosts.toml` as syncbit writes it (`syncbit.mirror.hosts`):
    the mirrors first (pull and resolve), then `server` (the registry itself, e.g.
    http://127.0.0.1:5000) as the fallback. Returns `hosts_dir`, what `ctr --hosts-dir`
    and containerd's `config_path` name."""
    directory = hosts_dir / registry
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(hosts_toml(server, mirrors))
    return hosts_dir


class MirrorProcess(ManagedProcess):
    """`python -m syncbit.mirror` on a free loopback port, its cache under `workdir`,
    reaching `insecure` registries over plain HTTP."""

    def __init__(
        self,
        workdir: Path,
        insecure: list[str],
        env: dict[str, str] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        super().__init__(f"mirror {workdir.name}", workdir / "mirror.log")
        self.workdir = workdir
        self.insecure = list(insecure)
        self.env = env or {}
        self.extra = list(extra or [])
        self.port = 0
        self.cache = workdir / "cache"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> MirrorProcess:
        self.port = self.port or free_port()
        argv = [*MIRROR, "serve", "--listen", f"{HOST}:{self.port}"]
        argv += ["--cache-dir", str(self.cache)]
        for registry in self.insecure:
            argv += ["--insecure-registry", registry]
        self._spawn([*argv, *self.extra], env=self.env)
        wait_until(self._ready, timeout, f"{self.name} to answer /v2/", evidence=self.log_tail)
        return self

    def _ready(self) -> bool:
        if not self.alive:
            raise HarnessError(f"{self.name} exited at start\n{self.log_tail()}")
        try:
            return httpx.get(self.url + "/v2/", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def cached(self) -> set[str]:
        """The digests in the mirror's cache (verified content only)."""
        blobs = self.cache / "blobs" / "sha256"
        return {f"sha256:{p.name}" for p in blobs.iterdir()} if blobs.exists() else set()

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive:
            self.terminate(timeout)

    def __enter__(self) -> MirrorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class MirrorCluster(Cluster):
    """A scheduler and `count` node daemons (separate processes, each with its cache,
    mount and peer port), each running the registry mirror of the node core on a loopback
    port of its own, reaching `insecure` registries over plain HTTP.

        with MirrorCluster(tmp / "mc", [reg.host], 2) as cluster:
            url = cluster.mirror_url(0)
    """

    def __init__(self, workdir: Path, insecure: list[str], count: int = 2) -> None:
        # No origin: the registry is the source. Cluster's start, close and context
        # manager need only the scheduler and the nodes.
        self.workdir = workdir
        self.tls = None
        self.token_file = self.admin_token_file = None
        self.scheduler = Scheduler(workdir / "scheduler", workdir / "logs", node_timeout=4.0)
        registries = {host: {"insecure": True} for host in insecure}
        self.ports = [free_port() for _ in range(count)]
        self.nodes = [
            Node(
                f"m{i + 1}",
                workdir,
                self.scheduler.url,
                read_deadline=30.0,
                config={
                    "heartbeat_interval": 0.5,
                    "mirror": {"listen": f"{HOST}:{port}", "registries": registries},
                },
            )
            for i, port in enumerate(self.ports)
        ]

    def mirror_url(self, index: int) -> str:
        return f"http://{HOST}:{self.ports[index]}"

    def start(self) -> MirrorCluster:
        super().start()
        try:
            for index, node in enumerate(self.nodes):
                ready = functools.partial(_answers, self.mirror_url(index) + "/v2/")
                wait_until(ready, 30, f"{node.name}'s mirror", evidence=node.log_tail)
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> MirrorCluster:
        return self.start()

    def holders(self, digest: str) -> set[str]:
        """Nodes the scheduler names as holding every chunk of blob `digest` (none when
        it knows no chunk of it)."""
        object_id = identity_digest("sha256", digest.partition(":")[2])
        try:
            doc = self.scheduler.get(f"/v1/objects/{object_id}/chunks")
        except HarnessError:
            return set()  # no dataset names it and no mirror registered it
        peers: dict[str, list[dict[str, str]]] = doc.get("peers", {})
        if not doc.get("digests") or len(peers) < len(doc["digests"]):
            return set()
        return set.intersection(*({p["node"] for p in found} for found in peers.values()))

    def chunk_digests(self, digest: str) -> dict[str, str]:
        """The chunk digests the scheduler recorded for blob `digest` (index -> hex)."""
        object_id = identity_digest("sha256", digest.partition(":")[2])
        found: dict[str, str] = self.scheduler.get(f"/v1/objects/{object_id}/chunks")["digests"]
        return found

    @staticmethod
    def store_objects(node: Node) -> set[str]:
        """Ids of the objects `node`'s store holds complete (its local API, `cache ls`)."""
        resp = httpx.get(f"http://{node.address}/v1/local/cache", timeout=10, trust_env=False)
        resp.raise_for_status()
        return {row["id"] for row in resp.json()["objects"] if row["complete"]}


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False
