"""Fixtures of the unit tests: a real SchedulerServer on 127.0.0.1 (any free port) with
an injectable clock, and a SchedulerClient on it (the scheduler API tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from schedulerfixtures import CHUNK, TIMEOUT, Clock, any_port

from syncbit.config import SchedulerConfig
from syncbit.scheduler import SchedulerClient, SchedulerServer


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
