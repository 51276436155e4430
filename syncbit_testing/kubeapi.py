"""A loopback fake of the Kubernetes API server, for Nodes only: enough for lightkube (and
curl) to read a Node and patch its labels and taints the way the real API server answers.

Owns a few Node objects and the API server's rules for them: bearer-token auth, GET,
PATCH in the three patch formats, resourceVersion bumped on every write that changes the
object, optimistic concurrency, and `Status` errors. Tests only; loopback only.

In-process::

    with KubeAPI() as api:
        api.add_node("n1", taints=[{"key": "syncbit.io/warming", "effect": "NoSchedule"}])
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        # lightkube.Client(KubeConfig.from_file(kubeconfig)).get(Node, "n1") works

As a process (`python -m syncbit_testing.kubeapi --node n1 [--taint KEY[=VALUE]:EFFECT]
[--kubeconfig PATH]`): prints `URL <url>` and `TOKEN <token>`, then `READY <port>` once
listening; serves `GET /__stats` (request counts, no auth) and stops on SIGTERM/SIGINT.

The API server's rules this server reproduces (checked against
k8s.io/apiserver/pkg/endpoints/handlers/patch.go and the API conventions):

- `GET /api/v1/nodes/{name}` -> the Node (`apiVersion: v1`, `kind: Node`, `metadata.name`,
  `uid`, `resourceVersion` (a string), `creationTimestamp`, `labels`; `spec.taints` as
  `[{key, value?, effect, timeAdded?}]`); `GET /api/v1/nodes` -> a NodeList (no selectors).
- `PATCH /api/v1/nodes/{name}` with Content-Type
  `application/merge-patch+json` (RFC 7386: objects merge, `null` deletes, anything else
  replaces), `application/strategic-merge-patch+json` (the same for Nodes' labels and
  taints: `NodeSpec.taints` has no patch merge key, so the list is replaced; `$patch`
  directives are not supported), or `application/json-patch+json` (RFC 6902: add, remove,
  replace, move, copy, test; JSON pointers with `~1` for `/` and `~0` for `~`). Other
  types (server-side apply included) get 415. Query parameters (`fieldManager`, ...) are
  accepted and recorded; `dryRun=All` validates without storing.
- A patch whose result carries a `metadata.resourceVersion` other than the stored one
  (a merge patch that sends the version it read) is a 409 Conflict: "the object has been
  modified; please apply your changes to the latest version and try again". A failing
  JSON-patch op (a `test` that does not match, a `remove` of a missing path) is a 422
  (reason Invalid), as on the real server, not a 409. A patch that changes nothing does
  not bump the resourceVersion (the real storage layer skips no-op writes).
- Label keys and values and taint effects are validated after a patch (422 Invalid).
- Errors are `Status` objects (`kind: Status`, `status: Failure`, `reason`, `code`,
  `details`) with Content-Type exactly `application/json`: lightkube turns only those into
  `ApiError`. No or a wrong bearer token: 401 Unauthorized. Unknown node: 404 NotFound.

Hooks for tests: `fail_next` (answer the next requests with an error Status, or with a
proxy's HTML page), `reset_next` (close the next connections with a TCP RST, no answer),
`forbid` (403 for a verb, like a missing RBAC rule), `before_next_patch` (another writer
changes the Node between a client's GET and its PATCH), `modify` (another writer, now),
`counts` and `statuses` (requests by method, answers by status).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import socket
import struct
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from syncbit_testing._http import (
    LoopbackServer,
    ServedInThread,
    TrackedHandler,
    serve_until_signal,
)

DEFAULT_TOKEN = "syncbit-test-token"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
_PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_PATCH)
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_CREATED = "2024-01-01T00:00:00Z"
_REASONS = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}

# k8s.io/apimachinery/pkg/util/validation: a qualified name, an optional DNS-1123 prefix.
_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

Json = Any  # a decoded JSON value
NodeDoc = dict[str, Any]


class ApiStatus(Exception):
    """An error the fake answers with a `Status` object."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            doc["details"] = self.details
        return doc


def _not_found(name: str) -> ApiStatus:
    return ApiStatus(404, "NotFound", f'nodes "{name}" not found', {"name": name, "kind": "nodes"})


def _conflict(name: str) -> ApiStatus:
    return ApiStatus(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on nodes "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        {"name": name, "kind": "nodes"},
    )


