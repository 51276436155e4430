"""Helpers of the etcd tests: a real one-member etcd on loopback (Debian's etcd-server,
started and always stopped by `integration.etcd_cluster`), skipped where it is missing,
and keys of their own for every test sharing it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from integration.etcd_cluster import EtcdCluster, etcd_unavailable

_MISSING = etcd_unavailable()
requires_etcd = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


@contextmanager
def single_etcd(workdir: Path, extra_args: list[str] | None = None) -> Iterator[EtcdCluster]:
    """One etcd member under `workdir`, running for the block."""
    with EtcdCluster(workdir, size=1, extra_args=extra_args) as cluster:
        yield cluster


def unique(prefix: str = "t") -> str:
    """A key prefix no other test uses."""
    return f"/{prefix}-{uuid.uuid4().hex[:10]}/"
