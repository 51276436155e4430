"""The data a node and the scheduler exchange that the node's fetch layer uses: peers,
chunk maps, claim and chunk-report answers. Plain dataclasses only: no I/O, no scheduler
state, nothing that imports httpx or pydantic (the node's hot paths import this).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ChunkMap", "ChunkReportResult", "ClaimResult", "Peer"]


@dataclass(frozen=True)
class Peer:
    """A node that holds a chunk, and the address its peer service listens on."""

    node: str
    address: str


@dataclass
class ChunkMap:
    """What the scheduler knows of one object: chunk digests and, per chunk, ranked peers."""

    digests: dict[int, str] = field(default_factory=dict)
    peers: dict[int, list[Peer]] = field(default_factory=dict)
    fetching: dict[int, str] = field(default_factory=dict)  # chunk -> node reading the source
    disputed: set[int] = field(default_factory=set)  # re-checked against the source now
    broken: str | None = None  # why the object's version is broken (never served), if it is


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