def _invalid(name: str, causes: list[tuple[str, str]]) -> ApiStatus:
    text = ", ".join(f"{f}: {m}" for f, m in causes)
    return ApiStatus(
        422,
        "Invalid",
        f'Node "{name}" is invalid: {text}',
        {
            "name": name,
            "kind": "Node",
            "causes": [
                {"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes
            ],
        },
    )


def _patch_failed(message: str) -> ApiStatus:
    # What patch.go answers when jsonpatch.Apply fails: a generic 422 with the library's
    # message as its only cause.
    return ApiStatus(
        422,
        "Invalid",
        "the server rejected our request due to an error in our request",
        {"causes": [{"message": message}]},
    )


# -- patch formats -----------------------------------------------------------------------------


def merge_patch(target: Json, patch: Json) -> Json:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes a member,
    anything else (arrays included) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    """RFC 6901: '/a~1b/c' -> ['a/b', 'c'] ('~1' before '~0', as the RFC requires)."""
    if path == "":
        return []
    if not path.startswith("/"):
        raise _patch_failed(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, allow_end: bool) -> int:
    if allow_end and token == "-":
        return len(container)
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise _patch_failed(f"invalid array index {token!r}")
    index = int(token)
    if index > len(container) or (index == len(container) and not allow_end):
        raise _patch_failed(f"array index {index} out of bounds")
    return index


def _parent(doc: Json, tokens: list[str], op: str) -> Json:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, allow_end=False)]
        else:
            raise _patch_failed(f"{op} operation does not apply: doc is missing path")
    return node


def _get(doc: Json, path: str, op: str) -> Json:
    node = doc
    for token in _pointer(path):
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, allow_end=False)]
        else:
            raise _patch_failed(f"{op} operation does not apply: doc is missing path: {path!r}")
    return node


def _remove(doc: Json, path: str, op: str) -> Json:
    tokens = _pointer(path)
    if not tokens:
        raise _patch_failed(f"{op} operation cannot remove the whole document")
    parent = _parent(doc, tokens, op)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _patch_failed(f"{op} operation does not apply: doc is missing key: {path!r}")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, allow_end=False))
    raise _patch_failed(f"{op} operation does not apply: doc is missing path: {path!r}")


def _add(doc: Json, path: str, value: Json) -> Json:
    tokens = _pointer(path)
    if not tokens:
        return copy.deepcopy(value)
    parent = _parent(doc, tokens, "add")
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = copy.deepcopy(value)
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, allow_end=True), copy.deepcopy(value))
    else:
        raise _patch_failed(f"add operation does not apply: doc is missing path: {path!r}")
    return doc


def json_patch(doc: Json, ops: Json) -> Json:
    """RFC 6902 JSON patch applied to a copy of `doc`; ApiStatus 422 when an op fails
    (`test` included), 400 when the patch is not a list of operations."""
    if not isinstance(ops, list):
        raise ApiStatus(400, "BadRequest", "json: cannot unmarshal object into Go value")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or not isinstance(op.get("path"), str):
            raise ApiStatus(400, "BadRequest", f"invalid JSON patch operation {op!r}")
        kind, path = op.get("op"), op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise _patch_failed(f"{kind} operation has no value")
        if kind == "add":
            doc = _add(doc, path, op["value"])
        elif kind == "remove":
            _remove(doc, path, "remove")
        elif kind == "replace":
            if _pointer(path):
                _remove(doc, path, "replace")
            doc = _add(doc, path, op["value"])
        elif kind in ("move", "copy"):
            source = op.get("from")
            if not isinstance(source, str):
                raise _patch_failed(f"{kind} operation has no 'from'")
            value = _remove(doc, source, kind) if kind == "move" else _get(doc, source, kind)
            doc = _add(doc, path, value)
        elif kind == "test":
            if _get(doc, path, "test") != op["value"]:
                raise _patch_failed(f"testing value {path} failed: test failed")
        else:
            raise _patch_failed(f"Unexpected kind: {kind}")
    return doc


# -- validation --------------------------------------------------------------------------------


def label_key_errors(key: str) -> list[str]:
    """Why `key` is not a valid label key (empty: it is), after IsQualifiedName."""
    prefix, slash, name = key.rpartition("/")
    errors = []
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        errors.append("prefix part must be a lowercase RFC 1123 subdomain")
    if not name or len(name) > 63 or not _NAME.fullmatch(name):
        errors.append(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character, at most 63 characters"
        )
    return errors


