"""Which nodes hold which chunks (soft state), the holders offered for each chunk (at most
K to any one requester), and, per object, change logs that answer "which chunks changed
since cursor C, for this requester" exactly.

Holders are bitmaps per (object, node), rebuilt from the nodes' chunk reports after a
restart. Requesters fall in `groups` groups by a stable hash of their name (`group_of`).
A chunk keeps one list of at most K offered holders while it has at most K, the same for
every requester; when a new holder finds its lists full, they double (up to `groups`
lists: each new list a copy of its twin, a group keeps answers and cursor) and the next
new holders take the copies' places one by one. So while they are fewer than
groups x K, every new holder is offered at once, to a share of the requesters: a chunk's
uploaders grow with its holders, as in a swarm, not K at a time (bench/simulate.py,
10,000 nodes: every requester offered the same K holders, the last piece the origin sent
reached the others no faster than N x chunk / (K x link), 1.82x the bound; 1.19x with 16
groups). Once every
list is its own, a new holder takes a place of one list (at random) in two cases, and
then the place of that list's holder offered in the most lists (of every chunk; `places`):

- it is offered nowhere yet and that holder in two or more lists: spread. Requesters
  only ask the offered holders, so a node offered nowhere uploads nothing while others
  serve several chunks in demand at once. Each such change makes a node offered
  somewhere and none offered nowhere, so they are at most one per node that becomes a
  holder or loses its last place (a report of many chunks takes its place at a random
  one of them, not always at the first);
- by reservoir sampling, with probability K x lists / holders (K over the holders one
  list stands for), so the offers follow the holders as they grow (the first holders
  alone would serve a whole cluster: 9x the bound at 1,000 nodes) while a list changes
  about K*ln(N/(K x lists)) times over N holders, not N times.

An offered holder that goes (dropped, down, reported) is replaced in a one-list chunk by
the policy's choice among the eligible holders (`choose`), in a chunk of several lists by
its choice among the holders the other lists offer (O(lists x K), never O(holders)).
What a node learns about a chunk stays bounded by K, never by the cluster's size; each
offer change costs O(K), a new holder O(lists x K) at most (a scan in C) and O(1) spread
over the holders that fill a doubling.

Every change of what the scheduler says about a chunk gets the object's next sequence
number. A change of the digest, dispute or source reader (told by the state through
`touch`) concerns every group and goes to one log; a change of list a of L goes to the
log of (L, a), which a group reads if a is its list at L lists. `since(cursor, group)`
merges the group's logs (one per doubling, at most log2(groups) + 2) and returns each
chunk whose answer for the group changed after the cursor once, in order: no chunk for a
change of another group's list. Cursors name the object's view (`view.seq`): a view
made anew (another scheduler process, a new geometry) does not know older cursors, and
says so (reset).

Never writes storage, never decides who may hold what (the state does, before `add`).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import os
import random
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import trio

from syncbit.scheduler.records import chunk_bytes

_VIEWS = itertools.count(1)
OFFER_GROUPS = 16  # offer lists per chunk at most: see the module docstring
_EPOCH = os.urandom(4).hex()  # this process: cursors of another process are unknown here


@dataclass(eq=False)
class _Log:
    """Changes logged in one place, ascending: (seq, chunk) as two compact arrays."""

    seqs: array[int] = field(default_factory=lambda: array("q"))
    indexes: array[int] = field(default_factory=lambda: array("q"))
    dead: int = 0  # entries no longer the latest of what they logged

    def append(self, seq: int, index: int) -> None:
        self.seqs.append(seq)
        self.indexes.append(index)

    def after(self, seq: int) -> Iterator[tuple[int, int]]:
        start = bisect.bisect_right(self.seqs, seq)
        return zip(self.seqs[start:], self.indexes[start:], strict=True)

    def last(self) -> int:
        return self.seqs[-1] if self.seqs else 0

    def holds(self, seq: int) -> bool:
        at = bisect.bisect_left(self.seqs, seq)
        return at < len(self.seqs) and self.seqs[at] == seq

    def died(self, live: Callable[[int, int], bool]) -> None:
        """One entry is no longer the latest of what it logged; once most are, they go
        (a scan per half of the log died: O(1) per entry spread over the deaths)."""
        self.dead += 1
        if self.dead * 2 <= len(self.seqs) or len(self.seqs) <= 64:
            return
        pairs = [(s, i) for s, i in zip(self.seqs, self.indexes, strict=True) if live(s, i)]
        self.seqs = array("q", [s for s, _ in pairs])
        self.indexes = array("q", [i for _, i in pairs])
        self.dead = 0


@dataclass(eq=False)
class ObjectHolders:
    """One object's holders, offers and change logs."""

    object_id: str
    size: int
    chunk_size: int
    count: int
    k: int = 8
    view: str = field(default_factory=lambda: f"{_EPOCH}{next(_VIEWS):x}")
    masks: dict[str, bytearray] = field(default_factory=dict)  # node -> bit i = chunk i
    held: dict[str, int] = field(default_factory=dict)  # node -> bytes it holds
    # chunk -> its offer lists side by side, K places each (None: free; one list: no padding)
    slots: dict[int, list[str | None]] = field(default_factory=dict)
    lasts: dict[int, array[int]] = field(default_factory=dict)  # chunk -> seq of each list's change
    room: dict[int, int] = field(default_factory=dict)  # chunk -> places filled since its split
    holes: dict[int, int] = field(default_factory=dict)  # chunk -> free places (several lists)
    counts: dict[int, int] = field(default_factory=dict)  # chunk -> how many hold it
    seq: int = 0
    changed: dict[int, int] = field(default_factory=dict)  # chunk -> seq of its last touch
    log: _Log = field(default_factory=_Log)  # touches: every group's
    logs: dict[int, _Log] = field(default_factory=dict)  # list L + a (of L) -> its offer changes
    event: trio.Event = field(default_factory=trio.Event)  # set (and replaced) on change

    def holds(self, node: str, index: int) -> bool:
        mask = self.masks.get(node)
        return mask is not None and bool(mask[index >> 3] >> (index & 7) & 1)

    def cursor(self, seq: int | None = None) -> str:
        return f"{self.view}.{self.seq if seq is None else seq}"

    def lists(self, index: int) -> int:
        """How many offer lists chunk `index` has now (1, 2, 4, ... up to the groups)."""
        slots = self.slots.get(index)
        return max(1, len(slots) // self.k) if slots else 1

    def offers(self, index: int, group: int = 0) -> list[str]:
        """The holders chunk `index` offers to requesters of `group`: at most K."""
        slots = self.slots.get(index)
        if not slots:
            return []
        width = self.lists(index)
        if width == 1:
            return [n for n in slots if n is not None]
        at = (group & (width - 1)) * self.k
        return [n for n in slots[at : at + self.k] if n is not None]

    def latest(self, index: int, group: int) -> int:
        """The seq of the last change of what `group` is told of chunk `index`."""
        touched = self.changed.get(index, 0)
        lasts = self.lasts.get(index)
        if lasts is None:
            return touched
        return max(touched, lasts[group & (len(lasts) - 1)])


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
        k: holders offered per chunk to one requester, at most.
        eligible: whether a node may be offered now (up, not quarantined).
        choose: picks up to n of the eligible candidate holders, best first.
        seed: the chunks of an object that have a record before its view exists (digests,
            disputes, claims): a new view starts by logging them, so `since` of nothing
            is the whole object.
        rng: the randomness of the offers' sampling (seeded in tests).
        groups: offer lists per chunk at most (a power of two; 1: every requester is
            offered the same K holders).
    """

    def __init__(
        self,
        k: int,
        eligible: Callable[[str], bool],
        choose: Callable[[list[str], int], list[str]],
        seed: Callable[[str], Iterable[int]] = lambda _: (),
        rng: random.Random | None = None,
        groups: int = OFFER_GROUPS,
    ) -> None:
        if groups < 1 or groups & (groups - 1):
            raise ValueError(f"offer groups must be a power of two, not {groups}")
        self.k = k
        self.groups = groups
        self.rng = rng or random.Random()
        self.eligible = eligible
        self.choose = choose
        self.seed = seed
        self.objects: dict[str, ObjectHolders] = {}
        self.by_node: dict[str, set[str]] = {}  # node -> objects it holds chunks of
        self.places: dict[str, int] = {}  # node -> offer lists (of every chunk) naming it

    def group_of(self, requester: str | None) -> int:
        """The requester's group: which of a chunk's lists it is offered (stable across
        processes; no requester: group 0)."""
        if not requester:
            return 0
        return zlib.crc32(requester.encode()) & (self.groups - 1)

    # -- views ---------------------------------------------------------------------------------

    def view(self, object_id: str, size: int, chunk_size: int, count: int) -> ObjectHolders:
        """The object's view, made (and seeded) when first needed or when its geometry
        changed (then every holder is forgotten: their bits meant other chunks)."""
        obj = self.objects.get(object_id)
        if obj is not None and (obj.size, obj.chunk_size) == (size, chunk_size):
            return obj
        if obj is not None:
            self.drop(object_id)
        obj = ObjectHolders(object_id, size, chunk_size, count, self.k)
        self.objects[object_id] = obj
        self._touch(obj, sorted(set(self.seed(object_id))))
        return obj

    def drop(self, object_id: str) -> None:
        """Forget an object's holders and view; long polls on it answer (with a reset)."""
        obj = self.objects.pop(object_id, None)
        if obj is None:
            return
        for node in obj.masks:
            self.by_node.get(node, set()).discard(object_id)
        for slots in obj.slots.values():
            for offered in slots:
                if offered is not None:
                    self._unplace(offered)
        obj.event.set()

    def touch(self, object_id: str, indexes: Iterable[int]) -> None:
        """Something else the scheduler says of these chunks changed (digest, dispute,
        source reader); with no indexes, the object as a whole (long polls answer)."""
        obj = self.objects.get(object_id)
        if obj is not None:
            self._touch(obj, [i for i in indexes if 0 <= i < obj.count])

    def _touch(self, obj: ObjectHolders, indexes: list[int]) -> None:
        """Logs a change every group is told of."""
        for index in indexes:
            obj.seq += 1
            if index in obj.changed:
                obj.log.died(lambda seq, i: obj.changed.get(i) == seq)
            obj.changed[index] = obj.seq
            obj.log.append(obj.seq, index)
        self._wake(obj)

    def _offer_changed(self, obj: ObjectHolders, index: int, at: int) -> None:
        """Logs a change of chunk `index`'s list `at`: the groups offered that list are
        told of it, the others not."""
        obj.seq += 1
        lasts = obj.lasts.get(index)
        if lasts is None:
            lasts = obj.lasts[index] = array("q", [0])
        old, lasts[at] = lasts[at], obj.seq
        log = obj.logs.get(len(lasts) + at)
        if log is None:
            log = obj.logs[len(lasts) + at] = _Log()
        log.append(obj.seq, index)
        if old and old not in lasts:  # no list's latest any more: its entry is dead
            width = len(lasts)  # it is in the log of this list or of one it was copied from
            while width:
                older = obj.logs.get(width + (at & (width - 1)))
                if older is not None and older.holds(old):
                    older.died(lambda seq, i: seq in obj.lasts.get(i, ()))
                    break
                width //= 2

    @staticmethod
    def _wake(obj: ObjectHolders) -> None:
        obj.event.set()
        obj.event = trio.Event()

    def since(
        self, obj: ObjectHolders, seq: int, limit: int, group: int = 0
    ) -> tuple[list[int], int, bool]:
        """The chunks changed for `group` after `seq`, each once, oldest change first, at
        most `limit`; the seq to continue from; whether more changes follow. Costs the
        changes logged for the group's lists (and every group's touches) since `seq`."""
        streams = [obj.log.after(seq)]
        width = 1
        while width <= self.groups:
            log = obj.logs.get(width + (group & (width - 1)))
            if log is not None:
                streams.append(log.after(seq))
            width *= 2
        found: list[int] = []
        last = seq
        for entry_seq, index in heapq.merge(*streams):
            if obj.latest(index, group) != entry_seq:
                continue  # changed again later (it comes at its later place), or not for us
            if len(found) == limit:
                return found, last, True
            found.append(index)
            last = entry_seq
        return found, obj.seq, False

    def last_change(self, obj: ObjectHolders, group: int) -> int:
        """The seq of the last change `group` is told of (a long poll waits for a later)."""
        last = obj.log.last()
        width = 1
        while width <= self.groups:
            log = obj.logs.get(width + (group & (width - 1)))
            if log is not None:
                last = max(last, log.last())
            width *= 2
        return last

    # -- holders -------------------------------------------------------------------------------

    def add(self, node: str, obj: ObjectHolders, indexes: Iterable[int]) -> None:
        """`node` holds these chunks now (their digests matched the record)."""
        mask = obj.masks.get(node)
        if mask is None:
            mask = obj.masks[node] = bytearray((obj.count + 7) // 8)
            self.by_node.setdefault(node, set()).add(obj.object_id)
        offer = self.eligible(node)
        changed = False
        batch = list(indexes)
        turn = self.rng.randrange(len(batch)) if len(batch) > 1 else 0
        for index in itertools.chain(batch[turn:], batch[:turn]):  # a spread place: any of them
            byte, bit = index >> 3, 1 << (index & 7)
            if mask[byte] & bit:
                continue
            mask[byte] |= bit
            obj.held[node] = obj.held.get(node, 0) + chunk_bytes(index, obj.size, obj.chunk_size)
            holders = obj.counts[index] = obj.counts.get(index, 0) + 1
            if offer:
                changed |= self._offer(node, obj, index, holders)
        if changed:
            self._wake(obj)

    def _offer(self, node: str, obj: ObjectHolders, index: int, holders: int) -> bool:
        """Places a new holder of chunk `index` in one of its lists, if the rules say so
        (see the module docstring); whether a list changed."""
        k = self.k
        slots = obj.slots.setdefault(index, [])
        width = obj.lists(index)
        # A new holder is in no list (lists name holders only): no scan of them for it.
        if width == 1 and len(slots) < k:
            slots.append(node)
            return self._put(node, obj, index, None, 0)
        if obj.holes.get(index):
            place = slots.index(None)
            slots[place] = node
            self._filled(obj, index)
            return self._put(node, obj, index, None, place // k)
        if index not in obj.room and width < self.groups:
            width = self._split(obj, index, slots)
        filled = obj.room.get(index)
        if filled is not None:
            half = width // 2
            at = half + filled % half
            place = at * k + filled // half
            old = slots[place]
            slots[place] = node
            if filled + 1 == half * k:
                del obj.room[index]
            else:
                obj.room[index] = filled + 1
            return self._put(node, obj, index, old, at)
        at = self.rng.randrange(width) if width > 1 else 0
        spot = at * k + self._busiest(slots, at * k)
        spread = node not in self.places and self.places.get(slots[spot] or "", 0) >= 2
        if not spread and self.rng.random() * holders >= k * width:  # reservoir: K/(H/lists)
            return False
        old = slots[spot]
        slots[spot] = node
        return self._put(node, obj, index, old, at)

    def _put(self, node: str, obj: ObjectHolders, index: int, old: str | None, at: int) -> bool:
        if old is not None:
            self._unplace(old)
        self._place(node)
        self._offer_changed(obj, index, at)
        return True

    def _split(self, obj: ObjectHolders, index: int, slots: list[str | None]) -> int:
        """Doubles chunk `index`'s lists: each new one a copy of its twin (nobody's answer
        changes: a group keeps its list's seq), whose places the next new holders take."""
        slots.extend([None] * (self.k - len(slots)) if len(slots) < self.k else [])
        copy = list(slots)
        slots.extend(copy)
        for node in copy:
            if node is not None:
                self._place(node)
        lasts = obj.lasts.get(index)
        if lasts is None:
            lasts = obj.lasts[index] = array("q", [0])
        lasts.extend(array("q", lasts))
        obj.room[index] = 0
        return len(lasts)

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
        k = self.k
        for object_id in sorted(self.by_node.get(node, ())):
            obj = self.objects.get(object_id)
            mask = None if obj is None else obj.masks.get(node)
            if obj is None or mask is None:
                continue
            changed = False
            for index in bits(mask):
                slots = obj.slots.setdefault(index, [])
                if obj.lists(index) == 1:
                    if len(slots) < k and node not in slots:
                        slots.append(node)
                        changed = self._put(node, obj, index, None, 0)
                    continue
                if not obj.holes.get(index):
                    continue
                for at in range(len(slots) // k):
                    here = slots[at * k : (at + 1) * k]
                    if None in here and node not in here:
                        slots[at * k + here.index(None)] = node
                        self._filled(obj, index)
                        changed = self._put(node, obj, index, None, at)
            if changed:
                self._wake(obj)

    def _unoffer(self, node: str, obj: ObjectHolders, indexes: list[int]) -> None:
        k = self.k
        changed = False
        for index in indexes:
            slots = obj.slots.get(index)
            if not slots or node not in slots:
                continue
            changed = True
            if obj.lists(index) == 1:
                slots.remove(node)
                self._unplace(node)
                others = [
                    n
                    for n in obj.masks
                    if n not in slots and n != node and obj.holds(n, index) and self.eligible(n)
                ]
                for chosen in self.choose(others, k - len(slots)):
                    slots.append(chosen)
                    self._place(chosen)
                self._offer_changed(obj, index, 0)
                continue
            # Several lists: the place goes to a holder another list offers (O(lists x K),
            # not O(holders)), chosen by the policy; none: it stays free for a new holder.
            for place in [p for p, n in enumerate(slots) if n == node]:
                self._unplace(node)
                at = place // k
                here = slots[at * k : (at + 1) * k]
                others = [
                    n
                    for n in dict.fromkeys(slots)
                    if n is not None and n != node and n not in here and self.eligible(n)
                ]
                best = self.choose(others, 1)
                slots[place] = best[0] if best else None
                if best:
                    self._place(best[0])
                else:
                    obj.holes[index] = obj.holes.get(index, 0) + 1
                self._offer_changed(obj, index, at)
        if changed:
            self._wake(obj)

    @staticmethod
    def _filled(obj: ObjectHolders, index: int) -> None:
        left = obj.holes[index] - 1
        if left:
            obj.holes[index] = left
        else:
            del obj.holes[index]

    def _busiest(self, slots: list[str | None], first: int) -> int:
        """The place among slots[first:first+K] whose holder is offered in the most lists
        (ties: the first from a random place on)."""
        places, k = self.places, self.k
        width = min(k, len(slots) - first)
        start = self.rng.randrange(width)
        return max(
            ((start + j) % width for j in range(width)),
            key=lambda j: places.get(slots[first + j] or "", 0),
        )

    def _place(self, node: str) -> None:
        self.places[node] = self.places.get(node, 0) + 1

    def _unplace(self, node: str) -> None:
        left = self.places[node] - 1
        if left:
            self.places[node] = left
        else:
            del self.places[node]


__all__ = ["OFFER_GROUPS", "Holders", "ObjectHolders", "bits"]
