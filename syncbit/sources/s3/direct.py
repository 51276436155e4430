"""Ranged S3 reads by presigned URL through `wire.Pool`, not through boto3.

A GetObject through boto3 goes through botocore's request building and signing and
urllib3's response stack for every 16 MiB read (a 1 GiB pull from s3rver: 2.4-2.7 CPU
seconds in the daemon through boto3, 2.0-2.2 this way), and its transfers cannot be cut
short from another thread, so a slow stream cannot be raced. Here boto3 only signs: one
presigned GET URL per object version (query-string SigV4, signing the host alone, so
Range and If-Match ride as plain headers), reused for a few minutes; the bytes come
through `wire.Pool`.

Anything this path cannot judge goes back to boto3: a redirect (another region), a
403/400 (credentials, clock skew, a store that refuses query-string auth), a server
error before any read of the source succeeded this way, a TLS certificate the system
store does not know; if boto3 then reads it, the source reads through boto3 from then
on. An endpoint reached through a proxy (boto3 honours HTTP(S)_PROXY) and the option
`direct_reads: false` keep every read with boto3. Presigned URLs carry a signature
(and, with temporary credentials, the session token): they never reach a message or a
log (`redact_url` drops the query).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from syncbit.errors import SourceChangedError, SourceUnavailableError
from syncbit.manifest import FileEntry
from syncbit.sources.base import THROTTLING, check_range_body, unavailable
from syncbit.sources.http.client import cause_text, check_etag
from syncbit.wire import Abort, Pool, Response, WireError

log = logging.getLogger("syncbit.sources.s3")

SIGNED_FOR = 900  # seconds a presigned URL is valid
REUSED_FOR = 300  # seconds one URL is used before another is signed (credentials rotate)
_MAX_URLS = 4096  # presigned URLs kept (one per object version read lately)
_CHANGED = frozenset({404, 412, 416})  # gone, not that version (405: see read_into)
_TEMPORARY = frozenset({408, 429, 500, 502, 503, 504})
_CODE = re.compile(rb"<Code>([A-Za-z]{1,64})</Code>")


def _answer(resp: Response) -> str:
    """`HTTP 404 NoSuchKey`: the status and the S3 error code of the body, if any."""
    found = _CODE.search(resp.body[:4096])
    return f"HTTP {resp.status}" + (f" {found.group(1).decode()}" if found else "")


def proxied(endpoint: str) -> bool:
    """Whether the environment sends requests to `endpoint` through a proxy (boto3
    honours HTTP(S)_PROXY; `wire.Pool` connects directly, so such reads stay with it)."""
    parts = urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    if not proxies.get(parts.scheme):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


def _context() -> ssl.SSLContext | None:
    """The TLS context boto3 would trust too: AWS_CA_BUNDLE if set, else the system's
    (None: `wire.Pool`'s default)."""
    bundle = os.environ.get("AWS_CA_BUNDLE")
    return ssl.create_default_context(cafile=bundle) if bundle else None


class DirectReads:
    """Presigned ranged GETs of one bucket (see the module docstring).

    Args:
        presign: the object's presigned GET URL for (key, version id or None), valid for
            `SIGNED_FOR` seconds (boto3's `generate_presigned_url`; thread-safe).
        where: `s3://bucket/key` for messages.
        connections: idle connections kept (the source's pool size).
        clock: monotonic seconds (tests inject).
    """

    def __init__(
        self,
        presign: Callable[[str, str | None], str],
        where: Callable[[str], str],
        connections: int,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.presign = presign
        self.where = where
        self.clock = clock
        self.pool = Pool(timeout=timeout, max_idle=connections, ssl_context=_context())
        self._lock = threading.Lock()
        self._urls: dict[tuple[str, str | None], tuple[str, float]] = {}
        self.signed = 0  # URLs made (tests)
        # A read answered before: a 5xx is the store's trouble then, not this way of
        # asking (moto with enforced auth answers presigned GETs 500).
        self.proven = False

    def url(self, key: str, version_id: str | None, fresh: bool = False) -> str:
        """The presigned URL for the object version, signed anew when older than
        `REUSED_FOR` (or `fresh`)."""
        now = self.clock()
        with self._lock:
            kept = self._urls.get((key, version_id))
        if kept is not None and not fresh and now - kept[1] < REUSED_FOR:
            return kept[0]
        url = self.presign(key, version_id)
        with self._lock:
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            self._urls[(key, version_id)] = (url, now)
            self.signed += 1
        return url

    def read_into(
        self,
        entry: FileEntry,
        offset: int,
        buf: memoryview,
        size: int,
        changed: Callable[[str], SourceChangedError],
        abort: Abort | None = None,
    ) -> int | None:
        """Fill `buf` with bytes [offset, offset+len(buf)) of the pinned version: None
        when done, else the HTTP status (or 0: a TLS failure) boto3 should judge instead.
        Raises the source's errors for answers this path can judge."""
        key, version = entry.locator, entry.version
        where = self.where(key)
        etag = version.get("etag")
        headers = {"Accept-Encoding": "identity"}
        if etag:
            headers["If-Match"] = etag
        for attempt in range(2):
            url = self.url(key, version.get("version_id"), fresh=attempt > 0)
            try:
                resp = self.pool.get_into(url, offset, buf, headers, None, abort)
            except WireError as exc:
                if isinstance(exc.__cause__, ssl.SSLError):
                    return 0  # a CA only boto3's configuration knows
                raise SourceUnavailableError(f"cannot read {where}: {cause_text(exc)}") from exc
            status = resp.status
            if status in (200, 206):
                check_etag(resp.headers, etag, changed)  # a store that ignores If-Match
                check_range_body(resp, offset, len(buf), size, where, changed)
                self.proven = True
                return None
            if status in _CHANGED or (status == 405 and version.get("version_id")):
                raise changed(_answer(resp))  # 405 to a pinned version: a delete marker
            if status in _TEMPORARY and (self.proven or status in THROTTLING):
                raise unavailable(status, resp.headers, f"cannot read {where}: {_answer(resp)}")
            if status != 403:
                return status
            # 403: perhaps the URL outlived its credentials; once more, freshly signed.
        return 403

    def close(self) -> None:
        self.pool.close()


def presigner(client: Any, bucket: str) -> Callable[[str, str | None], str]:
    """`DirectReads.presign` over a boto3 S3 client."""

    def presign(key: str, version_id: str | None) -> str:
        params = {"Bucket": bucket, "Key": key}
        if version_id:
            params["VersionId"] = version_id
        url: str = client.generate_presigned_url("get_object", Params=params, ExpiresIn=SIGNED_FOR)
        return url

    return presign


__all__ = ["REUSED_FOR", "SIGNED_FOR", "DirectReads", "presigner", "proxied"]
