"""The scheduler's JSON HTTP API over `SchedulerState`, on a thread-per-connection server
with bounded connections (`syncbit.serving`).

Owns routing, authorization (who may call which route, `_RULES`), request-body
validation, source resolution for `POST /v1/datasets`, issuing credentials, and the
mapping of errors to status codes. Every request is handled in three steps, each before
the next costs anything: authorize it from its headers, find its route (which sets the
body limit), then read at most that limit; a body over it is refused (413) unread. It
never keeps state of its own (all of it lives in `SchedulerState`), never sends a
traceback to a client and never logs a credential.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
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

from syncbit import tls
from syncbit.auth import check_exposure, drain_refused, read_token
from syncbit.chunks import chunk_count
from syncbit.config import SchedulerConfig
from syncbit.credentials import PEER, Issuer, Principal, Role, is_credential, public_key_text
from syncbit.errors import (
    ConfigError,
    ForbiddenError,
    NotFoundError,
    SchedulerError,
    SourceError,
    SourceUnavailableError,
    UnauthorizedError,
    UserError,
)
from syncbit.manifest import Manifest, build_manifest, validate_dataset_name
from syncbit.metrics import Snapshot, counter, gauge, render
from syncbit.scheduler import traces
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
from syncbit.sources.base import Listing, open_source, options_for
from syncbit.sources.fences import Fences, default_file_roots
from syncbit.sources.options import (
    SCHEMES,
    public_options,
    public_source,
    register_secrets,
    scheme_of,
    validate_options,
)

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
    fences: Fences | None = None,
) -> Manifest:
    """List `source` (blocking: runs its own trio loop in the calling thread) inside
    `fences` and freeze the listing into a manifest. The manifest keeps the source without
    credentials and no secret option: those serve this listing only. Raises UserError for
    bad input, SourceError for source failures.
    """
    public, _ = public_source(source)

    async def listing() -> Manifest:
        src = open_source(source, options, fences)
        try:
            with trio.fail_after(timeout):
                result = await src.list()
        except trio.TooSlowError:
            raise SourceUnavailableError(
                f"source {public} did not finish listing within {timeout:.0f}s"
            ) from None
        finally:
            src.close()
        parsed = validate_options(source, options)
        result = _filtered(result, parsed.get("include") or [], parsed.get("exclude") or [])
        return build_manifest(
            name,
            public,
            result.files,
            result.dirs,
            chunk_size=chunk_size,
            source_options=public_options(source, parsed),
            dir_perms=result.dir_perms,
        )

    manifest: Manifest = trio.run(listing)
    return manifest


# -- authorization ----------------------------------------------------------------------------

NODE_CREDENTIAL_TTL = 24 * 3600.0
"""Seconds a node credential issued at registration is valid; the daemon renews it with
itself at half-life, so a copy taken from a node stops working within a day of that
node's leaving (rotating the cluster secret revokes every credential at once)."""


@dataclass(frozen=True)
class _Rule:
    """Who may call a route (admin always may). `own` binds a node credential to the node
    the request acts for: "path" is the node name in the path (`/v1/nodes/<name>/...`), any
    other value a field of the JSON body."""

    roles: tuple[Role, ...] = ()
    own: str = ""


_OPEN = None  # probes: no credential needed
# Every route by its handler's name. A route missing here is admin-only (the test of the
# table fails first): new routes are closed until someone decides who may call them.
_RULES: dict[str, _Rule | None] = {
    "_healthz": _OPEN,
    "_readyz": _OPEN,
    "_nodes": _Rule((Role.READER,)),
    "_heartbeat": _Rule((Role.NODE,), own="path"),
    "_credential": _Rule((Role.NODE, Role.BOOTSTRAP), own="path"),
    "_labels": _Rule(),
    "_plan": _Rule((Role.NODE,), own="path"),
    "_assignments": _Rule((Role.READER,)),
    "_add_targets": _Rule(),
    "_remove_targets": _Rule(),
    "_claim": _Rule((Role.NODE,), own="node"),
    "_release": _Rule((Role.NODE,), own="node"),
    "_chunks": _Rule((Role.NODE,), own="path"),
    "_datasets": _Rule((Role.READER,)),
    "_add_dataset": _Rule(),
    "_manifest": _Rule((Role.READER,)),
    "_remove_dataset": _Rule(),
    "_chunk_map": _Rule((Role.NODE,)),
    "_report": _Rule((Role.NODE,), own="reporter"),
    "_status": _Rule((Role.READER,)),
    "_generation": _Rule((Role.READER,)),
    "_issue": _Rule(),
    "_check": _Rule((Role.NODE,), own="node"),
    "_lift_quarantine": _Rule(),
    "_trace": _Rule((Role.READER,)),
    "_put_trace": _Rule((Role.NODE,), own="node"),
}


