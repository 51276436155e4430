"""What the store tells the node: durable and removed chunks, for the one consumer that
reports them, and a wake-up on any chunk or object change. Trio thread; the store appends
and fires, consumers only take and wait.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from syncbit.store.objects import StoredObject

Durable = tuple["StoredObject", int, str]  # (object, chunk, digest)
Removed = tuple["StoredObject", list[int]]  # (object, chunks)


@dataclass
class Changes:
    """Chunk changes, oldest first. A chunk may appear in both lists (durable, then
    removed, or the other way): what holds now is the object's `durable` set."""

    durable: list[Durable] = field(default_factory=list)
    removed: list[Removed] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.durable or self.removed)


class ChangeFeed:
    """Chunk changes since the consumer last took them. One consumer: what `take`
    returns is the consumer's (to retry, say); the feed forgets it."""

    def __init__(self) -> None:
        self._changes = Changes()
        self._event = trio.Event()  # set exactly while changes are waiting

    def durable(self, items: list[Durable]) -> None:
        if items:
            self._changes.durable.extend(items)
            self._event.set()

    def removed(self, obj: StoredObject, indexes: list[int]) -> None:
        self._changes.removed.append((obj, indexes))
        self._event.set()

    def take(self) -> Changes:
        """Everything since the last take (possibly nothing), without waiting."""
        changes, self._changes = self._changes, Changes()
        if changes:
            self._event = trio.Event()
        return changes

    async def next(self) -> Changes:
        """Wait until something changed, then `take` it."""
        await self._event.wait()
        return self.take()


class Signal:
    """A wake-up: `wait` returns at the next `fire`. Cheap to fire with nobody waiting."""

    def __init__(self) -> None:
        self._event = trio.Event()

    @property
    def event(self) -> trio.Event:
        """The event the next `fire` sets (fetch it, then wait on it)."""
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()
