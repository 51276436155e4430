"""`syncbit wait`'s client side (syncbit.cli.progress.follow) against a real peer server on
loopback: a daemon that is listening but not serving yet answers 503, and the wait keeps
trying instead of calling the dataset unknown."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from syncbit.cli.progress import WaitTimeoutError, follow
from syncbit.peer import PeerServer
from syncbit.store import ObjectStore


def _done(method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 200, {"dataset": "d", "size": 10, "present_bytes": 10, "complete": True}


def test_wait_retries_while_the_daemon_is_still_starting(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 20)
    server = PeerServer(store, "127.0.0.1:0")
    server.start()
    out = io.StringIO()
    result: list[dict[str, Any]] = []
    waiter = threading.Thread(
        target=lambda: result.append(follow(server.address, "d", out, start=False, timeout=20))
    )
    try:
        waiter.start()
        time.sleep(0.5)  # several attempts while the control API is not set up
        assert not result
        server.set_control(_done)  # the daemon finished starting
        waiter.join(20)
    finally:
        server.stop()
        store.close()
    assert result and result[0]["complete"] is True
    assert f"the syncbit daemon at http://{server.address} is starting" in out.getvalue()


def test_wait_never_shows_100_percent_before_every_byte_is_here(tmp_path: Path) -> None:
    def almost(method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        doc = {"dataset": "d", "size": 64 << 20, "present_bytes": (64 << 20) - 67}
        return 200, {**doc, "complete": False, "assigned": True, "pulling": False}

    store = ObjectStore.open(tmp_path, 1 << 20)
    server = PeerServer(store, "127.0.0.1:0")
    server.set_control(almost)
    server.start()
    out = io.StringIO()
    try:
        with pytest.raises(WaitTimeoutError, match=r"not ready after 0\.3s: 99\.9% "):
            follow(server.address, "d", out, start=False, timeout=0.3)
    finally:
        server.stop()
        store.close()
    assert "d:  99.9%" in out.getvalue()
