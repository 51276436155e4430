"""The one exception tree of syncbit, and the one table that turns its errors into HTTP
answers and back; third-party errors are mapped onto the tree at the boundary.

Nothing here does I/O. The CLI turns `UserError` into a message and exit code 2, any other
`SyncbitError` into a message and exit code 1; the FUSE layer turns every error into EIO
(`fs.wire.FUSEError` is not part of this tree: it is the errno reply made of it).
Every class takes its message as its only required argument, so a client can rebuild the
error a server answered (`error_class`).

    SyncbitError                                                         HTTP (`HTTP_STATUS`)
    ├── UserError                 bad input from a person: message, exit 2, nothing changed  400
    │   ├── ConfigError           invalid config file or flag (names the bad key)
    │   ├── UnsafePathError       a listed name would escape the dataset root
    │   ├── InvalidSourceError    unknown scheme, malformed URI, nothing at the URI
    │   ├── NotFoundError         unknown dataset / node / endpoint                        404
    │   ├── DatasetExistsError    the dataset name is taken by another source              409
    │   ├── UnauthorizedError     missing, wrong or expired token or credential            401
    │   ├── ForbiddenError        a valid credential whose role may not do this            403
    │   ├── TrustError            a server's TLS certificate is not accepted (tls_ca)
    │   ├── MethodNotAllowedError an endpoint that does not take this method               405
    │   └── BodyError             a request body refused from its headers alone            400
    │       ├── LengthRequiredError   a body without a Content-Length                      411
    │       └── PayloadTooLargeError  a body over the endpoint's limit                     413
    ├── SourceError               the dataset's source failed                              502
    │   ├── SourceUnavailableError  temporary (network, 5xx): retried with backoff
    │   │   └── SourceThrottledError  the origin asked to slow down (429/503, SlowDown)
    │   └── SourcePermanentError    retrying cannot help (no Range support, 401/403):
    │       │                       never retried; a job that meets it stops
    │       └── SourceChangedError  the recorded version is gone
    ├── WireError                 a connection failed, or the other side spoke no HTTP/1.1
    │   └── ConnectError          no connection could be made (refused, unreachable, DNS)
    ├── PeerError                 a peer failed to deliver a chunk (next peer is tried)
    │   ├── PeerBusyError         a peer had no free upload slot (prefetch only)
    │   ├── PeerUnreachableError  no connection to the peer: avoided for a while by all reads
    │   └── DigestMismatchError   a peer sent bytes that do not match the chunk digest
    ├── ReadDeadlineError         neither peers nor source delivered before the deadline
    ├── TransferAbortedError      a transfer this node ended itself (a hedge's loser)
    ├── RegistryError             the registry mirror cannot answer an image request: the
    │                             distribution API's error code and status (404, 502...)
    ├── CacheLockedError          another daemon already owns the cache dir
    ├── CacheFullError            a chunk does not fit: the budget is pinned or in use
    │   └── DiskFullError         the cache filesystem has no space and nothing could go
    ├── VolumeBusyError           a volume target is in use (open files, a mount below it)
    ├── KubeAPIError              the Kubernetes API answered something that is not its JSON
    ├── DaemonUnreachableError    no daemon serves the local control API there (yet)     503
    ├── WaitTimeoutError          `syncbit wait` ran out of time before the data was ready
    └── SchedulerError            the scheduler is unreachable or answered an error        503
        ├── StateUnavailableError   the state store (etcd) did not answer in time, or has
        │                           no quorum: temporary; a write may or may not have happened
        ├── StateLimitError         a value is larger than the state store accepts
        ├── RevisionCompactedError  an etcd revision asked for was compacted away: re-read
        ├── LeaseExpiredError       an etcd lease is gone (expired or revoked)
        ├── NotLeaderError          only the leading scheduler writes; names the leader
        └── SchedulerBusyError      the scheduler held the request as long as it may:   429
                                    it serves heartbeats first; ask again later

Anything else a server meets is a bug: 500, logged there, never shown in detail.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final


class SyncbitError(Exception):
    """Base of every error syncbit raises on purpose."""


class UserError(SyncbitError):
    """A person gave bad input; shown as a message with exit code 2."""


class ConfigError(UserError):
    """Invalid configuration; the message names the offending key."""


class UnsafePathError(UserError):
    """A file name from a listing would escape the dataset root."""


class InvalidSourceError(UserError):
    """The source URI is malformed, of an unknown scheme, or names nothing."""


class NotFoundError(UserError):
    """An unknown dataset, node, object or endpoint."""


class DatasetExistsError(UserError):
    """A dataset of that name already exists with a different source."""


class UnauthorizedError(UserError):
    """A request without the cluster token, or with a wrong one (`token_file`)."""


class ForbiddenError(UserError):
    """A valid credential whose role may not do this: a reader writing, a node acting for
    another node (403)."""


class TrustError(UserError):
    """A server's TLS certificate is not accepted: wrong or missing CA (`tls_ca`,
    $SYNCBIT_TLS_CA) or a name the certificate does not carry."""


class MethodNotAllowedError(UserError):
    """An endpoint asked with a method it does not take; `allow` lists those it takes
    (the Allow header of the answer)."""

    def __init__(self, message: str, allow: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allow = allow


class BodyError(UserError):
    """A request body refused from its headers alone (a malformed Content-Length): never
    read. `status` is the answer's, from `HTTP_STATUS`."""

    @property
    def status(self) -> int:
        return http_status(self)


