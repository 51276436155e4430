"""Scheduler-driven prefetch and readiness with real daemons: four labelled nodes, the
real CLI (`prefetch`, `wait`, `node label`, `status`), a loopback origin that counts the
bytes it sends."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from integration.cluster import (
    SYNCBIT,
    Cluster,
    Dataset,
    Origin,
    background,
    fresh_dataset,
    sha256_file,
    wait_until,
)
from syncbit.chunks import HEAD_SAMPLE

CLUSTER_NODES = 4
MiB = 1 << 20


def CLUSTER_LABELS(i: int) -> dict[str, str]:
    return {"gpu": "h100" if i <= 3 else "t4", "zone": "a"}


def _wait(cluster: Cluster, node: str, name: str, timeout: str = "90s") -> tuple[int, str]:
    done = cluster.cli(
        "wait",
        name,
        "--timeout",
        timeout,
        "--daemon",
        cluster.node(node).address,
        scheduler=False,
        timeout=200,
    )
    return done.returncode, done.stdout + done.stderr


def _progress(cluster: Cluster, node: str, name: str) -> dict[str, object]:
    import httpx

    url = f"http://{cluster.node(node).address}/v1/local/datasets/{name}"
    doc: dict[str, object] = httpx.get(url, timeout=10, trust_env=False).json()
    return doc


def _served(origin: Origin, ds: Dataset) -> int:
    return sum(origin.served(f"{ds.name}/{rel}") for rel in ds.files)


def _status(cluster: Cluster) -> dict[str, dict[str, Any]]:
    done = cluster.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    return {d["name"]: d for d in json.loads(done.stdout)["datasets"]}


def _check_bytes(cluster: Cluster, node: str, ds: Dataset) -> None:
    for rel, facts in ds.files.items():
        assert sha256_file(cluster.node(node).path(ds.name, rel)) == facts.sha256, (node, rel)


@pytest.mark.timeout(300)
def test_prefetch_to_a_selector_fills_matching_nodes_with_each_byte_from_the_origin_once(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds = fresh_dataset(
        origin_root, "pf", {"model/w1.bin": 40 * MiB, "model/w2.bin": 24 * MiB, "cfg.json": 999}
    )
    origin.reset()
    up.add_dataset("pf", f"{origin.url}/pf/")

    # Not assigned yet: `wait` times out with a clear message and a non-zero exit.
    code, out = _wait(up, "n1", "pf", timeout="1s")
    assert code == 1, out
    assert "not ready after 1s" in out and "not assigned to this node" in out
    assert "Traceback" not in out
    code, out = _wait(up, "n1", "nope", timeout="1s")
    assert code == 2 and "no dataset 'nope'" in out, out

    done = up.cli("prefetch", "pf", "--selector", "gpu=h100")
    assert done.returncode == 0, done.stderr
    assert "selector gpu=h100" in done.stdout

    for node in ("n1", "n2", "n3"):
        code, out = _wait(up, node, "pf")
        assert code == 0, out
        doc = _progress(up, node, "pf")
        # `wait` returned only once everything was here.
        assert doc["ready"] is True and doc["present_bytes"] == ds.total_size
    assert _served(origin, ds) <= ds.total_size * 1.1  # each byte about once, for 3 nodes
    for node in ("n1", "n2", "n3"):
        _check_bytes(up, node, ds)
        assert os.getxattr(up.node(node).path("pf"), "user.syncbit.ready") == b"1"
        cached = os.getxattr(up.node(node).path("pf"), "user.syncbit.cached_bytes")
        assert int(cached) == ds.total_size

    # n4 does not match the selector: nothing was fetched there.
    assert _progress(up, "n4", "pf")["present_bytes"] == 0
    assert os.getxattr(up.node("n4").path("pf"), "user.syncbit.ready") == b"0"
    assert os.getxattr(up.node("n1").path("pf"), "user.syncbit.assigned") == b"1"
    assert os.getxattr(up.node("n4").path("pf"), "user.syncbit.assigned") == b"0"
    wait_until(
        lambda: sorted(_status(up)["pf"]["ready"]) == ["n1", "n2", "n3"],
        15,
        "the scheduler to see pf ready on n1-n3",
    )
    status = _status(up)["pf"]
    assert sorted(status["assigned"]) == ["n1", "n2", "n3"]
    table = up.cli("status")
    assert "3/3" in table.stdout, table.stdout
    listed = up.cli("node", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    ready = {n["name"]: sorted(n["ready"]) for n in json.loads(listed.stdout)}
    assert ready == {"n1": ["pf"], "n2": ["pf"], "n3": ["pf"], "n4": []}

    # A label change on n4 assigns it without a restart; it fills from its peers.
    before = _served(origin, ds)
    done = up.cli("node", "label", "n4", "gpu=h100", "zone-")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "n4: gpu=h100"
    code, out = _wait(up, "n4", "pf")
    assert code == 0, out
    _check_bytes(up, "n4", ds)
    assert _served(origin, ds) - before <= ds.total_size * 0.05

    # Dropping the assignment stops nothing that is done, and status follows.
    done = up.cli("prefetch", "pf", "--remove")
    assert done.returncode == 0, done.stderr
    assert "assigned to no nodes" in done.stdout
    up.cli("node", "label", "n4", "gpu=t4")


@pytest.mark.timeout(300)
def test_progress_long_poll_answers_when_the_dataset_becomes_ready(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    import httpx

    ds = fresh_dataset(origin_root, "lpoll", {"w.bin": 8 * MiB + 5})
    up.add_dataset("lpoll", f"{origin.url}/lpoll/")
    url = f"http://{up.node('n2').address}/v1/local/datasets/lpoll"
    with httpx.Client(timeout=45, trust_env=False) as client:
        # Not ready: the daemon holds the request for the whole wait, then says so.
        start = time.monotonic()
        doc = client.get(url, params={"wait": "1.5"}).json()
        assert doc["ready"] is False and doc["present_bytes"] == 0
        assert time.monotonic() - start >= 1.5
        bad = client.get(url, params={"wait": "61"})
        assert bad.status_code == 400 and "wait must be 0-60 seconds" in bad.json()["error"]

        # A 60 s long poll is answered as soon as the prefetch completes: well inside the
        # client's 45 s timeout, which it would hit if the daemon only answered at the end.
        answers: list[dict[str, object]] = []
        poll = threading.Thread(
            target=lambda: answers.append(client.get(url, params={"wait": "60"}).json())
        )
        poll.start()
        try:
            time.sleep(0.5)  # the poll is waiting before anything is assigned
            assert up.cli("prefetch", "lpoll", "--nodes", "n2").returncode == 0
        finally:
            poll.join(50)
        assert answers and answers[0]["ready"] is True, answers
        assert answers[0]["present_bytes"] == ds.total_size
    _check_bytes(up, "n2", ds)


@pytest.mark.timeout(300)
def test_a_foreground_read_completes_while_prefetch_runs(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    # 48 MiB of prefetch at 4 MB/s takes ~12 s
    with up.node("n2").restarted_with(["--prefetch-bandwidth", "4MB"]) as n2:
        ds = fresh_dataset(origin_root, "busy", {"big.bin": 48 * MiB})
        up.add_dataset("busy", f"{origin.url}/busy/")
        assert up.cli("prefetch", "busy", "--nodes", "n2").returncode == 0
        wait_until(
            lambda: int(_progress(up, "n2", "busy")["present_bytes"]) > 0,  # type: ignore[call-overload]
            30,
            "prefetch to start on n2",
        )
        start = time.monotonic()
        with open(n2.path("busy", "big.bin"), "rb") as f:
            f.seek(40 * MiB)
            tail = f.read(2 * MiB)
        took = time.monotonic() - start
        doc = _progress(up, "n2", "busy")
        assert doc["ready"] is False, f"prefetch finished before the read ({took:.1f}s)"
        with open(ds.root / "big.bin", "rb") as f:
            f.seek(40 * MiB)
            assert tail == f.read(2 * MiB)
        code, out = _wait(up, "n2", "busy")
        assert code == 0, out
        _check_bytes(up, "n2", ds)


@pytest.mark.timeout(300)
def test_restart_resumes_prefetch_without_fetching_again(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    with up.node("n3").restarted_with(["--prefetch-bandwidth", "8MB"]) as n3:
        ds = fresh_dataset(origin_root, "resumepf", {"big.bin": 64 * MiB})
        up.add_dataset("resumepf", f"{origin.url}/resumepf/")
        assert up.cli("prefetch", "resumepf", "--nodes", "n3").returncode == 0
        wait_until(
            lambda: int(_progress(up, "n3", "resumepf")["present_bytes"]) > 16 * MiB,  # type: ignore[call-overload]
            60,
            "prefetch to be under way on n3",
        )
        n3.stop()  # SIGTERM mid-prefetch
        held = origin.served("resumepf/big.bin")
        assert held < ds.total_size
        n3.extra_args = []  # restarted without the cap (restored after the block)
        n3.start()
        code, out = _wait(up, "n3", "resumepf")
        assert code == 0, out
        _check_bytes(up, "n3", ds)
        # What n3 had before the restart was not fetched again (a few chunks in flight
        # at the stop may be).
        assert origin.served("resumepf/big.bin") <= ds.total_size + 8 * 4 * MiB


@pytest.mark.timeout(300)
def test_wait_rides_out_a_daemon_restart(up: Cluster, origin: Origin, origin_root: Path) -> None:
    """A DaemonSet rollout restarts the daemon under a pod's `syncbit wait`: the wait
    keeps going (within its timeout) and exits 0 once the dataset is ready."""
    with up.node("n3").restarted_with(["--prefetch-bandwidth", "8MB"]) as n3:
        ds = fresh_dataset(origin_root, "rollwait", {"big.bin": 48 * MiB})
        up.add_dataset("rollwait", f"{origin.url}/rollwait/")
        assert up.cli("prefetch", "rollwait", "--nodes", "n3").returncode == 0
        argv = [*SYNCBIT, "wait", "rollwait", "--timeout", "120s", "--daemon", n3.address]
        with background(argv) as waiter:
            assert waiter.stdout is not None and waiter.stderr is not None
            first = waiter.stderr.readline()  # its first progress line: it is waiting
            assert first.startswith("rollwait:") and "complete" not in first, first
            n3.stop()  # the rollout: SIGTERM, a moment down, then the new daemon
            time.sleep(1.0)
            assert waiter.poll() is None  # still waiting
            n3.extra_args = []
            n3.start()
            out = first + waiter.communicate(timeout=120)[1]
        assert waiter.returncode == 0, out
        assert "waiting for it to come back" in out and "complete" in out, out
        assert "Traceback" not in out
        _check_bytes(up, "n3", ds)


@pytest.mark.timeout(300)
def test_new_revision_prefetches_only_changed_content_and_open_files_keep_old_bytes(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds = fresh_dataset(origin_root, "upd", {"a.bin": 16 * MiB, "b.bin": 16 * MiB})
    up.add_dataset("upd", f"{origin.url}/upd/")
    assert up.cli("prefetch", "upd", "--nodes", "n1,n2").returncode == 0
    for node in ("n1", "n2"):
        code, out = _wait(up, node, "upd")
        assert code == 0, out
    old_a = (ds.root / "a.bin").read_bytes()
    held = open(up.node("n1").path("upd", "a.bin"), "rb")  # noqa: SIM115  (open across the update)
    try:
        update = fresh_dataset(origin_root, "upd", {"a.bin": 16 * MiB})  # a.bin changes
        origin.reset()
        done = up.cli("dataset", "add", "upd", f"{origin.url}/upd/")
        assert done.returncode == 0 and "added" in done.stdout, done.stdout + done.stderr
        for node in ("n1", "n2"):
            code, out = _wait(up, node, "upd")
            assert code == 0, out
            assert sha256_file(up.node(node).path("upd", "a.bin")) == update.files["a.bin"].sha256
            assert sha256_file(up.node(node).path("upd", "b.bin")) == ds.files["b.bin"].sha256
        # Only the changed file came from the origin, about once for both nodes (and the
        # listing's head sample of each file: an ETag does not prove content).
        assert origin.served("upd/b.bin") == HEAD_SAMPLE
        assert origin.served("upd/a.bin") <= 16 * MiB * 1.1
        assert held.read() == old_a  # the file opened before the update: old bytes
    finally:
        held.close()
    up.cli("prefetch", "upd", "--remove")


@pytest.mark.timeout(300)
def test_lazy_reads_on_several_nodes_at_once_fetch_each_byte_from_the_origin_once(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    import threading

    ds = fresh_dataset(origin_root, "together", {"big.bin": 48 * MiB})
    up.add_dataset("together", f"{origin.url}/together/")
    results: dict[str, str] = {}
    start = threading.Barrier(3)

    def read(node: str) -> None:
        start.wait()
        results[node] = sha256_file(up.node(node).path("together", "big.bin"))

    threads = [threading.Thread(target=read, args=(n,)) for n in ("n1", "n2", "n3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {n: ds.files["big.bin"].sha256 for n in ("n1", "n2", "n3")}
    # The three readers claimed chunks at the scheduler: each chunk was read from the
    # origin by one node and taken from it by the others.
    assert origin.served("together/big.bin") <= ds.total_size * 1.15