def _validate(name: str, node: NodeDoc) -> None:
    causes: list[tuple[str, str]] = []
    labels = node.get("metadata", {}).get("labels") or {}
    if not isinstance(labels, dict):
        causes.append(("metadata.labels", "must be a map of strings"))
        labels = {}
    for key, value in labels.items():
        for err in label_key_errors(key):
            causes.append(("metadata.labels", f'Invalid value: "{key}": {err}'))
        if not isinstance(value, str) or (
            value and (len(value) > 63 or not _NAME.fullmatch(value))
        ):
            causes.append(("metadata.labels", f"Invalid value: {value!r}: not a label value"))
    taints = (node.get("spec") or {}).get("taints") or []
    for i, taint in enumerate(taints if isinstance(taints, list) else [None]):
        where = f"spec.taints[{i}]"
        if not isinstance(taint, dict) or not isinstance(taint.get("key"), str):
            causes.append((where, "Required value: a taint needs a key"))
        elif taint.get("effect") not in _EFFECTS:
            causes.append((f"{where}.effect", f"Unsupported value: {taint.get('effect')!r}"))
        elif label_key_errors(taint["key"]):
            causes.append((f"{where}.key", f"Invalid value: {taint['key']!r}"))
    if node.get("metadata", {}).get("name") != name:
        raise ApiStatus(
            400,
            "BadRequest",
            f"the name of the object ({node.get('metadata', {}).get('name')}) does not match "
            f"the name on the URL ({name})",
        )
    if causes:
        raise _invalid(name, causes)


# -- state and server --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request as the fake saw it (for assertions on what a client sends)."""

    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None


