"""The swarm over real links: origin, scheduler and three daemons in their own network
namespaces (bench/netns.py), every node link capped at 100 Mbit/s each way. A dataset
prefetched to all three must end up byte-exact behind every mount while the origin sends
it about once: the nodes must take it from each other, not from the origin.

The processes are those of `integration.cluster`, each started through `nsenter` into its
host's network namespace only, so the FUSE mounts stay visible to this test.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bench.netns import Host, NetnsError, Port, Topology, unusable
from integration.cluster import (
    SYNCBIT,
    Dataset,
    HarnessError,
    ManagedProcess,
    Node,
    Origin,
    fresh_dataset,
    in_thread,
    run_cli,
    sha256_file,
    wait_until,
)

MiB = 1 << 20
SIZE = 24 * MiB
RATE = "100mbit"
NODES = 3
PEER_PORT = 7901
SCHED_PORT = 7900
ORIGIN_PORT = 8080

pytestmark = pytest.mark.skipif(unusable() is not None, reason=f"swarm test: {unusable()}")


class NsOrigin(Origin):
    """The test origin, listening on its host's address inside its namespace."""

    def __init__(self, root: Path, log_dir: Path, host: Host) -> None:
        super().__init__(root, log_dir, host=host.address)
        self.port = ORIGIN_PORT
        self.ns = host

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        super()._spawn(self.ns.argv(argv), env)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.ns.http_get(self.url + "__stats"))
        return result


class NsScheduler(ManagedProcess):
    """`syncbit scheduler` on its host's address."""

    def __init__(self, state_dir: Path, log_dir: Path, host: Host) -> None:
        super().__init__("scheduler", log_dir / "scheduler.log")
        self.ns = host
        self.url = f"http://{host.address}:{SCHED_PORT}"
        self.state_dir = state_dir

    def start(self) -> NsScheduler:
        # --insecure: open on purpose, on a LAN of network namespaces nothing else reaches.
        argv = [*SYNCBIT, "scheduler", "--listen", f"{self.ns.address}:{SCHED_PORT}"]
        argv += ["--insecure"]
        self._spawn(self.ns.argv([*argv, "--state-dir", str(self.state_dir)]))

        def healthy() -> bool:
            if not self.alive:
                raise HarnessError(f"scheduler exited\n{self.log_tail()}")
            with contextlib.suppress(NetnsError):
                return bool(self.ns.http_get(self.url + "/healthz", timeout=2))
            return False

        wait_until(healthy, 30, "scheduler /healthz", interval=0.2, evidence=self.log_tail)
        return self


class NsNode(Node):
    """A daemon in its host's namespace: it listens on every address there (local control
    requests must come from loopback) and tells peers its LAN address."""

    def __init__(self, host: Host, workdir: Path, scheduler_url: str) -> None:
        advertise = ["--advertise", f"{host.address}:{PEER_PORT}", "--insecure"]
        super().__init__(
            host.name, workdir, scheduler_url, labels={"swarm": "1"}, extra_args=advertise
        )
        self.ns = host

    @property
    def address(self) -> str:
        return f"0.0.0.0:{PEER_PORT}"

    def command(self) -> list[str]:
        return self.ns.argv(super().command())


@dataclass
class Swarm:
    lan: Topology
    origin: NsOrigin
    scheduler: NsScheduler
    nodes: list[NsNode]
    dataset: Dataset

    def cli(self, host: Host, *args: str, timeout: float = 60) -> None:
        done = run_cli(host.argv([*SYNCBIT, *args]), timeout=timeout)
        if done.returncode != 0:
            raise HarnessError(f"syncbit {' '.join(args)} on {host.name}: {done.stderr}")


@pytest.fixture
def swarm(workdir: Path) -> Iterator[Swarm]:
    """The LAN and every process on it; all stopped by PID, unmounted and deleted after."""
    where = workdir / "swarm"
    ds = fresh_dataset(where / "www", "weights", {"model.bin": SIZE, "config.json": 4321})
    processes: list[ManagedProcess] = []
    with Topology(RATE) as lan:
        try:
            origin = NsOrigin(where / "www", where / "logs", lan.add_host("origin"))
            processes.append(origin.start())
            scheduler = NsScheduler(where / "scheduler", where / "logs", lan.add_host("sched"))
            processes.append(scheduler.start())
            nodes = [
                NsNode(lan.add_host(f"node{i}"), where, scheduler.url) for i in range(1, NODES + 1)
            ]
            for node in nodes:
                processes.append(node.start(wait=False))
            for node in nodes:
                node.wait_mounted()
            yield Swarm(lan, origin, scheduler, nodes, ds)
        finally:
            for proc in reversed(processes):
                with contextlib.suppress(Exception):
                    proc.cleanup()


@pytest.mark.timeout(90)
def test_prefetch_over_shaped_links_sends_each_byte_from_the_origin_about_once(
    swarm: Swarm,
) -> None:
    sched = swarm.scheduler
    url = f"{swarm.origin.url}{swarm.dataset.name}/"
    swarm.cli(sched.ns, "dataset", "add", "weights", url, "--scheduler", sched.url)
    ports = swarm.lan.ports()
    start = time.monotonic()
    swarm.cli(sched.ns, "prefetch", "weights", "--selector", "swarm=1", "--scheduler", sched.url)
    wait = [*SYNCBIT, "wait", "weights", "--timeout", "45s", "--daemon", f"127.0.0.1:{PEER_PORT}"]
    waits = [
        subprocess.Popen(node.ns.argv(wait), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for node in swarm.nodes
    ]
    try:
        outputs = [w.communicate(timeout=60)[0].decode(errors="replace") for w in waits]
    finally:
        for w in waits:
            if w.poll() is None:
                w.kill()
            w.communicate()  # reaped, and its pipe closed
    elapsed = time.monotonic() - start
    for node, w, out in zip(swarm.nodes, waits, outputs, strict=True):
        assert w.returncode == 0, f"wait on {node.name} exited {w.returncode}:\n{out}"

    for node in swarm.nodes:
        for rel, facts in swarm.dataset.files.items():
            path = node.path("weights", rel)
            digest = in_thread(partial(sha256_file, path), 30, f"read {path}")
            assert digest == facts.sha256, f"{node.name}: {rel} differs from the origin's"

    served = swarm.origin.served()
    total = swarm.dataset.total_size
    assert served <= 1.25 * total, (
        f"origin sent {served / total:.2f}x the dataset to {NODES} nodes in {elapsed:.1f}s"
    )
    # The switch's counters, which bench/swarm.py reports from: every node's port
    # delivered the dataset to it, the origin's port carried at least what it served, and
    # the switch delivered no more than the hosts sent into it.
    carried = Port.deltas(ports, swarm.lan.ports())
    for node in swarm.nodes:
        got = carried[node.name].to_host
        assert got >= total, f"{node.name}'s port delivered {got} bytes of {total}"
    assert carried["origin"].from_host >= served
    sent_in = sum(p.from_host for p in carried.values())
    delivered = sum(p.to_host for p in carried.values())
    assert delivered <= sent_in
