"""`S3Source`: `s3://bucket/prefix` on AWS or any S3-compatible store, through boto3. Owns
the client (built on first use, in a worker thread), the listing (versioned buckets pin a
VersionId) and ranged reads that refuse any other version: by presigned URL on syncbit's
own HTTP client (`direct`), else through boto3. boto3 is synchronous: it never runs on
the trio loop, and credentials and signatures never reach a message or a log.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bex
import botocore.loaders
import botocore.session
import trio
from botocore.config import Config

from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
    SyncbitError,
)
from syncbit.manifest import FileEntry
from syncbit.sources.base import Listing, Source, changed_error, pinned_size, register
from syncbit.sources.fences import Fences
from syncbit.sources.options import SCHEMES, parse_bool
from syncbit.sources.s3.direct import DirectReads, presigner, proxied
from syncbit.sources.s3.errors import GONE, NO_VERSIONING, error_code, map_error
from syncbit.sources.s3.listing import (
    file_entry,
    head_object,
    list_page,
    list_versions_page,
    next_token,
    page_entries,
    safe_name,
)
from syncbit.wire import Abort, WireError, parse_content_range

log = logging.getLogger("syncbit.sources.s3")
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
DEFAULT_MAX_CONNECTIONS = 64  # the fetcher runs up to source_concurrency (64) range reads at once
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
_ADDRESSING_STYLES = ("auto", "path", "virtual")

_LOADER_LOCK = threading.Lock()
_loader: Any = None  # botocore's data loader, one per process (see `_session`)


def _session(profile: str | None) -> Any:
    """A boto3 session of its own (credentials resolved anew) on the process's one
    botocore data loader: the S3 service model, its endpoint rules and the partitions are
    read from disk and parsed once (~0.07 CPU seconds), so a client takes ~10 ms to
    build, not 60-100 ms."""
    global _loader
    with _LOADER_LOCK:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        core = botocore.session.get_session()
        core.register_component("data_loader", _loader)
        session = boto3.session.Session(botocore_session=core, profile_name=profile)
        # boto3 appends its own data path to the loader of each session it makes: once.
        _loader.search_paths[:] = list(dict.fromkeys(_loader.search_paths))
    return session


def warm() -> None:
    """Blocking (a worker thread at start-up): read what building a client reads, so the
    first dataset on S3 does not wait for it. Builds a client with placeholder keys and
    no endpoint it would reach: no credential lookup, no request."""
    client = _session(None).client(
        "s3",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="warm",
        aws_secret_access_key="warm",
        config=Config(signature_version="s3v4"),
    )
    client.close()


_VERSION_KEYS = ("etag", "version_id", "size")  # what pins an object, in messages


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


@register
class S3Source(Source):
    """Every object under `s3://bucket/prefix/`, or the single object `s3://bucket/key`.

    A prefix ending in `/` (or empty) is a directory. Without a trailing slash the URI
    names the exact key if such an object exists, else the prefix as a directory.

    Options (all optional, none secret; unset means the standard boto3 chain, so the
    usual AWS environment variables and profiles work with no syncbit setting):
    `endpoint_url` (S3-compatible stores), `region`, `addressing_style` ("path",
    "virtual" or "auto"), `profile`, `max_attempts` (botocore tries per request,
    throttling included), `max_connections` (connection pool size, default 64: the
    fetcher's `source_concurrency`, so no read opens a connection of its own).
    Credentials come only from the boto3 chain, never from options, so they never enter
    a manifest.

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
        # Reads by presigned URL (`direct`) unless turned off, or the endpoint is reached
        # through a proxy; `abortable` while they are.
        self.abortable = parse_bool(opts.get("direct_reads", True)) and not proxied(
            self.endpoint_url or "https://s3.amazonaws.com"
        )
        self._direct: DirectReads | None = None

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
        session = _session(self.profile)
        region = self.region or session.region_name or os.environ.get("AWS_REGION") or None
        settings: dict[str, Any] = {
            "retries": {"mode": "standard", "max_attempts": self.max_attempts},
            "max_pool_connections": self.max_connections,
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
            # What requests use anyway; said so that presigned URLs use it too (botocore
            # presigns with SigV2 in us-east-1 otherwise, which newer regions refuse).
            "signature_version": "s3v4",
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

    def direct(self) -> DirectReads | None:
        """The presigned-URL reader while reads take that way (built with the client)."""
        if not self.abortable:
            return None
        client = self.client()
        with self._client_lock:
            if self._direct is None:
                self._direct = DirectReads(
                    presigner(client, self.bucket),
                    self._where,
                    self.max_connections,
                    READ_TIMEOUT,
                )
            return self._direct

    def close(self) -> None:
        with self._client_lock:
            client, self._client_obj = self._client_obj, None
            direct, self._direct = self._direct, None
            self._closed = True
        if client is not None:
            client.close()
        if direct is not None:
            direct.close()

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
        prefix = self.prefix
        single = bool(prefix) and not prefix.endswith("/")
        # The bucket's versioning is asked beside the first listing request, not before
        # it: one round trip fewer before a pull can start (a versioned bucket's first
        # page is then asked again, as versions).
        found: dict[str, Any] = {}

        async def outcome(name: str, call: Callable[[], Awaitable[Any]]) -> None:
            try:
                found[name] = await call()
            except Exception as exc:  # raised below, alone: never a group of two
                found.setdefault("error", exc)

        # Keys sort bytewise and a key sorts before every longer key it prefixes, so the
        # first key under `prefix` is `prefix` itself when that object exists.
        more = {"MaxKeys": 1} if single else {}
        first_request = functools.partial(
            self._call, self._where(), list_page, Bucket=self.bucket, Prefix=prefix, **more
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outcome, "versioned", self._versioned)
            nursery.start_soon(outcome, "page", first_request)
        if "error" in found:
            raise found["error"]
        versioned: bool = found["versioned"]
        first_page: dict[str, Any] = found["page"]
        # A versioned bucket's pages are asked again as versions.
        page: dict[str, Any] | None = None if versioned else first_page
        if single:
            first = first_page.get("Contents") or []
            if first and isinstance(first[0], dict) and first[0].get("Key") == prefix:
                return await self._single(prefix, first[0], versioned)
            prefix += "/"
            page = None
        files: list[FileEntry] = []
        dirs: set[str] = set()
        where = self._where(prefix)
        token: dict[str, str] = {}
        while True:
            if page is None:
                lister = list_versions_page if versioned else list_page
                page = await self._call(where, lister, Bucket=self.bucket, Prefix=prefix, **token)
            page_files, page_dirs = page_entries(page, self.bucket, prefix, versioned)
            files += page_files
            dirs |= page_dirs
            token = next_token(page, versioned)
            if not token:
                break
            page = None
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
                code, status = error_code(exc)
                if code in NO_VERSIONING or code == "AccessDenied" or status == 501:
                    log.debug("%s: versioning state unknown (%s); pinning ETags only", where, code)
                    return False
                raise map_error(exc, where, self.bucket) from exc
            except Exception as exc:
                raise map_error(exc, where, self.bucket) from exc
            return bool(resp.get("Status") == "Enabled")

        versioned: bool = await trio.to_thread.run_sync(run)
        return versioned

    async def _single(self, key: str, obj: dict[str, Any], versioned: bool) -> Listing:
        name = safe_name(key.rsplit("/", 1)[-1], key, self.bucket)
        if versioned:
            # The listing has no VersionId; HEAD gives ETag, size and version in one view.
            head = await self._call(self._where(key), head_object, Bucket=self.bucket, Key=key)
            obj = {
                "Key": key,
                "ETag": head["ETag"],
                "Size": head["ContentLength"],
                "VersionId": head.get("VersionId"),
            }
        return Listing(files=[self._entry(name, obj, versioned)])

    def _entry(self, name: str, obj: dict[str, Any], versioned: bool) -> FileEntry:
        return file_entry(self.bucket, name, obj, versioned)

    # -- reads -----------------------------------------------------------------------------

    def read_into(
        self, entry: FileEntry, offset: int, buf: memoryview, abort: Abort | None = None
    ) -> None:
        want = len(buf)
        if want == 0:
            return
        size = pinned_size(entry, offset, want)
        changed = functools.partial(
            changed_error, self._where(entry.locator), entry.version, _VERSION_KEYS
        )
        direct = self.direct()
        if direct is None:
            self._read_boto3(entry, offset, buf, size, changed)
            return
        refused = direct.read_into(entry, offset, buf, size, changed, abort)
        if refused is None:
            return
        # An answer only boto3 can judge (a region redirect, credentials, a CA): its read
        # decides, and if it succeeds this source reads through boto3 from now on.
        self._read_boto3(entry, offset, buf, size, changed)
        if self.abortable:
            self.abortable = False
            log.warning(
                "reads of s3://%s go through boto3 from now on: a presigned ranged GET was "
                "answered %s",
                self.bucket,
                f"HTTP {refused}" if refused else "with a TLS failure",
            )

    def _read_boto3(
        self,
        entry: FileEntry,
        offset: int,
        buf: memoryview,
        size: int,
        changed: Callable[[str], SourceChangedError],
    ) -> None:
        want = len(buf)
        version = entry.version
        key = entry.locator
        where = self._where(key)
        request: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Range": f"bytes={offset}-{offset + want - 1}",
        }
        if version.get("etag"):
            request["IfMatch"] = version["etag"]
        if version.get("version_id"):
            request["VersionId"] = version["version_id"]
        try:
            resp = self.client().get_object(**request)
        except bex.ClientError as exc:
            code, status = error_code(exc)
            if code in GONE or (status == 405 and "VersionId" in request):
                # 405: the pinned version is now a delete marker.
                raise changed(code) from exc
            raise map_error(exc, where, self.bucket, reading=True) from exc
        except Exception as exc:
            raise map_error(exc, where, self.bucket, reading=True) from exc
        body = resp["Body"]
        done = False
        try:
            _check_answer(resp, offset, want, size, where, version.get("etag"), changed)
            _fill(body, buf, where)
            done = True
        except SyncbitError:
            raise
        except Exception as exc:
            raise map_error(exc, where, self.bucket, reading=True) from exc
        finally:
            if not done:
                body.close()  # drops the connection: its unread body makes it unusable


def _check_answer(
    resp: dict[str, Any],
    offset: int,
    want: int,
    size: int,
    where: str,
    etag: str | None,
    changed: Callable[[str], SourceChangedError],
) -> None:
    """A GetObject answer is bytes [offset, offset+want) of the pinned `size`-byte version
    (`etag`), else the right error."""
    got_etag = resp.get("ETag")
    if etag and got_etag and got_etag.strip('"') != etag.strip('"'):
        raise changed(f"now etag={got_etag}")  # a store that ignores If-Match
    length = resp.get("ContentLength")
    content_range = resp.get("ContentRange")
    last = offset + want - 1
    if content_range is None:
        if offset != 0 or want != size:
            raise SourceError(f"cannot read {where}: the endpoint ignores Range requests")
        if length != size:
            raise changed(f"now {length} bytes")
        return
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
