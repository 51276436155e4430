"""Fixtures of the unit tests: a real SchedulerServer on 127.0.0.1 (any free port) with
an injectable clock, and a SchedulerClient on it (the scheduler API tests); a small real
tmpfs (the full-disk tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fakes import Clock
from schedulerfixtures import CHUNK, TIMEOUT, any_port

from syncbit.config import SchedulerConfig
from syncbit.scheduler import SchedulerClient, SchedulerServer
from syncbit_testing.smallfs import CannotMount
from syncbit_testing.smallfs import small_fs as mount_small_fs


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def config(tmp_path: Path) -> SchedulerConfig:
    return any_port(
        SchedulerConfig(state_dir=tmp_path / "state", node_timeout=TIMEOUT, chunk_size=CHUNK)
    )


@pytest.fixture
def server(config: SchedulerConfig, clock: Clock) -> Iterator[SchedulerServer]:
    srv = SchedulerServer(config, clock=clock)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def client(server: SchedulerServer) -> AsyncIterator[SchedulerClient]:
    async with SchedulerClient(server.url) as c:
        yield c


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs, unmounted afterwards (skipped where it cannot be mounted)."""
    try:
        with mount_small_fs("tmpfs", tmp_path / "small", 8) as mnt:
            yield mnt
    except CannotMount as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
