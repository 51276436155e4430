"""Bytes served to readers through the mount, by where their chunks came from (/metrics).
Counts only; never fetches, never decides anything about a read.
"""

from __future__ import annotations

from collections import Counter

from syncbit.chunks import chunk_span
from syncbit.fetch.flight import Flight, Origin
from syncbit.store import StoredObject

_MAX_PENDING = 100_000  # chunks fetched for readers but never read: forgotten past this


class Served:
    """A chunk fetched for a reader (or its readahead) counts as peer or source bytes until
    a read reaches its end; every other byte was already in the cache."""

    def __init__(self) -> None:
        self.read_bytes: Counter[str] = Counter()  # by origin
        self._came_from: dict[tuple[str, int], Origin] = {}  # fetched for readers, not yet read

    def fetched(self, flight: Flight) -> None:
        """A reader's flight brought its chunk from `flight.origin`."""
        if len(self._came_from) > _MAX_PENDING:
            self._came_from.clear()
        self._came_from[(flight.obj.id, flight.index)] = flight.origin

    def count(self, obj: StoredObject, offset: int, length: int) -> None:
        """A read of [offset, offset+length) of `obj` was served."""
        came_from = self._came_from
        if not came_from:
            self.read_bytes[Origin.CACHE] += length
            return
        cs, end = obj.chunk_size, offset + length
        for index in chunk_span(offset, length, obj.size, cs):
            chunk_end = min(obj.size, (index + 1) * cs)
            part = min(end, chunk_end) - max(offset, index * cs)
            key = (obj.id, index)
            origin = came_from.pop(key, Origin.CACHE) if end >= chunk_end else came_from.get(key)
            self.read_bytes[origin or Origin.CACHE] += part
