"""The node's composition root without FUSE: `Node(config)` builds every component before
the trio loop runs, and gives back all it took when a step fails or on `close`."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from syncbit.config import DaemonConfig
from syncbit.errors import SyncbitError
from syncbit.node import Node
from syncbit.store import ObjectStore


def _config(tmp_path: Path, listen: str) -> DaemonConfig:
    return DaemonConfig.model_validate(
        {
            "node": "n1",
            "scheduler": "http://127.0.0.1:9",  # never asked: nothing runs
            "listen": listen,
            "cache_dir": tmp_path / "cache",
            "cache_size": 1 << 20,
            "mount": tmp_path / "mnt",
        }
    )


def test_a_node_that_cannot_listen_releases_its_cache(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SyncbitError, match=f"cannot listen on 127.0.0.1:{port}"):
            Node(_config(tmp_path, f"127.0.0.1:{port}"))
    ObjectStore.open(tmp_path / "cache", 1 << 20).close()  # the cache lock is free again


def test_close_gives_back_the_port_and_the_cache(tmp_path: Path) -> None:
    node = Node(_config(tmp_path, "127.0.0.1:0"))
    address = node.peer_server.address
    assert node.reporter.advertise == address  # no `advertise`: the bound address
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port))):
        pass  # serving already, before the trio loop runs
    node.close()
    with socket.socket() as again:
        again.bind((host, int(port)))
    ObjectStore.open(tmp_path / "cache", 1 << 20).close()
