"""Helpers of the scheduler API tests (their fixtures live in conftest.py): the chunk
size and node timeout they run with, port 0 configs."""

from __future__ import annotations

from syncbit.config import SchedulerConfig

CHUNK = 4
TIMEOUT = 10.0


def any_port(config: SchedulerConfig) -> SchedulerConfig:
    # config.parse_address refuses port 0 (a person never means it); the server takes it.
    return config.model_copy(update={"listen": "127.0.0.1:0"})
