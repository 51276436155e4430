"""The chunk map of an object, kept ranked between requests: what `GET
/v1/objects/<id>/chunks` answers, rendered once per change instead of once per request.

A chunk map names, per chunk, at most K offered holders ranked by the peer policy. Many
nodes ask for the same object's map (a daemon asks every second while it fetches), and
between two requests only a few chunks change, so each object's map is kept here: per
chunk its digest, its ranked peers and their JSON, brought up to date before each answer
from the object's change log (`Holders.since`: exactly the chunks whose offers, digest,
dispute or reader changed), and ranked afresh as a whole when who may be offered may
have changed (a node went up or down, was reported or quarantined, moved: the stamp) or,
when a node's load changed, at most every `RERANK` seconds or every heartbeat interval
in force if longer (loads are no fresher than the heartbeats that carry them: at 2,000
nodes every object's map was ranked whole each second for loads 4 s old). An answer then costs the
chunks whose peers name the asking node (it is never offered itself), not O(chunks x K).
Requesters of different groups are offered different holders (`Holders.group_of`), so a
map is kept per (object, group): at most `groups` per object, each brought up to date
from its group's changes only.

Holds only what it can rebuild from the state; never writes storage, never decides who
may be offered (the `Ranker` does, with the state's `eligible`).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from syncbit.scheduler.holders import Holders, ObjectHolders
from syncbit.scheduler.objects import ObjectFacts

RERANK = 1.0  # seconds a map may rank by loads older than the last heartbeat's
MAX_CACHED_CHUNKS = 262_144  # chunks of all kept maps (of every group) together (~100 MiB at K=8)


class RankFn(Protocol):
    """Ranks one chunk's offered holders for nobody in particular (`directory.Ranker`)."""

    named: dict[str, str]

    def __call__(self, offered: list[str] | None) -> list[str]: ...


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(eq=False)
class ObjectMap:
    """One object's ranked map, as of `seq` of `view` and the state's `stamp`."""

    view: ObjectHolders
    stamp: Hashable
    loads: int  # the liveness load counter it was ranked at
    ranked_at: float  # time.monotonic() of its last whole ranking
    seq: int = 0
    group: int = 0  # the requesters' group whose offers it names (`Holders.group_of`)
    digests: dict[int, str] = field(default_factory=dict)  # index -> hex
    peers: dict[int, list[str]] = field(default_factory=dict)  # index -> ranked names
    addresses: dict[str, str] = field(default_factory=dict)  # name -> address
    named_in: dict[str, set[int]] = field(default_factory=dict)  # name -> chunks naming it
    refs: dict[str, str] = field(default_factory=dict)  # name -> its {"node","address"} JSON
    name_refs: dict[str, str] = field(default_factory=dict)  # name -> its JSON string
    address_json: dict[str, str] = field(default_factory=dict)  # name -> '"name":"address"'
    digest_json: dict[int, str] = field(default_factory=dict)
    peer_json: dict[int, str] = field(default_factory=dict)
    name_json: dict[int, str] = field(default_factory=dict)  # index -> '"i":["name",...]'
    _joined: tuple[str, str] | None = None  # (digests, peers) JSON objects, all chunks
    _joined_names: tuple[str, str] | None = None  # (peers by name, addresses) JSON, all

    def joined(self) -> tuple[str, str]:
        if self._joined is None:
            digests = ",".join(self.digest_json[i] for i in sorted(self.digest_json))
            peers = ",".join(self.peer_json[i] for i in sorted(self.peer_json))
            self._joined = ("{" + digests + "}", "{" + peers + "}")
        return self._joined

    def set_chunk(self, index: int, digest: str | None, names: list[str], rank: RankFn) -> None:
        """Chunk `index` as it is now: its digest and ranked peers (no digest: none)."""
        for name in self.peers.pop(index, ()):
            where = self.named_in.get(name)
            if where is not None:
                where.discard(index)
        self.peer_json.pop(index, None)
        self.name_json.pop(index, None)
        self.digest_json.pop(index, None)
        self.digests.pop(index, None)
        self._joined = None
        self._joined_names = None
        if digest is None:
            return
        self.digests[index] = digest
        self.digest_json[index] = f'"{index}":"{digest}"'
        if not names:
            return
        self.peers[index] = names
        for name in names:
            self.named_in.setdefault(name, set()).add(index)
            if name not in self.refs:
                address = self.addresses[name] = rank.named[name]
                self.refs[name] = _dump({"node": name, "address": address})
                self.name_refs[name] = _dump(name)
                self.address_json[name] = f"{self.name_refs[name]}:{_dump(address)}"
        self.peer_json[index] = self._render(index, names)
        self.name_json[index] = self._render(index, names, self.name_refs)

    def _render(self, index: int, names: Iterable[str], refs: dict[str, str] | None = None) -> str:
        refs = self.refs if refs is None else refs
        return f'"{index}":[' + ",".join(refs[n] for n in names) + "]"

    def peers_for(self, requester: str | None) -> dict[int, list[str]]:
        """Each chunk's peers for `requester` (never itself; chunks left without any out)."""
        if requester is None or not self.named_in.get(requester):
            return self.peers
        out: dict[int, list[str]] = {}
        for index, names in self.peers.items():
            if requester in names:
                names = [n for n in names if n != requester]
            if names:
                out[index] = names
        return out

    def json_for(self, requester: str | None) -> tuple[str, str]:
        """The digests and peers JSON objects for `requester` (never itself)."""
        digests, peers = self.joined()
        mine = self.named_in.get(requester, set()) if requester is not None else set()
        if not mine:
            return digests, peers
        return digests, self._without(requester, mine, self.peer_json, self.refs)

    def names_json_for(self, requester: str | None) -> tuple[str, str, str]:
        """The digests, the peers by name and the addresses of the nodes named, as JSON
        objects for `requester` (never itself): the compact form of `json_for`, each node's
        address once instead of once per chunk naming it (a 320-chunk map at K=8 from
        2,000 holders: ~20 KiB instead of 80-210)."""
        digests = self.joined()[0]
        mine = self.named_in.get(requester, set()) if requester is not None else set()
        if mine:  # its own chunks and address left out: rendered for it alone
            peers = self._without(requester, mine, self.name_json, self.name_refs)
            return digests, peers, self._addresses(requester)
        if self._joined_names is None:
            joined = ",".join(self.name_json[i] for i in sorted(self.name_json))
            self._joined_names = ("{" + joined + "}", self._addresses(None))
        return digests, *self._joined_names

    def _addresses(self, requester: str | None) -> str:
        """The JSON object of every named node's address but `requester`'s."""
        named = (self.address_json[n] for n, at in self.named_in.items() if at and n != requester)
        return "{" + ",".join(named) + "}"

    def _without(
        self, requester: str | None, mine: set[int], rendered: dict[int, str], refs: dict[str, str]
    ) -> str:
        """The peers JSON object from the chunks' `rendered` entries, those naming the
        requester (`mine`) rendered again without it (a chunk left with none: out)."""
        parts: list[str] = []
        for index in sorted(rendered):
            if index not in mine:
                parts.append(rendered[index])
                continue
            names = [n for n in self.peers[index] if n != requester]
            if names:
                parts.append(self._render(index, names, refs))
        return "{" + ",".join(parts) + "}"


