"""The scheduler's JSON HTTP API over `SchedulerState`, on a thread-per-connection server
with bounded connections (`syncbit.serving`).

Owns routing, request-body validation, source resolution for `POST /v1/datasets` and the
mapping of errors to status codes. Every request is handled in three steps, each before
the next costs anything: authorize it from its headers, find its route (which sets the
body limit), then read at most that limit; a body over it is refused (413) unread. It
never keeps state of its own (all of it lives in `SchedulerState`) and never sends a
traceback to a client.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from syncbit.auth import check_bearer, read_token
from syncbit.chunks import chunk_count
from syncbit.config import SchedulerConfig
from syncbit.errors import (
    NotFoundError,
    SchedulerError,
    SourceError,
    SourceUnavailableError,
    UnauthorizedError,
    UserError,
)
from syncbit.manifest import Manifest, build_manifest
from syncbit.metrics import Snapshot, counter, gauge, render
from syncbit.scheduler.claims import Claims
from syncbit.scheduler.client import (
    MAX_CLAIM_CHUNKS,
    MAX_REPORT_CHUNKS,
    MAX_REPORT_REMOVALS,
    RESOLVE_TIMEOUT,
)
from syncbit.scheduler.policy import LeastLoaded, PeerPolicy
from syncbit.scheduler.state import MAX_CHUNK_INDEX, DatasetExistsError, SchedulerState
from syncbit.serving import (
    BodyError,
    BoundedHandler,
    BoundedServer,
    Limits,
    body_length,
    loads_bounded,
)
from syncbit.sources.base import open_source, options_for

log = logging.getLogger("syncbit.scheduler")

_UP_TTL = 0.5  # seconds a list of up nodes is reused by claims and chunk maps


# Request body limits by route, checked against Content-Length before anything is read.
# Each is a few times what the largest valid body of that route can be.
_NO_BODY = 0
_SMALL_BODY = 64 * 2**10  # labels, claims (MAX_CLAIM_CHUNKS), targets, datasets, reports
_HEARTBEAT_BODY = 2 * 2**20  # labels, and every dataset ready on the node (MAX_READY)
# A chunk report: MAX_REPORT_CHUNKS [index, digest] pairs added (~80 bytes each, plus a
# header per object) and MAX_REPORT_REMOVALS indexes removed (~11 bytes each).
_CHUNKS_BODY = 4 * 2**20

# Counts and sizes inside bodies: what one node or one request may make the state hold.
MAX_LABELS = 1024  # a Kubernetes node with feature discovery carries a few hundred
MAX_READY = 10_000  # datasets one heartbeat says are ready on the node
MAX_TARGETS = 1024
MAX_OPTIONS = 64
_MAX_INT = 2**63 - 1

# Connections: every node keeps a few (heartbeats, the generation long poll, chunk maps,
# claims); one client address may hold a quarter of them.
LIMITS = Limits(max_connections=4096, max_per_client=1024)

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


def _parse(model: type[_Body], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(body)"
        raise UserError(f"invalid request body: field '{where}': {err['msg']}") from None


# -- dataset resolution -----------------------------------------------------------------------


def resolve_dataset(
    name: str,
    source: str,
    options: dict[str, Any],
    chunk_size: int,
    timeout: float = RESOLVE_TIMEOUT,
) -> Manifest:
    """List `source` (blocking: runs its own trio loop in the calling thread) and freeze the
    listing into a manifest. Raises UserError for bad input, SourceError for source failures.
    """

    async def listing() -> Manifest:
        src = open_source(source, options)
        try:
            with trio.fail_after(timeout):
                result = await src.list()
        except trio.TooSlowError:
            raise SourceUnavailableError(
                f"source {source} did not finish listing within {timeout:.0f}s"
            ) from None
        finally:
            src.close()
        return build_manifest(
            name,
            source,
            result.files,
            result.dirs,
            chunk_size=chunk_size,
            source_options=options,
        )

    manifest: Manifest = trio.run(listing)
    return manifest


# -- HTTP plumbing ----------------------------------------------------------------------------


class _HTTPError(Exception):
    """An answer other than 200 that is not a domain error (unknown route, bad method)."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = headers


