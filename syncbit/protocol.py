"""The data a node and the scheduler exchange: peers, chunk maps and their updates, claim
and report answers, plan entries, and the limits both sides hold requests to.

Plain dataclasses and their JSON forms only: no I/O, no scheduler state, nothing that
imports httpx or pydantic (the node's hot paths and `syncbit wait` import this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RESOLVE_TIMEOUT = 300.0
"""Seconds a source may take to list a dataset before `POST /v1/datasets` fails with 502
(the server's limit; the client waits a little longer)."""

# What one request may carry; the server refuses more (400), so the client splits.
MAX_REPORT_CHUNKS = 4096  # chunks added by one chunk report
MAX_REPORT_REMOVALS = 65536  # chunk indexes removed by one chunk report
MAX_CLAIM_CHUNKS = 4096  # chunks one claim or release names
PEERS_PER_CHUNK = 8  # the scheduler's default K: peers named for one chunk, at most
MAX_UPDATE_CHUNKS = 4096  # chunk records one page of updates carries, at most
MAX_PLAN_MEMBERS = 256  # plan entries list their members up to this many (see PlanEntry)

MAX_HEARTBEAT_INTERVAL = 30.0
"""Seconds, the longest a scheduler asks a node to wait between heartbeats, and the longest
a node waits whatever it is told. Shorter than the scheduler's re-check timeout (60 s), so
that a node chosen to re-check a chunk hears of it in time."""

LOOKUP_RATE = 500.0
"""The scheduler's default budget (`lookup_rate`): chunk-map lookups a second that all nodes'
parked prefetches together are asked to keep to."""

MAX_LOOKUP_INTERVAL = 10.0
"""Seconds, the longest a scheduler asks a node to wait between two chunk-map lookups of its
parked prefetches, and the longest a node waits whatever it is told: the delay with which
a prefetch learns of new holders, at most."""


@dataclass(frozen=True)
class Peer:
    """A node that holds a chunk, and the address its peer service listens on."""

    node: str
    address: str

    def to_json(self) -> dict[str, str]:
        return {"node": self.node, "address": self.address}

    @classmethod
    def from_json(cls, doc: Any) -> Peer:
        return cls(str(doc["node"]), str(doc["address"]))


@dataclass
class ChunkState:
    """What the scheduler says of one chunk: its digest (None: not established yet), at
    most K peers that hold it, ranked (never the asking node), the node reading it from
    the source now (never the asking node), and whether it is disputed (then no peers)."""

    digest: str | None = None
    peers: list[Peer] = field(default_factory=list)
    fetching: str | None = None
    disputed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "peers": [p.to_json() for p in self.peers],
            "fetching": self.fetching,
            "disputed": self.disputed,
        }

    @classmethod
    def from_json(cls, doc: Any) -> ChunkState:
        return cls(
            digest=str(doc["digest"]) if doc.get("digest") else None,
            peers=[Peer.from_json(p) for p in doc.get("peers", [])],
            fetching=str(doc["fetching"]) if doc.get("fetching") else None,
            disputed=bool(doc.get("disputed", False)),
        )


@dataclass
class ChunkUpdates:
    """One page of `GET /v1/objects/<id>/updates`: the chunks whose state changed after
    the cursor the node sent, each once, with its whole state now (ascending by change).

    `cursor`: send it with the next request. `reset`: the cursor was unknown (another
    scheduler instance, or none sent): `chunks` then describes the object from scratch,
    so drop what was known of it before applying. `more`: further changes follow at once
    (ask again without waiting). `broken`: why the object's version is broken, if it is.

    On the wire a page is flat, with each node's address once: {"cursor", "reset",
    "more", "broken", "changed": [index], "digests": {index: hex}, "peers": {index:
    [node]}, "fetching": {index: node}, "disputed": [index], "addresses": {node: addr}}.
    """

    cursor: str = ""
    reset: bool = False
    more: bool = False
    chunks: dict[int, ChunkState] = field(default_factory=dict)
    broken: str | None = None

    @classmethod
    def from_json(cls, doc: Any) -> ChunkUpdates:
        addresses = {str(n): str(a) for n, a in doc.get("addresses", {}).items()}
        digests = {int(i): str(d) for i, d in doc.get("digests", {}).items()}
        peers = {int(i): [str(n) for n in names] for i, names in doc.get("peers", {}).items()}
        fetching = {int(i): str(n) for i, n in doc.get("fetching", {}).items()}
        disputed = {int(i) for i in doc.get("disputed", [])}
        chunks = {
            index: ChunkState(
                digest=digests.get(index),
                peers=[Peer(n, addresses[n]) for n in peers.get(index, [])],
                fetching=fetching.get(index),
                disputed=index in disputed,
            )
            for index in map(int, doc["changed"])
        }
        return cls(
            cursor=str(doc["cursor"]),
            reset=bool(doc["reset"]),
            more=bool(doc["more"]),
            chunks=chunks,
            broken=str(doc["broken"]) if doc.get("broken") else None,
        )


