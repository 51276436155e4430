"""Where chunks are: chunk reports in, bounded chunk maps and exact updates out.

Owns the rules of a chunk report (a digest is recorded only from the node granted the
chunk's source read, `Claims`; one that differs from the record opens a dispute, `Trust`)
and the answers about an object: at most K peers per chunk, never the asking node, only
up and trusted ones, ranked by the peer policy; each chunk's source reader and dispute.
Every answer costs O(chunks asked or changed x K), never O(nodes x chunks).
Holders are soft state (`Holders`); digests are durable (`Facts`, via group commits).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from syncbit.chunks import chunk_count
from syncbit.errors import NotFoundError, UserError
from syncbit.scheduler.chunkmaps import ChunkMaps, ObjectMap
from syncbit.scheduler.claims import Claims
from syncbit.scheduler.facts import Facts, Txn
from syncbit.scheduler.holders import Holders, ObjectHolders
from syncbit.scheduler.live import Liveness
from syncbit.scheduler.objects import ObjectFacts
from syncbit.scheduler.policy import PeerPolicy
from syncbit.scheduler.records import check_digest, check_name, check_oid
from syncbit.scheduler.trust import Trust

log = logging.getLogger("syncbit.scheduler")


@dataclass
class ChunkReport:
    """What `add_chunks` made of a report: chunks whose digest differs from the recorded
    one (a dispute is opened), and chunks refused (no digest recorded and the reporter was
    not granted the source read, or the reporter is quarantined). Neither is held."""

    conflicts: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Candidate:
    name: str
    load: int
    reports: int


class Directory:
    """Chunk reports and chunk answers over the scheduler's facts and soft state."""

    def __init__(
        self,
        facts: Facts,
        live: Liveness,
        claims: Claims,
        holders: Holders,
        trust: Trust,
        policy: PeerPolicy,
        eligible: Callable[[str], bool],
    ) -> None:
        self.facts = facts
        self.live = live
        self.claims = claims
        self.holders = holders
        self.trust = trust
        self.policy = policy
        self.eligible = eligible
        self.maps = ChunkMaps(holders, self._stamp, lambda: live.load_changes, rerank=live.interval)

    def _stamp(self) -> tuple[int, int]:
        """Changes when who may be offered, or where they listen, may have (`chunkmaps`)."""
        return self.live.changes, len(self.facts.quarantine)

    # -- reports -------------------------------------------------------------------------------

    async def add_chunks(
        self,
        node: str,
        object_id: str,
        size: int,
        chunk_size: int,
        chunks: list[tuple[int, str]],
        establish: AbstractSet[int] = frozenset(),
    ) -> ChunkReport:
        """Record that `node` holds `chunks` (index, digest) of an object.

        The object must be one a manifest named (NotFoundError otherwise) and `size` and
        `chunk_size` must be its recorded ones (UserError): every index is then bounded
        by the object's size. A chunk without a recorded digest is recorded only if its
        index is in `establish` (the node was granted its source read), else refused. A
        digest that differs from the recorded one is a conflict and opens a dispute. A
        quarantined node's report is refused whole. Refused and conflicting chunks are
        not held by `node`."""
        check_name("node", node)
        object_id = check_oid(object_id)
        if size < 0 or chunk_size <= 0:
            raise UserError(f"object {object_id}: invalid size {size} / chunk size {chunk_size}")
        count = chunk_count(size, chunk_size)
        parsed: list[tuple[int, bytes]] = []
        for index, value in chunks:
            if not 0 <= index < count:
                raise UserError(
                    f"object {object_id}: chunk {index} out of range (object has {count})"
                )
            parsed.append((index, bytes.fromhex(check_digest(index, value))))
        report = ChunkReport()
        if node in self.facts.quarantine:
            report.refused = [i for i, _ in parsed]
            return report  # nothing of a liar's is recorded (no log: it reports often)
        obj = self._known(object_id, size, chunk_size)
        held, new = self._sort(node, object_id, obj, parsed, establish, report)
        if new:
            ok, conflicts = await self.facts.batched(
                lambda txn: _establish(txn, node, object_id, (size, chunk_size), new)
            )
            held += ok
            report.conflicts += conflicts
        view = self.view(object_id)
        if view is not None:
            self.holders.add(node, view, held)
            self.holders.remove(node, view, report.conflicts)
        if report.refused:
            log.warning(
                "node %s reported digests for chunks %s of object %s that it was not granted "
                "the source read of: refused",
                node,
                report.refused[:20],
                object_id[:16],
            )
        if report.conflicts:
            # One dispute per object settles the rest: a liar is quarantined (and its word
            # dropped), a broken version is broken as a whole.
            index = report.conflicts[0]
            claimed = next(raw for i, raw in parsed if i == index)
            await self.trust.open_dispute(
                node, object_id, index, claimed.hex(), "reported holding it"
            )
        return report

    def _sort(
        self,
        node: str,
        object_id: str,
        obj: ObjectFacts,
        parsed: list[tuple[int, bytes]],
        establish: AbstractSet[int],
        report: ChunkReport,
    ) -> tuple[list[int], list[tuple[int, bytes]]]:
        """Each reported chunk against the record: held (it matches), new (no record, and
        `node` may establish it), refused or conflicting (into `report`)."""
        held: list[int] = []
        new: list[tuple[int, bytes]] = []
        for index, raw in parsed:
            recorded = obj.digests.get(index)
            if recorded is None:
                if index in establish:
                    new.append((index, raw))
                else:
                    report.refused.append(index)
            elif recorded == raw:
                held.append(index)
            elif obj.revoked.get(index) == raw:
                report.refused.append(index)  # bytes a re-check proved false
                self.trust.notify(node, object_id)
            else:
                report.conflicts.append(index)
        return held, new

    def _known(self, object_id: str, size: int, chunk_size: int) -> ObjectFacts:
        obj = self.facts.objects.get(object_id)
        if obj is None:
            raise NotFoundError(f"unknown object {object_id}: no dataset names it")
        if (obj.size, obj.chunk_size) != (size, chunk_size):
            raise UserError(
                f"object {object_id} is known with size {obj.size} and chunk size "
                f"{obj.chunk_size}, not {size} and {chunk_size}"
            )
        return obj

    def remove_chunks(self, node: str, object_id: str, indexes: list[int]) -> None:
        """`node` no longer holds chunks `indexes` of an object."""
        view = self.holders.objects.get(check_oid(object_id))
        if view is not None:
            self.holders.remove(node, view, indexes)

    def report_bad_peer(
        self, reporter: str, peer: str, object_id: str, index: int, reason: str
    ) -> None:
        """`reporter` could not get a good chunk from `peer`: stop offering that chunk from
        it and count the report against it (the policy ranks reported peers last). A
        quarantined reporter is not listened to."""
        check_name("node", peer)
        object_id = check_oid(object_id)
        if reporter in self.facts.quarantine:
            return
        view = self.holders.objects.get(object_id)
        if view is not None and index >= 0:
            self.holders.remove(peer, view, [index])
        if peer in self.facts.nodes:
            self.live.reported(peer)
        log.warning(
            "node %s reported peer %s for chunk %d of object %s: %s",
            reporter,
            peer,
            index,
            object_id[:16],
            reason or "(no reason)",
        )

    # -- answers -------------------------------------------------------------------------------

    def view(self, object_id: str) -> ObjectHolders | None:
        """The object's holders view (None: no dataset or digest names the object)."""
        obj = self.facts.objects.get(object_id)
        if obj is None:
            return None
        return self.holders.view(object_id, obj.size, obj.chunk_size, obj.count)

    def ranker(self, requester: str | None) -> Ranker:
        """Ranks offered holders for one answer (see `Ranker`)."""
        return Ranker(self, requester)

    def candidate(self, name: str) -> _Candidate:
        """What the peer policy sees of `name`."""
        live = self.live.nodes.get(name)
        return _Candidate(name, live.load, live.reports) if live else _Candidate(name, 0, 0)

    def choose(self, names: list[str], n: int) -> list[str]:
        """Up to `n` of `names` by the peer policy: whom to offer for a free place."""
        if n <= 0 or not names:
            return []
        return [c.name for c in self.policy.rank([self.candidate(x) for x in names])][:n]

    def chunk_map(self, object_id: str, requester: str | None = None) -> dict[str, Any]:
        """Digests of an object's known chunks and, per chunk, at most K up, trusted peers
        that hold it (never `requester`), ranked by the policy: {"digests": {index: hex},
        "peers": {index: [{"node", "address"}]}, "disputed": [index], "broken": reason
        (only if the object is broken)}. A disputed chunk has no peers until its re-check
        settles who was right."""
        object_id = check_oid(object_id)
        kept = self._kept(object_id, requester)
        doc: dict[str, Any] = {"digests": {}, "peers": {}, "disputed": []}
        if kept is None:
            return doc
        doc["digests"] = {i: kept.digests[i] for i in sorted(kept.digests)}
        peers = kept.peers_for(requester)
        doc["peers"] = {
            i: [{"node": n, "address": kept.addresses[n]} for n in peers[i]] for i in sorted(peers)
        }
        doc.update(self._tail(object_id))
        return doc

    def chunk_map_json(
        self, object_id: str, requester: str | None, extra: dict[str, Any], names: bool = False
    ) -> bytes:
        """`chunk_map` as JSON with the fields of `extra` after its own, rendered from the
        kept map (`chunkmaps`): what `GET /v1/objects/<id>/chunks` answers. `names`: the
        compact form (`?peers=names`): peers by node name, each node's address once under
        "addresses", as updates name them."""
        object_id = check_oid(object_id)
        kept = self._kept(object_id, requester)
        tail = self._tail(object_id) if kept is not None else {"disputed": []}
        rest = json.dumps({**tail, **extra}, separators=(",", ":"))
        if not names:
            digests, peers = ("{}", "{}") if kept is None else kept.json_for(requester)
            return f'{{"digests":{digests},"peers":{peers},{rest[1:]}'.encode()
        digests, peers, addresses = (
            ("{}", "{}", "{}") if kept is None else kept.names_json_for(requester)
        )
        head = f'{{"digests":{digests},"peers":{peers},"addresses":{addresses},'
        return (head + rest[1:]).encode()

    def _kept(self, object_id: str, requester: str | None) -> ObjectMap | None:
        obj = self.facts.objects.get(object_id)
        if obj is None:
            return None
        view = self.view(object_id)
        assert view is not None
        disputes = self.facts.disputes
        return self.maps.get(
            object_id,
            obj,
            view,
            lambda index: (object_id, index) in disputes,
            lambda: self.ranker(None),
            self.holders.group_of(requester),
        )

    def _tail(self, object_id: str) -> dict[str, Any]:
        """A chunk map's fields after the peers: disputed chunks, and why it is broken."""
        doc: dict[str, Any] = {
            "disputed": sorted(i for o, i in self.facts.disputes if o == object_id)
        }
        broken = self.facts.broken.get(object_id)
        if broken is not None:
            doc["broken"] = broken["reason"]
        return doc

    def updates(
        self, object_id: str, requester: str | None, cursor: str, limit: int
    ) -> dict[str, Any]:
        """The chunks whose state changed after `cursor`, each once with its state now,
        oldest change first, at most `limit` (`protocol.ChunkUpdates` as JSON): which
        changed, and of those the digests, peers (names; `addresses` says where each
        listens), source readers and disputes."""
        object_id = check_oid(object_id)
        view = self.view(object_id)
        broken = self.facts.broken.get(object_id)
        doc: dict[str, Any] = {
            "cursor": "",
            "reset": True,
            "more": False,
            "broken": broken["reason"] if broken else None,
            "changed": [],
        }
        if view is None:
            return doc
        self.claims.expire(object_id)  # lapsed leases are changes too
        seq = _seq_of(cursor, view.view)
        group = self.holders.group_of(requester)
        indexes, last, more = self.holders.since(view, seq or 0, limit, group)
        doc.update(reset=seq is None, more=more, cursor=view.cursor(last), changed=indexes)
        doc.update(self._states(object_id, self._kept(object_id, requester), indexes, requester))
        return doc

    def _states(
        self, object_id: str, kept: ObjectMap | None, indexes: list[int], requester: str | None
    ) -> dict[str, Any]:
        """The changed chunks' states now, peers read from the object's kept map (brought
        up to date by `_kept`), not ranked again per request: at 2,000 nodes (`bench/
        scale.py --mode prefetch`) updates were a fifth of the scheduler's CPU, most of it
        ranking each answer's chunks afresh."""
        obj = self.facts.objects.get(object_id)
        recorded = obj.digests if obj is not None else {}
        disputes = self.facts.disputes
        digests: dict[int, str] = {}
        peers: dict[int, list[str]] = {}
        fetching: dict[int, str] = {}
        disputed: list[int] = []
        named: dict[str, str] = {}
        ranked, where = (kept.peers, kept.addresses) if kept is not None else ({}, {})
        for index in indexes:
            digest = recorded.get(index)
            if digest is not None:
                digests[index] = digest.hex()
            if (object_id, index) in disputes:
                disputed.append(index)
            elif digest is not None:
                names = [n for n in ranked.get(index, ()) if n != requester]
                if names:
                    peers[index] = names
                    for name in names:
                        named[name] = where[name]
            reader = self.claims.reader(object_id, index)
            if reader is not None and reader != requester and self.live.is_up(reader):
                fetching[index] = reader
        return {
            "digests": digests,
            "peers": peers,
            "fetching": fetching,
            "disputed": disputed,
            "addresses": named,
        }

    def held(self, object_id: str, requester: str, indexes: list[int]) -> set[int]:
        """The chunks among `indexes` that a peer can serve `requester` now."""
        obj = self.facts.objects.get(object_id)
        view = self.view(object_id)
        if obj is None or view is None:
            return set()
        rank = self.ranker(requester)
        group = self.holders.group_of(requester)
        return {
            i
            for i in indexes
            if i in obj.digests
            and (object_id, i) not in self.facts.disputes
            and rank(view.offers(i, group))
        }


