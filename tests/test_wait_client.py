"""`syncbit wait`'s client side (syncbit.cli.progress.follow) against a real peer server on
loopback: a daemon that is listening but not serving yet answers 503, and the wait keeps
trying instead of calling the dataset unknown; the daemon's errors reach the client as
the errors they are (the one status table), never as an absent daemon."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from syncbit.cli.daemon_client import local
from syncbit.cli.progress import follow
from syncbit.errors import (
    CacheFullError,
    NotFoundError,
    SchedulerError,
    SyncbitError,
    UserError,
    WaitTimeoutError,
)
from syncbit.node.http import LocalApi
from syncbit.peer import PeerServer
from syncbit.store import ObjectStore


async def _done(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": "d", "size": 10, "present_bytes": 10, "complete": True}


def test_wait_retries_while_the_daemon_is_still_starting(tmp_path: Path) -> None:
    store = ObjectStore.open(tmp_path, 1 << 20)
    server = PeerServer(store, "127.0.0.1:0")
    api = LocalApi()
    server.add_routes(api)
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
        api.set_control(_done)  # the daemon finished starting
        waiter.join(20)
    finally:
        server.stop()
        store.close()
    assert result and result[0]["complete"] is True
    assert f"the syncbit daemon at http://{server.address} is starting" in out.getvalue()


def test_wait_never_shows_100_percent_before_every_byte_is_here(tmp_path: Path) -> None:
    async def almost(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        doc = {"dataset": "d", "size": 64 << 20, "present_bytes": (64 << 20) - 67}
        return {**doc, "complete": False, "assigned": True, "pulling": False}

    store = ObjectStore.open(tmp_path, 1 << 20)
    server = PeerServer(store, "127.0.0.1:0")
    api = LocalApi()
    api.set_control(almost)
    server.add_routes(api)
    server.start()
    out = io.StringIO()
    try:
        with pytest.raises(WaitTimeoutError, match=r"not ready after 0\.3s: 99\.9% "):
            follow(server.address, "d", out, start=False, timeout=0.3)
    finally:
        server.stop()
        store.close()
    assert "d:  99.9%" in out.getvalue()


@pytest.mark.parametrize(
    ("raised", "expected", "message"),
    [
        (RuntimeError("a bug"), SyncbitError, "internal daemon error; see the daemon log"),
        (NotFoundError("no dataset 'd' on this node"), NotFoundError, "no dataset 'd'"),
        (UserError("wait must be 0-60 seconds"), UserError, "wait must be"),
        (SchedulerError("scheduler at x unreachable"), SchedulerError, "unreachable"),
        (CacheFullError("pinned"), CacheFullError, "pinned"),  # a 500 of the tree: kept
    ],
)
def test_a_daemon_error_reaches_the_cli_as_what_it_is(
    tmp_path: Path, raised: Exception, expected: type[SyncbitError], message: str
) -> None:
    """Errors of the control API come back through the one status table: never taken for
    a daemon that is absent or starting (which `syncbit wait` would wait out)."""

    async def failing(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        raise raised

    store = ObjectStore.open(tmp_path, 1 << 20)
    server = PeerServer(store, "127.0.0.1:0")
    api = LocalApi()
    api.set_control(failing)
    server.add_routes(api)
    server.start()
    try:
        with pytest.raises(expected, match=message) as caught:
            follow(server.address, "d", io.StringIO(), start=False, timeout=30)
        assert type(caught.value) is expected
        with pytest.raises(expected, match=message):  # the connection is still usable
            local(server.address, "POST", "cache/gc")
    finally:
        server.stop()
        store.close()
