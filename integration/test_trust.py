"""Digest provenance and versions that never mix, with real processes: a scheduler, three
node daemons with FUSE mounts, the test origin, and a fake node (`CorruptPeer`) that lies.

- Digests reported first by a node nobody granted the source read are refused; a fresh
  node then reads the source's bytes (without a cluster token, and with one).
- A report that conflicts with the record is re-checked against the source by a third node;
  the liar is quarantined (status, metrics), and an operator can lift it.
- A node whose source read disagrees with the recorded digest fails the read (EIO), stores
  nothing, and the re-check finds the establisher lied.
- An origin that changes a file but keeps its ETag and Last-Modified: no mixed file is ever
  returned; EIO and a log line on every node; `dataset add` again serves the new content.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from functools import partial
from pathlib import Path

import httpx
import pytest

from integration.cluster import (
    CHUNK_SIZE,
    Cluster,
    CorruptPeer,
    Node,
    Origin,
    flipped,
    fresh_dataset,
    in_thread,
    sha256_file,
    wait_until,
)
from syncbit.chunks import digest

READ_TIMEOUT = 120.0


# n1 reads no further ahead than asked: a reader that took chunk 0 of a file, then the
# rest later, as in the mixed-versions report.
NODE_CONFIG = {"n1": {"readahead_chunks": 0}}


def read_sha(node: Node, *parts: str) -> str:
    path = node.path(*parts)
    return in_thread(partial(sha256_file, path), READ_TIMEOUT, f"read {path}")


def read_errno(node: Node, *parts: str) -> int:
    """0 if the whole file reads, else the errno of the read that failed."""
    try:
        read_sha(node, *parts)
    except OSError as exc:
        return exc.errno or -1
    return 0


def object_of(cluster: Cluster, dataset: str, path: str) -> tuple[str, int]:
    manifest = cluster.scheduler.get(f"/v1/datasets/{dataset}")
    entry = next(f for f in manifest["files"] if f["path"] == path)
    return str(entry["object"]), int(entry["size"])


def chunk_digests(data: bytes) -> dict[int, str]:
    return {
        i: digest(data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE])
        for i in range(-(-len(data) // CHUNK_SIZE))
    }


def recorded(cluster: Cluster, object_id: str) -> dict[int, str]:
    digests = cluster.scheduler.get(f"/v1/objects/{object_id}/chunks")["digests"]
    return {int(i): str(d) for i, d in digests.items()}


def quarantined(cluster: Cluster) -> dict[str, str]:
    return {q["node"]: q["reason"] for q in cluster.scheduler.status().get("quarantined", [])}


def wait_quarantined(cluster: Cluster, node: str) -> str:
    """Until the scheduler quarantined `node` (a third node re-checked the source); why."""
    wait_until(
        lambda: node in quarantined(cluster),
        60,
        f"{node} quarantined",
        interval=0.2,
        evidence=lambda: cluster.scheduler.log_tail(30),
    )
    return quarantined(cluster)[node]


def poison_and_read(
    cluster: Cluster, origin: Origin, origin_root: Path, name: str, token: str | None = None
) -> None:
    """A client registers as node "evil" (with `token`: a credential of its own) and reports
    digests of its own (flipped) bytes first, for every chunk of a file nobody read yet,
    and serves those bytes as a peer."""
    ds = fresh_dataset(origin_root, name, {"model.bin": 4 * CHUNK_SIZE})
    cluster.add_dataset(name, origin.url + f"{name}/")
    object_id, size = object_of(cluster, name, "model.bin")
    true_bytes = (ds.root / "model.bin").read_bytes()
    evil = CorruptPeer(cluster.scheduler, "evil", token=token).start()
    try:
        evil.files[object_id] = ds.root / "model.bin"
        answer = evil.report(object_id, size, chunk_digests(flipped(true_bytes)))
        chunk_map = cluster.scheduler.get(f"/v1/objects/{object_id}/chunks")
        # A fresh node reads the source's bytes, and never asks the poisoner.
        n1 = cluster.node("n1")
        assert read_sha(n1, name, "model.bin") == ds.files["model.bin"].sha256
        assert evil.requests == 0
        assert answer.get("refused") == [[object_id, i] for i in range(4)], answer
        assert chunk_map["digests"] == {} and chunk_map["peers"] == {}, chunk_map
        cluster.wait_cached(n1, name, size)  # its reports: the digests are the source's
        assert recorded(cluster, object_id) == chunk_digests(true_bytes)
        assert "reported digests for chunks [0, 1, 2, 3]" in cluster.scheduler.log_text()
    finally:
        evil.stop()


# -- 1: provenance -------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_digests_reported_first_by_a_node_nobody_granted_are_refused(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    poison_and_read(up, origin, origin_root, "poison")


@pytest.mark.timeout(300)
def test_a_node_with_its_own_credential_cannot_establish_what_it_was_not_granted(
    workdir: Path, origin: Origin, origin_root: Path
) -> None:
    """The same attempt by a node with a valid node credential of its own (issued for the
    name "evil", as a compromised node of the cluster would hold): a credential lets it act
    as itself, never establish a digest it was not granted the source read of."""
    where = workdir / "trust-token"
    shutil.rmtree(where, ignore_errors=True)
    secret = "s3cret-cluster-token"
    with Cluster(where, origin, nodes=1, token=secret, bootstrap=True) as cluster:
        from syncbit.credentials import Issuer, Role

        evil_credential = Issuer(secret).issue(Role.NODE, "evil")[0]
        poison_and_read(cluster, origin, origin_root, "poison-token", token=evil_credential)


# -- 2: a conflicting report ----------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_conflicting_report_is_rechecked_and_the_liar_quarantined(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds = fresh_dataset(origin_root, "dispute", {"model.bin": 2 * CHUNK_SIZE + 1000})
    up.add_dataset("dispute", origin.url + "dispute/")
    n1, n2 = up.node("n1"), up.node("n2")
    facts = ds.files["model.bin"]
    assert read_sha(n1, "dispute", "model.bin") == facts.sha256  # n1 establishes
    up.wait_cached(n1, "dispute", facts.size)
    object_id, size = object_of(up, "dispute", "model.bin")
    true_bytes = (ds.root / "model.bin").read_bytes()

    evil = CorruptPeer(up.scheduler, "evil2").start()
    try:
        lie = chunk_digests(flipped(true_bytes))
        answer = evil.report(object_id, size, {0: lie[0], 1: lie[1]})
        assert answer["conflicts"] == [[object_id, 0], [object_id, 1]], answer
        # Never settled by counting: a third node (not n1, not evil2) re-reads the source.
        why = wait_quarantined(up, "evil2")
        assert why.startswith("false report on chunk 0 of dispute/model.bin")
        assert "n1" not in quarantined(up)
        checker_log = n2.log_text() + up.node("n3").log_text()
        assert "re-checked chunk 0 of dispute/model.bin against the source" in checker_log

        # Visible: status (text and JSON), node ls, scheduler metrics.
        done = up.cli("status")
        assert done.returncode == 0, done.stderr
        assert "node evil2 is quarantined: false report" in done.stdout
        doc = json.loads(up.cli("status", "--json").stdout)
        (node,) = [n for n in doc["nodes"] if n["name"] == "evil2"]
        assert node["quarantined"]["reason"].startswith("false report")
        assert "up quarantined" in up.cli("node", "ls").stdout
        metrics = httpx.get(up.scheduler.url + "/metrics", timeout=10, trust_env=False).text
        assert "syncbit_scheduler_quarantined_nodes 1.0" in metrics
        assert 'syncbit_scheduler_node_quarantined{node="evil2"} 1.0' in metrics

        # Its word is dropped now: true digests do not make it a holder either.
        answer = evil.report(object_id, size, chunk_digests(true_bytes))
        assert answer["refused"] == [[object_id, i] for i in range(3)], answer
        peers = up.scheduler.get(f"/v1/objects/{object_id}/chunks?node=n2")["peers"]
        assert all(p["node"] != "evil2" for ps in peers.values() for p in ps), peers
        assert read_sha(n2, "dispute", "model.bin") == facts.sha256
        assert evil.requests == 0

        # An operator lifts it.
        done = up.cli("node", "trust", "evil2")
        assert done.returncode == 0 and "quarantine lifted" in done.stdout, done.stderr
        assert "evil2" not in quarantined(up)
        done = up.cli("node", "trust", "evil2")
        assert done.returncode == 2 and "not quarantined" in done.stderr, done.stderr
    finally:
        evil.stop()


# -- 3: source bytes that disagree with the record --------------------------------------------


@pytest.mark.timeout(300)
def test_a_source_read_that_disagrees_fails_stores_nothing_and_catches_the_establisher(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    """A node granted the source reads records false digests and holds nothing (so readers
    go to the source). A reader's source bytes disagree: EIO, nothing stored, and the
    re-check by a third node shows who lied. (A liar that also serves its bytes as a peer
    is caught only once someone reads those chunks from the source: see the README.)"""
    ds = fresh_dataset(origin_root, "liar", {"model.bin": 3 * CHUNK_SIZE})
    up.add_dataset("liar", origin.url + "liar/")
    object_id, size = object_of(up, "liar", "model.bin")
    true_bytes = (ds.root / "model.bin").read_bytes()
    n2 = up.node("n2")
    evil = CorruptPeer(up.scheduler, "evil3").start()
    try:
        assert evil.claim_source(object_id, [0, 1, 2]) == [0, 1, 2]
        lie = chunk_digests(flipped(true_bytes))
        answer = evil.report(object_id, size, lie)
        assert not answer["conflicts"] and not answer.get("refused"), answer
        evil.report(object_id, size, {}, remove=[0, 1, 2])  # readers must use the source

        mark = n2.log_mark()
        assert read_errno(n2, "liar", "model.bin") == errno.EIO
        assert "differ from the recorded digest" in n2.log_since(mark)
        held = up.cli("cache", "ls", "--json", "--daemon", n2.address, scheduler=False)
        rows = [r for r in json.loads(held.stdout)["objects"] if r["id"] == object_id]
        assert sum(r["held"] for r in rows) == 0, rows  # nothing of it was stored

        why = wait_quarantined(up, "evil3")
        assert why.startswith("false digest for chunk 0 of liar/model.bin")
        assert "n2" not in quarantined(up)
        assert recorded(up, object_id) == {0: chunk_digests(true_bytes)[0]}  # rest forgotten
        # An HTTP origin cannot prove content: the source might as well have changed since
        # evil3's read, so the file is broken until it is resolved again, then read whole.
        doc = json.loads(up.cli("status", "--json").stdout)
        (summary,) = [d for d in doc["datasets"] if d["name"] == "liar"]
        assert [b["path"] for b in summary["broken"]] == ["model.bin"]
        assert read_errno(n2, "liar", "model.bin") == errno.EIO
        assert up.cli("dataset", "add", "liar", origin.url + "liar/").returncode == 0
        wait_until(lambda: read_errno(n2, "liar", "model.bin") == 0, 30, "n2 reads liar/model.bin")
        assert read_sha(n2, "liar", "model.bin") == ds.files["model.bin"].sha256
        new_id, _ = object_of(up, "liar", "model.bin")
        assert new_id != object_id  # a new identity: none of the old records is reused
        up.wait_cached(n2, "liar", size)
        assert recorded(up, new_id) == chunk_digests(true_bytes)
    finally:
        evil.stop()
        up.cli("node", "trust", "evil3")


# -- 4: versions never mix -----------------------------------------------------------------


def rewrite_keeping_version(path: Path) -> bytes:
    """New bytes in the same file: same inode, size and mtime, hence the same ETag and
    Last-Modified at the origin (a server whose validators lie)."""
    st = path.stat()
    data = os.urandom(st.st_size)
    with open(path, "r+b") as f:  # in place: the inode stays
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    return data


@pytest.mark.timeout(300)
def test_a_file_changed_under_a_kept_etag_is_never_served_mixed(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds = fresh_dataset(origin_root, "etag", {"model.bin": 7 * CHUNK_SIZE - 100})
    path = ds.root / "model.bin"
    old = ds.files["model.bin"]
    up.add_dataset("etag", origin.url + "etag/")
    n1, n2, n3 = up.node("n1"), up.node("n2"), up.node("n3")
    url = origin.url + "etag/model.bin"

    # n1's reader takes the start of the file (chunk 0 of the listed version)...
    with open(n1.path("etag", "model.bin"), "rb") as f:
        assert f.read(4096) == path.read_bytes()[:4096]
    before = httpx.head(url, trust_env=False).headers
    new = rewrite_keeping_version(path)
    after = httpx.head(url, trust_env=False).headers
    assert (before["etag"], before["last-modified"]) == (after["etag"], after["last-modified"])

    # ...and the rest after the origin changed: never a file that never existed.
    marks = {n.name: n.log_mark() for n in (n1, n2, n3)}
    assert read_errno(n1, "etag", "model.bin") == errno.EIO
    assert "differ from those recorded at `dataset add`" in n1.log_since(marks["n1"])
    assert read_errno(n2, "etag", "model.bin") == errno.EIO  # a fresh reader elsewhere too

    # A third node confirms against the source: the revision is broken on every node.
    def broken_everywhere() -> bool:
        return all("this revision is broken" in n.log_since(marks[n.name]) for n in (n1, n2, n3))

    wait_until(broken_everywhere, 60, "every node to log the broken revision", interval=0.2)
    for node in (n1, n2, n3):
        assert read_errno(node, "etag", "model.bin") == errno.EIO
    doc = json.loads(up.cli("status", "--json").stdout)
    (summary,) = [d for d in doc["datasets"] if d["name"] == "etag"]
    assert [b["path"] for b in summary["broken"]] == ["model.bin"]
    assert quarantined(up) == {}  # nobody lied: the source changed
    assert "etag/model.bin is broken" in up.cli("status").stdout

    # `dataset add` again picks up the new content, whole, on every node.
    done = up.cli("dataset", "add", "etag", origin.url + "etag/")
    assert done.returncode == 0, done.stderr
    new_sha = sha256_file(path)
    assert new_sha != old.sha256 and len(new) == old.size
    for node in (n1, n2, n3):
        wait_until(
            lambda node=node: read_errno(node, "etag", "model.bin") == 0,  # type: ignore[misc]
            30,
            f"{node.name} to read the new revision",
            interval=0.2,
        )
        assert read_sha(node, "etag", "model.bin") == new_sha
