"""The scheduler's JSON HTTP API over `SchedulerState`, on stdlib `ThreadingHTTPServer`.

Owns routing, request-body validation, source resolution for `POST /v1/datasets` and the
mapping of errors to status codes. It never keeps state of its own (all of it lives in
`SchedulerState`) and never sends a traceback to a client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote, urlsplit

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from syncbit.auth import check_bearer, read_token
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
from syncbit.scheduler.client import RESOLVE_TIMEOUT
from syncbit.scheduler.policy import LeastLoaded, PeerPolicy
from syncbit.scheduler.state import DatasetExistsError, SchedulerState
from syncbit.sources.base import open_source, options_for

log = logging.getLogger("syncbit.scheduler")

_UP_TTL = 0.5  # seconds a list of up nodes is reused by claims and chunk maps


_IDLE_TIMEOUT = 120.0  # an idle keep-alive connection is dropped after this many seconds
_MAX_BODY = 256 * 2**20

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=255)]


# -- request bodies ---------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeartbeatBody(_Body):
    address: Annotated[str, StringConstraints(min_length=1)]
    labels: dict[str, str] = Field(default_factory=dict)
    load: int = Field(0, ge=0)
    cache_bytes: int = Field(0, ge=0)
    cache_size: int = Field(0, ge=0)
    ready: dict[str, str] = Field(default_factory=dict)
    pinned_bytes: int = Field(0, ge=0)
    pinned_over_budget: bool = False


class LabelsBody(_Body):
    set: dict[Name, str] = Field(default_factory=dict)
    remove: list[Name] = Field(default_factory=list)


class Target(_Body):
    node: Name | None = None
    selector: dict[Name, str] | None = None

    def doc(self) -> dict[str, Any]:
        if (self.node is None) == (self.selector is None):
            raise UserError("a target is either {'node': name} or {'selector': {key: value}}")
        return {"node": self.node} if self.node is not None else {"selector": self.selector}


class TargetsBody(_Body):
    targets: list[Target] | None = None


class ClaimBody(_Body):
    node: Name
    chunks: list[Annotated[int, Field(ge=0)]]
    ttl: float = Field(30.0, gt=0, le=3600)


class DatasetBody(_Body):
    name: Name
    source: Annotated[str, StringConstraints(min_length=1)]
    options: dict[str, Any] = Field(default_factory=dict)


class AddedObject(_Body):
    object: Hex64
    size: int = Field(ge=0)
    chunk_size: int = Field(gt=0)
    chunks: list[tuple[Annotated[int, Field(ge=0)], Hex64]]


class ObjectRef(_Body):
    object: Hex64


class RemovedObject(_Body):
    object: Hex64
    chunks: list[Annotated[int, Field(ge=0)]]


class ChunksBody(_Body):
    add: list[AddedObject] = Field(default_factory=list)
    remove: list[RemovedObject] = Field(default_factory=list)


class ReportBody(_Body):
    reporter: Name
    peer: Name
    object: Hex64
    chunk: int = Field(ge=0)
    reason: str = ""


class CheckBody(_Body):
    """What a node read from the source for one chunk: its digest, or what changed."""

    node: Name
    chunk: int = Field(ge=0, lt=2**32)
    digest: Hex64 | None = None
    changed: Annotated[str, StringConstraints(max_length=2000)] = ""


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


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    # Every node connects at start-up; socketserver's default backlog of 5 drops SYNs.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, api: Api) -> None:
        self.address_family = family
        self.api = api
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished mid-request is routine; anything else is logged once."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("connection from %s dropped: %s", client_address, exc)
        else:
            log.exception("unexpected error serving %s", client_address)

    def drop_connections(self) -> None:
        """Wake handler threads parked on idle keep-alive connections so they exit."""
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "syncbit-scheduler"
    timeout = _IDLE_TIMEOUT
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

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise _HTTPError(411, "request bodies need a Content-Length", "LengthRequired", {})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self.close_connection = True
            raise UserError(f"invalid Content-Length {self.headers.get('Content-Length')!r}")
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        status, payload, headers = 200, b"", {}
        content_type = "application/json"
        try:
            raw = self._read_body()
            split = urlsplit(self.path)
            segments = [unquote(s) for s in split.path.strip("/").split("/")]
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            if method == "GET" and segments == ["metrics"]:
                payload, content_type = self.server.api.metrics()
            else:
                self.server.api.authorize(segments, self.headers.get("Authorization"))
                payload = self.server.api.handle(method, segments, query, raw)
        except _HTTPError as exc:
            status, headers = exc.status, exc.headers
            payload = _error(str(exc), exc.kind)
        except Exception as exc:
            status = _status_of(exc)
            if status == 500:
                log.exception("%s %s failed", method, self.path)
                message = f"internal scheduler error ({type(exc).__name__}); see scheduler log"
            else:
                message = str(exc)
            payload = _error(message, type(exc).__name__)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)


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
        doc = json.loads(raw)
    except ValueError as exc:
        raise UserError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UserError("request body must be a JSON object")
    return doc


# -- the API ----------------------------------------------------------------------------------


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
        self._quarantine_cache: tuple[float, frozenset[str]] | None = None
        self.refused: dict[str, int] = {}  # digests not recorded, by why (for /metrics)
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
        quarantined = self.state.quarantined()
        yield gauge(
            "syncbit_scheduler_quarantined_nodes",
            "Nodes quarantined for a false report (not offered as peers, reports dropped).",
            {(): len(quarantined)},
            [],
        )
        yield gauge(
            "syncbit_scheduler_node_quarantined",
            "1 for each quarantined node.",
            {(name,): 1.0 for name in quarantined},
            ["node"],
        )
        yield gauge(
            "syncbit_scheduler_disputes",
            "Chunk digests under dispute, waiting for a re-check against the source.",
            {(): len(status["disputes"])},
            [],
        )
        yield gauge(
            "syncbit_scheduler_broken_files",
            "Files of current dataset revisions whose source changed under their version.",
            {(d["name"],): len(d["broken"]) for d in status["datasets"]},
            ["dataset"],
        )
        yield counter(
            "syncbit_scheduler_refused_digests",
            "Reported chunk digests not recorded: refused (no source read granted, a "
            "quarantined reporter, a revoked digest) or in conflict with the record.",
            {(k,): float(v) for k, v in self.refused.items()},
            ["reason"],
        )
        yield counter(
            "syncbit_scheduler_requests",
            "API requests by method and route.",
            {k: float(v) for k, v in self.requests.items()},
            ["method", "route"],
        )

    def handle(self, method: str, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        route = self._route(method, seg)
        key = (method, route.__name__.lstrip("_"))
        self.requests[key] = self.requests.get(key, 0) + 1  # GIL-atomic enough for a count
        return route(seg, query, body)

    def _route(
        self, method: str, seg: list[str]
    ) -> Callable[[list[str], dict[str, str], bytes], bytes]:
        table: dict[str, Callable[[list[str], dict[str, str], bytes], bytes]] = {}
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
            case ["v1", "nodes", _, "quarantine"]:
                table = {"DELETE": self._lift_quarantine}
            case ["v1", "objects", _, "checks"]:
                table = {"POST": self._check}
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
        return _json(
            {
                **info.to_json(),
                "plan": self.plan(seg[2]),
                "rechecks": self.state.rechecks_for(seg[2]),
                "discard": self.state.take_notices(seg[2]),
            }
        )

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

    def _quarantined(self) -> AbstractSet[str]:
        """Quarantined node names, read at most twice a second (as `_up`)."""
        now = self.state.clock()
        cached = self._quarantine_cache
        if cached is None or cached[0] <= now:
            cached = self._quarantine_cache = (now + _UP_TTL, frozenset(self.state.quarantined()))
        return cached[1]

    def _claim(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        """Grant source fetches of chunks no peer holds and no other node is fetching; the
        grant is also the right to establish those chunks' digests (not for a quarantined
        node: it reads for its own readers, but its word is not recorded)."""
        req: ClaimBody = _parse(ClaimBody, _decode(body))
        object_id = _parse(ObjectRef, {"object": seg[2]}).object.lower()
        held = self.state.chunk_map(object_id, req.node, self.policy)["peers"]
        wanted = [i for i in req.chunks if i not in held]
        granted, busy = self.claims.claim(
            req.node,
            object_id,
            wanted,
            req.ttl,
            self._up(),
            establish=req.node not in self._quarantined(),
        )
        return _json(
            {"granted": granted, "busy": busy, "held": [i for i in req.chunks if i in held]}
        )

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
        """Chunks a node now holds (recorded only as `SchedulerState.add_chunks` allows:
        a new digest only from the node granted the source read) and chunks it dropped."""
        req: ChunksBody = _parse(ChunksBody, _decode(body))
        node = seg[2]
        conflicts: list[list[Any]] = []
        refused: list[list[Any]] = []
        for added in req.add:
            object_id = added.object.lower()
            indexes = [i for i, _ in added.chunks]
            report = self.state.add_chunks(
                node,
                object_id,
                added.size,
                added.chunk_size,
                added.chunks,
                establish=self.claims.may_establish(node, object_id, indexes),
            )
            conflicts.extend([added.object, i] for i in report.conflicts)
            refused.extend([added.object, i] for i in report.refused)
            for why, count in (("conflict", report.conflicts), ("refused", report.refused)):
                if count:
                    self.refused[why] = self.refused.get(why, 0) + len(count)
            self.claims.release(node, object_id, indexes)
        for removed in req.remove:
            self.state.remove_chunks(node, removed.object.lower(), removed.chunks)
        return _json({"conflicts": conflicts, "refused": refused})

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

    def _check(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        """A node's source read of one chunk: a re-check it was asked for, or a read that
        disagreed with the recorded digest (which opens a dispute)."""
        req: CheckBody = _parse(CheckBody, _decode(body))
        object_id = _parse(ObjectRef, {"object": seg[2]}).object.lower()
        digest = req.digest.lower() if req.digest else None
        outcome = self.state.check(req.node, object_id, req.chunk, digest, req.changed)
        return _json({"outcome": outcome})

    def _lift_quarantine(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        self.state.lift_quarantine(seg[2])
        self._quarantine_cache = None
        return _json({"node": seg[2], "quarantined": False})

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
    """

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        policy: PeerPolicy | None = None,
        resolve: Callable[[str, str, dict[str, Any], int], Manifest] = resolve_dataset,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
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
            server = _Server((host, port), family, api)
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
