"""Log lines of the node's control loops: a recurring failure (the scheduler down, a disk
full) is logged once per `interval`, not once per attempt. Never raises, never waits.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("syncbit.daemon")


class Throttled:
    """`warn(what, exc)` logs at most once per `interval` seconds per `what`."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last.get(what, -self.interval) > self.interval:
            self._last[what] = now
            log.warning("%s: %s", what, exc)
