"""A full cache filesystem and `syncbit cache verify` with real daemons: the cache dir on a
small tmpfs and on a small ext4 image (each mounted and unmounted by the test), a budget
far above the filesystem as on a shared disk, through chunk writes, prefetch, a clean
restart and a kill -9 on the 100% full filesystem, and space coming back; bytes rotted
on the cache disk under a running daemon and across a crash."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from integration.cluster import (
    CHUNK_SIZE,
    Cluster,
    Dataset,
    Node,
    Origin,
    fresh_dataset,
    scrape,
    sha256_file,
    wait_until,
)
from syncbit.chunks import head_length
from syncbit_testing.smallfs import CannotMount, fill, small_fs, takes_no_block

CLUSTER_NODES = 1  # the module cluster (verify tests); the full-disk tests build their own
MiB = 1 << 20


def _cache(cluster: Cluster, node: Node, *args: str) -> tuple[int, str]:
    done = cluster.cli("cache", *args, "--daemon", node.address, scheduler=False, timeout=300)
    return done.returncode, done.stdout + done.stderr


def _wait_disk_full(cluster: Cluster, node: Node, full: bool) -> None:
    """Until `syncbit status` says the node's cache filesystem is (not) full."""

    def reported() -> bool:
        nodes: list[dict[str, object]] = cluster.scheduler.status()["nodes"]
        return next(n for n in nodes if n["name"] == node.name).get("disk_full") is full

    what = "full" if full else "no longer full"
    wait_until(reported, 60, f"status: {node.name}'s cache disk {what}", 0.2, node.log_tail)


