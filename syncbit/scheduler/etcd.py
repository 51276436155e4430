"""An async etcd v3 client for trio, spoken over etcd's own JSON gateway with httpx.

Owns the wire format (base64 keys and values, 64-bit integers as strings, the gateway's two
error shapes), endpoint failover, timeouts, etcd authentication, and the mapping of every
etcd and transport failure onto syncbit's errors. It must never resend a write whose
outcome is unknown, never return an unbounded range, and never block the trio loop.

Why the gateway and not a client library: etcd serves its v3 API as JSON over HTTP on the
client port (`/v3/kv/range`, `/v3/kv/txn`, `/v3/lease/...`, `/v3/watch` as a stream of
JSON lines) in every 3.4+ release; httpx is already a dependency and runs on trio. The
Python libraries are unmaintained (python-etcd3: last release 2020, breaks on current
protobuf) or asyncio-only (aetcd), and bring a gRPC stack for what fits in this module.
Limits of the gateway, and what this module does about them:

- Bidirectional streams are one request each: a keep-alive is one POST, a watch is one
  POST whose response streams; so each watch holds one HTTP connection.
- A watch never ends by itself when its member loses the cluster; every request carries
  gRPC metadata `hasleader` (header `Grpc-Metadata-hasleader`), so a member without a
  leader refuses at once (a write is then safe to send elsewhere) and cancels its watches,
  and a watch silent for `idle_timeout` is reopened (a stopped member answers nothing).
- Requests are limited by the server's `--max-request-bytes` (1.5 MiB by default): a
  larger put fails with `StateLimitError`; `syncbit.scheduler.kv_etcd` splits big values.

Failover: the endpoint that answered last is tried first. A failure that proves the
request was not processed (connection refused, "no leader", "too many requests") moves to
the next endpoint at once, passes repeat with a short backoff until the call's `timeout`;
a read is also retried after a timeout or a dropped connection, a write never is (its
outcome is unknown: `StateUnavailableError` says so).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from syncbit.errors import (
    ConfigError,
    LeaseExpiredError,
    RevisionCompactedError,
    SchedulerError,
    StateLimitError,
    StateUnavailableError,
)
from syncbit.retry import backoff_delays

log = logging.getLogger("syncbit.etcd")

MAX_PAGE = 10_000  # keys per range answer: no answer is unbounded
DEFAULT_PAGE = 1000
# gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html) etcd uses.
_INVALID_ARGUMENT = 3
_NOT_FOUND = 5
_PERMISSION_DENIED = 7
_RESOURCE_EXHAUSTED = 8
_FAILED_PRECONDITION = 9
_OUT_OF_RANGE = 11
_UNAVAILABLE = 14
_UNAUTHENTICATED = 16
# Sent with every request but stale reads: a member without a raft leader refuses at once
# (instead of after its own 5-7 s request timeout) and cancels the watches it serves.
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}
# A watch connection whose unread answers exceed this is closed and resumed later, from
# the first revision not yet delivered: a slow consumer costs a reconnect, not memory.
_MAX_WATCH_BUFFER = 64 * 2**20


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes [prefix, end) every key starting with `prefix`."""
    raw = bytearray(prefix)
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\x00"  # etcd: from `key` to the end of the keyspace


