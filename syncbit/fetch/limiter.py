"""Limits on prefetch traffic: the bandwidth cap, a token bucket shared by every prefetch
transfer. Only waits; never decides what runs (queue) or where bytes come from.
"""

from __future__ import annotations

import trio


class Bandwidth:
    """At most `rate` bytes per second across the transfers that `take` (0: no cap)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._next = 0.0  # when the next byte may go

    async def take(self, nbytes: int) -> None:
        """Wait until `nbytes` more may go (each caller waits for the bytes before it)."""
        if self.rate <= 0:
            return
        now = trio.current_time()
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        await trio.sleep_until(start)
