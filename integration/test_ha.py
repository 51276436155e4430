"""A highly available control plane, all real and on loopback: a 3-member etcd cluster
(Debian's etcd-server), 3 `syncbit scheduler --state etcd://...` replicas, 3 daemons with
FUSE mounts that know all three scheduler URLs, the CLI given all three too.

During a prefetch to the 3 nodes the leading scheduler is killed (SIGKILL): another leads
within about the lease TTL, the prefetch completes with the origin sending each byte
about once, nothing durable is lost, reads never fail. With one etcd member stopped all
keeps working; with two, writes fail with one clear line while cached reads go on, and
everything recovers when etcd is back.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.cluster import (
    SYNCBIT,
    Dataset,
    HarnessError,
    Node,
    Origin,
    Scheduler,
    fresh_dataset,
    run_cli,
    sha256_file,
    wait_until,
)
from integration.etcd_cluster import EtcdCluster, etcd_unavailable

pytestmark = pytest.mark.skipif(etcd_unavailable() is not None, reason=etcd_unavailable() or "")

MiB = 1 << 20
TTL = 5  # the replicas' election TTL (the default)
_LEADER = re.compile(r"^syncbit_scheduler_leader (\S+)$", re.M)


class HA:
    """etcd x3, scheduler replicas x3, daemons x3; `close` kills what runs, by PID."""

    def __init__(self, workdir: Path, origin: Origin) -> None:
        self.workdir = workdir
        self.origin = origin
        self.etcd = EtcdCluster(workdir / "etcd", size=3)
        self.schedulers: list[Scheduler] = []
        self.nodes: list[Node] = []

    def start(self) -> HA:
        self.etcd.start()
        for i in range(3):
            scheduler = Scheduler(
                self.workdir / f"s{i}",
                self.workdir / f"s{i}",
                node_timeout=4.0,
                file_roots=[self.origin.root],
                extra_args=["--state", self.etcd.url],
            )
            self.schedulers.append(scheduler)
            scheduler.start()
        config = {
            "heartbeat_interval": 0.5,
            "file_roots": [str(self.origin.root)],
            "prefetch_concurrency": 2,
        }
        # Each scheduler is first for one node: whichever leader dies, a node that talked
        # to it must fail over to the next URL.
        urls = [s.url for s in self.schedulers]
        self.nodes = [
            Node(f"n{i + 1}", self.workdir, ",".join(urls[i:] + urls[:i]), config=config)
            for i in range(3)
        ]
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_mounted()
        return self

    def close(self) -> None:
        for proc in [*self.nodes, *self.schedulers]:
            with contextlib.suppress(Exception):
                proc.cleanup()
        for scheduler in self.schedulers:
            scheduler.close()
        self.etcd.close()

    @property
    def urls(self) -> str:
        return ",".join(s.url for s in self.schedulers)

    def leaders(self) -> list[int]:
        found = []
        for i, scheduler in enumerate(self.schedulers):
            if not scheduler.alive:
                continue
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"{scheduler.url}/metrics", timeout=2, trust_env=False).text
                match = _LEADER.search(text)
                if match and float(match.group(1)) == 1.0:
                    found.append(i)
        return found

    def wait_leader(self, timeout: float = 60.0) -> int:
        found: list[int] = []

        def one() -> bool:
            found[:] = self.leaders()
            if len(found) > 1:
                raise HarnessError(f"replicas {found} lead at once")
            return len(found) == 1

        wait_until(one, timeout, "one scheduler replica to lead", interval=0.05)
        return found[0]

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run_cli([*SYNCBIT, *args, "--scheduler", self.urls], timeout=timeout)

    def ok(self, *args: str) -> str:
        done = self.cli(*args)
        if done.returncode != 0:
            raise HarnessError(f"syncbit {' '.join(args)}: {done.returncode}\n{done.stderr}")
        return done.stdout

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.ok("status", "--json"))
        return doc

    def add(self, name: str) -> None:
        self.ok("dataset", "add", name, f"{self.origin.url}/{name}/")
        for node in self.nodes:
            wait_until(node.path(name).is_dir, 30, f"{name} on {node.name}", interval=0.05)


@pytest.fixture
def ha(workdir: Path, origin: Origin) -> Iterator[HA]:
    group = HA(workdir / "ha", origin)
    try:
        yield group.start()
    finally:
        group.close()


class Reader(threading.Thread):
    """Reads random ranges of a cached dataset through every mount until stopped; keeps
    every failure."""

    def __init__(self, nodes: list[Node], ds: Dataset) -> None:
        super().__init__(daemon=True)
        self.nodes, self.ds = nodes, ds
        self.failures: list[str] = []
        self.reads = 0
        self._done = threading.Event()

    def run(self) -> None:
        rng = random.Random(7)
        while not self._done.is_set():
            node = rng.choice(self.nodes)
            rel, facts = rng.choice(sorted(self.ds.files.items()))
            offset = rng.randrange(max(1, facts.size - MiB))
            try:
                with open(node.path(self.ds.name, rel), "rb") as f:
                    f.seek(offset)
                    f.read(MiB)
                self.reads += 1
            except OSError as exc:
                self.failures.append(f"{node.name} {rel}@{offset}: {exc}")
            time.sleep(0.01)

    def stop(self) -> list[str]:
        self._done.set()
        self.join(30)
        return self.failures


def _served(origin: Origin, ds: Dataset) -> int:
    return sum(origin.served(f"{ds.name}/{rel}") for rel in ds.files)


def _check_bytes(ha: HA, ds: Dataset) -> None:
    for node in ha.nodes:
        for rel, facts in ds.files.items():
            assert sha256_file(node.path(ds.name, rel)) == facts.sha256, (node.name, rel)


def _cached_total(ha: HA, name: str) -> int:
    for doc in ha.status()["datasets"]:
        if doc["name"] == name:
            return sum(int(v) for v in doc.get("cached", {}).values())
    return 0


@pytest.mark.timeout(900)
def test_the_control_plane_survives_its_leader_and_etcd_members(
    ha: HA, origin: Origin, origin_root: Path
) -> None:
    first = ha.wait_leader()
    warm = fresh_dataset(origin_root, "ha-warm", {"w.bin": 12 * MiB, "x.bin": 3 * MiB})
    ha.add("ha-warm")
    for node in ha.nodes:  # cached on every node: what the reader reads throughout
        for rel in warm.files:
            sha256_file(node.path("ha-warm", rel))
    ha.ok("node", "label", "n1", "rack=r1")

    ds = fresh_dataset(
        origin_root, "ha-ds", {"w/a.bin": 320 * MiB, "w/b.bin": 192 * MiB, "c.json": 999}
    )
    ha.add("ha-ds")
    origin.reset()
    ha.ok("prefetch", "ha-ds", "--nodes", "n1,n2,n3")
    reader = Reader(ha.nodes, warm)
    reader.start()
    try:
        # Kill the leader mid-prefetch, once a fifth of the bytes are in.
        wait_until(
            lambda: _cached_total(ha, "ha-ds") >= 3 * ds.total_size // 5,
            300,
            "the prefetch to be under way",
            interval=0.2,
        )
        killed_at = time.monotonic()
        ha.schedulers[first].kill(signal.SIGKILL)
        second = ha.wait_leader(timeout=60)
        took = time.monotonic() - killed_at
        print(f"new leader after {took:.1f}s (lease TTL {TTL}s)")
        assert second != first
        # The lease of a dead leader lapses after the TTL; the bound is the election's
        # correctness on a loaded machine, not a speed figure.
        assert took <= 4 * TTL

        for node in ha.nodes:
            done = run_cli(
                [*SYNCBIT, "wait", "ha-ds", "--timeout", "240s", "--daemon", node.address],
                timeout=300,
            )
            assert done.returncode == 0, done.stdout + done.stderr
        _check_bytes(ha, ds)
        served = _served(origin, ds)
        print(f"origin sent {served / ds.total_size:.3f}x the dataset")
        assert served <= 1.1 * ds.total_size

        # Nothing durable was lost.
        status = ha.status()
        assert {d["name"] for d in status["datasets"]} >= {"ha-warm", "ha-ds"}
        (pf,) = [d for d in status["datasets"] if d["name"] == "ha-ds"]
        assert sorted(t["node"] for t in pf["targets"]) == ["n1", "n2", "n3"]
        (n1,) = [n for n in status["nodes"] if n["name"] == "n1"]
        assert n1["labels"].get("rack") == "r1"

        # One etcd member down: everything keeps working.
        ha.etcd.stop(0)
        more = fresh_dataset(origin_root, "ha-more", {"m.bin": 2 * MiB})
        ha.add("ha-more")
        for node in ha.nodes:
            assert sha256_file(node.path("ha-more", "m.bin")) == more.files["m.bin"].sha256

        # Two down: no quorum. Writes fail in one line; cached reads go on.
        ha.etcd.stop(1)
        fresh_dataset(origin_root, "ha-late", {"l.bin": MiB})
        failed = ha.cli("dataset", "add", "ha-late", f"{origin.url}/ha-late/")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), failed.stderr
        assert "Traceback" not in failed.stderr
        _check_bytes(ha, ds)

        # etcd back: it all recovers.
        ha.etcd.restart(0)
        ha.etcd.restart(1)
        ha.wait_leader(timeout=60)
        wait_until(
            lambda: ha.cli("dataset", "add", "ha-late", f"{origin.url}/ha-late/").returncode == 0,
            60,
            "dataset add to work again",
            interval=1.0,
        )
        assert "ha-late" in {d["name"] for d in ha.status()["datasets"]}
    finally:
        failures = reader.stop()
    assert failures == [] and reader.reads > 0