def _held(cluster: Cluster, node: Node, ds: Dataset) -> tuple[int, int]:
    """(chunks, bytes) of the dataset the node's cache holds, from `cache ls`; once the
    scheduler was told the same (the chunk reports follow the index)."""
    code, out = _cache(cluster, node, "ls", "--json")
    assert code == 0, out
    rows = json.loads(out)["objects"]
    held = sum(r["held"] for r in rows if any(f.startswith(f"{ds.name}/") for f in r["files"]))
    wait_until(
        lambda: cluster.cached(ds.name).get(node.name, 0) == held,
        30,
        f"the scheduler to know {node.name} holds {held} bytes of {ds.name}",
        interval=0.2,
        evidence=lambda: f"{cluster.cached(ds.name)}\n{node.log_tail()}",
    )
    return -(-held // CHUNK_SIZE), held  # every chunk is whole but a file's last


def _read_chunks(node: Node, ds: Dataset) -> tuple[int, int]:
    """Read every chunk of the dataset through the mount: each is either exactly the
    origin's bytes or EIO (a chunk the full cache could not keep), never anything else.
    Returns (chunks read right, chunks failed with EIO)."""
    good = failed = 0
    for rel in ds.files:
        want = (ds.root / rel).read_bytes()
        fd = os.open(node.path(ds.name, rel), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # reach the daemon
            for offset in range(0, len(want), CHUNK_SIZE):
                try:
                    got = os.pread(fd, CHUNK_SIZE, offset)
                except OSError as exc:
                    assert exc.errno == errno.EIO, exc
                    failed += 1
                    continue
                assert got == want[offset : offset + CHUNK_SIZE], f"{rel} @ {offset}: wrong bytes"
                good += 1
        finally:
            os.close(fd)
    return good, failed


def _verify(cluster: Cluster, node: Node) -> int:
    """`syncbit cache verify` finds every stored chunk right; how many it checked."""
    code, out = _cache(cluster, node, "verify", "--json")
    assert code == 0, out  # 0: every stored chunk matched its digest
    doc = json.loads(out)
    assert doc["dropped"] == [] and doc["running"] is False, doc
    return int(doc["checked"])


@pytest.fixture
def full_cluster(
    request: pytest.FixtureRequest, workdir: Path, origin: Origin
) -> Iterator[tuple[Cluster, Path, str]]:
    """A scheduler and one node whose cache dir is on a fresh 64 MiB filesystem of the
    requested kind, with a 1 GiB budget; the filesystem is unmounted at the end, after
    the processes are stopped, also when the test fails."""
    kind: str = request.param
    where = workdir / f"disk_full_{kind}"
    with contextlib.ExitStack() as stack:
        try:
            fs = stack.enter_context(small_fs(kind, where / "fs", 64))
        except CannotMount as exc:
            pytest.skip(f"cannot mount a small {kind} here: {exc}")
        cluster = Cluster(where, origin, nodes=1)
        node = cluster.node("n1")
        node.cache_dir = fs / "cache"
        node.config["cache_size"] = "1GiB"
        yield stack.enter_context(cluster), fs, kind


@pytest.mark.timeout(600)
@pytest.mark.parametrize("full_cluster", ["tmpfs", "ext4"], indirect=True)
def test_full_cache_filesystem_through_writes_restarts_and_prefetch(
    full_cluster: tuple[Cluster, Path, str], origin: Origin, origin_root: Path
) -> None:
    cluster, fs, kind = full_cluster
    n1 = cluster.node("n1")
    lazy = fresh_dataset(origin_root, f"dfl_{kind}", {"l.bin": 8 * MiB})
    big = fresh_dataset(origin_root, f"dfb_{kind}", {"b1.bin": 12 * MiB, "b2.bin": 12 * MiB + 4321})
    for ds in (lazy, big):
        cluster.add_dataset(ds.name, f"{origin.url}{ds.name}/")

    # Other users of a shared disk leave the cache 20 MiB: less than the assigned data.
    fill(fs / "filler1", leave=20 * MiB)
    assert _read_chunks(n1, lazy) == (2, 0)
    done = cluster.cli("prefetch", big.name, "--nodes", "n1")
    assert done.returncode == 0, done.stderr
    _wait_disk_full(cluster, n1, True)
    assert n1.alive
    log = n1.log_text()
    assert log.count("cache filesystem full under") == 1, "logged once, not per chunk"
    assert "fills before the cache budget" in log  # unpinned data made room first
    assert _held(cluster, n1, lazy) == (0, 0)
    held, _ = _held(cluster, n1, big)
    assert 0 < held < 7
    good, _failed = _read_chunks(n1, big)
    assert good >= held  # cached reads keep working; the rest is right or EIO
    held, held_bytes = _held(cluster, n1, big)  # a read may have found room for a chunk
    assert held < 7
    assert scrape(n1.address)["syncbit_cache_disk_full"] == 1.0
    status = cluster.cli("status")
    assert "warning: n1: cache filesystem full" in status.stdout, status.stdout
    assert json.loads(cluster.cli("status", "--json").stdout)["nodes"][0]["disk_full"] is True
    code, out = _cache(cluster, n1, "ls")
    assert code == 0 and "warning: this node: cache filesystem full" in out, out
    assert _verify(cluster, n1) == held

    # A clean restart on the 100% full filesystem.
    n1.stop()
    fill(fs / "filler2")
    assert takes_no_block(fs)
    n1.start()
    assert _read_chunks(n1, big)[0] >= held
    _wait_disk_full(cluster, n1, True)
    assert _held(cluster, n1, big) == (held, held_bytes)
    assert _verify(cluster, n1) == held

    # A crash, and a start on the 100% full filesystem again: re-verified, served right.
    n1.kill()
    n1.start()
    assert "was not shut down cleanly" in n1.log_text()
    assert _read_chunks(n1, big)[0] >= held
    assert _verify(cluster, n1) == held
    assert "verification (after an unclean shutdown)" in n1.log_text()
    assert _held(cluster, n1, big) == (held, held_bytes)

    # Space comes back: the episode ends and the assigned dataset completes.
    (fs / "filler1").unlink()
    (fs / "filler2").unlink()
    _wait_disk_full(cluster, n1, False)
    done = cluster.cli(
        "wait", big.name, "--timeout", "120s", "--daemon", n1.address, scheduler=False, timeout=200
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _read_chunks(n1, big) == (7, 0)
    for rel, facts in big.files.items():
        assert sha256_file(n1.path(big.name, rel)) == facts.sha256
    assert _verify(cluster, n1) == 7
    log = n1.log_text()
    assert log.count("cache filesystem full under") == 1
    assert log.count("space is back under") == 1
    assert scrape(n1.address)["syncbit_cache_disk_full"] == 0.0


# -- cache verify on a normal disk (the module cluster) --------------------------------------


def _object_file(cluster: Cluster, node: Node, ds: Dataset) -> tuple[str, Path]:
    code, out = _cache(cluster, node, "ls", "--json")
    assert code == 0, out
    (oid,) = [r["id"] for r in json.loads(out)["objects"] if f"{ds.name}/v.bin" in r["files"]]
    return oid, node.cache_dir / "objects" / oid[:2] / oid


def _rot(path: Path, offset: int) -> None:
    """Change bytes of a cached object file behind the daemon's back (a failing disk)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xde\xad" * 64, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.timeout(300)
def test_cache_verify_drops_rotten_chunks_and_a_crash_checks_before_serving(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    n1 = up.node("n1")
    ds = fresh_dataset(origin_root, "dv", {"v.bin": 12 * MiB + 777})
    size = ds.files["v.bin"].size
    up.add_dataset(ds.name, f"{origin.url}{ds.name}/")
    assert up.cli("prefetch", ds.name, "--nodes", "n1").returncode == 0
    done = up.cli(
        "wait", ds.name, "--timeout", "60s", "--daemon", n1.address, scheduler=False, timeout=100
    )
    assert done.returncode == 0, done.stderr
    oid, path = _object_file(up, n1, ds)
    assert _verify(up, n1) == 4

    # Rot under a running daemon: `cache verify` finds it, drops it, says where it was;
    # the scheduler hears of it, and the assigned dataset fetches that chunk again.
    before = origin.served(f"{ds.name}/v.bin")
    _rot(path, CHUNK_SIZE + 1000)
    # That chunk, and the file's head sample read alongside (every source read checks it).
    refetch = CHUNK_SIZE + head_length(size)
    code, out = _cache(up, n1, "verify")
    assert code == 1, out
    assert f"dropped: chunk 1 of object {oid[:12]} ({ds.name}/v.bin)" in out
    wait_until(
        lambda: origin.served(f"{ds.name}/v.bin") - before == refetch,
        30,
        "n1 to fetch the dropped chunk again",
        evidence=n1.log_tail,
    )
    up.wait_cached(n1, ds.name, size)
    assert sha256_file(n1.path(ds.name, "v.bin")) == ds.files["v.bin"].sha256
    assert origin.served(f"{ds.name}/v.bin") - before == refetch  # that chunk only
    assert _verify(up, n1) == 4

    # A crash, then rot: the next start re-checks every chunk before it serves it
    # (through passthrough too), and drops the rotten one.
    n1.kill()
    _rot(path, 100)
    n1.start()
    assert sha256_file(n1.path(ds.name, "v.bin")) == ds.files["v.bin"].sha256
    resp = httpx.get(
        f"http://{n1.address}/v1/local/cache/verify?wait=30", timeout=60, trust_env=False
    )
    doc = resp.json()
    assert resp.status_code == 200 and doc["reason"] == "after an unclean shutdown", doc
    assert doc["running"] is False
    assert scrape(n1.address)["syncbit_cache_dropped_chunks_total"] == 1.0
    assert scrape(n1.address)["syncbit_cache_unverified_chunks"] == 0.0
    assert "was not shut down cleanly" in n1.log_text()
    assert _verify(up, n1) == 4
