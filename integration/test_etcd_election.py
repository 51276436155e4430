"""Scheduler-like contenders as processes on a real 3-member etcd cluster: `kill -9` the
leading one and another leads once its lease expired; a contender stopped with SIGTERM
resigns, and the office passes on without waiting for a lease.

Waits are bounded generously; the failover time is printed, never asserted."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.cluster import HarnessError, ManagedProcess, wait_until
from integration.etcd_cluster import EtcdCluster, etcd_unavailable

pytestmark = pytest.mark.skipif(etcd_unavailable() is not None, reason=str(etcd_unavailable()))

TTL = 2
PATIENCE = 30.0


class Contender(ManagedProcess):
    """`python -m integration.election_contender` as contender `index`."""

    def __init__(self, index: int, workdir: Path, endpoints: str, key: str) -> None:
        super().__init__(f"contender-{index}", workdir / f"contender-{index}.log")
        self.id = f"sched-{index}"
        self.argv = [
            sys.executable,
            "-m",
            "integration.election_contender",
            endpoints,
            key,
            self.id,
            f"10.0.0.{index}:7070",
            str(TTL),
        ]

    def start(self) -> Contender:
        self._spawn(self.argv)
        wait_until(
            lambda: "READY" in self.log_text(),
            PATIENCE,
            f"{self.name} READY",
            evidence=self.log_tail,
        )
        return self

    def term(self) -> int | None:
        """The term this contender leads now, by its own account (None: it does not)."""
        events = re.findall(r"^(LEADING|STOPPED) (\d+)$", self.log_text(), re.M)
        if self.alive and events and events[-1][0] == "LEADING":
            return int(events[-1][1])
        return None


@pytest.fixture(scope="module")
def etcd(workdir: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(workdir / "etcd-election", size=3) as cluster:
        yield cluster


def etcd_leader_id(etcd: EtcdCluster, key: str) -> str:
    """Who holds the election key, asked with etcdctl ("" when nobody does)."""
    done = subprocess.run(
        ["etcdctl", "--endpoints", ",".join(etcd.endpoints), "get", key, "--print-value-only"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
    )
    if done.returncode != 0:
        raise HarnessError(f"etcdctl get failed: {done.stderr}")
    match = re.search(r'"id": "([^"]+)"', done.stdout)
    return match.group(1) if match else ""


def the_leader(contenders: list[Contender]) -> Contender:
    """Until exactly one contender says it leads; that one."""

    def one() -> Contender | None:
        leading = [c for c in contenders if c.term() is not None]
        return leading[0] if len(leading) == 1 else None

    found = wait_until(
        one,
        PATIENCE,
        "exactly one leading contender",
        evidence=lambda: "\n".join(c.log_tail(10) for c in contenders),
    )
    assert found is not None
    return found


def test_killed_leader_is_replaced_and_a_resigning_one_hands_over(
    etcd: EtcdCluster, workdir: Path
) -> None:
    key = f"/election-{uuid.uuid4().hex[:8]}"
    contenders = [Contender(i, workdir / "contenders", etcd.url, key) for i in range(3)]
    try:
        for contender in contenders:
            contender.start()
        first = the_leader(contenders)
        first_term = first.term()
        assert first_term is not None and etcd_leader_id(etcd, key) == first.id

        killed_at = time.monotonic()
        first.kill(signal.SIGKILL)  # no resignation: the office waits for the lease
        second = the_leader([c for c in contenders if c is not first])
        print(f"failover after kill -9: {time.monotonic() - killed_at:.2f}s (lease TTL {TTL}s)")
        second_term = second.term()
        assert second_term is not None and second_term > first_term
        assert etcd_leader_id(etcd, key) == second.id

        second.terminate()  # resigns: deletes its key and revokes its lease
        assert second.returncode == 0, second.log_tail()
        assert f"STOPPED {second_term}" in second.log_text()
        third = the_leader([c for c in contenders if c.alive])
        assert third not in (first, second) and etcd_leader_id(etcd, key) == third.id
    finally:
        for contender in contenders:
            contender.cleanup()