@dataclass
class _State:
    """What the owner and the handler threads share; guarded by `lock`."""

    token: str | None
    nodes: dict[str, NodeDoc] = field(default_factory=dict)
    version: int = 1000  # one counter for every object, like etcd's revision
    counts: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    log: list[Request] = field(default_factory=list)
    # Queued failures: (status, as a Status object or as a proxy's HTML page); None: reset.
    fail: list[tuple[int, bool] | None] = field(default_factory=list)
    forbidden: set[str] = field(default_factory=set)
    before_patch: list[Callable[[NodeDoc], None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self, name: str, node: NodeDoc) -> NodeDoc:
        """Write `node` with a new resourceVersion (caller holds the lock)."""
        self.version += 1
        node["metadata"]["resourceVersion"] = str(self.version)
        self.nodes[name] = node
        return node


class _Server(LoopbackServer):
    def __init__(self, address: tuple[str, int], state: _State, control: bool) -> None:
        self.state = state
        self.control = control
        super().__init__(address, _Handler)


class _Handler(TrackedHandler):
    server_version = "syncbit-kubeapi"
    server: _Server

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        if self.server.control and method == "GET" and url.path == "/__stats":
            self._drain_body()
            with state.lock:
                stats = {
                    "requests": dict(state.counts),
                    "statuses": {str(k): v for k, v in state.statuses.items()},
                    "nodes": sorted(state.nodes),
                }
            self._json(200, stats)
            return
        ctype = self.headers.get("Content-Type")
        with state.lock:
            state.counts[method] += 1
            state.log.append(Request(method, url.path, parse_qs(url.query), ctype))
            failure = state.fail.pop(0) if state.fail else (0, True)
        body = self._read_body()
        if failure is None:
            self._reset()
            return
        code, as_status = failure
        if code and not as_status:  # a load balancer or proxy in front of the API server
            with state.lock:
                state.statuses[code] += 1
            page = f"<html><body><h1>{code} injected failure</h1></body></html>\n"
            self._simple(code, page, content_type="text/html")
            return
        try:
            if code:
                raise ApiStatus(
                    code,
                    _REASONS.get(code, "InternalError"),
                    "Internal error occurred: injected failure",
                    {"causes": [{"message": "injected failure"}]},
                )
            if state.token is not None and self.headers.get("Authorization") != (
                f"Bearer {state.token}"
            ):
                raise ApiStatus(401, "Unauthorized", "Unauthorized")
            status, doc = self._route(method, url.path, url.query, body, ctype)
        except ApiStatus as exc:
            status, doc = exc.code, exc.body()
        with state.lock:
            state.statuses[status] += 1
        self._json(status, doc)

    def _route(
        self, method: str, path: str, query: str, body: bytes, ctype: str | None
    ) -> tuple[int, Any]:
        state = self.server.state
        parts = [unquote(p) for p in path.split("/") if p]
        if parts[:3] != ["api", "v1", "nodes"] or len(parts) > 4:
            raise ApiStatus(404, "NotFound", "the server could not find the requested resource")
        verb = {"GET": "get" if len(parts) == 4 else "list", "PATCH": "patch"}.get(method)
        if verb is None or (verb == "patch" and len(parts) != 4):
            raise ApiStatus(
                405, "MethodNotAllowed", f"the server does not allow this method: {method}"
            )
        name = parts[3] if len(parts) == 4 else ""
        with state.lock:
            if verb in state.forbidden:
                what = f'nodes "{name}"' if name else "nodes"
                raise ApiStatus(
                    403,
                    "Forbidden",
                    f'{what} is forbidden: User "system:serviceaccount:syncbit:syncbit" '
                    f'cannot {verb} resource "nodes" in API group "" at the cluster scope',
                    {"name": name, "kind": "nodes"} if name else {"kind": "nodes"},
                )
            if verb == "list":
                items = [_public(n, listed=True) for _, n in sorted(state.nodes.items())]
                meta = {"resourceVersion": str(state.version)}
                return 200, {
                    "kind": "NodeList",
                    "apiVersion": "v1",
                    "metadata": meta,
                    "items": items,
                }
            if name not in state.nodes:
                raise _not_found(name)
            if verb == "get":
                return 200, _public(state.nodes[name])
            return 200, self._patch(name, parse_qs(query), body, ctype)

    def _patch(
        self, name: str, query: dict[str, list[str]], body: bytes, ctype: str | None
    ) -> NodeDoc:
        """Apply one PATCH (caller holds the lock)."""
        state = self.server.state
        media = (ctype or "").split(";")[0].strip().lower()
        if media not in _PATCH_TYPES:
            raise ApiStatus(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(_PATCH_TYPES)}",
            )
        try:
            patch = json.loads(body)
        except ValueError as exc:
            raise ApiStatus(400, "BadRequest", f"error decoding patch: {exc}") from None
        if state.before_patch:  # another writer got in first
            node = copy.deepcopy(state.nodes[name])
            state.before_patch.pop(0)(node)
            if node != state.nodes[name]:
                state.store(name, node)
        current = state.nodes[name]
        if media == JSON_PATCH:
            patched = json_patch(current, patch)
        else:
            if not isinstance(patch, dict):
                raise ApiStatus(400, "BadRequest", "error decoding patch: not a JSON object")
            patched = merge_patch(current, patch)
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise ApiStatus(400, "BadRequest", "the patched object is not a Node")
        sent_version = patched["metadata"].get("resourceVersion")
        if sent_version and sent_version != current["metadata"]["resourceVersion"]:
            raise _conflict(name)
        patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        _validate(name, patched)
        if patched == current or query.get("dryRun") == ["All"]:
            return _public(patched)
        return _public(state.store(name, patched))

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def _reset(self) -> None:
        """Abort the connection with a TCP RST and no answer (SO_LINGER 0, then close)."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _json(self, status: int, doc: Any) -> None:
        # Exactly `application/json`: lightkube only maps error bodies of that type to ApiError.
        self._simple(status, json.dumps(doc), content_type="application/json")


def _public(node: NodeDoc, listed: bool = False) -> NodeDoc:
    doc = copy.deepcopy(node)
    if listed:  # items of a typed list carry no apiVersion/kind
        doc.pop("apiVersion", None)
        doc.pop("kind", None)
    return doc


def parse_taint(spec: str) -> dict[str, str]:
    """`key[=value]:Effect` (kubectl taint syntax) -> a taint object."""
    key_value, sep, effect = spec.rpartition(":")
    if not sep or effect not in _EFFECTS or not key_value:
        raise ValueError(f"not a taint: {spec!r} (use KEY[=VALUE]:{'|'.join(_EFFECTS)})")
    key, eq, value = key_value.partition("=")
    taint = {"key": key, "effect": effect}
    if eq:
        taint["value"] = value
    return taint


def write_kubeconfig(
    path: str | Path, server: str, token: str | None, context: str = "syncbit-test"
) -> Path:
    """Write a kubeconfig (YAML is a superset of JSON) that points at `server` with a
    bearer `token`; what lightkube's `KubeConfig.from_file` and kubectl read."""
    user: dict[str, str] = {"token": token} if token is not None else {}
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": server}}],
        "users": [{"name": context, "user": user}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        "current-context": context,
    }
    path = Path(path)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


