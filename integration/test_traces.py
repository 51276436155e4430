"""Access traces with real daemons and mounts: the first node to read a dataset records the
order of its reads (bounded), the scheduler keeps it, `syncbit dataset trace` shows it, and
another node's prefetch fetches in that order (read from its fetch log); a dataset added
with `--trace off` has none and its prefetch goes file by file."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from integration.cluster import (
    CHUNK_SIZE,
    Cluster,
    Node,
    Origin,
    fresh_dataset,
    sha256_file,
    wait_until,
)

CLUSTER_NODES = 2
MAX_RUNS = 3
# Quiet after a second: the recording is offered soon after the reads stop. n1 records at
# most MAX_RUNS runs (the bound, at a size a test can reach).
NODE_CONFIG = {
    "n1": {"trace_quiet": 1.0, "trace_max_runs": MAX_RUNS},
    "n2": {"trace_quiet": 1.0},
}
FILES = {"a.bin": 3 * CHUNK_SIZE, "b.bin": 3 * CHUNK_SIZE, "c.bin": 3 * CHUNK_SIZE}
# What n1's workload reads, in this order: one chunk of each file, none in manifest order,
# then two more than the recorder keeps.
READS = [("c.bin", 2), ("a.bin", 1), ("b.bin", 0), ("a.bin", 0), ("c.bin", 0)]


def _read(node: Node, name: str) -> None:
    for rel, chunk in READS:
        with open(node.path(name, rel), "rb") as f:
            f.seek(chunk * CHUNK_SIZE)
            assert len(f.read(4096)) == 4096


def _trace(cluster: Cluster, name: str) -> dict[str, Any]:
    done = cluster.cli("dataset", "trace", name, "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def _prefetched_in_order(cluster: Cluster, node: Node, name: str) -> list[tuple[str, int, int]]:
    """Prefetch `name` to `node`, wait until it is there; the pieces its fetch log names,
    in the order it started them."""
    mark = node.log_mark()
    assert cluster.cli("prefetch", name, "--nodes", node.name).returncode == 0
    done = cluster.cli("wait", name, "--timeout", "60s", "--daemon", node.address, scheduler=False)
    assert done.returncode == 0, done.stdout + done.stderr
    pattern = re.compile(rf"prefetch of {re.escape(name)}: (\S+) chunks (\d+)-(\d+)$", re.M)
    return [(p, int(a), int(b)) for p, a, b in pattern.findall(node.log_since(mark))]


@pytest.mark.timeout(300)
def test_the_first_readers_order_is_kept_shown_and_followed_by_another_nodes_prefetch(
    cluster: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds = fresh_dataset(origin_root, "traced", dict(FILES))
    cluster.add_dataset("traced", origin.url + "traced/")
    n1, n2 = cluster.nodes
    assert _trace(cluster, "traced")["trace"] is None
    _read(n1, "traced")
    wait_until(
        lambda: _trace(cluster, "traced")["trace"] is not None,
        30,
        "n1 to offer its access trace",
        evidence=n1.log_tail,
    )
    record = _trace(cluster, "traced")["trace"]
    assert record["node"] == "n1"
    # Bounded: the first MAX_RUNS runs, in the order read; marked partial.
    assert record["trace"]["runs"] == [["c.bin", 2, 2], ["a.bin", 1, 1], ["b.bin", 0, 0]]
    assert record["trace"]["complete"] is False
    shown = cluster.cli("dataset", "trace", "traced")
    assert shown.returncode == 0 and "recorded on n1, 3 runs (partial" in shown.stdout
    assert re.search(r"^2\s+a\.bin\s+1-1$", shown.stdout, re.M), shown.stdout

    order = _prefetched_in_order(cluster, n2, "traced")
    assert "follows the access trace of node n1 (3 runs)" in n2.log_text()
    assert order[:3] == [("c.bin", 2, 2), ("a.bin", 1, 1), ("b.bin", 0, 0)], order
    # Then the rest of each file the trace names, in the order it named them (here every
    # file); each chunk once.
    assert order[3:] == [("c.bin", 0, 1), ("a.bin", 0, 0), ("a.bin", 2, 2), ("b.bin", 1, 2)]
    for rel, facts in ds.files.items():
        assert sha256_file(n2.path("traced", rel)) == facts.sha256


@pytest.mark.timeout(300)
def test_a_dataset_added_with_trace_off_is_neither_recorded_nor_followed(
    cluster: Cluster, origin: Origin, origin_root: Path
) -> None:
    fresh_dataset(origin_root, "untraced", dict(FILES))
    done = cluster.cli("dataset", "add", "untraced", origin.url + "untraced/", "--trace", "off")
    assert done.returncode == 0, done.stderr
    n1, n2 = cluster.nodes
    wait_until(lambda: n1.path("untraced").is_dir(), 20, "untraced on n1")
    mark = n1.log_mark()
    _read(n1, "untraced")
    # n1 read it: a recording would be offered a second after (trace_quiet). An absence
    # is only seen by waiting past that.
    time.sleep(3)
    order = _prefetched_in_order(cluster, n2, "untraced")
    assert order == []  # no trace to follow: file by file, not piece by piece
    assert _trace(cluster, "untraced")["trace"] is None
    assert "access trace of untraced" not in n1.log_since(mark)
    shown = cluster.cli("dataset", "trace", "untraced")
    assert shown.returncode == 0 and "no access trace of untraced" in shown.stdout