def _bearer_value(header: str | None) -> str | None:
    scheme, _, value = (header or "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def _filtered(listing: Listing, include: list[str], exclude: list[str]) -> Listing:
    """The files a dataset's `include`/`exclude` globs keep (for every scheme; `*` also
    crosses `/`). With a filter, directories are those of the files kept."""
    if not include and not exclude:
        return listing

    def keep(path: str) -> bool:
        if include and not any(fnmatch.fnmatchcase(path, g) for g in include):
            return False
        return not any(fnmatch.fnmatchcase(path, g) for g in exclude)

    files = [f for f in listing.files if keep(f.path)]
    dirs = {parent for f in files for parent in _parents(f.path)}
    perms = {d: p for d, p in listing.dir_perms.items() if d == "" or d in dirs}
    return Listing(files=files, dirs=sorted(dirs), dir_perms=perms)


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


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
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        api: Api,
        limits: Limits,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.api = api
        self.tls = tls_context
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

    def _secure(self) -> bool:
        """TLS, or no TLS needed: none configured, or a client on this host."""
        if self.server.tls is None or tls.is_tls(self.connection):
            return True
        return tls.is_loopback(str(self.client_address[0]))

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
                if not self._secure() and segments not in (["healthz"], ["readyz"]):
                    raise ForbiddenError("this scheduler requires TLS: use https://")
                # 1. Who asks, from the headers alone: nothing of the body is read for a
                # client that may not make this request.
                principal = api.authorize(method, segments, self.headers.get("Authorization"))
                # 2. Where to: an unknown route or method costs no body either.
                route = api.route(method, segments)
                # 3. What: at most the route's limit, else 413 unread.
                raw = self._read_body(route.body_limit)
                payload = api.call(route, method, segments, query, raw, principal)
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
        if not self._body_done and _has_body(self.headers) and not drain_refused(self):
            # Refused before its body was read: an unread body would be parsed as the next
            # request, so a small one is dropped and a larger one ends the connection.
            self.close_connection = True
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


def _is_secret(source: str, key: str) -> bool:
    option = SCHEMES.get(scheme_of(source), {}).get(key)
    return option is not None and option.secret


def _status_of(exc: Exception) -> int:
    if isinstance(exc, UnauthorizedError):
        return 401
    if isinstance(exc, ForbiddenError):
        return 403
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
    "credential": _SMALL_BODY,
    "issue": _SMALL_BODY,
    "check": _SMALL_BODY,
    "put_trace": traces.TRACE_BODY,
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
        auth: Issuer | None = None,
    ) -> None:
        self.state = state
        self.auth = auth  # None: no cluster secret, every route open (loopback only)
        self._request = threading.local()  # the principal of the request this thread serves
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

    def authorize(self, method: str, seg: list[str], header: str | None) -> Principal | None:
        """Who sends this request, and whether they may call the route (`_RULES`); None
        without a cluster secret (or for a probe). Body-bound rules are checked by `handle`.

        Raises UnauthorizedError (401) for a missing or bad credential, before the route is
        even looked up; ForbiddenError (403) for a role or node that may not call it.
        """
        if self.auth is None or seg in (["healthz"], ["readyz"]):
            return None
        value = _bearer_value(header)
        if value is None:
            raise UnauthorizedError("missing or wrong cluster token (see token_file)")
        principal = self.auth.verify(value)
        if principal.audience == PEER:
            raise UnauthorizedError("this credential is for the peer API only")
        route = self._route(method, seg).__name__
        rule = _RULES.get(route, _Rule())
        if rule is None:
            return principal
        if not principal.allows(*rule.roles):
            raise ForbiddenError(
                f"a {principal.role.value} credential may not {method} /{'/'.join(seg)}"
            )
        if rule.own == "path" and principal.role is Role.NODE:
            self._own(principal, seg[2])
        return principal

    @staticmethod
    def _own(principal: Principal, node: Any) -> None:
        if principal.role is Role.NODE and node != principal.subject:
            raise ForbiddenError(
                f"the credential of node {principal.subject} may not act for node {node}"
            )

    def _check_body(self, route: str, principal: Principal, body: bytes) -> None:
        """A node's credential binds the node named in the body too (claims, reports)."""
        rule = _RULES.get(route)
        if rule is None or not rule.own or rule.own == "path" or principal.role is not Role.NODE:
            return
        self._own(principal, _decode(body).get(rule.own))

    def principal(self) -> Principal | None:
        """The principal of the request being handled in this thread."""
        current: Principal | None = getattr(self._request, "principal", None)
        return current

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

    def handle(
        self,
        method: str,
        seg: list[str],
        query: dict[str, str],
        body: bytes,
        principal: Principal | None = None,
    ) -> bytes:
        return self.call(self.route(method, seg), method, seg, query, body, principal)

    def call(
        self,
        route: Route,
        method: str,
        seg: list[str],
        query: dict[str, str],
        body: bytes,
        principal: Principal | None = None,
    ) -> bytes:
        """Run a request whose body was read within `route.body_limit`, on behalf of
        `principal` (None without a cluster secret)."""
        key = (method, route.name)
        self.requests[key] = self.requests.get(key, 0) + 1  # GIL-atomic enough for a count
        if principal is not None:
            self._check_body(route.handler.__name__, principal, body)
        self._request.principal = principal
        try:
            return route.handler(seg, query, body)
        finally:
            self._request.principal = None

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
            case ["v1", "nodes", _, "credential"]:
                table = {"POST": self._credential}
            case ["v1", "tokens"]:
                table = {"POST": self._issue}
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
            case ["v1", "datasets", _, "trace"]:
                table = {"GET": self._trace, "PUT": self._put_trace}
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
            disk_full=req.disk_full,
            disk_free=req.disk_free,
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
        self._check_indexes(object_id, req.chunks)
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
        """Resolve and register a dataset. Credentials that come with the request (URL
        user:password, secret options such as `headers` or a Hub `token`) serve this
        listing only: the manifest keeps the source without them, and nodes read with
        the credentials of their own config or environment."""
        req: DatasetBody = _parse(DatasetBody, _decode(body))
        validate_dataset_name(req.name)
        register_secrets(req.source, req.options)  # masked in any log line from now on
        public, had_userinfo = public_source(req.source)
        given = validate_options(req.source, req.options, from_dataset=True)
        try:
            existing = self.state.summary(req.name)
        except NotFoundError:
            pass
        else:  # refuse before a possibly slow listing; put_dataset checks again atomically
            if existing["source"] != public:
                raise DatasetExistsError(
                    f"dataset {req.name} already exists with source {existing['source']}; "
                    "remove it first"
                )
        options = options_for(public, self.source_options, req.options)
        manifest = self.resolve(req.name, req.source, options, self.chunk_size)
        summary, changed = self.state.put_dataset(manifest)
        secret = sorted(k for k in given if _is_secret(req.source, k))
        if had_userinfo:
            secret.insert(0, "user:password in the URL")
        warnings = []
        if secret:
            warnings.append(
                f"the credentials given with this request ({', '.join(secret)}) served the "
                f"listing only and are not stored: nodes read {public} with their own "
                "(source_options in their config, or their environment)"
            )
        return _json({"dataset": summary, "changed": changed, "warnings": warnings})

    def _datasets(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        # generation first: a change between the two reads makes a client look again
        generation = self.state.generation()
        return _json({"generation": generation, "datasets": self.state.datasets()})

    def _manifest(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        return self.state.get_dataset_json(seg[2])

    def _trace(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        return _json(traces.answer(self.state, seg[2]))

    def _put_trace(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        return _json(traces.store(self.state, seg[2], _decode(body), self.state.clock()))

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
        unknown: list[str] = []
        for added in req.add:
            object_id = added.object.lower()
            indexes = [i for i, _ in added.chunks]
            try:
                report = self.state.add_chunks(
                    node,
                    object_id,
                    added.size,
                    added.chunk_size,
                    added.chunks,
                    establish=self.claims.may_establish(node, object_id, indexes),
                )
            except NotFoundError:
                # No dataset names it (any more, or this state was lost): nothing to record,
                # and no reason to refuse the rest of the report.
                unknown.append(added.object)
                continue
            conflicts.extend([added.object, i] for i in report.conflicts)
            refused.extend([added.object, i] for i in report.refused)
            for why, count in (("conflict", report.conflicts), ("refused", report.refused)):
                if count:
                    self.refused[why] = self.refused.get(why, 0) + len(count)
            self.claims.release(node, object_id, indexes)
        for removed in req.remove:
            self.state.remove_chunks(node, removed.object.lower(), removed.chunks)
        if unknown:
            log.debug("node %s reported chunks of unknown objects %s", node, unknown[:5])
        return _json({"conflicts": conflicts, "refused": refused, "unknown": unknown})

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

    def _issuer(self) -> Issuer:
        if self.auth is None:
            raise UserError(
                "this scheduler has no cluster secret (token_file): it issues no credentials"
            )
        return self.auth

    def _credential(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        """A node's credentials: one for the scheduler, one for its peers (audience "peer":
        a peer that receives it cannot use it here). A node renews its own; a bootstrap
        credential gets one only for a name that is not registered and up, so that it cannot
        take over a running node."""
        issuer = self._issuer()
        name = _parse(ObjectName, {"name": seg[2]}).name
        principal = self.principal()
        bootstrap = principal is not None and principal.role is Role.BOOTSTRAP
        if bootstrap and any(n.name == name and n.up for n in self.state.nodes()):
            raise ForbiddenError(
                f"node {name} is registered and up: a bootstrap credential cannot take "
                "its name (it renews its own credential; a new daemon of that name gets "
                "one once the old one is down)"
            )
        token, expires = issuer.issue(Role.NODE, name, NODE_CREDENTIAL_TTL)
        peer_token, _ = issuer.issue(Role.NODE, name, NODE_CREDENTIAL_TTL, audience=PEER)
        log.info(
            "issued node credentials of %s (%s)",
            name,
            principal.describe() if principal else "open",
        )
        return _json(
            {
                "node": name,
                "token": token,
                "peer_token": peer_token,
                "expires": expires,
                "public_key": public_key_text(issuer.public),
                "key_id": issuer.key_id,
            }
        )

    def _issue(self, seg: list[str], query: dict[str, str], body: bytes) -> bytes:
        """`syncbit token create`: a credential of any role (admin only)."""
        req: TokenBody = _parse(TokenBody, _decode(body))
        if (req.role is Role.NODE) != (req.node is not None):
            raise UserError("--node goes with --role node, and only with it")
        token, expires = self._issuer().issue(req.role, req.node or "", req.ttl)
        log.info("issued a %s credential%s", req.role.value, f" for {req.node}" * bool(req.node))
        return _json({"token": token, "role": req.role.value, "node": req.node, "expires": expires})


# -- the server -------------------------------------------------------------------------------


def file_roots(config: SchedulerConfig) -> tuple[Path, ...]:
    """The directories `file://` datasets may name: the configured ones, else the default
    for where the scheduler listens (`sources.fences.default_file_roots`)."""
    if config.file_roots is not None:
        return tuple(config.file_roots)
    return default_file_roots(_split_listen(config.listen)[0])


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
        resolve: lists a source into a manifest (default `resolve_dataset` inside the
            config's `file_roots`; tests inject).
        clock: wall-clock seconds for liveness (tests inject).
        limits: connections open at once, per client, and their idle timeout.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        policy: PeerPolicy | None = None,
        resolve: Callable[[str, str, dict[str, Any], int], Manifest] | None = None,
        clock: Callable[[], float] = time.time,
        limits: Limits = LIMITS,
    ) -> None:
        self.config = config
        self.limits = limits
        self.policy: PeerPolicy = policy or LeastLoaded()
        self.fences = Fences.for_roots(file_roots(config))
        for prefix, options in config.source_options.items():
            register_secrets(prefix, options)  # masked in every log line of this process
        self._resolve = resolve or functools.partial(resolve_dataset, fences=self.fences)
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
        """Base URL clients use, e.g. http://127.0.0.1:7900 (https:// with tls_cert)."""
        scheme = "https" if self.config.tls_cert is not None else "http"
        return f"{scheme}://{self.address}"

    def start(self) -> str:
        """Open the state, bind `config.listen` (port 0 picks one) and serve in the background.

        Returns the bound "host:port".
        """
        if self._server is not None:
            raise SchedulerError("scheduler server is already started")
        secret = read_token(self.config.token_file)
        if secret is not None and is_credential(secret):
            raise ConfigError(
                f"token_file {self.config.token_file} holds a credential: a scheduler's "
                "token_file holds the cluster secret (e.g. `openssl rand -hex 32`)"
            )
        check_exposure("the scheduler", self.config.listen, secret, self.config.insecure, log)
        context = tls.config_pair(self.config.tls_cert, self.config.tls_key)
        state = SchedulerState(self.config.state_dir, self.config.node_timeout, self._clock)
        host, port, family = _split_listen(self.config.listen)
        api = Api(
            state,
            self.config.chunk_size,
            self.policy,
            self._resolve,
            self.config.source_options,
            Issuer(secret, self._clock) if secret is not None else None,
        )
        try:
            server = _Server((host, port), family, api, self.limits, context)
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