class KubeAPI(ServedInThread):
    """A fake Kubernetes API server holding Nodes, on `host:port` (0 = any free port).

    Every request needs `Authorization: Bearer <token>` (`token=None` turns auth off).
    A stopped server may be started again on the same port, with the same Nodes.
    """

    def __init__(
        self,
        token: str | None = DEFAULT_TOKEN,
        port: int = 0,
        host: str = "127.0.0.1",
        control: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.control = control
        self._state = _State(token)

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, as kubeconfig `server:` fields spell it."""
        return f"http://{self.host}:{self.port}"

    @property
    def token(self) -> str | None:
        return self._state.token

    # -- nodes -----------------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        taints: Iterable[dict[str, str]] = (),
    ) -> NodeDoc:
        """Register a Node as the kubelet would (with its hostname label)."""
        node: NodeDoc = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _CREATED,
                "labels": {"kubernetes.io/hostname": name, **(labels or {})},
            },
            "spec": {},
            "status": {},
        }
        taint_list = [dict(t) for t in taints]
        if taint_list:
            node["spec"]["taints"] = taint_list
        with self._state.lock:
            return copy.deepcopy(self._state.store(name, node))

    def node(self, name: str) -> NodeDoc:
        """A copy of the stored Node (KeyError if unknown)."""
        with self._state.lock:
            return copy.deepcopy(self._state.nodes[name])

    def labels(self, name: str) -> dict[str, str]:
        return dict(self.node(name)["metadata"].get("labels") or {})

    def taints(self, name: str) -> list[dict[str, str]]:
        return list(self.node(name).get("spec", {}).get("taints") or [])

    def modify(self, name: str, change: Callable[[NodeDoc], None]) -> NodeDoc:
        """Another writer: apply `change` to the Node now and bump its resourceVersion."""
        with self._state.lock:
            node = copy.deepcopy(self._state.nodes[name])
            change(node)
            return copy.deepcopy(self._state.store(name, node))

    def before_next_patch(self, change: Callable[[NodeDoc], None]) -> None:
        """Another writer that gets in between a client's GET and its PATCH: `change` is
        applied (and the resourceVersion bumped) just before the next PATCH is handled.
        Each call covers one PATCH: call it N times to make N PATCHes in a row meet one."""
        with self._state.lock:
            self._state.before_patch.append(change)

    # -- failures and accounting -----------------------------------------------------------

    def fail_next(self, count: int = 1, status: int = 500, status_object: bool = True) -> None:
        """Answer the next `count` requests with HTTP `status`: a `Status` object (500:
        InternalError), or with `status_object=False` an HTML page, as a load balancer or
        proxy in front of the API server does."""
        with self._state.lock:
            self._state.fail.extend([(status, status_object)] * count)

    def reset_next(self, count: int = 1) -> None:
        """Abort the next `count` requests: read them, then reset the connection."""
        with self._state.lock:
            self._state.fail.extend([None] * count)

    def forbid(self, *verbs: str) -> None:
        """Answer 403 to these verbs ('get', 'list', 'patch'), as a missing RBAC rule does;
        no arguments: allow everything again."""
        with self._state.lock:
            self._state.forbidden = set(verbs)

    @property
    def counts(self) -> Counter[str]:
        """Requests received, by HTTP method (injected failures included)."""
        with self._state.lock:
            return Counter(self._state.counts)

    @property
    def statuses(self) -> Counter[int]:
        """Answers sent, by HTTP status (resets are not answers)."""
        with self._state.lock:
            return Counter(self._state.statuses)

    @property
    def requests(self) -> list[Request]:
        with self._state.lock:
            return list(self._state.log)

    def reset_counts(self) -> None:
        with self._state.lock:
            self._state.counts.clear()
            self._state.statuses.clear()
            self._state.log.clear()

    def write_kubeconfig(self, path: str | Path, token: str | None = None) -> Path:
        """A kubeconfig for this server, with its token (or `token`, e.g. a wrong one)."""
        return write_kubeconfig(path, self.url, token if token is not None else self.token)

    # -- lifecycle -------------------------------------------------------------------------

    def _make_server(self) -> _Server:
        return _Server((self.host, self.port), self._state, self.control)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m syncbit_testing.kubeapi",
        description="fake Kubernetes API server (Nodes only) on loopback",
    )
    parser.add_argument("--node", action="append", required=True, help="a Node (repeatable)")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE on every Node")
    parser.add_argument(
        "--taint", action="append", default=[], help="KEY[=VALUE]:EFFECT on every Node"
    )
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the bearer token to accept")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig for it here")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    try:
        labels = dict(_split_label(s) for s in args.label)
        taints = [parse_taint(s) for s in args.taint]
        api = KubeAPI(token=args.token, port=args.port, host=args.host, control=True)
        for name in args.node:
            api.add_node(name, labels, taints)
        api.start()
        if args.kubeconfig is not None:
            api.write_kubeconfig(args.kubeconfig)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"URL {api.url}", flush=True)
    print(f"TOKEN {api.token}", flush=True)
    return serve_until_signal(api)


def _split_label(spec: str) -> tuple[str, str]:
    key, sep, value = spec.partition("=")
    if not sep or label_key_errors(key):
        raise ValueError(f"not a label: {spec!r} (use KEY=VALUE)")
    return key, value


if __name__ == "__main__":
    sys.exit(main())