def parse_endpoints(url: str) -> list[str]:
    """`etcd://h1:2379,h2:2379` (plain HTTP) or `etcds://...` (TLS) -> base URLs.

    Also takes comma-separated http(s):// URLs. Credentials never go in the URL (it is
    logged and shown by `ps`): ConfigError says where they belong."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    schemes = {"etcd": "http", "etcds": "https", "http": "http", "https": "https"}
    if not sep or scheme not in schemes:
        raise ConfigError(f"etcd endpoints {url!r}: expected etcd://host:port[,host:port...]")
    endpoints: list[str] = []
    for part in rest.split(","):
        item = part.strip().rstrip("/")
        if "://" in item:  # http://a:1,http://b:2
            inner, _, item = item.partition("://")
            if inner not in ("http", "https"):
                raise ConfigError(f"etcd endpoint {part!r}: unknown scheme {inner!r}")
            item_scheme = inner
        else:
            item_scheme = schemes[scheme]
        parsed = urlsplit(f"{item_scheme}://{item}")
        if "@" in item:
            raise ConfigError(
                "etcd credentials do not belong in the endpoint URL (it is logged): "
                "use the username and password file options"
            )
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not parsed.hostname or port is None or parsed.path not in ("", "/"):
            raise ConfigError(f"etcd endpoint {part.strip()!r}: expected host:port")
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        endpoints.append(f"{item_scheme}://{host}:{port}")
    return endpoints


# -- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd stores it. Revisions are store-wide counters: `create_revision` of
    the write that created this incarnation of the key, `mod_revision` of the last write;
    `version` counts writes since creation; `lease` is 0 when none is attached."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(doc.get("key")),
            value=_unb64(doc.get("value")),
            create_revision=int(doc.get("create_revision", 0)),
            mod_revision=int(doc.get("mod_revision", 0)),
            version=int(doc.get("version", 0)),
            lease=int(doc.get("lease", 0)),
        )


@dataclass(frozen=True, slots=True)
class RangeResult:
    """One page of a range: `kvs` in key order, `more` when keys beyond the limit exist,
    `count` of all keys in the range, `revision` the store revision it was read at."""

    kvs: list[KeyValue]
    more: bool
    count: int
    revision: int


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: int
    revision: int


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Whether every compare held, the revision after the transaction, and one result per
    operation of the branch that ran (in order)."""

    succeeded: bool
    revision: int
    results: list[RangeResult | PutResult | DeleteResult]


class Target(enum.Enum):
    """What of a key a `Compare` looks at."""

    VERSION = "version"
    CREATE = "create_revision"
    MOD = "mod_revision"
    VALUE = "value"
    LEASE = "lease"


class Order(enum.Enum):
    EQUAL = "EQUAL"
    NOT_EQUAL = "NOT_EQUAL"
    LESS = "LESS"
    GREATER = "GREATER"


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction, e.g. `Compare(key, Target.MOD, 42)`: the key was
    last written at revision 42. An absent key has version and revisions 0."""

    key: bytes
    target: Target
    value: int | bytes
    order: Order = Order.EQUAL

    @classmethod
    def absent(cls, key: bytes) -> Compare:
        return cls(key, Target.CREATE, 0)

    @classmethod
    def created_at(cls, key: bytes, revision: int) -> Compare:
        return cls(key, Target.CREATE, revision)

    @classmethod
    def modified_at(cls, key: bytes, revision: int) -> Compare:
        return cls(key, Target.MOD, revision)

    def holds(self, kv: KeyValue | None) -> bool:
        """Evaluate locally against a key read in the same revision (None: absent)."""
        if self.target is Target.VALUE:
            if kv is None:
                return False  # etcd: a value compare on an absent key fails
            mine: int | bytes = kv.value
        else:
            mine = 0 if kv is None else int(getattr(kv, self.target.value))
        want = self.value
        if self.order is Order.EQUAL:
            return mine == want
        if self.order is Order.NOT_EQUAL:
            return mine != want
        if self.order is Order.LESS:
            return mine < want  # type: ignore[operator]
        return mine > want  # type: ignore[operator]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "key": _b64(self.key),
            "target": self.target.name,
            "result": self.order.value,
        }
        if self.target is Target.VALUE:
            doc["value"] = _b64(self.value if isinstance(self.value, bytes) else b"")
        else:
            doc[self.target.value] = str(int(self.value))
        return doc


@dataclass(frozen=True, slots=True)
class PutOp:
    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            doc["lease"] = str(self.lease)
        return {"request_put": doc}


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """Delete `key`, or every key in [key, range_end) when `range_end` is given."""

    key: bytes
    range_end: bytes = b""

    def to_json(self) -> dict[str, Any]:
        doc = {"key": _b64(self.key)}
        if self.range_end:
            doc["range_end"] = _b64(self.range_end)
        return {"request_delete_range": doc}


@dataclass(frozen=True, slots=True)
class RangeOp:
    """Read `key` (or [key, range_end)) inside a transaction, at most `limit` keys."""

    key: bytes
    range_end: bytes = b""
    limit: int = 1

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": _b64(self.key), "limit": str(_check_limit(self.limit))}
        if self.range_end:
            doc["range_end"] = _b64(self.range_end)
        return {"request_range": doc}


Op = PutOp | DeleteOp | RangeOp


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease: its id and the TTL in seconds etcd granted (may exceed the ask)."""

    id: int
    ttl: int


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class Event:
    """One change seen by a watch; for DELETE, `kv` has the key and the deleting revision
    as `mod_revision`, and an empty value."""

    type: EventType
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """What a watch delivers: events of one or more revisions, in order, and the revision
    up to which the watcher has now seen everything.

    `compacted` means the history the watcher asked for is gone: `events` is empty, and
    the watcher must re-read the watched range at `revision` (a range read with that
    revision); the next batch holds only changes after `revision`."""

    events: list[Event]
    revision: int
    compacted: bool = False


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"range limit must be 1-{MAX_PAGE}, not {limit}")
    return limit