class LengthRequiredError(BodyError):
    """A request body without a Content-Length (chunked): its size cannot be checked."""


class PayloadTooLargeError(BodyError):
    """A request body over the endpoint's limit."""


class SourceError(SyncbitError):
    """The dataset's source failed to list or deliver."""


class SourceUnavailableError(SourceError):
    """A temporary source failure (connection refused, timeout, 5xx): worth retrying."""


class SourceThrottledError(SourceUnavailableError):
    """The origin asked this node to slow down (HTTP 429 or 503, S3 `SlowDown`): worth
    retrying after `retry_after` seconds when the origin said how long (its Retry-After),
    and a sign to run fewer concurrent requests against it."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourcePermanentError(SourceError):
    """The source refuses a read in a way no retry changes (it ignores Range requests,
    access is denied): never retried, and a pull or prefetch that meets it stops."""


class SourceChangedError(SourcePermanentError):
    """The source no longer holds the recorded version of a file; never retried."""


class WireError(SyncbitError):
    """The connection failed or the other side spoke something other than HTTP/1.1
    (`syncbit.wire`); sources and the peer client map it onto their own errors."""


class ConnectError(WireError):
    """No connection could be made: refused, unreachable, timed out, a name that does not
    resolve. Nothing was sent."""


class PeerError(SyncbitError):
    """A peer failed to deliver a chunk."""


class PeerUnreachableError(PeerError):
    """No connection to a peer could be made: it is down or gone (the scheduler may not
    know yet), so this node's other reads avoid it for a while."""


class PeerBusyError(PeerError):
    """A peer had no free upload slot for a prefetch transfer: ask another holder."""


class DigestMismatchError(PeerError):
    """Bytes did not match the chunk's recorded digest."""


class ReadDeadlineError(SyncbitError):
    """Neither peers nor the source delivered a chunk before the read deadline."""


class TransferAbortedError(SyncbitError):
    """A transfer this node ended itself (a hedge's loser, its connection shut): nobody's
    fault, so it says nothing about the peer or origin it was running against."""


class CacheLockedError(SyncbitError):
    """Another daemon holds the cache directory."""


class CacheFullError(SyncbitError):
    """A chunk cannot be stored: the cache budget (or the disk) is full of data that may
    not be evicted now (pinned to this node, or in use). The message says how much is
    pinned against the budget."""


class DiskFullError(CacheFullError):
    """The cache filesystem has no space left (whatever the budget says) and nothing could
    be evicted to make room; also a start-up that cannot create the index for lack of
    space."""


class VolumeBusyError(SyncbitError):
    """The target of a volume publication is in use (open files, a mount below it)."""


class KubeAPIError(SyncbitError):
    """The Kubernetes API server (or a proxy before it) answered something that is not
    Kubernetes API JSON; the Node's labels wait for the next sync."""


class DaemonUnreachableError(SyncbitError):
    """No daemon serves the node-local control API at the address (yet): nothing listens,
    or the daemon is still starting (503). `syncbit wait` tries again."""


class WaitTimeoutError(SyncbitError):
    """`syncbit wait` ran out of time before the dataset was ready."""


class SchedulerError(SyncbitError):
    """The scheduler is unreachable or rejected a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StateUnavailableError(SchedulerError):
    """The scheduler's state store (etcd) did not answer in time or has no quorum.

    Temporary. The message says whether a write's outcome is unknown (sent, unconfirmed)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503)


