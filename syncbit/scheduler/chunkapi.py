"""The scheduler API's chunk handlers: chunk reports, chunk maps and their updates (with
the long poll), source-fetch claims, bad-peer reports and source re-checks.

A mixin of `api.Api` (one handler per route, from a routed, authorized request whose body
was read within its limit, to the JSON of the answer); every answer is bounded by the
chunks asked or changed times K, never by the cluster's size. Holds no state of its own
beyond the refused-digest counts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import trio

from syncbit.chunks import chunk_count
from syncbit.credentials import Principal
from syncbit.errors import NotFoundError, SchedulerError, UserError
from syncbit.scheduler.admission import step_aside
from syncbit.scheduler.bodies import (
    CheckBody,
    ChunksBody,
    ClaimBody,
    GeometryBody,
    ObjectRef,
    ReportBody,
    UpdatesQuery,
    decode,
    parse,
)
from syncbit.scheduler.records import check_oid
from syncbit.scheduler.state import SchedulerState

log = logging.getLogger("syncbit.scheduler")


@dataclass(frozen=True)
class Call:
    """One request as a handler sees it."""

    method: str
    seg: list[str]
    query: dict[str, str]
    body: bytes
    principal: Principal | None

    def doc(self) -> Any:
        return decode(self.body)


def json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class ChunkHandlers:
    """The chunk routes of `api.Api`."""

    state: SchedulerState
    refused: dict[str, int]  # digests not recorded, by why (for /metrics)

    def _object(self, c: Call) -> str:
        object_id: str = parse(ObjectRef, {"object": c.seg[2]}).object.lower()
        return object_id

    async def _chunks(self, c: Call) -> bytes:
        """Chunks a node now holds (recorded as `Directory.add_chunks` allows: a new digest
        only from the node granted the source read) and chunks it dropped."""
        req: ChunksBody = parse(ChunksBody, c.doc())
        node = c.seg[2]
        conflicts: list[list[Any]] = []
        refused: list[list[Any]] = []
        unknown: list[str] = []
        claims = self.state.claims
        for added in req.add:
            object_id = added.object.lower()
            indexes = [i for i, _ in added.chunks]
            try:
                report = await self.state.chunks.add_chunks(
                    node,
                    object_id,
                    added.size,
                    added.chunk_size,
                    added.chunks,
                    establish=claims.may_establish(node, object_id, indexes),
                )
            except NotFoundError:
                # No dataset names it (any more, or this state was lost): nothing to record,
                # and no reason to refuse the rest of the report.
                unknown.append(added.object)
                continue
            conflicts.extend([added.object, i] for i in report.conflicts)
            refused.extend([added.object, i] for i in report.refused)
            for why, which in (("conflict", report.conflicts), ("refused", report.refused)):
                if which:
                    self.refused[why] = self.refused.get(why, 0) + len(which)
            claims.release(node, object_id, indexes)
        for removed in req.remove:
            self.state.chunks.remove_chunks(node, removed.object.lower(), removed.chunks)
        if unknown:
            log.debug("node %s reported chunks of unknown objects %s", node, unknown[:5])
        return json_bytes({"conflicts": conflicts, "refused": refused, "unknown": unknown})

    async def _chunk_map(self, c: Call) -> bytes:
        object_id = check_oid(c.seg[2])
        node = c.query.get("node")
        state = self.state
        state.live.refresh()
        extra: dict[str, Any] = {"fetching": state.claims.fetching(object_id, state.live.up, node)}
        view = state.chunks.view(object_id)  # made here when first asked
        if view is not None:
            extra["cursor"] = view.cursor()  # continue with GET .../updates?cursor=
        names = c.query.get("peers") == "names"  # the compact form (`Directory.chunk_map_json`)
        return state.chunks.chunk_map_json(object_id, node, extra, names)

    async def _updates(self, c: Call) -> bytes:
        """Changes since `cursor` (see `protocol.ChunkUpdates`); with `wait=S`, when there
        are none yet, waits up to S seconds for one (a long poll: a coroutine)."""
        object_id = check_oid(c.seg[2])
        query: UpdatesQuery = parse(UpdatesQuery, c.query)
        if query.wait > 0:
            async with step_aside():  # waiting takes no admitted request's place
                await self._await_change(object_id, query.node, query.cursor, query.wait)
        doc = self.state.chunks.updates(object_id, query.node, query.cursor, query.limit)
        return json_bytes(doc)

    async def _await_change(
        self, object_id: str, node: str | None, cursor: str, wait: float
    ) -> None:
        state = self.state
        view = state.chunks.view(object_id)
        seq = cursor.rpartition(".")[2]
        if view is None or not cursor.startswith(view.view + ".") or not seq.isdigit():
            return  # unknown object or cursor: the answer (a reset) is due now
        seen, group = int(seq), state.holders.group_of(node)
        deadline = time.monotonic() + wait
        # Only a change for the node's group answers: other groups' offers are not its news.
        while state.holders.last_change(view, group) <= seen and not state.facts.closed:
            lapse = state.claims.expire(object_id)  # a lease running out is a change too
            if (
                state.holders.last_change(view, group) > seen
                or state.holders.objects.get(object_id) is not view
            ):
                return
            until = deadline if lapse is None else min(deadline, lapse)
            with trio.move_on_after(max(0.0, until - time.monotonic())):
                await view.event.wait()
            if time.monotonic() >= deadline:
                return

    async def _claim(self, c: Call) -> bytes:
        """Grant source fetches of chunks no peer holds and no other node is fetching; the
        grant is also the right to establish those chunks' digests (not for a quarantined
        node: it reads for its own readers, but its word is not recorded)."""
        req: ClaimBody = parse(ClaimBody, c.doc())
        object_id = self._object(c)
        self._check_indexes(object_id, req.chunks)
        if self.state.claims.settling():
            # 503: a prefetch waits and asks again; a reader reads without a claim.
            raise SchedulerError(
                "this scheduler has just begun to lead: claims resume once the nodes have "
                "reported again what they hold (a few seconds)"
            )
        held = self.state.chunks.held(object_id, req.node, req.chunks)
        wanted = [i for i in req.chunks if i not in held]
        self.state.live.refresh()
        granted, busy = self.state.claims.claim(
            req.node,
            object_id,
            wanted,
            req.ttl,
            self.state.live.up,
            establish=req.node not in self.state.facts.quarantine,
        )
        return json_bytes(
            {"granted": granted, "busy": busy, "held": [i for i in req.chunks if i in held]}
        )

    async def _register_object(self, c: Call) -> bytes:
        """An object no manifest named (a registry blob a node's mirror serves) made
        claimable and reportable; answers the geometry recorded, which may be another's."""
        req: GeometryBody = parse(GeometryBody, c.doc())
        size, chunk_size = await self.state.catalog.register_object(
            self._object(c), req.size, req.chunk_size
        )
        return json_bytes({"size": size, "chunk_size": chunk_size})

    def _check_indexes(self, object_id: str, indexes: list[int]) -> None:
        """Claims name chunks of objects a manifest named, within the object's size: what
        the claims table holds is then bounded by the registered datasets."""
        obj = self.state.facts.objects.get(object_id)
        if obj is None:
            raise NotFoundError(f"unknown object {object_id}: no dataset names it")
        count = chunk_count(obj.size, obj.chunk_size)
        bad = next((i for i in indexes if i >= count), None)
        if bad is not None:
            raise UserError(f"object {object_id}: chunk {bad} out of range (object has {count})")

    async def _release(self, c: Call) -> bytes:
        req: ClaimBody = parse(ClaimBody, c.doc())
        self.state.claims.release(req.node, self._object(c), req.chunks)
        return json_bytes({})

    async def _report(self, c: Call) -> bytes:
        req: ReportBody = parse(ReportBody, c.doc())
        self.state.chunks.report_bad_peer(
            req.reporter, req.peer, req.object.lower(), req.chunk, req.reason
        )
        return json_bytes({})

    async def _check(self, c: Call) -> bytes:
        """A node's source read of one chunk: a re-check it was asked for, or a read that
        disagreed with the recorded digest (which opens a dispute)."""
        req: CheckBody = parse(CheckBody, c.doc())
        object_id = self._object(c)
        digest = req.digest.lower() if req.digest else None
        outcome = await self.state.trust.check(req.node, object_id, req.chunk, digest, req.changed)
        return json_bytes({"outcome": outcome})


__all__ = ["Call", "ChunkHandlers", "json_bytes"]