class Ranker:
    """Orders the offered holders of chunks for one answer to `requester` by the peer
    policy, leaving out the requester and those that may not serve now (down or
    quarantined). Each node is looked up and keyed once per answer however many chunks
    offer it; per chunk, one sort by those keys, then a random turn of the best equal
    ones (spread). `named` collects the address of every node named."""

    def __init__(self, directory: Directory, requester: str | None) -> None:
        self.directory = directory
        self.requester = requester
        self.named: dict[str, str] = {}
        self._keys: dict[str, tuple[int, ...]] = {}
        self._refused: set[str] = set()
        self._rng = directory.policy.rng

    def _admit(self, name: str) -> bool:
        d = self.directory
        record = d.facts.nodes.get(name)
        if name == self.requester or record is None or not d.eligible(name):
            self._refused.add(name)
            return False
        self._keys[name] = d.policy.key(d.candidate(name))
        self.named[name] = record.address
        return True

    def __call__(self, offered: list[str] | None) -> list[str]:
        """The peers to name for one chunk, best first: at most K (its offers)."""
        if not offered:
            return []
        keys = self._keys
        usable = [n for n in offered if n in keys or (n not in self._refused and self._admit(n))]
        if len(usable) > 1:
            usable.sort(key=keys.__getitem__)
            best = keys[usable[0]]
            ties = 1
            while ties < len(usable) and keys[usable[ties]] == best:
                ties += 1
            if ties > 1:
                turn = int(self._rng.random() * ties)
                usable[:ties] = usable[turn:ties] + usable[:turn]
        return usable


def _seq_of(cursor: str, view: str) -> int | None:
    """The sequence number of a cursor of this view (None: not one of this view's)."""
    name, _, seq = cursor.rpartition(".")
    if name != view or not seq.isdigit() or len(seq) > 18:
        return None
    return int(seq)


def _establish(
    txn: Txn, node: str, object_id: str, geometry: tuple[int, int], new: list[tuple[int, bytes]]
) -> tuple[list[int], list[int]]:
    """In a group commit: record the digests nobody recorded yet (first wins); returns the
    chunks `node` holds by its report and those that conflict with a digest recorded
    meanwhile."""
    obj = txn.facts.objects.get(object_id)
    if obj is None or (obj.size, obj.chunk_size) != geometry:
        raise NotFoundError(f"object {object_id} changed while its chunks were reported")
    draft = txn.draft(object_id)
    held: list[int] = []
    conflicts: list[int] = []
    for index, raw in new:
        recorded = draft.digest(index)
        if recorded is None:
            draft.record(index, raw, node)
        elif recorded != raw:
            conflicts.append(index)
            continue
        held.append(index)
    return held, conflicts


__all__ = ["ChunkReport", "Directory", "Ranker"]