@dataclass
class ChunkMap:
    """What the scheduler knows of one object: chunk digests and, per chunk, at most K
    ranked peers; the chunks other nodes read from the source now; the disputed ones.
    `cursor` continues it with updates (`apply`)."""

    digests: dict[int, str] = field(default_factory=dict)
    peers: dict[int, list[Peer]] = field(default_factory=dict)
    fetching: dict[int, str] = field(default_factory=dict)  # chunk -> node reading the source
    disputed: set[int] = field(default_factory=set)  # re-checked against the source now
    broken: str | None = None  # why the object's version is broken (never served), if it is
    cursor: str = field(default="", compare=False)

    def apply(self, updates: ChunkUpdates) -> None:
        """Fold one page of updates in: afterwards this map says what the scheduler said
        at that page's cursor."""
        if updates.reset:
            self.digests.clear()
            self.peers.clear()
            self.fetching.clear()
            self.disputed.clear()
        for index, chunk in updates.chunks.items():
            _put(self.digests, index, chunk.digest)
            _put(self.peers, index, chunk.peers or None)
            _put(self.fetching, index, chunk.fetching)
            if chunk.disputed:
                self.disputed.add(index)
            else:
                self.disputed.discard(index)
        self.broken = updates.broken
        self.cursor = updates.cursor


def _put(table: dict[int, Any], index: int, value: Any) -> None:
    if value is None:
        table.pop(index, None)
    else:
        table[index] = value


@dataclass
class ChunkReportResult:
    """The scheduler's answer to a chunk report: (object, index) pairs whose digest differed
    from the recorded one, and pairs refused (nobody recorded a digest and this node was not
    granted their source read, or it is quarantined). Neither counts as held."""

    conflicts: list[tuple[str, int]] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class ClaimResult:
    """The answer to a source-fetch claim: what this node may read from the source now,
    what another node is reading (wait for it), what a peer already holds."""

    granted: list[int] = field(default_factory=list)
    busy: dict[int, str] = field(default_factory=dict)
    held: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PlanEntry:
    """One dataset a node must hold: its revision, and the node's share of the source
    reads: of the `count` members (up, trusted nodes assigned the dataset, this one always
    counted), this node is number `index`, and reads from the source the chunks at
    positions p with p % count == index. `members` names them while there are at most
    MAX_PLAN_MEMBERS (for nodes that split by name); beyond, it is empty."""

    dataset: str
    revision: str
    index: int
    count: int
    members: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "revision": self.revision,
            "members": list(self.members),
            "share": {"index": self.index, "count": self.count},
        }

    @classmethod
    def from_json(cls, doc: Any) -> PlanEntry:
        """An entry as `to_json` writes it; KeyError/TypeError/ValueError for any other
        shape (a dataset or revision that is not a string, members not a list, a share not
        an object): the node keys its plan by these values."""
        share = doc.get("share") or {}
        members = doc.get("members", [])
        dataset, revision = doc["dataset"], doc["revision"]
        if not (isinstance(dataset, str) and isinstance(revision, str)):
            raise TypeError("plan entry: dataset and revision must be strings")
        if not isinstance(members, list) or not isinstance(share, dict):
            raise TypeError("plan entry: members must be a list, share an object")
        return cls(
            dataset=dataset,
            revision=revision,
            index=int(share.get("index", 0)),
            count=int(share.get("count", max(1, len(members)))),
            members=tuple(str(m) for m in members),
        )

    def may_source(self, position: int) -> bool:
        """Whether this node reads the chunk at `position` (across the dataset)."""
        return self.count <= 1 or position % self.count == self.index


__all__ = [
    "LOOKUP_RATE",
    "MAX_CLAIM_CHUNKS",
    "MAX_HEARTBEAT_INTERVAL",
    "MAX_LOOKUP_INTERVAL",
    "MAX_PLAN_MEMBERS",
    "MAX_REPORT_CHUNKS",
    "MAX_REPORT_REMOVALS",
    "MAX_UPDATE_CHUNKS",
    "PEERS_PER_CHUNK",
    "RESOLVE_TIMEOUT",
    "ChunkMap",
    "ChunkReportResult",
    "ChunkState",
    "ChunkUpdates",
    "ClaimResult",
    "Peer",
    "PlanEntry",
]
