"""`syncbit volume publish/unpublish/ls` with real bind mounts of a live daemon's mount:
CSI NodePublish/NodeUnpublish semantics (idempotent, read-only, clean errors)."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.cluster import Cluster, Origin, fresh_dataset, is_mounted, unmount_lazy

CLUSTER_NODES = 1
MiB = 1 << 20


@pytest.fixture
def volumes(up: Cluster, tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    """The cluster and a scratch dir for targets; every mount below it goes at the end."""
    yield up, tmp_path
    for target in sorted(tmp_path.rglob("*"), reverse=True):
        if is_mounted(target):
            unmount_lazy(target)


def _vol(cluster: Cluster, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    node = cluster.node("n1")
    return cluster.cli(
        "volume",
        *args,
        "--mount",
        str(node.mount),
        "--state",
        str(state),
        scheduler=False,
    )


@pytest.mark.timeout(300)
def test_publish_is_read_only_idempotent_and_unpublish_cleans_up(
    volumes: tuple[Cluster, Path], origin: Origin, origin_root: Path
) -> None:
    up, tmp = volumes
    ds = fresh_dataset(origin_root, "vol", {"w.bin": 3 * MiB, "sub/cfg.json": 100})
    up.add_dataset("vol", f"{origin.url}/vol/")
    state = tmp / "state" / "volumes.json"
    target = tmp / "pods" / "p1" / "volume"

    done = _vol(up, state, "publish", "vol", str(target))
    assert done.returncode == 0, done.stderr
    assert (target / "w.bin").read_bytes() == (ds.root / "w.bin").read_bytes()
    assert (target / "sub" / "cfg.json").stat().st_size == 100
    with pytest.raises(OSError) as err:
        (target / "new").write_bytes(b"x")
    assert err.value.errno == errno.EROFS
    # Idempotent: the same publish again succeeds and stacks no second mount.
    again = _vol(up, state, "publish", "vol", str(target))
    assert again.returncode == 0, again.stderr
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert sum(f" {target} " in line for line in mounts) == 1

    listed = _vol(up, state, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["dataset"], row["target"], row["mounted"]) == ("vol", str(target), True)

    # Busy: a file open below the target keeps it.
    held = open(target / "w.bin", "rb")  # noqa: SIM115  (held across the unpublish)
    try:
        busy = _vol(up, state, "unpublish", str(target))
        assert busy.returncode == 1 and "busy" in busy.stderr, busy.stderr
        assert is_mounted(target)
    finally:
        held.close()
    done = _vol(up, state, "unpublish", str(target))
    assert done.returncode == 0, done.stderr
    assert not is_mounted(target) and not target.exists()  # publish made it, so it goes
    again = _vol(up, state, "unpublish", str(target))
    assert again.returncode == 0 and "not published" in again.stdout
    assert json.loads(_vol(up, state, "ls", "--json").stdout) == []


@pytest.mark.timeout(300)
def test_publish_and_unpublish_refuse_what_they_must(
    volumes: tuple[Cluster, Path], origin: Origin, origin_root: Path
) -> None:
    up, tmp = volumes
    fresh_dataset(origin_root, "vol2", {"a.bin": 1000})
    up.add_dataset("vol2", f"{origin.url}/vol2/")
    state = tmp / "volumes.json"

    missing = _vol(up, state, "publish", "nope", str(tmp / "t0"))
    assert missing.returncode == 2 and "no dataset 'nope'" in missing.stderr

    full = tmp / "full"
    full.mkdir()
    (full / "x").write_text("x")
    refused = _vol(up, state, "publish", "vol2", str(full))
    assert refused.returncode == 2 and "not empty" in refused.stderr

    foreign = tmp / "foreign"
    foreign.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(foreign)], check=True)
    busy = _vol(up, state, "publish", "vol2", str(foreign))
    assert busy.returncode == 1 and "already a mount point" in busy.stderr
    refused = _vol(up, state, "unpublish", str(foreign))
    assert refused.returncode == 2 and "did not publish" in refused.stderr
    assert is_mounted(foreign)  # left alone

    other = tmp / "other"
    assert _vol(up, state, "publish", "vol2", str(other)).returncode == 0
    clash = _vol(up, state, "publish", "vol", str(other))
    assert clash.returncode == 1 and "already publishes dataset vol2" in clash.stderr
    assert _vol(up, state, "unpublish", str(other)).returncode == 0


@pytest.mark.timeout(300)
def test_publish_wait_gates_on_readiness(
    volumes: tuple[Cluster, Path], origin: Origin, origin_root: Path
) -> None:
    up, tmp = volumes
    fresh_dataset(origin_root, "vol3", {"a.bin": 2 * MiB})
    up.add_dataset("vol3", f"{origin.url}/vol3/")
    state = tmp / "volumes.json"
    node = up.node("n1")
    target = tmp / "t"
    args = ["--wait", "--timeout", "1s", "--daemon", node.address]
    early = _vol(up, state, "publish", "vol3", str(target), *args)
    assert early.returncode == 1 and "not ready after 1s" in early.stderr, early.stderr
    assert not is_mounted(target)
    assert up.cli("prefetch", "vol3", "--nodes", "n1").returncode == 0
    args = ["--wait", "--timeout", "60s", "--daemon", node.address]
    done = _vol(up, state, "publish", "vol3", str(target), *args)
    assert done.returncode == 0, done.stderr
    assert (target / "a.bin").stat().st_size == 2 * MiB
    assert _vol(up, state, "unpublish", str(target)).returncode == 0
