"""The cache budget's rules as pure functions: pins, which object the LRU evicts next,
what a full cache says. No I/O, no waiting; never changes an object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from syncbit.diskspace import size_text
from syncbit.store.objects import StoredObject


@dataclass(frozen=True)
class Pins:
    """The objects of the datasets assigned to this node: never evicted by the LRU.
    `sizes` (object -> bytes) tells that pinned data alone exceeds the budget before
    those objects are fetched."""

    ids: frozenset[str] = frozenset()
    sizes: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, ids: Iterable[str], sizes: Mapping[str, int] | None = None) -> Pins:
        pinned = frozenset(ids)
        return cls(pinned, {k: v for k, v in (sizes or {}).items() if k in pinned})

    def __contains__(self, object_id: object) -> bool:
        return object_id in self.ids

    def usage(self, get: Callable[[str], StoredObject | None]) -> tuple[int, int]:
        """(bytes held of pinned objects, bytes they need when whole)."""
        held = size = 0
        for oid in self.ids:
            obj = get(oid)
            has = obj.bytes_in(obj.written) if obj is not None else 0
            held += has
            size += max(self.sizes.get(oid, obj.size if obj is not None else 0), has)
        return held, size


def lru_victim(
    objects: Iterable[StoredObject],
    pins: Pins,
    keep: StoredObject | None,
    busy: Callable[[StoredObject], bool],
) -> StoredObject | None:
    """The least recently used unpinned object that holds bytes and is idle, never `keep`;
    objects of files open through the mount only when no other object can go (a file
    open across a dataset update keeps its old bytes as long as there is room)."""
    best: StoredObject | None = None
    for obj in objects:
        if obj is keep or not obj.written or obj.id in pins or busy(obj):
            continue
        if best is None or (obj.opened > 0, obj.last_used) < (best.opened > 0, best.last_used):
            best = obj
    return best


def waitable(
    objects: Iterable[StoredObject],
    pins: Pins,
    keep: StoredObject | None,
    busy: Callable[[StoredObject], bool],
) -> bool:
    """Some unpinned object other than `keep` holds bytes but is in use right now: worth
    waiting a moment for."""
    return any(o is not keep and o.written and o.id not in pins and busy(o) for o in objects)


def full_message(nbytes: int, budget: int, held: int, pinned: int, pinned_size: int) -> str:
    """Why `nbytes` more cannot be stored: how much is pinned and how much in use."""
    msg = (
        f"cache full: {size_text(pinned)} pinned (assigned datasets) and "
        f"{size_text(held - pinned)} in use of a {size_text(budget)} budget; cannot store "
        f"{size_text(nbytes)} more"
    )
    if pinned_size > budget:
        msg += (
            f" (the assigned datasets need {size_text(pinned_size)}, more than the budget:"
            " raise --cache-size or assign less to this node)"
        )
    return msg


def too_large(nbytes: int, budget: int) -> str | None:
    """Why one chunk can never fit, or None."""
    if nbytes <= budget:
        return None
    return (
        f"a chunk of {size_text(nbytes)} is larger than the whole cache budget of "
        f"{size_text(budget)}: raise --cache-size"
    )
