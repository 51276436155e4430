"""The etcd v3 JSON gateway's wire format, without I/O: base64 keys and values, 64-bit
integers as strings, range/put/delete/txn results, transaction compares and operations,
leases, watch events, endpoint URLs, and the gateway's two error shapes mapped onto
syncbit's errors (which failures prove a request was not processed). `etcd.EtcdClient`
and `etcd_watch.Watch` speak it; nothing here sends a byte.
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from syncbit.errors import (
    ConfigError,
    LeaseExpiredError,
    RevisionCompactedError,
    SchedulerError,
    StateLimitError,
)

MAX_PAGE = 10_000  # keys per range answer: no answer is unbounded
DEFAULT_PAGE = 1000
# gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html) etcd uses.
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_FAILED_PRECONDITION = 9
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str | None) -> bytes:
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
            key=unb64(doc.get("key")),
            value=unb64(doc.get("value")),
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
            "key": b64(self.key),
            "target": self.target.name,
            "result": self.order.value,
        }
        if self.target is Target.VALUE:
            doc["value"] = b64(self.value if isinstance(self.value, bytes) else b"")
        else:
            doc[self.target.value] = str(int(self.value))
        return doc


@dataclass(frozen=True, slots=True)
class PutOp:
    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": b64(self.key), "value": b64(self.value)}
        if self.lease:
            doc["lease"] = str(self.lease)
        return {"request_put": doc}


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """Delete `key`, or every key in [key, range_end) when `range_end` is given."""

    key: bytes
    range_end: bytes = b""

    def to_json(self) -> dict[str, Any]:
        doc = {"key": b64(self.key)}
        if self.range_end:
            doc["range_end"] = b64(self.range_end)
        return {"request_delete_range": doc}


@dataclass(frozen=True, slots=True)
class RangeOp:
    """Read `key` (or [key, range_end)) inside a transaction, at most `limit` keys."""

    key: bytes
    range_end: bytes = b""
    limit: int = 1

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": b64(self.key), "limit": str(check_limit(self.limit))}
        if self.range_end:
            doc["range_end"] = b64(self.range_end)
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


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"range limit must be 1-{MAX_PAGE}, not {limit}")
    return limit


def range_result(doc: dict[str, Any]) -> RangeResult:
    return RangeResult(
        kvs=[KeyValue.from_json(kv) for kv in doc.get("kvs", [])],
        more=bool(doc.get("more", False)),
        count=int(doc.get("count", 0)),
        revision=int(doc.get("header", {}).get("revision", 0)),
    )


# -- failures ------------------------------------------------------------------------------------


class Outcome(enum.Enum):
    """What a failed attempt says about the request."""

    REFUSED = "refused"  # not processed: safe to send to the next endpoint, also a write
    UNKNOWN = "unknown"  # maybe processed: only a read may be sent again
    AUTH = "auth"  # our auth token expired: authenticate again, then resend


@dataclass(frozen=True, slots=True)
class Failed:
    outcome: Outcome
    reason: str


def gateway_error(doc: Any) -> tuple[int, str] | None:
    """(gRPC code, message) of an error answer in either of the gateway's shapes."""
    if not isinstance(doc, dict) or "error" not in doc:
        return None
    error = doc["error"]
    if isinstance(error, dict):  # streams: {"error": {"grpc_code", "message", ...}}
        return int(error.get("grpc_code", 2)), str(error.get("message", ""))
    return int(doc.get("code", 2)), str(doc.get("message") or error)


def raise_permanent(code: int, message: str, what: str, username: str | None) -> None:
    """Raise the syncbit error for an etcd error no other endpoint would answer differently;
    return for the temporary ones (and for an expired auth token: log in again)."""
    if code in (GRPC_INVALID_ARGUMENT, GRPC_RESOURCE_EXHAUSTED) and (
        "too large" in message or "larger than max" in message
    ):
        raise StateLimitError(
            f"etcd refused {what}: {message} (the server's --max-request-bytes, 1.5 MiB by "
            "default, bounds every request)"
        )
    if code == GRPC_OUT_OF_RANGE and "compacted" in message:
        raise RevisionCompactedError(f"etcd: {what}: {message}")
    if code == GRPC_NOT_FOUND and "lease" in message:
        raise LeaseExpiredError(f"etcd: {what}: {message}")
    if code == GRPC_PERMISSION_DENIED or "permission denied" in message:
        raise ConfigError(f"etcd user {username or '(none)'} may not {what}: {message}")
    if code != GRPC_UNAUTHENTICATED and ("authentication" in message or "user name" in message):
        raise ConfigError(f"etcd login as {username or '(none)'} failed: {message}")
    if code in (GRPC_INVALID_ARGUMENT, GRPC_FAILED_PRECONDITION, GRPC_OUT_OF_RANGE, GRPC_NOT_FOUND):
        raise SchedulerError(f"etcd refused {what}: {message}")


def classify(code: int, message: str) -> Failed:
    if code == GRPC_UNAUTHENTICATED:
        return Failed(Outcome.AUTH, message)
    if code == GRPC_UNAVAILABLE and "no leader" in message:
        return Failed(Outcome.REFUSED, "no leader (no quorum?)")
    if code == GRPC_RESOURCE_EXHAUSTED and "too many requests" in message:
        return Failed(Outcome.REFUSED, message)
    return Failed(Outcome.UNKNOWN, message or f"gRPC code {code}")
