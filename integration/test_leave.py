"""A daemon stopping cleanly tells the scheduler: a real scheduler (whose node timeout is
two minutes) sees a SIGTERM'ed daemon down the moment its process has exited, not when the
timeout runs out, so no peer is sent to it meanwhile; the other node stays up, and the
stopped one is back with the first heartbeat of its restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.cluster import Node, Scheduler, wait_until

NODE_TIMEOUT = 120.0  # seconds: far longer than this test waits for anything


@pytest.mark.timeout(180)
def test_a_daemon_that_stops_cleanly_is_down_at_once(workdir: Path) -> None:
    root = workdir / "leave"
    root.mkdir(parents=True, exist_ok=True)
    scheduler = Scheduler(root / "state", root / "logs", NODE_TIMEOUT)
    nodes = [Node(f"n{i}", root, scheduler.url) for i in (1, 2)]

    def up() -> dict[str, bool]:
        return {n["name"]: n["up"] for n in scheduler.get("/v1/nodes")["nodes"]}

    try:
        scheduler.start()
        for node in nodes:
            node.start()
        wait_until(lambda: up() == {"n1": True, "n2": True}, 30, "both nodes up")
        nodes[1].stop()  # SIGTERM by PID; returns once the process exited
        assert up() == {"n1": True, "n2": False}
        assert "told the scheduler this node is leaving" in nodes[1].log_text(whole=True)
        assert "node n2 is leaving" in scheduler.log_text(whole=True)
        nodes[1].start()
        wait_until(lambda: up() == {"n1": True, "n2": True}, 30, "n2 up again")
        for node in nodes:
            node.stop()
        scheduler.stop()
    finally:
        for node in nodes:
            node.cleanup()
        scheduler.cleanup()
        scheduler.close()
