"""Small trio helpers shared by the node's layers. No I/O, no state."""

from __future__ import annotations

import trio


async def first_of(*events: trio.Event) -> None:
    """Until one of `events` is set (at once if one is)."""
    if any(event.is_set() for event in events):
        return
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)
