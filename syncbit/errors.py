"""The one exception tree of syncbit; third-party errors are mapped onto it at the boundary.

Nothing here does I/O. The CLI turns `UserError` into a message and exit code 2, any other
`SyncbitError` into a message and exit code 1; the FUSE layer turns every error into EIO.

    SyncbitError
    ├── UserError                 bad input from a person: message, exit 2, nothing changed
    │   ├── ConfigError           invalid config file or flag (names the bad key)
    │   ├── UnsafePathError       a listed name would escape the dataset root
    │   ├── InvalidSourceError    unknown scheme, malformed URI, nothing at the URI
    │   ├── NotFoundError         unknown dataset / node
    │   ├── UnauthorizedError     missing, wrong or expired token or credential (401)
    │   ├── ForbiddenError        a valid credential whose role may not do this (403)
    │   └── TrustError            a server's TLS certificate is not accepted (tls_ca)
    ├── SourceError               the dataset's source failed
    │   ├── SourceUnavailableError  temporary (network, 5xx): retried with backoff
    │   └── SourcePermanentError    retrying cannot help (no Range support, 401/403):
    │       │                       never retried; a job that meets it stops
    │       └── SourceChangedError  the recorded version is gone
    ├── PeerError                 a peer failed to deliver a chunk (next peer is tried)
    │   └── DigestMismatchError   a peer sent bytes that do not match the chunk digest
    ├── ReadDeadlineError         neither peers nor source delivered before the deadline
    ├── RegistryError             the registry mirror cannot answer an image request: the
    │                             distribution API's error code and status (404, 502...)
    ├── CacheLockedError          another daemon already owns the cache dir
    ├── CacheFullError            a chunk does not fit: the budget is pinned or in use
    │   └── DiskFullError         the cache filesystem has no space and nothing could go
    └── SchedulerError            the scheduler is unreachable or answered an error
        ├── StateUnavailableError   the state store (etcd) did not answer in time, or has
        │                           no quorum: temporary; a write may or may not have happened
        ├── StateLimitError         a value is larger than the state store accepts
        ├── RevisionCompactedError  an etcd revision asked for was compacted away: re-read
        ├── LeaseExpiredError       an etcd lease is gone (expired or revoked)
        └── NotLeaderError          only the leading scheduler writes; names the leader
"""

from __future__ import annotations


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
    """An unknown dataset, node or object."""


class SourceError(SyncbitError):
    """The dataset's source failed to list or deliver."""


class SourceUnavailableError(SourceError):
    """A temporary source failure (connection refused, timeout, 5xx): worth retrying."""


class SourcePermanentError(SourceError):
    """The source refuses a read in a way no retry changes (it ignores Range requests,
    access is denied): never retried, and a pull or prefetch that meets it stops."""


class SourceChangedError(SourcePermanentError):
    """The source no longer holds the recorded version of a file; never retried."""


class PeerError(SyncbitError):
    """A peer failed to deliver a chunk."""


class PeerBusyError(PeerError):
    """A peer had no free upload slot for a prefetch transfer: ask another holder."""


class DigestMismatchError(PeerError):
    """Bytes did not match the chunk's recorded digest."""


class ReadDeadlineError(SyncbitError):
    """Neither peers nor the source delivered a chunk before the read deadline."""


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


class SchedulerError(SyncbitError):
    """The scheduler is unreachable or rejected a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UnauthorizedError(UserError):
    """A request without the cluster token, or with a wrong one (`token_file`)."""


class ForbiddenError(UserError):
    """A valid credential whose role may not do this: a reader writing, a node acting for
    another node (403)."""


class TrustError(UserError):
    """A server's TLS certificate is not accepted: wrong or missing CA (`tls_ca`,
    $SYNCBIT_TLS_CA) or a name the certificate does not carry."""


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

    def __init__(self, message: str, code: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
