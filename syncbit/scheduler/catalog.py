"""Datasets and assignments: resolved manifests stored and replaced by revision, their
summaries (with the files found broken), and the targets that assign them to nodes.

Every change here is durable and moves the generation, so nodes look again. It never
lists a source (`resolve` does, before `put_dataset`) and holds no soft state.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from syncbit.chunks import chunk_count, identity_digest
from syncbit.errors import NotFoundError, UserError
from syncbit.manifest import Manifest, build_manifest
from syncbit.scheduler.facts import DatasetFacts, Facts, Txn
from syncbit.scheduler.objects import BLOCK, block_key
from syncbit.scheduler.records import (
    MAX_CHUNK_INDEX,
    DatasetExistsError,
    check_name,
    check_oid,
    dataset_summary,
    describe_target,
    is_oid,
)
from syncbit.scheduler.trust import Trust

log = logging.getLogger("syncbit.scheduler")

# Objects no manifest named that nodes' registry mirrors registered (`register_object`):
# their count bounds what claims and reports may name beyond the registered datasets.
MAX_REGISTERED_OBJECTS = 100_000


class Catalog:
    """Datasets and their assignment targets over `facts`."""

    def __init__(self, facts: Facts, trust: Trust) -> None:
        self.facts = facts
        self.trust = trust

    # -- datasets -------------------------------------------------------------------------------

    async def put_dataset(self, manifest: Manifest) -> tuple[dict[str, Any], bool]:
        """Store a resolved dataset version; returns (summary, changed).

        The same name with the same revision changes nothing; a new revision of the same
        source replaces the old one; a different source is refused (DatasetExistsError).
        A file whose content identity was found broken (its source changed under the same
        version facts) gets a new identity, so none of the old content's chunks is reused.
        """
        name = check_name("dataset", manifest.dataset)
        manifest = self._renew_broken(manifest)
        summary = dataset_summary(manifest)
        async with self.facts.transaction() as txn:
            old = self.facts.datasets.get(name)
            if old is not None and old.summary["source"] != manifest.source:
                raise DatasetExistsError(
                    f"dataset {name} already exists with source {old.summary['source']}; "
                    "remove it first"
                )
            if old is not None and old.summary["revision"] == manifest.revision:
                return self.summary(name), False
            self._drop_other_geometry(txn, manifest)
            txn.put(f"dataset/{name}", manifest.model_dump_json().encode())
            txn.bump = True
            listed = self._objects(exclude=name) | _objects_of(manifest)
            self.trust.prune_disputes(txn, listed)
        generation = self.facts.generation
        if old is None:
            log.info(
                "dataset %s added: revision %s, %d files, %d bytes from %s (generation %d)",
                name,
                manifest.revision,
                summary["files"],
                summary["size"],
                manifest.source,
                generation,
            )
        else:
            log.info(
                "dataset %s updated: revision %s -> %s, %d files, %d bytes (generation %d)",
                name,
                old.summary["revision"],
                manifest.revision,
                summary["files"],
                summary["size"],
                generation,
            )
        return summary, True

    async def register_object(self, object_id: str, size: int, chunk_size: int) -> tuple[int, int]:
        """Record the size and chunk size of an object no manifest named yet (a registry
        blob a node's mirror serves: its id is its sha256, so no two contents share it), so
        that its chunks can be claimed, reported and fetched from peers like any dataset's.
        Returns the recorded (size, chunk size): one already known stands (a manifest's,
        or the first registration), and a manifest naming the object later overrides a
        registration. At most MAX_REGISTERED_OBJECTS are added this way (UserError beyond).
        """
        object_id = check_oid(object_id)
        if size <= 0 or chunk_size <= 0 or chunk_count(size, chunk_size) > MAX_CHUNK_INDEX:
            raise UserError(f"object {object_id}: invalid size {size} / chunk size {chunk_size}")
        async with self.facts.transaction() as txn:
            known = self.facts.objects.get(object_id)
            if known is not None:
                return known.size, known.chunk_size
            if len(self.facts.registered) >= MAX_REGISTERED_OBJECTS:
                raise UserError(
                    f"{len(self.facts.registered)} objects outside datasets are registered "
                    "already (the limit)"
                )
            doc = {"size": size, "chunk_size": chunk_size}
            txn.put(f"object/{object_id}", json.dumps(doc).encode())
        return size, chunk_size

    def _drop_other_geometry(self, txn: Txn, manifest: Manifest) -> None:
        """Chunk facts recorded against another size or chunk size than this manifest's
        (reports before any manifest named the object, or another chunk size): the
        manifest wins, those facts are deleted with its commit."""
        for entry in manifest.files:
            obj = self.facts.objects.get(entry.object.lower())
            if obj is None or not entry.size:
                continue
            if (obj.size, obj.chunk_size) == (entry.size, manifest.chunk_size):
                continue
            log.warning(
                "object %s was recorded with size %d and chunk size %d; dataset %s says %d "
                "and %d: its chunk records are dropped",
                entry.object[:16],
                obj.size,
                obj.chunk_size,
                manifest.dataset,
                entry.size,
                manifest.chunk_size,
            )
            for block in range(-(-obj.count // BLOCK)):
                txn.delete(block_key(entry.object.lower(), block))

    def _objects(self, exclude: str | None = None) -> set[str]:
        return {
            o
            for n, d in self.facts.datasets.items()
            if n != exclude
            for o in _objects_of(d.manifest)
        }

    def _renew_broken(self, manifest: Manifest) -> Manifest:
        """`manifest` with every broken object id replaced by a derived, unbroken one: the
        listing of a source that changed under unchanged version facts (an ETag that lies)
        yields the old identity, whose recorded chunks hold the old bytes."""
        broken = self.facts.broken
        if not broken:
            return manifest
        files = []
        renewed = False
        for entry in manifest.files:
            object_id = entry.object
            while is_oid(object_id) and object_id.lower() in broken:
                object_id = identity_digest("after-broken", object_id)
            renewed = renewed or object_id != entry.object
            files.append(entry.model_copy(update={"object": object_id}))
        if not renewed:
            return manifest
        log.info(
            "dataset %s: files whose source changed get new content identities", manifest.dataset
        )
        return build_manifest(
            manifest.dataset,
            manifest.source,
            files,
            manifest.dirs,
            chunk_size=manifest.chunk_size,
            source_options=manifest.source_options,
        )

    def _dataset(self, name: str) -> DatasetFacts:
        facts = self.facts.datasets.get(name)
        if facts is None:
            raise NotFoundError(f"unknown dataset {name!r}")
        return facts

    def get_dataset_json(self, name: str) -> bytes:
        """The stored manifest document of `name`, as JSON bytes (NotFoundError if unknown)."""
        return self._dataset(name).raw

    def get_dataset(self, name: str) -> Manifest:
        """The manifest of `name` (NotFoundError if unknown)."""
        return self._dataset(name).manifest

    def summary(self, name: str) -> dict[str, Any]:
        """The listing entry of dataset `name` (NotFoundError if unknown), with `broken`:
        its files whose version was found broken, when there are any."""
        facts = self._dataset(name)
        summary = dict(facts.summary)
        broken = self.broken_files(facts)
        if broken:
            summary["broken"] = broken
        return summary

    def broken_files(self, facts: DatasetFacts) -> list[dict[str, Any]]:
        marks = self.facts.broken
        if not marks:
            return []
        return [
            {
                "path": f.path,
                "object": f.object.lower(),
                "reason": marks[f.object.lower()]["reason"],
            }
            for f in facts.manifest.files
            if f.object.lower() in marks
        ]

    def datasets(self) -> list[dict[str, Any]]:
        """Summaries of every dataset, by name."""
        return [self.summary(name) for name in sorted(self.facts.datasets)]

    async def remove_dataset(self, name: str) -> None:
        """Forget a dataset (NotFoundError if unknown). Chunk facts stay: nodes hold them."""
        async with self.facts.transaction(bump=True) as txn:
            self._dataset(name)
            txn.delete(f"dataset/{name}")
            txn.delete(f"targets/{name}")
            txn.delete(f"trace/{name}")
            self.trust.prune_disputes(txn, self._objects(exclude=name))
        log.info("dataset %s removed (generation %d)", name, self.facts.generation)

    # -- assignments ----------------------------------------------------------------------------

    async def add_targets(self, name: str, targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Assign dataset `name` to more nodes: each target is {"node": n} or
        {"selector": {k: v}}; nodes that register later match too. Returns all targets."""
        for target in targets:
            if "node" in target:
                check_name("node", str(target["node"]))
        async with self.facts.transaction() as txn:
            self._dataset(name)
            current = list(self.facts.targets.get(name, []))
            added = [t for t in targets if t not in current]
            if added:
                current.extend(added)
                txn.put(f"targets/{name}", _json(current))
                txn.bump = True
        for target in added:
            log.info(
                "dataset %s assigned to %s (generation %d)",
                name,
                describe_target(target),
                self.facts.generation,
            )
        return current

    async def remove_targets(
        self, name: str, targets: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        """Drop assignment targets of `name` (None: all of them); returns what is left.
        NotFoundError when a given target is not assigned."""
        async with self.facts.transaction(bump=True) as txn:
            self._dataset(name)
            current = list(self.facts.targets.get(name, []))
            drop = current if targets is None else targets
            for target in drop:
                if target not in current:
                    raise NotFoundError(
                        f"dataset {name} is not assigned to {describe_target(target)}"
                    )
            left = [t for t in current if t not in drop]
            if left:
                txn.put(f"targets/{name}", _json(left))
            else:
                txn.delete(f"targets/{name}")
        log.info(
            "dataset %s unassigned from %s (generation %d)",
            name,
            ", ".join(describe_target(t) for t in drop) or "nothing",
            self.facts.generation,
        )
        return left

    def targets(self) -> dict[str, list[dict[str, Any]]]:
        """Every dataset's assignment targets."""
        return {name: list(t) for name, t in sorted(self.facts.targets.items())}


def _objects_of(manifest: Manifest) -> set[str]:
    return {f.object.lower() for f in manifest.files}


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


__all__ = ["Catalog"]
