"""The durable chunk facts of one object: its geometry, each chunk's recorded digest and who
established it, and the digests a re-check proved false; and their storage form, blocks of
BLOCK chunks under `digests/<object>/<block>`.

Owns the encoding of those blocks and nothing else: which digest may be recorded is
decided by `trust` and `state`, never here; it does no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from syncbit.chunks import chunk_count

BLOCK = 128  # chunks per stored block: ~13 KiB of JSON, rewritten as its chunks arrive
DIGESTS = "digests/"


@dataclass
class ObjectFacts:
    """What is durable about one object's chunks (digests are 32 raw bytes)."""

    size: int
    chunk_size: int
    digests: dict[int, bytes] = field(default_factory=dict)
    establisher: dict[int, str] = field(default_factory=dict)  # "" before provenance
    revoked: dict[int, bytes] = field(default_factory=dict)  # digests proven false

    @property
    def count(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def clear(self) -> list[int]:
        """Forget every chunk fact (another geometry wins); the indexes that had one."""
        gone = sorted(set(self.digests) | set(self.revoked))
        self.digests.clear()
        self.establisher.clear()
        self.revoked.clear()
        return gone

    def blocks_of(self, indexes: Iterable[int]) -> set[int]:
        return {i // BLOCK for i in indexes}

    def encode_block(self, block: int) -> bytes | None:
        """The stored form of one block (None: nothing recorded in it, delete the key)."""
        span = range(block * BLOCK, (block + 1) * BLOCK)
        recorded = {
            str(i): [self.digests[i].hex(), self.establisher.get(i, "")]
            for i in span
            if i in self.digests
        }
        revoked = {str(i): self.revoked[i].hex() for i in span if i in self.revoked}
        if not recorded and not revoked:
            return None
        doc = {"size": self.size, "chunk_size": self.chunk_size, "d": recorded, "r": revoked}
        return json.dumps(doc, separators=(",", ":")).encode()

    def apply_block(self, block: int, value: bytes | None) -> set[int]:
        """Replace one block's facts by its stored form; the indexes whose facts changed."""
        span = range(block * BLOCK, (block + 1) * BLOCK)
        before = self._snapshot(span)
        for table in (self.digests, self.establisher, self.revoked):
            for i in span:
                table.pop(i, None)
        if value is not None:
            doc: dict[str, Any] = json.loads(value)
            for key, (digest, establisher) in doc.get("d", {}).items():
                self.digests[int(key)] = bytes.fromhex(digest)
                self.establisher[int(key)] = str(establisher)
            for key, digest in doc.get("r", {}).items():
                self.revoked[int(key)] = bytes.fromhex(digest)
        after = self._snapshot(span)
        return {i for i in before.keys() | after.keys() if before.get(i) != after.get(i)}

    def _snapshot(self, span: range) -> dict[int, tuple[bytes | None, bytes | None]]:
        return {
            i: (self.digests.get(i), self.revoked.get(i))
            for i in span
            if i in self.digests or i in self.revoked
        }


class Draft:
    """Changes to one object's chunk facts, staged by a transaction: reads see them, the
    mirror does not until the commit applies the blocks they rewrite (`encoded`)."""

    def __init__(self, object_id: str, obj: ObjectFacts) -> None:
        self.object_id = object_id
        self.obj = obj
        self._digests: dict[int, tuple[bytes, str] | None] = {}
        self._revoked: dict[int, bytes] = {}

    def digest(self, index: int) -> bytes | None:
        if index in self._digests:
            staged = self._digests[index]
            return None if staged is None else staged[0]
        return self.obj.digests.get(index)

    def establisher(self, index: int) -> str:
        staged = self._digests.get(index)
        return staged[1] if staged is not None else self.obj.establisher.get(index, "")

    def record(self, index: int, digest: bytes, establisher: str) -> None:
        self._digests[index] = (digest, establisher)

    def forget(self, index: int) -> None:
        self._digests[index] = None

    def revoke(self, index: int, digest: bytes) -> None:
        self._revoked[index] = digest

    def encoded(self) -> dict[str, bytes | None]:
        """Every block these changes touch, rewritten: key -> stored form (None: delete)."""
        merged = ObjectFacts(self.obj.size, self.obj.chunk_size)
        out: dict[str, bytes | None] = {}
        for block in sorted(self.obj.blocks_of([*self._digests, *self._revoked])):
            for i in range(block * BLOCK, (block + 1) * BLOCK):
                digest = self.digest(i)
                if digest is not None:
                    merged.digests[i] = digest
                    merged.establisher[i] = self.establisher(i)
                revoked = self._revoked.get(i, self.obj.revoked.get(i))
                if revoked is not None:
                    merged.revoked[i] = revoked
            out[block_key(self.object_id, block)] = merged.encode_block(block)
        return out


def block_key(object_id: str, block: int) -> str:
    return f"{DIGESTS}{object_id}/{block:06d}"


def parse_block_key(key: str) -> tuple[str, int]:
    """(object id, block) of a `digests/` key; ValueError if it is not one."""
    object_id, _, block = key[len(DIGESTS) :].partition("/")
    return object_id, int(block)


def block_geometry(value: bytes) -> tuple[int, int]:
    """(size, chunk size) a stored block was recorded against."""
    doc = json.loads(value)
    return int(doc["size"]), int(doc["chunk_size"])


__all__ = [
    "BLOCK",
    "DIGESTS",
    "Draft",
    "ObjectFacts",
    "block_geometry",
    "block_key",
    "parse_block_key",
]
