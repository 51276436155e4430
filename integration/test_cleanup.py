"""A test run stopped with SIGTERM (a CI timeout, `timeout(1)`) still stops the daemons it
started and detaches their mounts: run a hanging test in a pytest of its own, stop it, and
look for what it left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration.cluster import Cluster, mounts_under, wait_until

HANG = "SYNCBIT_IT_HANG"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not os.environ.get(HANG), reason="run by test_sigterm_leaves_nothing")
def test_hang(cluster: Cluster) -> None:
    time.sleep(600)


def _left_behind(where: Path) -> list[str]:
    """Processes whose command line names `where` (the run's daemons, scheduler, origin)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if pid.isdigit() and str(where).encode() in cmdline and int(pid) != os.getpid():
            found.append(pid)
    return found


@pytest.mark.timeout(180)
def test_sigterm_leaves_nothing(tmp_path: Path) -> None:
    env = {**os.environ, HANG: "1", "SYNCBIT_IT_DIR": str(tmp_path)}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    run = subprocess.Popen(
        [*argv, f"{__file__}::test_hang"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: mounts_under(tmp_path), 120, "the hanging test's mounts")
        run.send_signal(signal.SIGTERM)
        run.wait(120)
    finally:
        if run.poll() is None:
            run.kill()  # by the PID we started
            run.wait(30)
    assert mounts_under(tmp_path) == []
    wait_until(lambda: not _left_behind(tmp_path), 30, "the run's processes to be gone")
