"""S3 sources: `s3://bucket/prefix` on AWS or any S3-compatible store, through boto3.

Owns pinning each object to its ETag (and VersionId on versioned buckets), ranged reads
that refuse any other version, and mapping botocore errors onto syncbit's. boto3 is
synchronous: it never runs on the trio loop, and credentials, signatures and signed URLs
never reach a message or a log line.
"""

from __future__ import annotations

import http.client
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bex
import trio
import urllib3.exceptions
from botocore.config import Config

from syncbit.chunks import identity_digest
from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
    SyncbitError,
    UnsafePathError,
)
from syncbit.manifest import FileEntry, safe_relpath
from syncbit.sources.base import Listing, Source, pinned_size, register
from syncbit.sources.fences import Fences
from syncbit.sources.options import SCHEMES
from syncbit.wire import WireError, parse_content_range

__all__ = ["OPTION_KEYS", "S3Source", "map_error", "page_entries"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# At DEBUG, botocore logs each request's headers (Authorization, X-Amz-Security-Token)
# and the string it signs. A daemon run with `--log-level debug` must not write
# credentials to its log, so these loggers stay at WARNING unless someone configured
# them on purpose.
for _name in ("botocore", "boto3", "s3transfer"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

OPTION_KEYS = frozenset(SCHEMES["s3"])
DEFAULT_MAX_ATTEMPTS = 4  # botocore counts the first try: three retries with backoff
DEFAULT_MAX_CONNECTIONS = 16  # the fetcher runs about this many range reads at once
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
_ADDRESSING_STYLES = ("auto", "path", "virtual")

# Error codes, grouped by what they mean to a user. S3 and its clones are not consistent
# (HEAD errors carry only the HTTP status as code), so the status decides when no code does.
_NO_BUCKET = frozenset({"NoSuchBucket"})
_GONE = frozenset({"NoSuchKey", "NoSuchVersion", "PreconditionFailed", "InvalidRange", "404"})
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
_TEMPORARY = frozenset(
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
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
    }
)
_NO_VERSIONING = frozenset({"NotImplemented", "MethodNotAllowed", "XNotImplemented"})


# -- URIs and errors ----------------------------------------------------------------------


def _parse_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix). The key part is literal: S3 keys may hold
    `#`, `?` and `%`, so it is not URL-decoded or split at them."""
    scheme, sep, rest = uri.partition("://")
    if scheme.lower() != "s3" or not sep:
        raise InvalidSourceError(f"invalid S3 source {uri!r}: expected s3://bucket/prefix")
    bucket, _, prefix = rest.partition("/")
    if not bucket or any(c in bucket for c in "@:?#\\ "):
        raise InvalidSourceError(f"invalid S3 source {uri!r}: expected s3://bucket/prefix")
    return bucket, prefix


def _error_code(exc: bex.ClientError) -> tuple[str, int]:
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
        code, status = _error_code(exc)
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
        if code in _TEMPORARY or status in (429, 503) or status >= 500:
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


def _describe(version: dict[str, str]) -> str:
    keys = ("etag", "version_id", "size")
    return " ".join(f"{k}={version[k]}" for k in keys if k in version) or "(unpinned)"


# -- the source ---------------------------------------------------------------------------


@register
class S3Source(Source):
    """Every object under `s3://bucket/prefix/`, or the single object `s3://bucket/key`.

    A prefix ending in `/` (or empty) is a directory. Without a trailing slash the URI
    names the exact key if such an object exists, else the prefix as a directory.

    Options (all optional, none secret; unset means the standard boto3 chain, so the
    usual AWS environment variables and profiles work with no syncbit setting):
    `endpoint_url` (S3-compatible stores), `region`, `addressing_style` ("path",
    "virtual" or "auto"), `profile`, `max_attempts` (botocore tries per request,
    throttling included), `max_connections` (connection pool size). Credentials come
    only from the boto3 chain, never from options, so they never enter a manifest.

    Object identity is `identity_digest("s3-etag", etag, size)` without bucket or key: the
    same object under two keys or prefixes is stored once. An S3 ETag is the MD5 of the
    content for single-part uploads and an MD5 over the part MD5s plus `-N` for multipart
    ones (the same bytes uploaded with other part sizes get another ETag: no dedup, never
    a wrong one). SSE-KMS/SSE-C ETags are opaque but still change with the content. The
    identity trusts the store: a bucket owner able to forge MD5 collisions could poison
    other datasets' objects, so only list buckets you trust.
    """

    schemes = ("s3",)

    def __init__(
        self, uri: str, options: dict[str, Any] | None = None, fences: Fences | None = None
    ) -> None:
        super().__init__(uri, options, fences)
        self.bucket, self.prefix = _parse_uri(uri)
        opts = self.options
        style = opts.get("addressing_style")
        if style is not None and style not in _ADDRESSING_STYLES:
            raise InvalidSourceError(
                f"invalid S3 option addressing_style={style!r}: "
                f"expected one of {', '.join(_ADDRESSING_STYLES)}"
            )
        self.addressing_style: str | None = style
        self.endpoint_url: str | None = opts.get("endpoint_url") or None
        self.region: str | None = opts.get("region") or None
        self.profile: str | None = opts.get("profile") or None
        try:
            self.max_attempts = int(opts.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
            self.max_connections = int(opts.get("max_connections", DEFAULT_MAX_CONNECTIONS))
        except (TypeError, ValueError) as exc:
            raise InvalidSourceError(f"invalid S3 option for {uri!r}: {exc}") from None
        if self.max_attempts < 1 or self.max_connections < 1:
            raise InvalidSourceError(
                f"invalid S3 options for {uri!r}: max_attempts and max_connections must be >= 1"
            )
        self._client_lock = threading.Lock()
        self._client_obj: Any = None
        self._closed = False

    # -- the client ------------------------------------------------------------------------

    def client(self) -> Any:
        """The one boto3 client of this source, built on first use (thread-safe).

        Building it reads config files and service models: call it from a worker thread.
        """
        with self._client_lock:
            if self._closed:
                raise SourceError(f"S3 source {self._where()} is closed")
            if self._client_obj is None:
                self._client_obj = self._build_client()
            return self._client_obj

    def _build_client(self) -> Any:
        session = boto3.session.Session(profile_name=self.profile)
        region = self.region or session.region_name or os.environ.get("AWS_REGION") or None
        settings: dict[str, Any] = {
            "retries": {"mode": "standard", "max_attempts": self.max_attempts},
            "max_pool_connections": self.max_connections,
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
        }
        if self.addressing_style:
            settings["s3"] = {"addressing_style": self.addressing_style}
        if "response_checksum_validation" in Config.OPTION_DEFAULTS:
            # botocore >= 1.36 would otherwise ask for and verify full-object checksums;
            # ranges are verified by chunk digests and pinned by If-Match instead.
            settings["response_checksum_validation"] = "when_required"
            settings["request_checksum_calculation"] = "when_required"
        return session.client(
            "s3", endpoint_url=self.endpoint_url, region_name=region, config=Config(**settings)
        )

    def close(self) -> None:
        with self._client_lock:
            client, self._client_obj = self._client_obj, None
            self._closed = True
        if client is not None:
            client.close()

    def _where(self, key: str | None = None) -> str:
        return f"s3://{self.bucket}/{self.prefix if key is None else key}"

    async def _call(self, where: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """One boto3 call in a worker thread, its errors mapped."""

        def run() -> T:
            try:
                return fn(self.client(), **kwargs)
            except Exception as exc:
                raise map_error(exc, where, self.bucket) from exc

        result: T = await trio.to_thread.run_sync(run)
        return result

    # -- listing ---------------------------------------------------------------------------

    async def list(self) -> Listing:
        versioned = await self._versioned()
        prefix = self.prefix
        if prefix and not prefix.endswith("/"):
            # Keys sort bytewise and a key sorts before every longer key it prefixes, so
            # the first key under `prefix` is `prefix` itself when that object exists.
            page = await self._call(
                self._where(), _list_page, Bucket=self.bucket, Prefix=prefix, MaxKeys=1
            )
            first = page.get("Contents") or []
            if first and first[0]["Key"] == prefix:
                return await self._single(prefix, first[0], versioned)
            prefix += "/"
        files: list[FileEntry] = []
        dirs: set[str] = set()
        where = self._where(prefix)
        token: dict[str, str] = {}
        while True:
            if versioned:
                page = await self._call(
                    where, _list_versions_page, Bucket=self.bucket, Prefix=prefix, **token
                )
            else:
                page = await self._call(
                    where, _list_page, Bucket=self.bucket, Prefix=prefix, **token
                )
            page_files, page_dirs = page_entries(page, self.bucket, prefix, versioned)
            files += page_files
            dirs |= page_dirs
            token = _next_token(page, versioned)
            if not token:
                break
        if not files and not dirs:
            raise InvalidSourceError(f"nothing under s3://{self.bucket}/{prefix}")
        return Listing(files=sorted(files, key=lambda e: e.path), dirs=sorted(dirs))

    async def _versioned(self) -> bool:
        """Whether the bucket keeps versions, so that reads can pin a VersionId.

        Stores without versioning support and credentials without
        s3:GetBucketVersioning read unpinned by version; If-Match on the ETag still
        refuses a changed object.
        """
        where = self._where()

        def run() -> bool:
            try:
                resp = self.client().get_bucket_versioning(Bucket=self.bucket)
            except bex.ClientError as exc:
                code, status = _error_code(exc)
                if code in _NO_VERSIONING or code == "AccessDenied" or status == 501:
                    log.debug("%s: versioning state unknown (%s); pinning ETags only", where, code)
                    return False
                raise map_error(exc, where, self.bucket) from exc
            except Exception as exc:
                raise map_error(exc, where, self.bucket) from exc
            return bool(resp.get("Status") == "Enabled")

        versioned: bool = await trio.to_thread.run_sync(run)
        return versioned

    async def _single(self, key: str, obj: dict[str, Any], versioned: bool) -> Listing:
        name = _safe_name(key.rsplit("/", 1)[-1], key, self.bucket)
        if versioned:
            # The listing has no VersionId; HEAD gives ETag, size and version in one view.
            head = await self._call(self._where(key), _head, Bucket=self.bucket, Key=key)
            obj = {
                "Key": key,
                "ETag": head["ETag"],
                "Size": head["ContentLength"],
                "VersionId": head.get("VersionId"),
            }
        return Listing(files=[self._entry(name, obj, versioned)])

    def _entry(self, name: str, obj: dict[str, Any], versioned: bool) -> FileEntry:
        return _entry(self.bucket, name, obj, versioned)

    # -- reads -----------------------------------------------------------------------------

    def read_into(self, entry: FileEntry, offset: int, buf: memoryview) -> None:
        want = len(buf)
        if want == 0:
            return
        version = entry.version
        size = pinned_size(entry, offset, want)
        key = entry.locator
        where = self._where(key)
        last = offset + want - 1
        request: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Range": f"bytes={offset}-{last}",
        }
        etag = version.get("etag")
        if etag:
            request["IfMatch"] = etag
        if version.get("version_id"):
            request["VersionId"] = version["version_id"]

        def changed(why: str) -> SourceChangedError:
            return SourceChangedError(
                f"source changed: {where} no longer has version {_describe(version)} ({why})"
            )

        try:
            resp = self.client().get_object(**request)
        except bex.ClientError as exc:
            code, status = _error_code(exc)
            if code in _GONE or (status == 405 and "VersionId" in request):
                # 405: the pinned version is now a delete marker.
                raise changed(code) from exc
            raise map_error(exc, where, self.bucket, reading=True) from exc
        except Exception as exc:
            raise map_error(exc, where, self.bucket, reading=True) from exc

        body = resp["Body"]
        done = False
        try:
            got_etag = resp.get("ETag")
            if etag and got_etag and got_etag.strip('"') != etag.strip('"'):
                raise changed(f"now etag={got_etag}")  # a store that ignores If-Match
            length = resp.get("ContentLength")
            content_range = resp.get("ContentRange")
            if content_range is None:
                if offset != 0 or want != size:
                    raise SourceError(f"cannot read {where}: the endpoint ignores Range requests")
                if length != size:
                    raise changed(f"now {length} bytes")
            else:
                try:
                    first, end, total = parse_content_range(content_range)
                except WireError as exc:
                    raise SourceError(f"cannot read {where}: {exc}") from exc
                if total is not None and total != size:
                    raise changed(f"now {total} bytes")
                if (first, end) != (offset, last) or length != want:
                    raise SourceError(
                        f"cannot read {where}: asked for bytes {offset}-{last}, "
                        f"got {content_range!r} with Content-Length {length}"
                    )
            _fill(body, buf, where)
            done = True
        except SyncbitError:
            raise
        except Exception as exc:
            raise map_error(exc, where, self.bucket, reading=True) from exc
        finally:
            if not done:
                body.close()  # drops the connection: its unread body makes it unusable


def _fill(body: Any, buf: memoryview, where: str) -> None:
    """Read exactly `len(buf)` body bytes into `buf` with `readinto`, never one big `bytes`.

    (Reading from the `http.client` response under urllib3 directly would skip one copy
    per call; measured on loopback it saved no CPU worth private attributes.)
    """
    want = len(buf)
    got = 0
    while got < want:
        n = body.readinto(buf[got:])
        if not n:
            raise SourceUnavailableError(
                f"S3 connection closed after {got} of {want} bytes of {where}"
            )
        got += n
    # Every announced byte is read, so urllib3 has already put the connection back in
    # its pool; closing the body now would drop it instead.


# -- boto3 calls (worker threads only) -----------------------------------------------------


def _list_page(client: Any, **kwargs: Any) -> dict[str, Any]:
    page: dict[str, Any] = client.list_objects_v2(**kwargs)
    return page


def _list_versions_page(client: Any, **kwargs: Any) -> dict[str, Any]:
    page: dict[str, Any] = client.list_object_versions(**kwargs)
    return page


def _head(client: Any, **kwargs: Any) -> dict[str, Any]:
    resp: dict[str, Any] = client.head_object(**kwargs)
    return resp


def _next_token(page: dict[str, Any], versioned: bool) -> dict[str, str]:
    if not page.get("IsTruncated"):
        return {}
    if versioned:
        token = {"KeyMarker": page.get("NextKeyMarker", "")}
        if page.get("NextVersionIdMarker"):
            token["VersionIdMarker"] = page["NextVersionIdMarker"]
        if not token["KeyMarker"]:
            raise SourceError("S3 listing truncated without a next marker")
        return token
    if not page.get("NextContinuationToken"):
        raise SourceError("S3 listing truncated without a continuation token")
    return {"ContinuationToken": page["NextContinuationToken"]}


def page_entries(
    page: Any, bucket: str, prefix: str, versioned: bool
) -> tuple[list[FileEntry], set[str]]:
    """The files and directory markers one ListObjectsV2 (or, `versioned`, one
    ListObjectVersions: latest versions only) page holds under `prefix`.

    Whatever the page says, the result is only safe names below `prefix`; a page that is
    not what S3 sends raises SourceError, an unsafe key UnsafePathError, an object
    without an ETag InvalidSourceError.
    """
    if not isinstance(page, dict):
        raise SourceError(f"S3 listing of s3://{bucket}/{prefix} is not a listing")
    raw = page.get("Versions" if versioned else "Contents") or []
    if not isinstance(raw, list):
        raise SourceError(f"S3 listing of s3://{bucket}/{prefix} is not a listing")
    files: list[FileEntry] = []
    dirs: set[str] = set()
    for obj in raw:
        if not isinstance(obj, dict) or not isinstance(obj.get("Key"), str):
            raise SourceError(f"S3 listing of s3://{bucket}/{prefix} has an entry without a key")
        if versioned and not obj.get("IsLatest"):
            continue
        key: str = obj["Key"]
        if not key.startswith(prefix):
            raise SourceError(f"S3 listing of s3://{bucket}/{prefix} has key {key!r} outside it")
        name = key[len(prefix) :]
        if not name:
            continue  # the folder marker of the listed prefix itself
        if name.endswith("/"):
            dirs.add(_safe_name(name[:-1], key, bucket))
            continue
        files.append(_entry(bucket, _safe_name(name, key, bucket), obj, versioned))
    return files, dirs


def _entry(bucket: str, name: str, obj: dict[str, Any], versioned: bool) -> FileEntry:
    etag = obj.get("ETag") or ""
    if not isinstance(etag, str) or not etag.strip('"'):
        raise InvalidSourceError(
            f"s3://{bucket}/{obj['Key']} has no ETag: its version cannot be pinned"
        )
    size = obj.get("Size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise SourceError(f"s3://{bucket}/{obj['Key']} has no valid size: {size!r}")
    version = {"etag": etag, "size": str(size)}
    version_id = obj.get("VersionId")
    if versioned and version_id:
        version["version_id"] = str(version_id)
    return FileEntry(
        path=name,
        size=size,
        mode=0o444,
        # Quotes are transport syntax; some S3 clones omit them.
        object=identity_digest("s3-etag", etag.strip('"'), str(size)),
        locator=obj["Key"],
        version=version,
    )


def _safe_name(name: str, key: str, bucket: str) -> str:
    try:
        return safe_relpath(name)
    except UnsafePathError as exc:
        raise UnsafePathError(f"unsafe key {key!r} in s3://{bucket}/: {exc}") from None