def _range_result(doc: dict[str, Any]) -> RangeResult:
    return RangeResult(
        kvs=[KeyValue.from_json(kv) for kv in doc.get("kvs", [])],
        more=bool(doc.get("more", False)),
        count=int(doc.get("count", 0)),
        revision=int(doc.get("header", {}).get("revision", 0)),
    )


# -- failures ------------------------------------------------------------------------------------


class _Outcome(enum.Enum):
    """What a failed attempt says about the request."""

    REFUSED = "refused"  # not processed: safe to send to the next endpoint, also a write
    UNKNOWN = "unknown"  # maybe processed: only a read may be sent again
    AUTH = "auth"  # our auth token expired: authenticate again, then resend


@dataclass(frozen=True, slots=True)
class _Failed:
    outcome: _Outcome
    reason: str


def _gateway_error(doc: Any) -> tuple[int, str] | None:
    """(gRPC code, message) of an error answer in either of the gateway's shapes."""
    if not isinstance(doc, dict) or "error" not in doc:
        return None
    error = doc["error"]
    if isinstance(error, dict):  # streams: {"error": {"grpc_code", "message", ...}}
        return int(error.get("grpc_code", 2)), str(error.get("message", ""))
    return int(doc.get("code", 2)), str(doc.get("message") or error)


def _raise_permanent(code: int, message: str, what: str, username: str | None) -> None:
    """Raise the syncbit error for an etcd error no other endpoint would answer differently;
    return for the temporary ones (and for an expired auth token: log in again)."""
    if code in (_INVALID_ARGUMENT, _RESOURCE_EXHAUSTED) and (
        "too large" in message or "larger than max" in message
    ):
        raise StateLimitError(
            f"etcd refused {what}: {message} (the server's --max-request-bytes, 1.5 MiB by "
            "default, bounds every request)"
        )
    if code == _OUT_OF_RANGE and "compacted" in message:
        raise RevisionCompactedError(f"etcd: {what}: {message}")
    if code == _NOT_FOUND and "lease" in message:
        raise LeaseExpiredError(f"etcd: {what}: {message}")
    if code == _PERMISSION_DENIED or "permission denied" in message:
        raise ConfigError(f"etcd user {username or '(none)'} may not {what}: {message}")
    if code != _UNAUTHENTICATED and ("authentication" in message or "user name" in message):
        raise ConfigError(f"etcd login as {username or '(none)'} failed: {message}")
    if code in (_INVALID_ARGUMENT, _FAILED_PRECONDITION, _OUT_OF_RANGE, _NOT_FOUND):
        raise SchedulerError(f"etcd refused {what}: {message}")


