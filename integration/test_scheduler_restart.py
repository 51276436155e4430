"""A scheduler restarted under running daemons: who holds what is soft state, kept in its
memory only, so the new one learns it again from the nodes (a new epoch in its heartbeat
answers makes each report what it holds) and peers serve as before, the origin idle."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.cluster import Cluster, Origin, fresh_dataset, wait_until
from integration.test_cluster import read_all

CLUSTER_NODES = 2
MiB = 1 << 20


@pytest.mark.timeout(240)
def test_a_restarted_scheduler_learns_the_holders_again_from_the_nodes(
    up: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds = fresh_dataset(origin_root, "relearn", {"a.bin": 12 * MiB, "b.bin": 3 * MiB})
    up.add_dataset("relearn", f"{origin.url}/relearn/")
    n1, n2 = up.node("n1"), up.node("n2")
    read_all(n1, ds, "relearn")
    up.wait_cached(n1, "relearn", ds.total_size)
    served = origin.served()

    up.scheduler.stop()
    up.scheduler.start()
    up.wait_cached(n1, "relearn", ds.total_size, timeout=60)  # reported again by n1

    read_all(n2, ds, "relearn")  # from its peer: the scheduler names n1 again
    assert origin.served() == served
    wait_until(lambda: "new scheduler instance" in n1.log_text(), 10, "n1 to say why")
