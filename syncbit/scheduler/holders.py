"""Which nodes hold which chunks (soft state), the at most K holders offered for each chunk,
and, per object, a change log that answers "which chunks changed since cursor C" exactly.

Holders are bitmaps per (object, node), rebuilt from the nodes' chunk reports after a
restart. Each chunk offers at most K of its holders, chosen when a place is free by
`choose` (the peer policy over eligible holders: up and trusted, `eligible`). Once K are
offered, a new holder takes an offered place in two cases, and then the place of the
offered holder that is offered for the most chunks (of every object; `places`):

- it is offered for no chunk yet and that holder for two or more: spread. Requesters
  only ask the offered holders, so a node offered nowhere uploads nothing while others
  serve several chunks in demand at once (bench/simulate.py, 10,000 nodes: most nodes
  idle while all waited, the last ready at 2.83x the bound; 1.82x with this rule). Each
  such change makes a node offered somewhere and none offered nowhere, so they are at
  most one per node that becomes a holder or loses its last place (a report of many
  chunks takes its place at a random one of them, not always at the first);
- by reservoir sampling: the i-th holder with probability K/i, so the offers follow the
  holders as they grow (the first K holders alone would serve a whole cluster: 9x the
  bound at 1,000 nodes) while a chunk's offers change about K*ln(N/K) times over N
  holders, not N times.

What a node learns about a chunk stays bounded by K, never by the cluster's size; each
offer change costs O(K).

Every change of what the scheduler says about a chunk (its offered holders, and, told by
the state through `touch`: its digest, dispute or source reader) gets the object's next
sequence number; `since(cursor)` returns each chunk changed after the cursor once, in
order. Cursors name the object's view (`view.seq`): a view made anew (another scheduler
process, a new geometry) does not know older cursors, and says so (reset).

Never writes storage, never decides who may hold what (the state does, before `add`).
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import trio

from syncbit.scheduler.records import chunk_bytes

_VIEWS = itertools.count(1)
_EPOCH = os.urandom(4).hex()  # this process: cursors of another process are unknown here


@dataclass(eq=False)
class ObjectHolders:
    """One object's holders, offers and change log."""

    object_id: str
    size: int
    chunk_size: int
    count: int
    view: str = field(default_factory=lambda: f"{_EPOCH}{next(_VIEWS):x}")
    masks: dict[str, bytearray] = field(default_factory=dict)  # node -> bit i = chunk i
    held: dict[str, int] = field(default_factory=dict)  # node -> bytes it holds
    offered: dict[int, list[str]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)  # chunk -> how many hold it
    seq: int = 0
    changed: dict[int, int] = field(default_factory=dict)  # chunk -> seq of its last change
    log: list[tuple[int, int]] = field(default_factory=list)  # (seq, chunk), ascending
    event: trio.Event = field(default_factory=trio.Event)  # set (and replaced) on change

    def holds(self, node: str, index: int) -> bool:
        mask = self.masks.get(node)
        return mask is not None and bool(mask[index >> 3] >> (index & 7) & 1)

    def cursor(self, seq: int | None = None) -> str:
        return f"{self.view}.{self.seq if seq is None else seq}"


def bits(mask: bytearray) -> Iterator[int]:
    """The set bits of a bitmap, ascending: O(bytes + bits set)."""
    for byte_index, byte in enumerate(mask):
        while byte:
            low = byte & -byte
            yield byte_index * 8 + low.bit_length() - 1
            byte ^= low