class _Server(BoundedServer):
    refusal_type = "application/json"
    refusal_body = b'{"error":"too many connections","kind":"TooManyConnections"}'

    def __init__(
        self, address: tuple[str, int], family: socket.AddressFamily, api: Api, limits: Limits
    ) -> None:
        self.api = api
        super().__init__(address, _Handler, limits, family)


class _Handler(BoundedHandler):
    protocol_version = "HTTP/1.1"
    server_version = "syncbit-scheduler"
    # Headers and body go out as two writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")  # no route takes it: 405, in JSON like every answer

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue` is answered only once the request is authorized and its
        body within the route's limit (`_read_body`): refused clients never send it."""
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (a malformed request line, headers too long, an
        unknown method) in JSON too, and the connection closed: after a request that
        could not be parsed, the rest of the stream cannot be trusted."""
        self.close_connection = True
        if code == 501:  # a method no handler exists for: it is the client's mistake
            code, message = 405, f"method {self.command!r} not allowed"
        short, _ = self.responses.get(code, ("error", ""))
        payload = _error(message or short, "BadRequest" if code < 500 else "ServerError")
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        else:
            self.end_headers()

    def _read_body(self, limit: int) -> bytes:
        """At most `limit` bytes of body, judged by Content-Length before reading any:
        a body over the limit (or without a length) is refused and never read, and the
        connection closes, since its unread bytes cannot be skipped safely."""
        try:
            length = body_length(self.headers, limit)
        except BodyError as exc:
            self.close_connection = True
            kind = {411: "LengthRequired", 413: "PayloadTooLarge"}.get(exc.status, "UserError")
            raise _HTTPError(exc.status, str(exc), kind, {}) from None
        if not length:
            self._body_done = True
            return b""
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        raw = self.rfile.read(length)
        if len(raw) != length:
            self.close_connection = True
            raise ConnectionError(f"client sent {len(raw)} of {length} body bytes")
        self._body_done = True
        return raw

    def _dispatch(self, method: str) -> None:
        status, payload, headers = 200, b"", {}
        content_type = "application/json"
        api = self.server.api
        self._body_done = False
        try:
            # The target is a path, never parsed as a URL: `//host` is a path here too.
            target, _, query_string = self.path.partition("?")
            query_string = query_string.partition("#")[0]
            segments = [unquote(s) for s in target.partition("#")[0].strip("/").split("/")]
            query = {k: v[-1] for k, v in parse_qs(query_string).items()}
            if method == "GET" and segments == ["metrics"]:
                self._read_body(_NO_BODY)
                payload, content_type = api.metrics()
            else:
                # 1. Who asks, from the headers alone: nothing of the body is read for a
                # client that may not make this request.
                api.authorize(segments, self.headers.get("Authorization"))
                # 2. Where to: an unknown route or method costs no body either.
                route = api.route(method, segments)
                # 3. What: at most the route's limit, else 413 unread.
                raw = self._read_body(route.body_limit)
                payload = api.call(route, method, segments, query, raw)
        except _HTTPError as exc:
            status, headers = exc.status, exc.headers
            payload = _error(str(exc), exc.kind)
        except (ConnectionError, TimeoutError):
            raise  # the client is gone or stalled: nobody to answer
        except Exception as exc:
            status = _status_of(exc)
            if status == 500:
                log.exception("%s %s failed", method, self.path)
                message = f"internal scheduler error ({type(exc).__name__}); see scheduler log"
            else:
                message = str(exc)
            payload = _error(message, type(exc).__name__)
        if not self._body_done and _has_body(self.headers):
            self.close_connection = True  # refused before its body was read: it cannot be skipped
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)


def _has_body(headers: Any) -> bool:
    """Whether a request announced a body (a length other than 0, or chunked)."""
    length = headers.get("Content-Length", "").strip()
    return length not in ("", "0") or bool(headers.get("Transfer-Encoding"))


def _status_of(exc: Exception) -> int:
    if isinstance(exc, UnauthorizedError):
        return 401
    if isinstance(exc, DatasetExistsError):
        return 409
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, UserError):
        return 400
    if isinstance(exc, SourceError):
        return 502
    if isinstance(exc, SchedulerError):
        return 503  # the state is closed: this server is stopping
    return 500


