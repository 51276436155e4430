"""Nothing blocks the trio loop of a real daemon: two daemons run with the blocking-call
auditor (`SYNCBIT_AUDIT_BLOCKING`), serve a cold read through the mount (from the source
on one, from its peer on the other), heartbeats, /metrics scrapes, xattrs and local control
calls; every blocking file, process or socket call their trio threads made fails the test,
listed with its stack. Deterministic: what is recorded is the call, not its duration."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from integration.cluster import (
    Cluster,
    Origin,
    fresh_dataset,
    scrape,
    sha256_file,
    wait_until,
)
from syncbit.looptrace import ENV, Finding, read_findings

MiB = 1 << 20

# Known blocking calls, each with the reason it is still there; `file.py function` (or a
# function name) on the finding's stack. Kept empty once the rebuild of the node (issue 13)
# moves them off the trio thread.
ALLOWED: dict[str, str] = {}


def _allowed(finding: Finding) -> bool:
    return any(finding.called_from(where) for where in ALLOWED)


@pytest.fixture(scope="module")
def audited(workdir: Path, origin: Origin) -> Iterator[Cluster]:
    where = workdir / "blocking"
    shutil.rmtree(where, ignore_errors=True)
    # With credentials, daemons trading a bootstrap credential for their own: the renewal
    # on the heartbeat path is audited too.
    cluster = Cluster(
        where, origin, nodes=2, token="blocking-test-token-0123456789", bootstrap=True
    )
    for node in cluster.nodes:
        # .log: kept with the logs when the test fails
        node.env[ENV] = str(where / f"{node.name}-blocking-calls.log")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def _local(
    cluster: Cluster, address: str, method: str, path: str, body: object = None
) -> dict[str, object]:
    """A local control call, as the CLI makes it (admin credential)."""
    assert cluster.admin_token_file is not None
    token = cluster.admin_token_file.read_text().strip()
    resp = httpx.request(
        method,
        f"http://{address}{path}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        trust_env=False,
    )
    assert resp.status_code == 200, resp.text
    doc: dict[str, object] = resp.json()
    return doc


@pytest.mark.timeout(300)
def test_the_trio_thread_makes_no_blocking_call(
    audited: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds = fresh_dataset(origin_root, "audited", {"big.bin": 24 * MiB, "dir/small.txt": 3000})
    audited.add_dataset("audited", f"{origin.url}/audited/")
    n1, n2 = audited.nodes
    # A cold read from the source on n1, then from n1 (a peer) on n2.
    for rel, facts in ds.files.items():
        assert sha256_file(n1.path("audited", rel)) == facts.sha256
    audited.wait_cached(n1, "audited", ds.total_size)
    for rel, facts in ds.files.items():
        assert sha256_file(n2.path("audited", rel)) == facts.sha256
    for node in (n1, n2):
        progress = _local(audited, node.address, "GET", "/v1/local/datasets/audited?wait=30")
        assert progress["ready"], progress
        assert os.getxattr(node.path("audited"), "user.syncbit.ready") == b"1"
        assert scrape(node.address)['syncbit_dataset_ready{dataset="audited"}'] == 1.0
        _local(audited, node.address, "GET", "/v1/local/datasets")
        _local(audited, node.address, "GET", "/v1/local/cache")
        _local(audited, node.address, "POST", "/v1/local/pull", {"dataset": "audited"})
    # Heartbeats that say the dataset is ready here: they ran after the reads. Before
    # n2's cache is evicted below: from then on n2's heartbeats say it is not.
    wait_until(
        lambda: {"n1", "n2"} <= set(_status(audited)),
        60,  # heartbeats back off while a loaded scheduler is slow to answer
        "both nodes to report the dataset ready",
    )
    # A warm read (the kernel reads the cache file itself), then the cache's upkeep.
    for rel, facts in ds.files.items():
        assert sha256_file(n1.path("audited", rel)) == facts.sha256
    _local(audited, n2.address, "POST", "/v1/local/cache/verify")
    checked = _local(audited, n2.address, "GET", "/v1/local/cache/verify?wait=30")
    assert not checked["running"] and not checked["dropped"], checked
    evicted = _local(audited, n2.address, "POST", "/v1/local/cache/evict", {"dataset": "audited"})
    assert evicted["evicted"] == len(ds.files), evicted
    _local(audited, n2.address, "POST", "/v1/local/cache/gc")
    for node in audited.nodes:  # audited indeed: the daemon said so, and its file is there
        assert f"auditing blocking calls on the trio thread into {node.env[ENV]}" in (
            node.log_text()
        )
        assert Path(node.env[ENV]).exists()
    found = {n.name: read_findings(Path(n.env[ENV])) for n in audited.nodes}
    blocking = [
        f"{name}: {finding}"
        for name, findings in found.items()
        for finding in findings
        if not _allowed(finding)
    ]
    assert not blocking, f"{len(blocking)} blocking calls on the trio thread:\n\n" + "\n\n".join(
        blocking
    )


def _status(cluster: Cluster) -> list[str]:
    for ds in cluster.scheduler.status()["datasets"]:
        if ds["name"] == "audited":
            return list(ds.get("ready", []))
    return []