def _classify(code: int, message: str) -> _Failed:
    if code == _UNAUTHENTICATED:
        return _Failed(_Outcome.AUTH, message)
    if code == _UNAVAILABLE and "no leader" in message:
        return _Failed(_Outcome.REFUSED, "no leader (no quorum?)")
    if code == _RESOURCE_EXHAUSTED and "too many requests" in message:
        return _Failed(_Outcome.REFUSED, message)
    return _Failed(_Outcome.UNKNOWN, message or f"gRPC code {code}")


class _Body(httpx.AsyncByteStream):
    """A request body that is an iterator object, not an async generator.

    httpx's own body streams are async generators; a request cancelled while its body is
    being sent leaves one suspended for the garbage collector to finalise, and trio
    warns. This one holds no frame: nothing is left behind."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


# -- the client ------------------------------------------------------------------------------


class EtcdClient:
    """A client of one etcd cluster through several endpoints (see the module docstring).

    Args:
        endpoints: base URLs (`http://host:2379`), or one `etcd://h1:2379,h2:2379` string.
        timeout: seconds one call may take in all, over every endpoint and retry.
        attempt_timeout: seconds one endpoint gets to answer before a read moves on.
        connect_timeout: seconds to connect to one endpoint.
        username, password: etcd's own authentication (a token is fetched and renewed).
        ca_file, cert_file, key_file: TLS: the CA that signed the servers' certificates,
            and a client certificate and key when etcd wants one.
        transport: an httpx transport (tests); the default is httpx's own.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        timeout: float = 5.0,
        attempt_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        urls = parse_endpoints(endpoints) if isinstance(endpoints, str) else list(endpoints)
        if not urls:
            raise ConfigError("etcd: no endpoints given")
        self.endpoints = [u.rstrip("/") for u in urls]
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.connect_timeout = min(connect_timeout, attempt_timeout)
        self.username = username
        self._password = password
        if (username is None) != (password is None):
            raise ConfigError("etcd: give both a username and a password, or neither")
        verify: ssl.SSLContext | bool = True
        if ca_file is not None or cert_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
                if cert_file is not None:
                    verify.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"etcd TLS files: {exc}") from exc
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(attempt_timeout, connect=self.connect_timeout),
            verify=verify,
            transport=transport,
            trust_env=False,  # etcd is reached directly; never through a proxy from the env
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
        )
        self._current = 0
        self._token: str | None = None
        self._auth_lock = trio.Lock()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- plumbing ------------------------------------------------------------------------------

    def _rotation(self) -> list[str]:
        n = len(self.endpoints)
        return [self.endpoints[(self._current + i) % n] for i in range(n)]

    def _headers(self, stale_ok: bool) -> dict[str, str]:
        headers = {} if stale_ok else dict(_REQUIRE_LEADER)
        if self._token is not None:
            headers["Authorization"] = self._token
        return headers

    def _request(
        self, url: str, body: dict[str, Any], headers: dict[str, str], timeout: httpx.Timeout
    ) -> httpx.Request:
        request = self._http.build_request(
            "POST",
            url,
            content=json.dumps(body).encode(),
            headers={**headers, "Content-Type": "application/json"},
            timeout=timeout,
        )
        request.stream = _Body(request.content)
        return request

    async def _attempt(
        self,
        endpoint: str,
        path: str,
        body: dict[str, Any],
        *,
        stale_ok: bool,
        what: str,
        read_timeout: float,
    ) -> dict[str, Any] | _Failed:
        """One POST to one endpoint: the answer, or how it failed (permanent errors raise)."""
        resp: httpx.Response | None = None
        request = self._request(
            endpoint + path,
            body,
            self._headers(stale_ok),
            httpx.Timeout(read_timeout, connect=self.connect_timeout),
        )
        # httpx bounds each socket operation; this bounds the attempt as a whole.
        with trio.move_on_after(self.connect_timeout + read_timeout):
            try:
                resp = await self._http.send(request)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                return _Failed(_Outcome.REFUSED, f"cannot connect: {exc or type(exc).__name__}")
            except httpx.TimeoutException:
                pass
            except httpx.HTTPError as exc:
                return _Failed(_Outcome.UNKNOWN, f"{type(exc).__name__}: {exc}")
        if resp is None:
            return _Failed(_Outcome.UNKNOWN, f"no answer within {read_timeout:.3g}s")
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.status_code == 404 and doc is None:
            raise SchedulerError(
                f"{endpoint} does not serve etcd's v3 JSON API ({path} not found): "
                "etcd 3.4 or later is needed"
            )
        error = _gateway_error(doc)
        if error is None and resp.status_code == 200 and isinstance(doc, dict):
            return doc
        code, message = error or (2, f"HTTP {resp.status_code}: {resp.text[:200]}")
        _raise_permanent(code, message, what, self.username)
        return _classify(code, message)

    async def _login(self, endpoint: str) -> _Failed | None:
        """Fetch an auth token with the username and password unless one is held; None
        when there is one (or no auth is configured), else why it could not be had."""
        if self.username is None or self._token is not None:
            return None
        async with self._auth_lock:
            if self._token is not None:
                return None
            body = {"name": self.username, "password": self._password}
            found = await self._attempt(
                endpoint,
                "/v3/auth/authenticate",
                body,
                stale_ok=False,
                what="login",
                read_timeout=self.attempt_timeout,
            )
            if isinstance(found, _Failed):
                return found
            token = str(found.get("token", ""))
            if not token:
                raise ConfigError(f"etcd at {endpoint} gave no auth token to {self.username!r}")
            self._token = token
            return None

    async def _call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        write: bool,
        what: str,
        stale_ok: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """POST to the first endpoint that answers (see the module docstring). A write
        waits for its answer as long as the call's budget allows: it cannot move on."""
        budget = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + budget
        errors: dict[str, str] = {}
        sent_write = False
        with trio.move_on_after(budget):
            delays = backoff_delays(base=0.05, cap=0.5)
            while True:
                for endpoint in self._rotation():
                    found: dict[str, Any] | _Failed | None = await self._login(endpoint)
                    if found is None:
                        left = max(deadline - trio.current_time(), 0.001)
                        sent_write = write
                        found = await self._attempt(
                            endpoint,
                            path,
                            body,
                            stale_ok=stale_ok,
                            what=what,
                            read_timeout=left if write else min(left, self.attempt_timeout),
                        )
                        sent_write = False
                    if not isinstance(found, _Failed):
                        assert found is not None
                        self._current = self.endpoints.index(endpoint)
                        return found
                    if found.outcome is _Outcome.AUTH:
                        self._token = None  # refused before processing: log in, send again
                    elif found.outcome is _Outcome.UNKNOWN and write:
                        raise StateUnavailableError(
                            f"etcd at {endpoint} did not confirm {what}: {found.reason}; "
                            "it may or may not have happened"
                        )
                    errors[endpoint] = found.reason
                await trio.sleep(next(delays))
        detail = "; ".join(f"{ep}: {why}" for ep, why in errors.items()) or "no answer"
        # The deadline can fall while a write is on its way: then nobody knows its fate.
        fate = "; the last attempt may or may not have happened" if sent_write else ""
        raise StateUnavailableError(
            f"etcd is unavailable (down or without quorum): {what} failed within "
            f"{budget:g}s: {detail}{fate}"
        )

    # -- key-value -----------------------------------------------------------------------------

    async def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        limit: int = DEFAULT_PAGE,
        revision: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        stale_ok: bool = False,
        timeout: float | None = None,
    ) -> RangeResult:
        """Keys in [key, range_end) (just `key` without an end), at most `limit` of them,
        in key order; at `revision` when given (RevisionCompactedError if compacted).
        `stale_ok` reads the answering member's local copy: it works without a quorum,
        and may lag behind the cluster."""
        body: dict[str, Any] = {"key": _b64(key), "limit": str(_check_limit(limit))}
        if range_end:
            body["range_end"] = _b64(range_end)
        if revision:
            body["revision"] = str(revision)
        if keys_only:
            body["keys_only"] = True
        if count_only:
            body["count_only"] = True
        if stale_ok:
            body["serializable"] = True
        doc = await self._call(
            "/v3/kv/range", body, write=False, what="read", stale_ok=stale_ok, timeout=timeout
        )
        return _range_result(doc)

    async def range_prefix(
        self,
        prefix: bytes,
        *,
        after: bytes | None = None,
        limit: int = DEFAULT_PAGE,
        revision: int = 0,
        keys_only: bool = False,
        stale_ok: bool = False,
    ) -> RangeResult:
        """One page of the keys starting with `prefix`: those after key `after` (the last
        key of the previous page), at most `limit`. Read the next pages at the first page's
        `revision` for one consistent view."""
        start = (prefix or b"\x00") if after is None else after + b"\x00"
        return await self.range(
            start,
            prefix_end(prefix),
            limit=limit,
            revision=revision,
            keys_only=keys_only,
            stale_ok=stale_ok,
        )

    async def get(self, key: bytes, *, stale_ok: bool = False) -> KeyValue | None:
        """The key, or None if absent."""
        found = await self.range(key, limit=1, stale_ok=stale_ok)
        return found.kvs[0] if found.kvs else None

    async def revision(self, *, stale_ok: bool = False) -> int:
        """The store's current revision."""
        return (await self.range(b"\x00", count_only=True, limit=1, stale_ok=stale_ok)).revision

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write `key`; the revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        doc = await self._call("/v3/kv/put", body, write=True, what=f"put {key!r}")
        return int(doc.get("header", {}).get("revision", 0))

    async def delete(self, key: bytes, range_end: bytes = b"") -> int:
        """Delete `key` (or [key, range_end)); how many keys were deleted."""
        body = {"key": _b64(key)}
        if range_end:
            body["range_end"] = _b64(range_end)
        doc = await self._call("/v3/kv/deleterange", body, write=True, what=f"delete {key!r}")
        return int(doc.get("deleted", 0))

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """If every compare holds, run `success`, else `failure`: atomically, at one
        revision. etcd allows 128 operations per transaction (`--max-txn-ops`)."""
        body = {
            "compare": [c.to_json() for c in compares],
            "success": [op.to_json() for op in success],
            "failure": [op.to_json() for op in failure],
        }
        doc = await self._call("/v3/kv/txn", body, write=True, what="transaction")
        revision = int(doc.get("header", {}).get("revision", 0))
        results: list[RangeResult | PutResult | DeleteResult] = []
        for item in doc.get("responses", []):
            if "response_range" in item:
                results.append(_range_result(item["response_range"]))
            elif "response_put" in item:
                results.append(PutResult(revision))
            elif "response_delete_range" in item:
                deleted = int(item["response_delete_range"].get("deleted", 0))
                results.append(DeleteResult(deleted, revision))
        return TxnResult(bool(doc.get("succeeded", False)), revision, results)

    async def compact(self, revision: int) -> None:
        """Drop the history before `revision` (etcd keeps every revision until compacted)."""
        body = {"revision": str(revision), "physical": True}
        await self._call("/v3/kv/compaction", body, write=True, what="compaction")

    # -- leases --------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> Lease:
        """A new lease of at least `ttl` seconds (etcd raises a TTL below its minimum)."""
        doc = await self._call("/v3/lease/grant", {"TTL": str(ttl)}, write=True, what="lease grant")
        return Lease(int(doc["ID"]), int(doc["TTL"]))

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Renew a lease; the TTL it now has, 0 if it is gone (expired or revoked).

        A renewal is idempotent, so it is retried on other endpoints like a read."""
        doc = await self._call(
            "/v3/lease/keepalive",
            {"ID": str(lease_id)},
            write=False,
            what="lease keep-alive",
            timeout=timeout,
        )
        result = doc.get("result", doc)
        return int(result.get("TTL", 0))

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on a lease, -1 if it is gone."""
        doc = await self._call(
            "/v3/lease/timetolive", {"ID": str(lease_id)}, write=False, what="lease lookup"
        )
        return int(doc.get("TTL", -1))

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        """Revoke a lease and delete its keys; a lease already gone is fine."""
        with contextlib.suppress(LeaseExpiredError):
            await self._call(
                "/v3/lease/revoke",
                {"ID": str(lease_id)},
                write=True,
                what="lease revoke",
                timeout=timeout,
            )

    # -- watches -------------------------------------------------------------------------------

    def watch(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        start_revision: int = 0,
        idle_timeout: float = 30.0,
    ) -> Watch:
        """Changes to `key` (or [key, range_end)) from `start_revision` (0: those after
        the watch is entered), as an async context manager and iterator of `WatchBatch`es.
        It reconnects to another endpoint by itself and resumes where it stopped; a gap in
        history (the revision was compacted) arrives as a batch with `compacted=True`."""
        return Watch(self, key, range_end, start_revision, idle_timeout)


