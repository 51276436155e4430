"""Access traces at the scheduler: the order the first node to read a dataset version read
it in, kept with that revision so the other nodes' prefetch follows it.

Owns the two answers of `/v1/datasets/<name>/trace` (GET: the current revision's trace or
none; PUT: a node's recording, validated against the manifest and kept only if none is
yet: the first trace wins) and their durable record, one per dataset (`trace/<name>` in
the facts; removed with the dataset). Never trusts the body: it comes from a node, and
everything in it is checked (`AccessTrace.from_doc`) before it is kept.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from syncbit.errors import UserError
from syncbit.scheduler.state import SchedulerState
from syncbit.trace import MAX_RUNS, AccessTrace, tracing

PREFIX = "trace/"


class TraceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    trace: dict[str, Any] = Field(max_length=8)


def current(state: SchedulerState, name: str) -> dict[str, Any] | None:
    """The trace record of `name`'s current revision; None without one (NotFoundError
    for an unknown dataset)."""
    revision = state.catalog.summary(name)["revision"]
    record = state.facts.traces.get(name)
    return record if record is not None and record.get("revision") == revision else None


def answer(state: SchedulerState, name: str) -> dict[str, Any]:
    """GET: {"dataset", "revision", "trace": record or None} for the current revision."""
    summary = state.catalog.summary(name)
    return {"dataset": name, "revision": summary["revision"], "trace": current(state, name)}


async def store(state: SchedulerState, name: str, doc: Any, now: float) -> dict[str, Any]:
    """PUT: keep the node's trace (`doc`: {"node", "trace"}) of the dataset's current
    revision unless one is kept. {"stored": bool, "trace": the record kept}. UserError for
    a body of another shape, a trace that does not fit the manifest, a dataset recorded at
    another revision, or one with tracing off."""
    try:
        body = TraceBody.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(body)"
        raise UserError(f"invalid request body: field '{where}': {err['msg']}") from None
    manifest = state.catalog.get_dataset(name)
    if not tracing(manifest):
        raise UserError(f"dataset {name!r} is added with --trace off: no trace is kept")
    trace = AccessTrace.from_doc(body.trace, manifest, MAX_RUNS)
    record = {
        "revision": manifest.revision,
        "node": body.node,
        "recorded": now,
        "runs": len(trace.runs),
        "trace": trace.to_doc(),
    }
    async with state.facts.transaction() as txn:
        if state.catalog.get_dataset(name).revision != manifest.revision:
            raise UserError(f"dataset {name!r} changed revision while its trace was checked")
        kept = current(state, name)
        if kept is not None:
            return {"stored": False, "trace": kept}
        txn.put(PREFIX + name, json.dumps(record, separators=(",", ":")).encode())
    return {"stored": True, "trace": record}
