"""`syncbit pull`: register a dataset and bring every byte to this node, resumably, from
peers where they have it; real daemons, a real origin, the real CLI."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from integration.cluster import (
    SYNCBIT,
    Cluster,
    Origin,
    background,
    fresh_dataset,
    sha256_file,
    wait_until,
)
from syncbit.chunks import DEFAULT_CHUNK_SIZE, HEAD_SAMPLE

CLUSTER_NODES = 2
MiB = 1 << 20


def _pull(cluster: Cluster, node_name: str, *args: str) -> subprocess.CompletedProcess[str]:
    node = cluster.node(node_name)
    return cluster.cli("pull", *args, "--daemon", node.address, timeout=120)


@pytest.mark.timeout(300)
def test_pull_brings_every_byte_once_then_peers_serve_the_next_node(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds = fresh_dataset(origin_root, "pullds", {"w/model.bin": 96 * MiB, "cfg.json": 3000})
    origin.reset()
    done = _pull(up, "n1", f"{origin.url}/pullds/")
    assert done.returncode == 0, done.stderr
    assert "complete" in done.stderr and "Traceback" not in done.stderr
    assert origin.served() <= ds.total_size * 1.02  # each byte about once

    # Complete means readable with no network: stop the origin and read via the mount.
    origin.stop()
    try:
        n1 = up.node("n1")
        for rel, facts in ds.files.items():
            assert sha256_file(n1.path("pullds", rel)) == facts.sha256
    finally:
        origin.start()

    origin.reset()
    time.sleep(1.0)  # n1's chunk reports reach the scheduler
    again = _pull(up, "n2", f"{origin.url}/pullds/", "--name", "pullds")
    assert again.returncode == 0, again.stderr
    assert origin.served() < ds.total_size * 0.05  # n2 got it from n1


@pytest.mark.timeout(300)
def test_interrupted_pull_resumes_without_downloading_again(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds = fresh_dataset(origin_root, "resume", {"big.bin": 200 * MiB})
    origin.reset()
    n1 = up.node("n1")
    argv = [
        *SYNCBIT,
        "pull",
        f"{origin.url}/resume/",
        "--scheduler",
        up.scheduler.url,
        "--daemon",
        n1.address,
    ]
    first = subprocess.Popen(argv, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: origin.served() > 8 * MiB, 30, "the pull to start", interval=0.01)
        first.send_signal(signal.SIGINT)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode != 0  # interrupted: not reported as complete
    second = _pull(up, "n1", f"{origin.url}/resume/")
    assert second.returncode == 0, second.stderr
    assert origin.served() <= ds.total_size * 1.05
    assert sha256_file(n1.path("resume", "big.bin")) == ds.files["big.bin"].sha256


@pytest.mark.timeout(300)
def test_pull_rides_out_a_daemon_restart(up: Cluster, origin: Origin, origin_root: Path) -> None:
    """The daemon restarts under a running `syncbit pull`: the client waits for it, asks
    again (a restarted daemon has forgotten the pull) and completes."""
    ds = fresh_dataset(origin_root, "rollpull", {"big.bin": 200 * MiB})
    origin.reset()
    n2 = up.node("n2")
    argv = [*SYNCBIT, "pull", f"{origin.url}/rollpull/", "--scheduler", up.scheduler.url]
    with background([*argv, "--daemon", n2.address]) as client:
        wait_until(lambda: origin.served() > 8 * MiB, 30, "the pull to start", interval=0.01)
        n2.stop()
        before_restart = origin.served()
        assert client.poll() is None  # still there, waiting for the daemon
        n2.start()
        _, err = client.communicate(timeout=120)
    assert client.returncode == 0, err
    assert "waiting for it to come back" in err and "complete" in err, err
    # Chunks in flight at the stop (RAM only) are fetched again, the rest is not:
    # after the restart the origin sends at most what the file lacks, and the head sample
    # each source read not at the file's start takes (at most one per chunk).
    samples = (ds.total_size // DEFAULT_CHUNK_SIZE) * HEAD_SAMPLE
    assert origin.served() - before_restart <= ds.total_size + samples
    assert sha256_file(n2.path("rollpull", "big.bin")) == ds.files["big.bin"].sha256


def test_pull_errors_are_clear(up: Cluster, origin: Origin) -> None:
    missing = _pull(up, "n1", f"{origin.url}/no-such-dir/")
    assert missing.returncode == 2 and "error:" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_daemon = up.cli("pull", f"{origin.url}/pullds/", "--daemon", "127.0.0.1:1")
    assert no_daemon.returncode == 1 and "no syncbit daemon" in no_daemon.stderr
    wrong = up.cli("pull", f"{origin.url}/pullds/", "--revision", "v1")
    assert wrong.returncode == 2 and "hf://" in wrong.stderr


def test_pull_from_a_local_directory(up: Cluster, origin_root: Path) -> None:
    ds = fresh_dataset(origin_root, "filepull", {"x/a.bin": 5 * MiB + 1, "b.txt": 10})
    done = _pull(up, "n1", f"file://{ds.root}")
    assert done.returncode == 0, done.stderr
    for rel, facts in ds.files.items():
        assert sha256_file(up.node("n1").path("filepull", rel)) == facts.sha256