class Holders:
    """Holders and offers of every object (see the module docstring).

    Args:
        k: holders offered per chunk, at most.
        eligible: whether a node may be offered now (up, not quarantined).
        choose: picks up to n of the eligible candidate holders, best first.
        seed: the chunks of an object that have a record before its view exists (digests,
            disputes, claims): a new view starts by logging them, so `since` of nothing
            is the whole object.
        rng: the randomness of the offers' sampling (seeded in tests).
    """

    def __init__(
        self,
        k: int,
        eligible: Callable[[str], bool],
        choose: Callable[[list[str], int], list[str]],
        seed: Callable[[str], Iterable[int]] = lambda _: (),
        rng: random.Random | None = None,
    ) -> None:
        self.k = k
        self.rng = rng or random.Random()
        self.eligible = eligible
        self.choose = choose
        self.seed = seed
        self.objects: dict[str, ObjectHolders] = {}
        self.by_node: dict[str, set[str]] = {}  # node -> objects it holds chunks of
        self.places: dict[str, int] = {}  # node -> chunks (of every object) it is offered for

    # -- views ---------------------------------------------------------------------------------

    def view(self, object_id: str, size: int, chunk_size: int, count: int) -> ObjectHolders:
        """The object's view, made (and seeded) when first needed or when its geometry
        changed (then every holder is forgotten: their bits meant other chunks)."""
        obj = self.objects.get(object_id)
        if obj is not None and (obj.size, obj.chunk_size) == (size, chunk_size):
            return obj
        if obj is not None:
            self.drop(object_id)
        obj = self.objects[object_id] = ObjectHolders(object_id, size, chunk_size, count)
        self._touch(obj, sorted(set(self.seed(object_id))))
        return obj

    def drop(self, object_id: str) -> None:
        """Forget an object's holders and view; long polls on it answer (with a reset)."""
        obj = self.objects.pop(object_id, None)
        if obj is None:
            return
        for node in obj.masks:
            self.by_node.get(node, set()).discard(object_id)
        for offered in obj.offered.values():
            for node in offered:
                self._unplace(node)
        obj.event.set()

    def touch(self, object_id: str, indexes: Iterable[int]) -> None:
        """Something else the scheduler says of these chunks changed (digest, dispute,
        source reader); with no indexes, the object as a whole (long polls answer)."""
        obj = self.objects.get(object_id)
        if obj is not None:
            self._touch(obj, [i for i in indexes if 0 <= i < obj.count])

    def _touch(self, obj: ObjectHolders, indexes: list[int]) -> None:
        for index in indexes:
            obj.seq += 1
            obj.changed[index] = obj.seq
            obj.log.append((obj.seq, index))
        if len(obj.log) > 2 * len(obj.changed) + 64:  # drop the entries changed since
            obj.log = sorted((seq, index) for index, seq in obj.changed.items())
        obj.event.set()
        obj.event = trio.Event()

    def since(self, obj: ObjectHolders, seq: int, limit: int) -> tuple[list[int], int, bool]:
        """The chunks changed after `seq`, each once, oldest change first, at most `limit`;
        the seq to continue from; whether more changes follow."""
        start = bisect.bisect_left(obj.log, (seq + 1,))
        found: list[int] = []
        last = seq
        for entry_seq, index in itertools.islice(obj.log, start, None):
            if obj.changed.get(index) != entry_seq:
                continue  # changed again later: it comes at its later place
            if len(found) == limit:
                return found, last, True
            found.append(index)
            last = entry_seq
        return found, obj.seq, False

    # -- holders -------------------------------------------------------------------------------

    def add(self, node: str, obj: ObjectHolders, indexes: Iterable[int]) -> None:
        """`node` holds these chunks now (their digests matched the record)."""
        mask = obj.masks.get(node)
        if mask is None:
            mask = obj.masks[node] = bytearray((obj.count + 7) // 8)
            self.by_node.setdefault(node, set()).add(obj.object_id)
        offer = self.eligible(node)
        places = self.places
        touched: list[int] = []
        batch = list(indexes)
        turn = self.rng.randrange(len(batch)) if len(batch) > 1 else 0
        for index in itertools.chain(batch[turn:], batch[:turn]):  # a spread place: any of them
            byte, bit = index >> 3, 1 << (index & 7)
            if mask[byte] & bit:
                continue
            mask[byte] |= bit
            obj.held[node] = obj.held.get(node, 0) + chunk_bytes(index, obj.size, obj.chunk_size)
            holders = obj.counts[index] = obj.counts.get(index, 0) + 1
            offered = obj.offered.setdefault(index, [])
            if not offer or node in offered:
                continue
            if len(offered) < self.k:
                offered.append(node)
                self._place(node)
                touched.append(index)
                continue
            spot = self._busiest(offered)
            spread = node not in places and places[offered[spot]] >= 2  # see the docstring
            if not spread and self.rng.random() * holders >= self.k:  # reservoir: K/holders
                continue
            self._unplace(offered[spot])
            offered[spot] = node
            self._place(node)
            touched.append(index)
        if touched:
            self._touch(obj, touched)

    def remove(self, node: str, obj: ObjectHolders, indexes: Iterable[int]) -> list[int]:
        """`node` no longer holds these chunks (dropped, reported bad, revoked); the ones
        it did hold."""
        mask = obj.masks.get(node)
        if mask is None:
            return []
        gone: list[int] = []
        for index in indexes:
            if not 0 <= index < obj.count:
                continue
            byte, bit = index >> 3, 1 << (index & 7)
            if not mask[byte] & bit:
                continue
            mask[byte] &= ~bit
            obj.held[node] -= chunk_bytes(index, obj.size, obj.chunk_size)
            obj.counts[index] -= 1
            gone.append(index)
        self._unoffer(node, obj, gone)
        return gone

    def holders_of(self, obj: ObjectHolders, index: int) -> list[str]:
        return [node for node in obj.masks if obj.holds(node, index)]

    # -- who may be offered ----------------------------------------------------------------------

    def ineligible(self, node: str) -> None:
        """`node` went down or was quarantined: its offers go to other holders."""
        for object_id in sorted(self.by_node.get(node, ())):
            obj = self.objects.get(object_id)
            mask = None if obj is None else obj.masks.get(node)
            if obj is not None and mask is not None:
                self._unoffer(node, obj, list(bits(mask)))

    def eligible_again(self, node: str) -> None:
        """`node` came up (or was trusted again): it fills the free offers of its chunks."""
        for object_id in sorted(self.by_node.get(node, ())):
            obj = self.objects.get(object_id)
            mask = None if obj is None else obj.masks.get(node)
            if obj is None or mask is None:
                continue
            touched: list[int] = []
            for index in bits(mask):
                offered = obj.offered.setdefault(index, [])
                if len(offered) < self.k and node not in offered:
                    offered.append(node)
                    self._place(node)
                    touched.append(index)
            if touched:
                self._touch(obj, touched)

    def _unoffer(self, node: str, obj: ObjectHolders, indexes: list[int]) -> None:
        touched: list[int] = []
        for index in indexes:
            offered = obj.offered.get(index)
            if offered is None or node not in offered:
                continue
            offered.remove(node)
            self._unplace(node)
            others = [
                n
                for n in obj.masks
                if n not in offered and n != node and obj.holds(n, index) and self.eligible(n)
            ]
            for chosen in self.choose(others, self.k - len(offered)):
                offered.append(chosen)
                self._place(chosen)
            touched.append(index)
        if touched:
            self._touch(obj, touched)

    def _busiest(self, offered: list[str]) -> int:
        """The offered place whose holder is offered for the most chunks (ties: the first
        from a random place on)."""
        places, k = self.places, len(offered)
        start = self.rng.randrange(k)
        return max(((start + j) % k for j in range(k)), key=lambda j: places[offered[j]])

    def _place(self, node: str) -> None:
        self.places[node] = self.places.get(node, 0) + 1

    def _unplace(self, node: str) -> None:
        left = self.places[node] - 1
        if left:
            self.places[node] = left
        else:
            del self.places[node]


__all__ = ["Holders", "ObjectHolders", "bits"]
