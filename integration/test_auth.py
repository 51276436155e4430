"""Authentication, roles and TLS end to end, on real processes: this module's cluster runs
as a Kubernetes install would (the scheduler holds the cluster secret, the daemons only a
bootstrap credential they trade for their own node credential, TLS everywhere, one
certificate shared by the daemons), and is attacked with every kind of credential."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.cluster import (
    SYNCBIT,
    Cluster,
    Node,
    Origin,
    background,
    free_port,
    fresh_dataset,
    run_cli,
    sha256_file,
    wait_until,
)
from syncbit import certs
from syncbit.credentials import Issuer, Role, peek

CLUSTER_NODES = 2
CLUSTER_TOKEN = "auth-integration-secret-0123456789abcdef"
CLUSTER_BOOTSTRAP = True
CLUSTER_TLS = True
MiB = 1 << 20


def _credential(node: Node) -> dict[str, Any]:
    """What the daemon was issued and keeps (its cache dir, 0600)."""
    path = node.cache_dir / "credential.json"
    assert path.stat().st_mode & 0o777 == 0o600
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def _scheduler(cluster: Cluster, token: str | None) -> httpx.Client:
    assert cluster.tls is not None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(
        base_url=cluster.scheduler.url,
        verify=cluster.tls.context(),
        headers=headers,
        trust_env=False,
        timeout=10,
    )


def _wrong_ca(cluster: Cluster) -> Path:
    other = cluster.workdir / "other-ca"
    if not (other / "ca.crt").exists():
        certs.init(other)
    return other / "ca.crt"


@pytest.fixture(scope="module")
def reader(cluster: Cluster) -> str:
    """A reader credential, issued through the CLI by the admin (the pods' credential)."""
    done = cluster.cli("token", "create", "--role", "reader")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert peek(token).role is Role.READER
    path = cluster.workdir / "reader.token"
    path.write_text(token + "\n")
    return token


@pytest.fixture(scope="module")
def shared(cluster: Cluster, origin: Origin, origin_root: Path) -> str:
    """A dataset read on n1 (from the source), then on n2 (from n1, over TLS)."""
    ds = fresh_dataset(origin_root, "authds", {"w.bin": 12 * MiB + 77, "c.json": 3000})
    cluster.ensure_up()
    cluster.add_dataset("authds", f"{origin.url}authds/")
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    assert sha256_file(n1.path("authds", "w.bin")) == ds.files["w.bin"].sha256
    cluster.wait_cached(n1, "authds", ds.files["w.bin"].size)
    assert sha256_file(n2.path("authds", "w.bin")) == ds.files["w.bin"].sha256
    return "authds"


def _metric(node: Node, key: str) -> float:
    # /metrics stays plain HTTP and open, as scrapers and kubelets expect.
    text = httpx.get(f"http://{node.address}/metrics", trust_env=False, timeout=10).text
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.timeout(300)
def test_daemons_trade_the_bootstrap_credential_and_share_chunks_over_tls(
    up: Cluster, shared: str
) -> None:
    bootstrap = Path(up.nodes[0].config["token_file"]).read_text().strip()
    assert peek(bootstrap).role is Role.BOOTSTRAP  # no daemon holds the cluster secret
    for node in up.nodes:
        doc = _credential(node)
        assert doc["node"] == node.name
        issued = Issuer(CLUSTER_TOKEN).verify(doc["token"])
        assert (issued.role, issued.subject) == (Role.NODE, node.name)
        assert issued.expires > 0
    n2 = up.node("n2")
    assert _metric(n2, 'syncbit_fetched_bytes_total{origin="peer"}') >= 12 * MiB


@pytest.mark.timeout(300)
def test_roles_on_the_real_scheduler_and_daemons(up: Cluster, reader: str, shared: str) -> None:
    n1, n2 = up.node("n1"), up.node("n2")
    own_n1, own_n2 = _credential(n1), _credential(n2)
    bootstrap = Path(n1.config["token_file"]).read_text().strip()
    files = up.scheduler.get("/v1/datasets/authds")["files"]
    oid = next(f["object"] for f in files if f["path"] == "w.bin")  # n1 read it
    beat = {"address": n2.address}
    claim = {"node": "n1", "chunks": [0]}
    report = {"reporter": "n1", "peer": "n2", "object": oid, "chunk": 0}
    # (credential, method, path, body, expected status)
    cases: list[tuple[str | None, str, str, Any, int]] = [
        (None, "GET", "/healthz", None, 200),
        (None, "GET", "/readyz", None, 200),
        (None, "GET", "/v1/status", None, 401),
        ("wrong", "GET", "/v1/status", None, 401),
        (own_n1["peer_token"], "GET", "/v1/status", None, 401),  # for peers only
        (reader, "GET", "/v1/status", None, 200),
        (reader, "GET", "/v1/datasets", None, 200),
        (reader, "POST", "/v1/datasets", {"name": "x", "source": "file:///etc/"}, 403),
        (reader, "DELETE", "/v1/datasets/authds", None, 403),
        (reader, "POST", "/v1/datasets/authds/targets", {"targets": []}, 403),
        (reader, "PUT", "/v1/nodes/n1", beat, 403),
        (reader, "POST", "/v1/tokens", {"role": "admin"}, 403),
        (own_n2["token"], "PUT", "/v1/nodes/n1", beat, 403),  # n2 acting as n1
        (own_n2["token"], "POST", f"/v1/objects/{oid}/claims", claim, 403),
        (own_n2["token"], "POST", "/v1/nodes/n1/chunks", {"add": [], "remove": []}, 403),
        (own_n2["token"], "POST", "/v1/reports", report, 403),
        (own_n2["token"], "POST", "/v1/nodes/n1/labels", {"set": {"a": "b"}}, 403),
        (own_n2["token"], "POST", "/v1/nodes/n1/credential", {}, 403),
        (own_n2["token"], "POST", "/v1/datasets", {"name": "x", "source": "file:///"}, 403),
        (own_n2["token"], "GET", "/v1/nodes/n2/plan", None, 200),
        (bootstrap, "POST", "/v1/nodes/n1/credential", {}, 403),  # n1 is up: no takeover
        (bootstrap, "GET", "/v1/status", None, 403),
    ]
    failures = []
    for token, method, path, body, expected in cases:
        with _scheduler(up, token) as http:
            resp = http.request(method, path, json=body)
        if resp.status_code != expected:
            failures.append(f"{method} {path} -> {resp.status_code} {resp.text[:200]}")
    # The daemon's API: chunk data only for a node's credential.
    url = f"https://{n1.address}/v1/objects/{oid}/data"
    assert up.tls is not None
    context = up.tls.context()
    context.check_hostname = True
    daemon_cases = [
        (None, 401),
        (reader, 403),
        (bootstrap, 403),
        ("wrong", 401),
        (own_n2["peer_token"], 206),
    ]
    for token, expected in daemon_cases:
        headers = {"Range": "bytes=0-9"} | ({"Authorization": f"Bearer {token}"} if token else {})
        # The daemons share one certificate, for syncbit-daemon and loopback.
        with httpx.Client(verify=context, trust_env=False, timeout=10) as http:
            resp = http.get(url, headers=headers)
        if resp.status_code != expected:
            failures.append(f"daemon data with {token and peek(token).role} -> {resp.status_code}")
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(300)
def test_pod_style_wait_with_the_reader_credential(
    up: Cluster, origin: Origin, reader: str, shared: str
) -> None:
    """What examples/pod-wait.yaml runs: `syncbit wait` over TLS to the node's address, the
    reader credential from a file, the CA and the daemons' certificate name from the
    environment. The same credential cannot register a dataset."""
    assert up.tls is not None
    n1 = up.node("n1")
    pod = {
        "SYNCBIT_TOKEN_FILE": str(up.workdir / "reader.token"),
        "SYNCBIT_TLS_CA": str(up.tls.ca),
        "SYNCBIT_TLS_NAME": "syncbit-daemon",
    }
    pulled = up.cli("pull", f"{origin.url}authds/", "--name", shared, "--daemon", n1.address)
    assert pulled.returncode == 0, pulled.stderr  # the admin, on the node
    done = up.cli(
        "wait",
        shared,
        "--timeout",
        "60s",
        "--daemon",
        f"https://{n1.address}",
        env=pod,
        scheduler=False,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    assert "complete" in done.stderr
    added = up.cli("dataset", "add", "evil", "file:///etc/", env=pod)
    assert added.returncode == 2, added.stderr
    assert added.stderr.startswith("error: ") and added.stderr.count("\n") == 1
    assert "reader credential may not POST /v1/datasets" in added.stderr
    # Nor change the node through its daemon.
    gc = up.cli("cache", "gc", "--daemon", f"https://{n1.address}", env=pod, scheduler=False)
    assert gc.returncode == 2 and "reader credential may not" in gc.stderr, gc.stderr


@pytest.mark.timeout(300)
def test_a_wrong_ca_is_refused_on_every_api(up: Cluster, reader: str) -> None:
    wrong = _wrong_ca(up)
    n1 = up.node("n1")
    bad = {"SYNCBIT_TLS_CA": str(wrong), "SYNCBIT_TLS_NAME": "syncbit-daemon"}
    # The scheduler API, from the CLI.
    status = up.cli("status", env=bad)
    assert status.returncode == 2
    assert status.stderr.startswith("error: scheduler at https://")
    assert "TLS certificate not accepted" in status.stderr and status.stderr.count("\n") == 1
    # The daemon's control API, from `syncbit wait`: refused at once, not retried.
    waited = up.cli(
        "wait",
        "authds",
        "--timeout",
        "5m",
        "--daemon",
        f"https://{n1.address}",
        env=bad,
        scheduler=False,
        timeout=60,
    )
    assert waited.returncode == 2, waited.stderr
    assert "TLS certificate not accepted" in waited.stderr and waited.stderr.count("\n") == 1
    # The peer API and the scheduler, from a daemon whose tls_ca is another CA: it never
    # registers, and says why.
    stray = Node(
        "n3", up.workdir, up.scheduler.url, config=dict(n1.config) | {"tls_ca": str(wrong)}
    )
    try:
        stray.start()
        wait_until(
            lambda: "TLS certificate not accepted" in stray.log_text(),
            30,
            "n3 to say the scheduler's certificate is not accepted",
            evidence=stray.log_tail,
        )
        assert up.node_state("n3") is None
    finally:
        stray.cleanup()


@pytest.mark.timeout(300)
def test_a_restarted_daemon_renews_its_own_credential(up: Cluster) -> None:
    """Within node_timeout of a stop the name is still up: a bootstrap credential would be
    refused, the kept node credential is not."""
    n2 = up.node("n2")
    mark = n2.log_mark()
    n2.stop()
    restarted = time.time()
    n2.start()
    wait_until(
        lambda: (up.node_state("n2") or {}).get("last_seen", 0) > restarted,
        20,
        "a heartbeat of the restarted n2",
        evidence=n2.log_tail,
    )
    assert "registered and up" not in n2.log_since(mark)


# -- refusing to listen beyond loopback without a token ----------------------------------------


@pytest.mark.timeout(120)
def test_nothing_listens_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    port = free_port()
    sched = run_cli(
        [*SYNCBIT, "scheduler", "--listen", f"0.0.0.0:{port}", "--state-dir", str(tmp_path / "s")]
    )
    assert sched.returncode == 2, sched.stderr
    assert sched.stderr.startswith("error: the scheduler would listen on 0.0.0.0:")
    assert "--insecure" in sched.stderr and sched.stderr.count("\n") == 1
    daemon = run_cli(
        [
            *SYNCBIT,
            "daemon",
            "--listen",
            f"0.0.0.0:{port}",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--mount",
            str(tmp_path / "mnt"),
        ]
    )
    assert daemon.returncode == 2, daemon.stderr
    assert daemon.stderr.startswith("error: the daemon would listen on 0.0.0.0:")
    assert not (tmp_path / "cache").exists()  # refused before touching anything


@pytest.mark.timeout(120)
def test_insecure_starts_open_beyond_loopback_with_a_warning(tmp_path: Path) -> None:
    """In a network namespace of its own (only its loopback exists), so that the open port
    is reachable from nowhere."""
    port = free_port()
    script = "ip link set lo up && exec " + " ".join(
        [
            sys.executable,
            "-m",
            "syncbit.cli",
            "scheduler",
            "--listen",
            f"0.0.0.0:{port}",
            "--state-dir",
            str(tmp_path / "s"),
            "--insecure",
        ]
    )
    with background(["unshare", "--net", "sh", "-c", script]) as proc:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line or proc.poll() is not None:
                break
        proc.terminate()
    text = "".join(lines)
    assert "INSECURE: the scheduler listens on 0.0.0.0:" in text, text
    assert f"scheduler listening on http://0.0.0.0:{port}" in text
