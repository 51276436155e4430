"""The cache filesystem's free space and its disk-full episodes: entered by a refused
write, left when free space is back, logged once each way and counted for status and
metrics. Decides nothing about what to evict or fetch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import trio

from syncbit.diskspace import free_bytes, size_text

log = logging.getLogger("syncbit.disk")


MIN_EPISODE = 1.0  # seconds: the shortest disk-full episode `run` ends


class DiskWatch:
    """The cache filesystem's free space and its disk-full episodes (trio thread only).

    An episode starts when a write that needs space is refused (`refused`) and nothing
    could be evicted to make room: one ERROR line, then only counts. It ends when
    `recover_bytes` are free again (`check`, polled by `run`): one line, and `changed` is
    set so the daemon saves what it could not and resumes prefetch. Free space is sampled
    in a worker thread; `free` is the last sample.
    """

    def __init__(self, path: Path, recover_bytes: int = 9 << 20, interval: float = 5.0) -> None:
        self.path = path
        # Free space that ends an episode: two chunks of the default size and the store's
        # headroom (a margin, so that one freed chunk does not end and restart it).
        self.recover_bytes = recover_bytes
        self.interval = interval  # seconds between samples; 1 s during an episode
        self.full = False
        self.since: float | None = None  # epoch seconds the current episode began
        self.refusals = 0  # writes refused for lack of space, ever
        self.episodes = 0
        self._episode_refusals = 0
        self.free = 0
        self.changed = trio.Event()  # set (and replaced) when an episode begins or ends
        self.sample()

    def sample(self) -> int:
        """Blocking: read the free space now."""
        with contextlib.suppress(OSError):  # keep the last sample; a write says what is wrong
            self.free = free_bytes(self.path)
        return self.free

    def refused(self, what: str, exc: BaseException) -> None:
        """A write (`what`: "a chunk", "the plan", ...) failed for lack of space."""
        self.refusals += 1
        self._episode_refusals += 1
        if self.full:
            log.debug("no space for %s: %s", what, exc)
            return
        self.full = True
        self.since = time.time()
        self.episodes += 1
        self._episode_refusals = 1
        log.error(
            "cache filesystem full under %s (writing %s: %s): new chunks are not cached here "
            "until space is freed; cached data is still served; `syncbit status` and "
            "/metrics show the state (logged once until space is back)",
            self.path,
            what,
            exc,
        )
        self._changed()

    def check(self) -> bool:
        """End the episode if enough space is free now (last sample); True if it ended."""
        if not self.full or self.free < self.recover_bytes:
            return False
        lasted = time.time() - (self.since or time.time())
        log.warning(
            "space is back under %s (%s free) after %.0fs full; %d writes were refused "
            "meanwhile; caching resumes",
            self.path,
            size_text(self.free),
            lasted,
            self._episode_refusals,
        )
        self.full = False
        self.since = None
        self._changed()
        return True

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample free space every `interval` seconds (every second during an episode) and
        end episodes when space is back."""
        task_status.started()
        while True:
            with trio.move_on_after(1.0 if self.full else self.interval):
                await self.changed.wait()
            if self.full and self.since is not None:
                # An episode lasts at least MIN_EPISODE: in the burst of writes that began
                # it, space an eviction frees is taken again at once, and ending the
                # episode on that sample would only begin another (and log it again).
                await trio.sleep(max(0.0, self.since + MIN_EPISODE - time.time()))
            await trio.to_thread.run_sync(self.sample)
            self.check()

    def state(self) -> dict[str, Any]:
        """For status, metrics and `cache ls`."""
        return {
            "disk_full": self.full,
            "disk_full_since": self.since,
            "disk_free": self.free,
            "disk_refusals": self.refusals,
        }
