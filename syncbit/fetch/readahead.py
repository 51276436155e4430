"""Readahead for sequential readers: which chunks to fetch ahead of a read, topped up half
a window at a time. Pure: never fetches, never waits; the fetcher queues what it names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Readahead:
    """Where one open file's reads were, and how far its readahead was scheduled."""

    next_offset: int = 0  # where a sequential read would start
    until: int = 0  # chunk index up to which readahead was scheduled
    size: int = 0  # the window now, in chunks (0: not started)
    grown_at: int = -1  # the chunk the reader had reached when the window last grew

    def grown(self, first: int, ceiling: int, after: int) -> int:
        """The window for a top-up after a read that ended before chunk `after`: `first`
        at the start, then twice as large each time the reader has moved on to a later
        chunk, never over `ceiling`. A reader that reads a header and stops costs `first`
        chunks; one that reads on reaches what the source's streams can keep busy within a
        few chunks, as the kernel's readahead ramps."""
        if self.size == 0:
            self.size, self.grown_at = first, after
        elif after > self.grown_at:
            self.size, self.grown_at = 2 * self.size, after
        self.size = min(ceiling, max(first, self.size))
        return self.size

    def sequential(self, offset: int, length: int) -> bool:
        """Note a read of [offset, offset+length): whether it went on from the last one."""
        sequential = offset == self.next_offset
        self.next_offset = offset + length
        if not sequential:
            self.size = 0  # a jump: the next sequential run starts small again
        return sequential

    def window(self, after: int, chunks: int, total: int) -> range:
        """The chunk indexes to fetch now, after a sequential read that ended before chunk
        `after`, with a window of `chunks` in a file of `total` chunks: empty until half
        the window is consumed, like the kernel's async readahead, so the new chunks queue
        together and go out as one source request and one claim, not one of each per
        chunk. Held chunks need nothing: the kernel's own readahead on the object file
        keeps them ahead of the reader."""
        if self.until - after > chunks // 2:
            return range(0)
        stop = min(after + chunks, total)
        start = max(after, self.until)
        self.until = max(self.until, stop)
        return range(start, stop)