class ChunkMaps:
    """Every object's kept map (least recently asked dropped first, see the module
    docstring).

    Args:
        holders: the offers and change logs.
        digest_of: an object's recorded digest of a chunk, hex (None: none recorded).
        disputed: whether a chunk is disputed (no peers until it is settled).
        stamp: changes whenever who may be offered, or where they listen, may have.
        loads: changes whenever a node's load or bad-peer count changed.
        clock: monotonic seconds (tests inject).
        budget: chunks of all kept maps together before other objects' maps are dropped.
        rerank: seconds a map may rank by loads older than the last change (at least
            `RERANK`; see the module docstring).
    """

    def __init__(
        self,
        holders: Holders,
        stamp: Callable[[], Hashable],
        loads: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
        budget: int = MAX_CACHED_CHUNKS,
        rerank: Callable[[], float] = lambda: RERANK,
    ) -> None:
        self.holders = holders
        self.rerank = rerank
        self.stamp = stamp
        self.loads = loads
        self.clock = clock
        self.budget = budget
        self.maps: OrderedDict[tuple[str, int], ObjectMap] = OrderedDict()  # (object, group)
        self.ranked = 0  # whole rankings done (for tests and /metrics)

    def get(
        self,
        object_id: str,
        obj: ObjectFacts,
        view: ObjectHolders,
        disputed: Callable[[int], bool],
        make_rank: Callable[[], RankFn],
        group: int = 0,
    ) -> ObjectMap:
        """The object's map for requesters of `group` (`Holders.group_of`), up to date."""
        stamp, loads, now = self.stamp(), self.loads(), self.clock()
        key = (object_id, group)
        kept = self.maps.get(key)
        if (
            kept is None
            or kept.view is not view
            or kept.stamp != stamp
            or (kept.loads != loads and now - kept.ranked_at >= max(RERANK, self.rerank()))
        ):
            return self._rank(key, obj, view, disputed, make_rank(), stamp, loads, now)
        if kept.seq != view.seq:
            changed, last, _ = self.holders.since(view, kept.seq, view.count + 1, group)
            rank = make_rank()
            for index in changed:
                self._chunk(kept, obj, view, index, disputed, rank)
            kept.seq = last
        if len(kept.digests) != len(obj.digests):  # a digest changed untold: rank anew
            return self._rank(key, obj, view, disputed, make_rank(), stamp, loads, now)
        self.maps.move_to_end(key)
        return kept

    def _rank(
        self,
        key: tuple[str, int],
        obj: ObjectFacts,
        view: ObjectHolders,
        disputed: Callable[[int], bool],
        rank: RankFn,
        stamp: Hashable,
        loads: int,
        now: float,
    ) -> ObjectMap:
        self.maps.pop(key, None)
        kept = ObjectMap(view, stamp, loads, now, seq=view.seq, group=key[1])
        for index in sorted(obj.digests):
            self._chunk(kept, obj, view, index, disputed, rank)
        self.maps[key] = kept
        self.ranked += 1
        # Over the budget, other objects' maps go, least recently asked first; never this
        # object's: its groups ask in turn, and dropping one of them would have every
        # answer rank the whole object again (an object too big for the budget alone is
        # kept whole, as one map always was).
        total = sum(m.view.count for m in self.maps.values())
        while total > self.budget:
            victim = next((k for k in self.maps if k[0] != key[0]), None)
            if victim is None:
                break
            total -= self.maps.pop(victim).view.count
        return kept

    @staticmethod
    def _chunk(
        kept: ObjectMap,
        obj: ObjectFacts,
        view: ObjectHolders,
        index: int,
        disputed: Callable[[int], bool],
        rank: RankFn,
    ) -> None:
        raw = obj.digests.get(index)
        digest = None if raw is None else raw.hex()
        names = [] if raw is None or disputed(index) else rank(view.offers(index, kept.group))
        kept.set_chunk(index, digest, names, rank)

    def forget(self, object_id: str) -> None:
        for key in [key for key in self.maps if key[0] == object_id]:
            del self.maps[key]


__all__ = ["MAX_CACHED_CHUNKS", "RERANK", "ChunkMaps", "ObjectMap"]
