"""One listing of an HTTP source: autoindex pages walked and every file pinned to its
ETag/Last-Modified/size and a digest of its first bytes (`version["head"]`: an ETag
proves nothing about content). Requests run in one nursery, the first error cancels the
rest; every request goes through `ListingClient`. Reads no file beyond its head.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import trio

from syncbit.chunks import HEAD_SAMPLE, digest, head_length, identity_digest
from syncbit.errors import (
    InvalidSourceError,
    SourceError,
    SourceUnavailableError,
    SyncbitError,
    UnsafePathError,
)
from syncbit.manifest import FileEntry, safe_relpath
from syncbit.redact import redact_url
from syncbit.sources.http.autoindex import parse_index
from syncbit.sources.http.client import ListingClient, check_status, map_httpx, opaque_etag
from syncbit.wire import WireError, parse_content_range

# Autoindex trees this deep are a symlink loop on the server, not a dataset.
MAX_DEPTH = 64
MAX_PAGE = 256 * 2**20  # bytes of one autoindex page: far above any real directory


class Walk:
    """One listing run: index pages and HEADs in one nursery, the first error cancels all."""

    def __init__(self, http: ListingClient, limiter: trio.CapacityLimiter) -> None:
        self.http = http
        self.limiter = limiter
        self.files: dict[str, FileEntry] = {}
        self.dirs: set[str] = set()
        self._error: SyncbitError | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._spawn(fn, *args)
        if self._error is not None:
            raise self._error

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, fn, *args)

    async def _guarded(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        except SyncbitError as exc:
            # Keep the first error as it is (no exception group) and stop the others.
            if self._error is None:
                self._error = exc
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()

    async def directory(self, url: str, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise InvalidSourceError(
                f"directories nested deeper than {MAX_DEPTH} at {redact_url(url)}: "
                "a symlink loop on the server?"
            )
        async with self.limiter:
            resp, page = await self._page(url)
        check_status(resp, url)
        ctype = resp.headers.get("content-type", "")
        if "html" not in ctype.lower():
            raise InvalidSourceError(
                f"{redact_url(url)} is not an HTML directory listing "
                f"(Content-Type: {ctype or 'none'})"
            )
        base = str(resp.url)
        if not urlsplit(base).path.endswith("/"):
            base = url
        for link in parse_index(page, base):
            path = safe_relpath(prefix + link.name)
            if link.is_dir:
                self.dirs.add(path)
                self._spawn(self.directory, link.url, path + "/", depth + 1)
            else:
                self._spawn(self.file, link.url, path)

    async def root_file(self, url: str) -> None:
        last = urlsplit(url).path.rsplit("/", 1)[-1]
        try:
            name = safe_relpath(unquote(last, errors="strict"))
        except (UnsafePathError, UnicodeDecodeError) as exc:
            raise UnsafePathError(
                f"unsafe file name {last!r} in source {redact_url(url)}: {exc}"
            ) from None
        # The ranged GET answers what a HEAD would, and brings the head sample along.
        resp, head = await self._first_bytes(url)
        if resp.status_code == 416:  # an empty file has no byte 0 to ask for
            async with self.limiter:
                resp = await self._head(url)
        final = urlsplit(str(resp.url)).path
        if resp.status_code == 200 and final.endswith("/"):
            # `http://host/dir` redirected to `http://host/dir/`: it is a directory after all.
            await self.directory(str(resp.url), "", 0)
            return
        await self.file(url, name, resp, head)

    async def file(
        self,
        url: str,
        path: str,
        resp: httpx.Response | None = None,
        head: bytes | None = None,
    ) -> None:
        if resp is None:
            # A ranged GET of the head answers what a HEAD would (size, validators) and
            # brings the head sample with it: one request per file, as before the sample.
            resp, head = await self._first_bytes(url)
            if resp.status_code == 416:  # an empty file has no byte 0 to ask for
                async with self.limiter:
                    resp = await self._head(url)
        if resp.status_code in (405, 501):
            resp = await self._probe(url)  # no HEAD support: ask for the first byte instead
        check_status(resp, url)
        size = _size(resp, url)
        encoding = resp.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise InvalidSourceError(
                f"{redact_url(url)} is served with Content-Encoding {encoding}: "
                "byte ranges would not address the file's bytes"
            )
        etag = resp.headers.get("etag")
        last_modified = resp.headers.get("last-modified")
        version = {"size": str(size)}
        if etag:
            version["etag"] = etag
        if last_modified:
            version["last_modified"] = last_modified
        if head is not None and len(head) == head_length(size):
            sample = digest(head) if size else ""
        elif resp.request.headers.get("range") and resp.status_code == 200:
            sample = ""  # the listing's ranged GET got the whole file: Range is ignored
        else:
            sample = await self._head_sample(url, size, etag) if size else ""
        if sample:
            version["head"] = sample
        self.files[path] = FileEntry(
            path=path,
            size=size,
            mode=0o444,
            # The head is part of the identity: a server that changes a file but not its
            # ETag gives new content a new identity at the next listing, when the head moved.
            object=identity_digest("http", url, etag or "", last_modified or "", str(size), sample),
            locator=url,
            version=version,
        )

    async def _first_bytes(self, url: str) -> tuple[httpx.Response, bytes | None]:
        """A GET of the first HEAD_SAMPLE bytes: the response (its headers say what a HEAD
        says) and the body when it is the file's start (a 206, or a 200 of a small file);
        None when the server sends more (it ignores Range) or an error: not read."""
        range_ = {"Range": f"bytes=0-{HEAD_SAMPLE - 1}"}
        async with self.limiter, self.http.send("GET", url, range_) as resp:
            length = resp.headers.get("content-length", "")
            small = length.isdigit() and int(length) <= HEAD_SAMPLE
            start = resp.status_code == 200 or resp.headers.get("content-range", "").startswith(
                "bytes 0-"
            )
            if resp.status_code in (200, 206) and small and start:
                try:
                    return resp, await resp.aread()
                except httpx.HTTPError as exc:
                    raise map_httpx(exc, url) from exc
            return resp, None  # headers only: leaving the block drops the body

    async def _head_sample(self, url: str, size: int, etag: str | None) -> str:
        """Digest of the file's first `head_length(size)` bytes (one small ranged GET); ""
        when the server ignores Range on a larger file (it can serve only whole-file reads,
        which the fetcher then checks against nothing but the size)."""
        n = head_length(size)
        async with self.limiter, self.http.send("GET", url, {"Range": f"bytes=0-{n - 1}"}) as resp:
            check_status(resp, url)
            got = resp.headers.get("etag")
            if etag and got and opaque_etag(got) != opaque_etag(etag):
                raise SourceUnavailableError(f"{redact_url(url)} changed while listed")
            length = resp.headers.get("content-length", "")
            whole = resp.status_code == 200 and length == str(size) == str(n)
            ranged = resp.status_code == 206 and length == str(n)
            if ranged and not resp.headers.get("content-range", "").startswith("bytes 0-"):
                raise SourceError(f"cannot read the start of {redact_url(url)}")
            if not (whole or ranged):
                return ""  # headers only: leaving the block drops the body
            try:
                data = await resp.aread()
            except httpx.HTTPError as exc:
                raise map_httpx(exc, url) from exc
        if len(data) != n:
            raise SourceUnavailableError(f"{redact_url(url)}: short read of its first {n} bytes")
        return digest(data)

    async def _probe(self, url: str) -> httpx.Response:
        async with self.limiter, self.http.send("GET", url, {"Range": "bytes=0-0"}) as resp:
            return resp  # headers only; leaving the block drops the body

    async def _head(self, url: str) -> httpx.Response:
        async with self.http.send("HEAD", url) as resp:
            return resp

    async def _page(self, url: str) -> tuple[httpx.Response, str]:
        """A GET of a listing page: the final response and its text (at most MAX_PAGE)."""
        async with self.http.send("GET", url) as resp:
            body = bytearray()
            try:
                async for piece in resp.aiter_bytes():
                    body += piece
                    if len(body) > MAX_PAGE:
                        raise InvalidSourceError(
                            f"{redact_url(url)} sent more than {MAX_PAGE >> 20} MiB for one "
                            "listing page"
                        )
            except httpx.HTTPError as exc:
                raise map_httpx(exc, url) from exc
            return resp, body.decode(resp.encoding or "utf-8", errors="replace")


def _size(resp: httpx.Response, url: str) -> int:
    """The file's size from a HEAD (Content-Length) or a first-byte probe (Content-Range)."""
    value: str | None
    if resp.status_code == 206:
        try:
            value = str(parse_content_range(resp.headers.get("content-range", ""))[2])
        except WireError:
            value = None
    else:
        value = resp.headers.get("content-length")
    try:
        size = int(value) if value is not None else -1
    except ValueError:
        size = -1
    if size < 0:
        raise InvalidSourceError(
            f"{redact_url(url)} has no Content-Length: its size cannot be pinned"
        )
    return size