class StateLimitError(SchedulerError):
    """A value is larger than the state store accepts (the message names the limit)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=413)


class RevisionCompactedError(SchedulerError):
    """An etcd revision asked for is older than the store's compaction: read current state."""


class LeaseExpiredError(SchedulerError):
    """An etcd lease is gone: it expired or was revoked."""


class SchedulerBusyError(SchedulerError):
    """The scheduler held a request as long as it may and did not serve it: it serves
    heartbeats first and the rest at the rate it keeps up with (`scheduler.admission`).
    Temporary, and not a reason to try another replica: ask again after `retry_after`
    seconds (the answer's Retry-After)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, status=429)
        self.retry_after = retry_after


class NotLeaderError(SchedulerError):
    """A write reached a scheduler replica that does not lead (or no longer does).

    `leader` is the address of the leader as this replica last saw it (None: unknown);
    the caller redirects there or retries."""

    def __init__(self, message: str, leader: str | None = None) -> None:
        super().__init__(message, status=421)
        self.leader = leader


class RegistryError(SyncbitError):
    """An image request the node's registry mirror answers with an error: `code` is the
    distribution API's error code (MANIFEST_UNKNOWN, BLOB_UNKNOWN, DIGEST_INVALID, ...),
    `status` the HTTP status. The message names the registry and the digest or tag, never
    a credential."""

    def __init__(self, message: str, code: str = "UNKNOWN", status: int = 502) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


# -- errors <-> HTTP answers ---------------------------------------------------------------

# The status a server answers for each error: the row of the nearest class in the
# exception's MRO; an error without one is a 500. Every server and every client of syncbit
# reads this one table, so a status means the same error everywhere.
HTTP_STATUS: Final[Mapping[type[SyncbitError], int]] = MappingProxyType(
    {
        UserError: 400,
        UnauthorizedError: 401,
        ForbiddenError: 403,
        NotFoundError: 404,
        MethodNotAllowedError: 405,
        DatasetExistsError: 409,
        LengthRequiredError: 411,
        PayloadTooLargeError: 413,
        SourceError: 502,  # the server is fine; what stands behind it failed
        DaemonUnreachableError: 503,  # a daemon still starting: ask again
        SchedulerError: 503,  # the scheduler's state is closed or unreachable: ask again
        SchedulerBusyError: 429,  # held too long behind heartbeats: ask again later
    }
)
INTERNAL_ERROR: Final = 500


def http_status(exc: BaseException | type[BaseException]) -> int:
    """The HTTP status a server answers for `exc` (an error or its class): 500 for
    anything not in the table."""
    for cls in (exc if isinstance(exc, type) else type(exc)).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return INTERNAL_ERROR


def error_doc(exc: BaseException, message: str | None = None) -> dict[str, str]:
    """The JSON body of an error answer: `{"error": message, "kind": class name}`. A
    server passes its own `message` for a 500, so that no bug's detail leaves it."""
    return {"error": str(exc) if message is None else message, "kind": type(exc).__name__}


def _tree() -> dict[str, type[SyncbitError]]:
    found: dict[str, type[SyncbitError]] = {}
    todo: list[type[SyncbitError]] = [SyncbitError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == __name__:  # never a class another module derived
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _named_by_status() -> dict[int, type[SyncbitError]]:
    """Per status, the class a status alone names: the one row all its other rows derive
    from (400: UserError); none where unrelated classes share a status (503)."""
    named: dict[int, type[SyncbitError]] = {}
    for status in set(HTTP_STATUS.values()):
        rows = [cls for cls, s in HTTP_STATUS.items() if s == status]
        common = [cls for cls in rows if all(issubclass(other, cls) for other in rows)]
        if common:
            named[status] = common[0]
    return named


_KINDS: Final = _tree()
_BY_STATUS: Final = _named_by_status()


def error_class(status: int, kind: object = None) -> type[SyncbitError] | None:
    """The exception a client raises for an error answer of `status` with `kind` (the
    answer's "kind", if any): the class `kind` names when the table gives that class this
    very status (a server cannot make a client raise an error of another status), else
    the class the status alone names (400 UserError, 401, 403, 404, 405, 409, 411, 413,
    502 SourceError); None when neither says (a 500, a bare 503): the client's own choice.
    Every class takes the message alone: `raise error_class(...)(message)`."""
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is not None and http_status(cls) == status:
        return cls
    return _BY_STATUS.get(status)
