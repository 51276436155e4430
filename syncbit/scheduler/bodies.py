"""The request bodies of the scheduler API: pydantic models with every count and size
capped (labels, ready datasets, targets, chunks per report or claim), the body size limit
of each route, and the one parse that names a bad field.

Validation only: no state, no I/O. What one node or one request may make the scheduler
hold is decided here, before anything else looks at a body.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from syncbit.credentials import Role
from syncbit.errors import UserError
from syncbit.protocol import (
    MAX_CLAIM_CHUNKS,
    MAX_REPORT_CHUNKS,
    MAX_REPORT_REMOVALS,
    MAX_UPDATE_CHUNKS,
)
from syncbit.scheduler.records import MAX_CHUNK_INDEX
from syncbit.serving import loads_bounded

# Request body limits by route, checked against Content-Length before anything is read.
# Each is a few times what the largest valid body of that route can be.
NO_BODY = 0
# An access trace (`traces.py`): MAX_RUNS runs are under half a MiB of JSON with ordinary
# paths; nodes trim theirs to fit (`syncbit.node.traces`).
TRACE_BODY = 1 << 20
SMALL_BODY = 64 * 2**10  # labels, claims (MAX_CLAIM_CHUNKS), targets, datasets, reports
HEARTBEAT_BODY = 2 * 2**20  # labels, and every dataset ready on the node (MAX_READY)
# A chunk report: MAX_REPORT_CHUNKS [index, digest] pairs added (~80 bytes each, plus a
# header per object) and MAX_REPORT_REMOVALS indexes removed (~11 bytes each).
CHUNKS_BODY = 4 * 2**20

# Counts and sizes inside bodies: what one node or one request may make the state hold.
MAX_LABELS = 1024  # a Kubernetes node with feature discovery carries a few hundred
MAX_READY = 10_000  # datasets one heartbeat says are ready on the node
MAX_TARGETS = 1024
MAX_OPTIONS = 64
_MAX_INT = 2**63 - 1

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Short = Annotated[str, StringConstraints(max_length=1024)]
Count = Annotated[int, Field(ge=0, le=_MAX_INT)]
ChunkIndex = Annotated[int, Field(ge=0, le=MAX_CHUNK_INDEX)]


# -- request bodies ---------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeartbeatBody(_Body):
    address: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    labels: dict[Name, Short] = Field(default_factory=dict, max_length=MAX_LABELS)
    load: Count = 0
    cache_bytes: Count = 0
    cache_size: Count = 0
    ready: dict[Name, Short] = Field(default_factory=dict, max_length=MAX_READY)
    pinned_bytes: Count = 0
    pinned_over_budget: bool = False
    disk_full: bool = False  # the node's cache filesystem has no space left
    disk_free: int = Field(0, ge=0)


class LabelsBody(_Body):
    set: dict[Name, Short] = Field(default_factory=dict, max_length=MAX_LABELS)
    remove: list[Name] = Field(default_factory=list, max_length=MAX_LABELS)


class Target(_Body):
    node: Name | None = None
    selector: dict[Name, Short] | None = Field(None, max_length=MAX_LABELS)

    def doc(self) -> dict[str, Any]:
        if (self.node is None) == (self.selector is None):
            raise UserError("a target is either {'node': name} or {'selector': {key: value}}")
        return {"node": self.node} if self.node is not None else {"selector": self.selector}


class TargetsBody(_Body):
    targets: list[Target] | None = Field(None, max_length=MAX_TARGETS)


class ClaimBody(_Body):
    node: Name
    chunks: list[ChunkIndex] = Field(max_length=MAX_CLAIM_CHUNKS)
    ttl: float = Field(30.0, gt=0, le=3600)


class GeometryBody(_Body):
    node: Name
    size: Count
    chunk_size: int = Field(gt=0, le=_MAX_INT)


class DatasetBody(_Body):
    name: Name
    source: Annotated[str, StringConstraints(min_length=1, max_length=8192)]
    options: dict[str, Any] = Field(default_factory=dict, max_length=MAX_OPTIONS)


class AddedObject(_Body):
    object: Hex64
    size: Count
    chunk_size: int = Field(gt=0, le=_MAX_INT)
    chunks: list[tuple[ChunkIndex, Hex64]] = Field(max_length=MAX_REPORT_CHUNKS)


class ObjectRef(_Body):
    object: Hex64


class ObjectName(_Body):
    name: Name


class RemovedObject(_Body):
    object: Hex64
    chunks: list[ChunkIndex] = Field(max_length=MAX_REPORT_REMOVALS)


class ChunksBody(_Body):
    add: list[AddedObject] = Field(default_factory=list, max_length=MAX_REPORT_CHUNKS)
    remove: list[RemovedObject] = Field(default_factory=list, max_length=MAX_REPORT_REMOVALS)

    @model_validator(mode="after")
    def _bounded(self) -> ChunksBody:
        if sum(len(a.chunks) for a in self.add) > MAX_REPORT_CHUNKS:
            raise ValueError(f"at most {MAX_REPORT_CHUNKS} chunks may be added per report")
        if sum(len(r.chunks) for r in self.remove) > MAX_REPORT_REMOVALS:
            raise ValueError(f"at most {MAX_REPORT_REMOVALS} chunks may be removed per report")
        return self


class ReportBody(_Body):
    reporter: Name
    peer: Name
    object: Hex64
    chunk: ChunkIndex
    reason: Short = ""


class TokenBody(_Body):
    role: Role
    node: Name | None = None
    ttl: float | None = Field(None, gt=0, le=10 * 365 * 86400)


class CheckBody(_Body):
    """What a node read from the source for one chunk: its digest, or what changed."""

    node: Name
    chunk: int = Field(ge=0, lt=2**32)
    digest: Hex64 | None = None
    changed: Annotated[str, StringConstraints(max_length=2000)] = ""


def parse(model: type[_Body], body: Any) -> Any:
    """`body` as `model`; UserError naming the first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(body)"
        raise UserError(f"invalid request body: field '{where}': {err['msg']}") from None


def decode(raw: bytes) -> Any:
    """A request body as a JSON object, nested at most `serving.MAX_JSON_DEPTH` deep."""
    if not raw:
        raise UserError("request body is missing: expected a JSON object")
    try:
        doc = loads_bounded(raw)
    except ValueError as exc:
        raise UserError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UserError("request body must be a JSON object")
    return doc


class UpdatesQuery(_Body):
    """`GET /v1/objects/<id>/updates?node=&cursor=&limit=&wait=`."""

    node: Name | None = None
    cursor: Annotated[str, StringConstraints(max_length=200)] = ""
    limit: int = Field(1024, ge=1, le=MAX_UPDATE_CHUNKS)
    wait: float = Field(0.0, ge=0, le=30, allow_inf_nan=False)
