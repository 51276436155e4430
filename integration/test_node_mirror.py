"""The registry mirror of the node daemon, at start-up: a bad `mirror` section and an
address already taken each end the daemon with one `error:` line and the exit code of
their kind, its mount point left unmounted. (Pulls through it: test_containerd.py.)"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from integration.cluster import HOST, Node, Scheduler, fuse_unavailable, is_mounted

_NO_FUSE = fuse_unavailable()
pytestmark = pytest.mark.skipif(_NO_FUSE is not None, reason=f"daemons mount: {_NO_FUSE}")


def _exit_of(tmp_path: Path, mirror: object) -> tuple[int, str, Node]:
    scheduler = Scheduler(tmp_path / "state", tmp_path / "logs")
    node = Node("n1", tmp_path, scheduler.url, config={"mirror": mirror})
    try:
        scheduler.start()
        node.start(wait=False)
        rc = node.wait(30)
        return rc, node.log_text(whole=True), node
    finally:
        node.cleanup()
        scheduler.cleanup()
        scheduler.close()


def test_a_bad_mirror_section_is_a_config_error(tmp_path: Path) -> None:
    rc, log, node = _exit_of(tmp_path, {"listen": f"{HOST}:1", "bogus": 1})
    assert rc == 2, log
    assert "error: invalid config key 'mirror'" in log and "bogus" in log
    assert "Traceback" not in log
    assert not is_mounted(node.mount)


def test_a_mirror_address_in_use_fails_start_up(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, log, node = _exit_of(tmp_path, {"listen": f"{HOST}:{port}"})
    assert rc == 1, log
    assert (
        f"error: cannot serve the registry mirror on {HOST}:{port}: Address already in use" in log
    )
    assert "Traceback" not in log
    assert not is_mounted(node.mount)
