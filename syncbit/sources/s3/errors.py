"""botocore's errors as syncbit's: by error code (S3 and its clones are not consistent, so
the HTTP status decides when no code does) and by exception type. Messages are built from
codes and our own words only: a server's message (SignatureDoesNotMatch echoes the string
it signed) and an exception's repr never reach them.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable

import botocore.exceptions as bex
import urllib3.exceptions

from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceThrottledError,
    SourceUnavailableError,
    SyncbitError,
)
from syncbit.sources.base import THROTTLING
from syncbit.sources.throttle import parse_retry_after

# Error codes, grouped by what they mean to a user (HEAD errors carry only the HTTP status
# as code).
_NO_BUCKET = frozenset({"NoSuchBucket"})
GONE = frozenset({"NoSuchKey", "NoSuchVersion", "PreconditionFailed", "InvalidRange", "404"})
_EXPIRED = frozenset(
    {"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "RequestExpired"}
)
_DENIED = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "UnauthorizedAccess",
        "AccountProblem",
        "403",
        "401",
    }
)
_THROTTLING = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
    }
)
_TEMPORARY = _THROTTLING | frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
    }
)
NO_VERSIONING = frozenset({"NotImplemented", "MethodNotAllowed", "XNotImplemented"})


def error_code(exc: bex.ClientError) -> tuple[str, int]:
    """A ClientError's code (its HTTP status when it has none) and HTTP status."""
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(error.get("Code", "") or status), status


def map_error(
    exc: BaseException, where: str, bucket: str, *, reading: bool = False
) -> SyncbitError:
    """The syncbit error for a boto3/botocore failure while listing or reading `where`.

    Messages are built from error codes and our own words only: a server's message text
    (SignatureDoesNotMatch echoes the string to sign and the access key id) and the
    exception's repr never reach them. When `reading`, a vanished object or bucket is
    `SourceChangedError` and a refused credential a plain `SourceError`; when listing,
    problems a person must fix are `InvalidSourceError`.
    """
    user_error: Callable[[str], SyncbitError] = SourceError if reading else InvalidSourceError
    if isinstance(exc, SyncbitError):
        return exc
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return user_error(
            f"cannot access {where}: no AWS credentials found "
            "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
        )
    if isinstance(exc, bex.ProfileNotFound):
        profile = getattr(exc, "kwargs", {}).get("profile", "?")
        return user_error(f"cannot access {where}: AWS profile {profile!r} not found")
    if isinstance(
        exc, bex.TokenRetrievalError | bex.SSOTokenLoadError | bex.UnauthorizedSSOTokenError
    ):
        return user_error(f"cannot access {where}: AWS credentials expired (refresh the login)")
    if isinstance(exc, bex.ParamValidationError):
        return user_error(f"invalid S3 request for {where}: check the bucket name and key")
    if isinstance(exc, bex.ClientError):
        code, status = error_code(exc)
        if code in _NO_BUCKET:
            if reading:
                return SourceChangedError(f"source changed: bucket {bucket!r} no longer exists")
            return InvalidSourceError(f"no such bucket {bucket!r}")
        if code in _EXPIRED:
            return user_error(f"cannot access {where}: AWS credentials expired ({code})")
        if code == "InvalidObjectState":
            return user_error(
                f"cannot read {where}: the object is archived (restore it from its "
                "storage class first)"
            )
        if code == "RequestTimeTooSkewed":
            return user_error(f"cannot access {where}: this machine's clock is off")
        if code in _DENIED or status in (401, 403):
            return user_error(f"access denied to {where} (check credentials): {code}")
        if code in _THROTTLING or status in THROTTLING:
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            return SourceThrottledError(
                f"S3 asks to slow down for {where}: {code} (HTTP {status})",
                parse_retry_after(headers.get("retry-after")),
            )
        if code in _TEMPORARY or status >= 500:
            return SourceUnavailableError(f"S3 unavailable for {where}: {code} (HTTP {status})")
        return SourceError(f"S3 request for {where} failed: {code} (HTTP {status})")
    if isinstance(exc, bex.EndpointConnectionError | bex.ConnectTimeoutError):
        # The message names the endpoint URL (no query string, no signature): keep the host.
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "the S3 endpoint")
        return SourceUnavailableError(
            f"cannot reach {_host_only(str(endpoint))} for {where} ({type(exc).__name__})"
        )
    transport = bex.BotoCoreError | urllib3.exceptions.HTTPError | http.client.HTTPException
    if isinstance(exc, transport | OSError):
        # Read timeouts, dropped connections, truncated bodies, TLS failures.
        return SourceUnavailableError(f"S3 connection failed for {where} ({type(exc).__name__})")
    return SourceError(f"S3 request for {where} failed ({type(exc).__name__})")


def _host_only(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    host = rest.split("/", 1)[0].rpartition("@")[2]
    return f"{scheme}{sep}{host}" if sep else host
