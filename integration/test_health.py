"""Health, readiness and Prometheus metrics of real daemons and a real scheduler, scraped
while reads run; and the shared cluster token end to end: this whole module's cluster
runs with one, so every scheduler call, peer transfer and CLI command must carry it."""

from __future__ import annotations

import re
import threading
from functools import partial
from pathlib import Path

import httpx
import pytest

from integration.cluster import Cluster, Origin, fresh_dataset, scrape, sha256_file, wait_until

CLUSTER_NODES = 2
CLUSTER_TOKEN = "health-test-token-0123456789"
MiB = 1 << 20


def _ready(address: str) -> bool:
    return httpx.get(f"http://{address}/readyz", trust_env=False).status_code == 200


def _get(values: dict[str, float], key: str) -> float:
    return values.get(key, 0.0)


@pytest.mark.timeout(300)
def test_probes_and_metrics_move_with_the_bytes_read(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    n1, n2 = up.node("n1"), up.node("n2")
    for node in (n1, n2):
        assert httpx.get(f"http://{node.address}/healthz", trust_env=False).status_code == 200
        wait_until(partial(_ready, node.address), 20, f"{node.name} ready")
    sched = httpx.get(f"{up.scheduler.url}/readyz", trust_env=False)
    assert sched.status_code == 200

    ds = fresh_dataset(origin_root, "metered", {"m.bin": 24 * MiB})
    up.add_dataset("metered", f"{origin.url}/metered/")
    before = scrape(n1.address)

    # Scrape while the read runs: the endpoint answers under load.
    scrapes: list[dict[str, float]] = []
    reading = threading.Thread(
        target=lambda: scrapes.append(
            {
                "sha": float(
                    int(sha256_file(n1.path("metered", "m.bin")) == ds.files["m.bin"].sha256)
                )
            }
        )
    )
    reading.start()
    while reading.is_alive():
        scrapes.append(scrape(n1.address))
        reading.join(0.05)
    assert {"sha": 1.0} in scrapes
    after = scrape(n1.address)
    size = ds.total_size
    read = sum(
        _get(after, f'syncbit_read_bytes_total{{origin="{o}"}}')
        - _get(before, f'syncbit_read_bytes_total{{origin="{o}"}}')
        for o in ("cache", "peer", "source")
    )
    assert read >= size  # every byte the reader got is counted, by origin
    fetched = _get(after, 'syncbit_fetched_bytes_total{origin="source"}') - _get(
        before, 'syncbit_fetched_bytes_total{origin="source"}'
    )
    assert fetched == size
    assert _get(after, 'syncbit_chunk_fetch_seconds_count{origin="source"}') > _get(
        before, 'syncbit_chunk_fetch_seconds_count{origin="source"}'
    )
    assert _get(after, 'syncbit_fuse_requests_total{op="read"}') > _get(
        before, 'syncbit_fuse_requests_total{op="read"}'
    )
    assert _get(after, 'syncbit_dataset_cached_bytes{dataset="metered"}') == size
    assert _get(after, 'syncbit_cache_bytes{kind="budget"}') > 0

    # n2 reads the same file from n1: n2's peer bytes and n1's served bytes move by it.
    wait_until(lambda: up.cached("metered").get("n1", 0) >= size, 20, "n1's chunks reported")
    served = _get(scrape(n1.address), "syncbit_peer_served_bytes_total")
    assert sha256_file(n2.path("metered", "m.bin")) == ds.files["m.bin"].sha256
    m2 = scrape(n2.address)
    # Fetched from peers, all of it (what the reader found already landed reads as "cache").
    assert _get(m2, 'syncbit_fetched_bytes_total{origin="peer"}') == size
    assert _get(m2, 'syncbit_fetched_bytes_total{origin="source"}') == 0
    assert _get(scrape(n1.address), "syncbit_peer_served_bytes_total") - served >= size

    metrics = httpx.get(f"{up.scheduler.url}/metrics", trust_env=False).text
    assert re.search(r'syncbit_scheduler_nodes\{state="up"\} 2\.0', metrics)
    # Both processes run with the collector tuned for a server (`syncbit.gctune`), and
    # count its pauses.
    scheduler = scrape(up.scheduler.url.removeprefix("http://"))
    for text in (scheduler, m2):
        assert _get(text, 'syncbit_gc_threshold{generation="0"}') == 50_000
        assert _get(text, 'syncbit_gc_collections_total{generation="2"}') >= 1  # at start
        assert _get(text, 'syncbit_gc_pause_seconds_total{generation="2"}') > 0


@pytest.mark.timeout(120)
def test_the_cluster_token_is_required_everywhere_but_the_probes(up: Cluster) -> None:
    n1 = up.node("n1")
    # The scheduler API without the token: 401 with a message, not data.
    denied = httpx.get(f"{up.scheduler.url}/v1/status", trust_env=False)
    assert denied.status_code == 401 and "token" in denied.json()["error"]
    # Chunk data without the token: 401.
    url = f"http://{n1.address}/v1/objects/{'ab' * 32}/data"
    assert httpx.get(url, headers={"Range": "bytes=0-9"}, trust_env=False).status_code == 401
    # The CLI with the token from SYNCBIT_TOKEN_FILE (the harness sets it) works; without,
    # a one-line error and exit 2.
    assert up.cli("status").returncode == 0
    bad = up.cli("status", env={"SYNCBIT_TOKEN": "wrong"})
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: ") and "missing or wrong cluster token" in bad.stderr