class _Stream:
    """One watch connection: the bytes its reader task received, and how it ended.

    Its reader is the only code that iterates the response, and it is only ever stopped
    by cancellation while it awaits the network: httpx's byte iterators are nested async
    generators, and one abandoned between two chunks is finalised by the garbage collector
    (trio warns); cancelled inside an await, they all unwind at once."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ended = False
        self.arrived = trio.Event()
        self.scope = trio.CancelScope()

    def wake(self) -> None:
        self.arrived.set()
        self.arrived = trio.Event()

    async def read(self, resp: httpx.Response) -> None:
        with self.scope:
            try:
                async for chunk in resp.aiter_raw():
                    self.buffer += chunk
                    if len(self.buffer) > _MAX_WATCH_BUFFER:
                        self.scope.cancel()  # lands inside the next read; the consumer resumes
                    self.wake()
            except httpx.HTTPError:
                pass
        with trio.CancelScope(shield=True):
            await resp.aclose()
        self.ended = True
        self.wake()


class Watch:
    """One watch (see `EtcdClient.watch`); iterate it inside its `async with` block. Never
    ends on its own: the consumer stops it by leaving the block (or by cancellation).
    Temporary failures reconnect with backoff and are logged; only permanent errors
    (authentication, permissions) raise."""

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        idle_timeout: float,
    ) -> None:
        self._client = client
        self._key = key
        self._range_end = range_end
        self._next = start_revision  # the first revision not delivered yet
        self._idle = idle_timeout
        self._stream: _Stream | None = None
        self._nursery: trio.Nursery | None = None
        self._lifetime: AbstractAsyncContextManager[Watch] | None = None
        self._delays = backoff_delays(base=0.05, cap=2.0)

    async def __aenter__(self) -> Watch:
        if self._lifetime is not None:
            raise RuntimeError("a Watch is entered once")
        if not self._next:  # "from now" is now, not when the stream happens to open
            self._next = await self._client.revision() + 1
        self._lifetime = self._open_nursery()
        return await self._lifetime.__aenter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._lifetime is not None
        return await self._lifetime.__aexit__(*exc)

    @asynccontextmanager
    async def _open_nursery(self) -> AsyncIterator[Watch]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def __aiter__(self) -> Watch:
        return self

    @property
    def next_revision(self) -> int:
        """The first revision this watch has not delivered yet."""
        return self._next

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.scope.cancel()  # its reader closes the response
            self._stream = None

    async def _open(self, endpoint: str) -> str | None:
        """Open the stream on `endpoint`; None, or why it failed."""
        client = self._client
        failed = await client._login(endpoint)
        if failed is not None:
            return failed.reason
        create: dict[str, Any] = {"key": _b64(self._key)}
        if self._range_end:
            create["range_end"] = _b64(self._range_end)
        if self._next:
            create["start_revision"] = str(self._next)
        request = client._request(
            endpoint + "/v3/watch",
            {"create_request": create},
            client._headers(stale_ok=False),
            httpx.Timeout(client.attempt_timeout, read=None),
        )
        resp: httpx.Response | None = None
        with trio.move_on_after(client.connect_timeout + client.attempt_timeout):
            try:
                resp = await client._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"
        if resp is None:
            return "no answer"
        if resp.status_code != 200:
            await resp.aclose()
            return f"HTTP {resp.status_code}"
        if self._nursery is None:
            await resp.aclose()
            raise RuntimeError("iterate a Watch inside its `async with` block")
        self._stream = _Stream()
        self._nursery.start_soon(self._stream.read, resp)
        return None

    async def _connect(self) -> None:
        """Open the stream on the first endpoint that takes it; with backoff, until one does."""
        client = self._client
        while True:
            failures: list[str] = []
            for endpoint in client._rotation():
                why = await self._open(endpoint)
                if why is None:
                    return
                failures.append(f"{endpoint}: {why}")
            log.warning("etcd watch: no endpoint answered: %s", "; ".join(failures))
            await trio.sleep(next(self._delays))

    async def _line(self, stream: _Stream) -> bytes | None:
        """The next JSON line of the stream; None when the stream ended or went silent."""
        with trio.move_on_after(self._idle):
            while True:
                end = stream.buffer.find(b"\n")
                if end >= 0:
                    line = bytes(stream.buffer[:end])
                    del stream.buffer[: end + 1]
                    return line
                if stream.ended:
                    return None
                await stream.arrived.wait()
        return None

    async def _now(self) -> int:
        """The store's revision now, however long etcd takes to answer."""
        while True:
            try:
                return await self._client.revision()
            except StateUnavailableError as exc:
                log.warning("etcd watch: cannot read the revision to resume at: %s", exc)
                await trio.sleep(next(self._delays))

    def _drop(self, why: str) -> None:
        """Close the stream and move to the next endpoint (a member that failed us)."""
        log.info("etcd watch: %s; reconnecting", why)
        self._close()
        client = self._client
        client._current = (client._current + 1) % len(client.endpoints)

    async def __anext__(self) -> WatchBatch:
        client = self._client
        while True:
            if self._stream is None:
                await self._connect()
            assert self._stream is not None
            line = await self._line(self._stream)
            if line is None:
                self._close()  # silent or closed: reconnect, resume at self._next
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                self._drop("unreadable answer")
                continue
            error = _gateway_error(doc)
            if error is not None:
                code, message = error
                _raise_permanent(code, message, "watch", client.username)
                if code == _UNAUTHENTICATED:
                    client._token = None
                self._drop(message)
                continue
            result = doc.get("result", {})
            header_rev = int(result.get("header", {}).get("revision", 0))
            if result.get("canceled"):
                if "compact_revision" in result:
                    # The history asked for is gone: the watcher re-reads at `now`.
                    self._close()
                    now = await self._now()
                    self._next = now + 1
                    return WatchBatch([], now, compacted=True)
                reason = str(result.get("cancel_reason", "canceled"))
                denied = _PERMISSION_DENIED if "denied" in reason else 0
                _raise_permanent(denied, reason, "watch", client.username)
                if "auth token" in reason:
                    client._token = None
                self._drop(reason)
                continue
            self._delays = backoff_delays(base=0.05, cap=2.0)  # connected: reset the backoff
            if result.get("created"):
                continue
            events = [
                Event(EventType(ev.get("type", "PUT")), KeyValue.from_json(ev.get("kv", {})))
                for ev in result.get("events", [])
            ]
            if events:
                self._next = events[-1].kv.mod_revision + 1
                return WatchBatch(events, events[-1].kv.mod_revision)
            if header_rev >= self._next:  # a progress notification
                self._next = header_rev + 1