def _error(message: str, kind: str) -> bytes:
    return _json({"error": message, "kind": kind})


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _decode(raw: bytes) -> Any:
    if not raw:
        raise UserError("request body is missing: expected a JSON object")
    try:
        doc = loads_bounded(raw)
    except ValueError as exc:
        raise UserError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UserError("request body must be a JSON object")
    return doc


Handler = Callable[[list[str], dict[str, str], bytes], bytes]


@dataclass(frozen=True)
class Route:
    """Where a request goes, and how large a body it may bring."""

    name: str
    handler: Handler
    body_limit: int


# -- the API ----------------------------------------------------------------------------------

# Body limits by route (handler name); a route not listed takes no body.
_BODY_LIMITS = {
    "heartbeat": _HEARTBEAT_BODY,
    "labels": _SMALL_BODY,
    "add_targets": _SMALL_BODY,
    "remove_targets": _SMALL_BODY,
    "claim": _SMALL_BODY,
    "release": _SMALL_BODY,
    "chunks": _CHUNKS_BODY,
    "add_dataset": _SMALL_BODY,
    "report": _SMALL_BODY,
}


class Api:
    """Routes decoded requests to `SchedulerState`; returns JSON bytes or raises."""

    def __init__(
        self,
        state: SchedulerState,
        chunk_size: int,
        policy: PeerPolicy,
        resolve: Callable[[str, str, dict[str, Any], int], Manifest] = resolve_dataset,
        source_options: dict[str, dict[str, Any]] | None = None,
        token: str | None = None,
    ) -> None:
        self.state = state
        self.token = token
        self.source_options = source_options or {}
        self.chunk_size = chunk_size
        self.policy = policy
        self.resolve = resolve
        self.claims = Claims()
        self._up_cache: tuple[float, frozenset[str]] | None = None
        self._plans: tuple[tuple[int, int], dict[str, list[dict[str, Any]]]] | None = None
        self.requests: dict[tuple[str, str], int] = {}  # (method, route) -> count
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Snapshot(self._collect))

    def authorize(self, seg: list[str], header: str | None) -> None:
        """With a cluster token configured, every route but the probes needs it."""
        if self.token is None or seg in (["healthz"], ["readyz"]):
            return
        if not check_bearer(header, self.token):
            raise UnauthorizedError("missing or wrong cluster token (see token_file)")

    def metrics(self) -> tuple[bytes, str]:
        return render(self.registry)

    def _collect(self) -> Iterator[Metric]:
        nodes = self.state.nodes()
        status = self.state.status()
        yield gauge(
            "syncbit_scheduler_nodes",
            "Registered nodes by liveness.",
            {("up",): sum(n.up for n in nodes), ("down",): sum(not n.up for n in nodes)},
            ["state"],
        )
        yield gauge(
            "syncbit_scheduler_datasets", "Registered datasets.", {(): len(status["datasets"])}, []
        )
        for key, doc in (
            ("assigned", "Nodes a dataset is assigned to."),
            ("ready", "Nodes where a dataset's current revision is ready."),
        ):
            yield gauge(
                f"syncbit_scheduler_dataset_{key}_nodes",
                doc,
                {(d["name"],): len(d[key]) for d in status["datasets"]},
                ["dataset"],
            )
        yield gauge(
            "syncbit_scheduler_claims", "Source reads claimed now.", {(): self.claims.active()}, []
        )
        yield counter(
            "syncbit_scheduler_requests",
            "API requests by method and route.",
            {k: float(v) for k, v in self.requests.items()},
            ["method", "route"],
        )

    def handle(self, method: str, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        return self.call(self.route(method, seg), method, seg, query, body)

    def call(
        self, route: Route, method: str, seg: list[str], query: dict[str, str], body: bytes
    ) -> bytes:
        """Run a request whose body was read within `route.body_limit`."""
        key = (method, route.name)
        self.requests[key] = self.requests.get(key, 0) + 1  # GIL-atomic enough for a count
        return route.handler(seg, query, body)

    def route(self, method: str, seg: list[str]) -> Route:
        """The route of a request, from its method and path alone (no body needed):
        _HTTPError 404 for an unknown path, 405 for a method the path does not take."""
        handler = self._route(method, seg)
        name = handler.__name__.lstrip("_")
        return Route(name, handler, _BODY_LIMITS.get(name, _NO_BODY))

    def _route(self, method: str, seg: list[str]) -> Handler:
        table: dict[str, Handler] = {}
        match seg:
            case ["healthz"]:
                table = {"GET": self._healthz}
            case ["readyz"]:
                table = {"GET": self._readyz}
            case ["v1", "nodes"]:
                table = {"GET": self._nodes}
            case ["v1", "nodes", _]:
                table = {"PUT": self._heartbeat}
            case ["v1", "nodes", _, "labels"]:
                table = {"POST": self._labels}
            case ["v1", "nodes", _, "plan"]:
                table = {"GET": self._plan}
            case ["v1", "assignments"]:
                table = {"GET": self._assignments}
            case ["v1", "datasets", _, "targets"]:
                table = {"POST": self._add_targets, "DELETE": self._remove_targets}
            case ["v1", "objects", _, "claims"]:
                table = {"POST": self._claim}
            case ["v1", "objects", _, "release"]:
                table = {"POST": self._release}
            case ["v1", "nodes", _, "chunks"]:
                table = {"POST": self._chunks}
            case ["v1", "datasets"]:
                table = {"GET": self._datasets, "POST": self._add_dataset}
            case ["v1", "datasets", _]:
                table = {"GET": self._manifest, "DELETE": self._remove_dataset}
            case ["v1", "objects", _, "chunks"]:
                table = {"GET": self._chunk_map}
            case ["v1", "reports"]:
                table = {"POST": self._report}
            case ["v1", "status"]:
                table = {"GET": self._status}
            case ["v1", "generation"]:
                table = {"GET": self._generation}
        if not table:
            raise _HTTPError(404, f"no such endpoint: /{'/'.join(seg)}", "NotFoundError", {})
        if method not in table:
            allow = ", ".join(sorted(table))
            raise _HTTPError(
                405,
                f"{method} not allowed on /{'/'.join(seg)} (allowed: {allow})",
                "MethodNotAllowed",
                {"Allow": allow},
            )
        return table[method]

    def _healthz(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        return _json({"ok": True})

    def _readyz(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        """Ready when the state answers a read (a closed or broken state raises: 503)."""
        return _json({"ok": True, "generation": self.state.generation()})

    def _heartbeat(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        req: HeartbeatBody = _parse(HeartbeatBody, _decode(body))
        info = self.state.heartbeat(
            seg[2],
            req.address,
            req.labels,
            req.load,
            req.cache_bytes,
            req.cache_size,
            req.ready,
            req.pinned_bytes,
            req.pinned_over_budget,
        )
        return _json({**info.to_json(), "plan": self.plan(seg[2])})

    def _labels(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        req: LabelsBody = _parse(LabelsBody, _decode(body))
        return _json(self.state.edit_labels(seg[2], req.set, req.remove).to_json())

    def _generation(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        """`?after=G&timeout=S`: answers when the generation is no longer G, or after S
        seconds (at most 60); without `after`, at once."""
        try:
            after = int(query["after"]) if "after" in query else None
            timeout = float(query.get("timeout", "30"))
            if not math.isfinite(timeout):
                raise ValueError(timeout)
        except ValueError:
            raise _HTTPError(
                400, "after must be an integer, timeout a number of seconds", "UserError", {}
            ) from None
        timeout = min(max(timeout, 0.0), 60.0)
        if after is None:
            return _json({"generation": self.state.generation()})
        return _json({"generation": self.state.wait_generation(after, timeout)})

    def _plan(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        generation = self.state.generation()
        return _json({"generation": generation, "plan": self.plan(seg[2])})

    def _assignments(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        return _json({"assignments": self.state.targets()})

    def _add_targets(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        req: TargetsBody = _parse(TargetsBody, _decode(body))
        targets = [t.doc() for t in req.targets or []]
        if not targets:
            targets = [{"selector": {}}]  # no target named: every node
        return _json({"dataset": seg[2], "targets": self.state.add_targets(seg[2], targets)})

    def _remove_targets(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        req: TargetsBody = _parse(TargetsBody, _decode(body) if body else {})
        targets = None if req.targets is None else [t.doc() for t in req.targets]
        return _json({"dataset": seg[2], "targets": self.state.remove_targets(seg[2], targets)})

    def _up(self) -> AbstractSet[str]:
        """Names of the nodes up now, read at most twice a second: claims and chunk maps
        ask for every request, and a node list is one JSON parse per registered node."""
        now = self.state.clock()
        cached = self._up_cache
        if cached is None or cached[0] <= now:
            cached = self._up_cache = (
                now + _UP_TTL,
                frozenset(n.name for n in self.state.nodes() if n.up),
            )
        return cached[1]

    def plan(self, node: str) -> list[dict[str, Any]]:
        """`node`'s plan, from all nodes' plans computed once per generation and second:
        every heartbeat carries one, and computing it reads every node and dataset."""
        key = (self.state.generation(), int(self.state.clock()))
        cached = self._plans
        if cached is None or cached[0] != key:
            cached = self._plans = (key, self.state.plans())
        return cached[1].get(node, [])

    def _claim(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        """Grant source fetches of chunks no peer holds and no other node is fetching."""
        req: ClaimBody = _parse(ClaimBody, _decode(body))
        object_id = _parse(ObjectRef, {"object": seg[2]}).object.lower()
        self._check_indexes(object_id, req.chunks)
        held = self.state.chunk_map(object_id, req.node, self.policy)["peers"]
        wanted = [i for i in req.chunks if i not in held]
        granted, busy = self.claims.claim(req.node, object_id, wanted, req.ttl, self._up())
        return _json(
            {"granted": granted, "busy": busy, "held": [i for i in req.chunks if i in held]}
        )

    def _check_indexes(self, object_id: str, indexes: list[int]) -> None:
        """Claims name chunks of objects a manifest named, within the object's size: what
        the claims table holds is then bounded by the registered datasets."""
        geometry = self.state.object_geometry(object_id)
        if geometry is None:
            raise NotFoundError(f"unknown object {object_id}: no dataset names it")
        count = chunk_count(*geometry)
        bad = next((i for i in indexes if i >= count), None)
        if bad is not None:
            raise UserError(f"object {object_id}: chunk {bad} out of range (object has {count})")

    def _release(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        req: ClaimBody = _parse(ClaimBody, _decode(body))
        object_id = _parse(ObjectRef, {"object": seg[2]}).object.lower()
        self.claims.release(req.node, object_id, req.chunks)
        return _json({})

    def _nodes(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        return _json({"nodes": [n.to_json() for n in self.state.nodes()]})

    def _add_dataset(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        req: DatasetBody = _parse(DatasetBody, _decode(body))
        try:
            existing = self.state.summary(req.name)
        except NotFoundError:
            pass
        else:  # refuse before a possibly slow listing; put_dataset checks again atomically
            if existing["source"] != req.source:
                raise DatasetExistsError(
                    f"dataset {req.name} already exists with source {existing['source']}; "
                    "remove it first"
                )
        options = options_for(req.source, self.source_options, req.options)
        manifest = self.resolve(req.name, req.source, options, self.chunk_size)
        summary, changed = self.state.put_dataset(manifest)
        return _json({"dataset": summary, "changed": changed})

    def _datasets(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        # generation first: a change between the two reads makes a client look again
        generation = self.state.generation()
        return _json({"generation": generation, "datasets": self.state.datasets()})

    def _manifest(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        return self.state.get_dataset_json(seg[2])

    def _remove_dataset(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        self.state.remove_dataset(seg[2])
        return _json({"removed": seg[2]})

    def _chunks(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        req: ChunksBody = _parse(ChunksBody, _decode(body))
        node = seg[2]
        conflicts: list[list[Any]] = []
        unknown: list[str] = []
        for added in req.add:
            try:
                bad = self.state.add_chunks(
                    node, added.object.lower(), added.size, added.chunk_size, added.chunks
                )
            except NotFoundError:
                # No dataset names it (any more, or this state was lost): nothing to record,
                # and no reason to refuse the rest of the report.
                unknown.append(added.object)
                continue
            conflicts.extend([added.object, i] for i in bad)
            self.claims.release(node, added.object.lower(), [i for i, _ in added.chunks])
        for removed in req.remove:
            self.state.remove_chunks(node, removed.object.lower(), removed.chunks)
        if unknown:
            log.debug("node %s reported chunks of unknown objects %s", node, unknown[:5])
        return _json({"conflicts": conflicts, "unknown": unknown})

    def _chunk_map(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        object_id = seg[2].lower()
        doc = self.state.chunk_map(object_id, query.get("node"), self.policy)
        doc["fetching"] = self.claims.fetching(object_id, self._up(), query.get("node"))
        return _json(doc)

    def _report(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        req: ReportBody = _parse(ReportBody, _decode(body))
        self.state.report_bad_peer(
            req.reporter, req.peer, req.object.lower(), req.chunk, req.reason
        )
        return _json({})

    def _status(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        return _json(self.state.status())


# -- the server -------------------------------------------------------------------------------


def _split_listen(listen: str) -> tuple[str, int, socket.AddressFamily]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return host, int(port), family


class SchedulerServer:
    """The scheduler API on `config.listen`, served from background threads.

    Standalone (`syncbit scheduler`) or embedded in a node daemon: `start()` returns once
    the socket is bound; `stop()` stops serving, drops idle connections, waits for requests
    in flight and closes the state.

    Args:
        config: listen address, state dir, node timeout, chunk size of new manifests.
        policy: peer ranking for chunk maps (default `LeastLoaded`).
        resolve: lists a source into a manifest (default `resolve_dataset`; tests inject).
        clock: wall-clock seconds for liveness (tests inject).
        limits: connections open at once, per client, and their idle timeout.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        policy: PeerPolicy | None = None,
        resolve: Callable[[str, str, dict[str, Any], int], Manifest] = resolve_dataset,
        clock: Callable[[], float] = time.time,
        limits: Limits = LIMITS,
    ) -> None:
        self.config = config
        self.limits = limits
        self.policy: PeerPolicy = policy or LeastLoaded()
        self._resolve = resolve
        self._clock = clock
        self.state: SchedulerState | None = None
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def address(self) -> str:
        """The bound "host:port" (valid after `start`)."""
        if self._server is None:
            raise SchedulerError("scheduler server is not started")
        host, port = self._server.server_address[:2]
        host = str(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        """Base URL clients use, e.g. http://127.0.0.1:7900."""
        return f"http://{self.address}"

    def start(self) -> str:
        """Open the state, bind `config.listen` (port 0 picks one) and serve in the background.

        Returns the bound "host:port".
        """
        if self._server is not None:
            raise SchedulerError("scheduler server is already started")
        state = SchedulerState(self.config.state_dir, self.config.node_timeout, self._clock)
        host, port, family = _split_listen(self.config.listen)
        api = Api(
            state,
            self.config.chunk_size,
            self.policy,
            self._resolve,
            self.config.source_options,
            read_token(self.config.token_file),
        )
        try:
            server = _Server((host, port), family, api, self.limits)
        except OSError as exc:
            state.close()
            raise SchedulerError(
                f"scheduler cannot listen on {self.config.listen}: {exc.strerror or exc}"
            ) from exc
        self.state, self._server = state, server
        self._stopping.clear()
        self._threads = [
            threading.Thread(
                target=server.serve_forever, args=(0.1,), name="syncbit-scheduler", daemon=True
            ),
            threading.Thread(target=self._watch, name="syncbit-scheduler-liveness", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self.address

    def _watch(self) -> None:
        """Log node up/down transitions as they happen, not only when someone asks."""
        interval = min(1.0, self.config.node_timeout / 4)
        while not self._stopping.wait(interval):
            state = self.state
            if state is None:
                return
            try:
                state.check_liveness()
            except SchedulerError:
                return  # state closed under us: stopping
            except Exception:
                log.exception("liveness check failed")

    def stop(self) -> None:
        """Stop serving and close the state. Idempotent."""
        server, state = self._server, self.state
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.drop_connections()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []
        if state is not None:
            state.close()  # waits for requests still in flight
        self._server = None
        self.state = None

    def __enter__(self) -> SchedulerServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["RESOLVE_TIMEOUT", "Api", "SchedulerServer", "resolve_dataset"]
