"""HTTP(S) sources: one file URL, or a directory tree behind nginx/Apache autoindex pages.

Owns parsing autoindex pages (stdlib html.parser, never regexes on HTML), pinning each file
to its ETag/Last-Modified/size and a digest of its first bytes (`version["head"]`: an ETag
proves nothing about content, the fetcher checks the head on every source read), range
reads that refuse any other version, and following redirects only as the dataset's
`RedirectPolicy` allows (same scheme, same host unless `follow_redirects=any`, its headers
only to the same origin, never a link-local address). It never puts query strings,
credentials or header values into messages, logs or entries.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
import trio

from syncbit.chunks import HEAD_SAMPLE, digest, head_length, identity_digest
from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourcePermanentError,
    SourceUnavailableError,
    SyncbitError,
    UnsafePathError,
)
from syncbit.manifest import FileEntry, safe_relpath
from syncbit.redact import redact_url, scrub, strip_userinfo
from syncbit.sources.base import Listing, Source, check_range_body, pinned_size, register
from syncbit.sources.fences import Fences, RedirectPolicy
from syncbit.wire import Pool, WireError, parse_content_range

__all__ = ["HttpSource", "IndexLink", "parse_index", "redact_url"]

DEFAULT_CONCURRENCY = 16
DEFAULT_TIMEOUT = 30.0
# Autoindex trees this deep are a symlink loop on the server, not a dataset.
MAX_DEPTH = 64
MAX_REDIRECTS = 10
MAX_PAGE = 256 * 2**20  # bytes of one autoindex page: far above any real directory
_TEMPORARY = frozenset({408, 429})
_GONE = frozenset({404, 410})
# Characters left as they are when a raw href is re-quoted into a request URL: existing
# escapes and RFC 3986 reserved characters that are legal in a path.
_PATH_SAFE = "/%:@!$&'()*+,;=~"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


# -- URLs in messages ---------------------------------------------------------------------


def _cause(exc: BaseException) -> str:
    """The error's message, else the first message down its cause chain (httpx raises
    an empty ConnectError for a TLS failure; the ssl error below it says what failed)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if text := scrub(str(seen)):
            return text
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


# -- autoindex pages ----------------------------------------------------------------------


@dataclass(frozen=True)
class IndexLink:
    """One entry of a directory listing.

    `name` is decoded and checked safe (may contain `/` only when the page linked deeper);
    `url` is absolute and percent-encoded, ready for a request.
    """

    name: str
    url: str
    is_dir: bool


class _LinkCollector(HTMLParser):
    def __init__(self) -> None:
        # Attribute values are always entity-decoded by HTMLParser (`&amp;` -> `&`).
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            for name, value in attrs:
                if name == "href" and value is not None:
                    self.hrefs.append(value)


def _canonical_path(path: str) -> str:
    return quote(unquote(path), safe="/")


def _relative_href(href: str, base_scheme: str, base_netloc: str, base_path: str) -> str | None:
    """The part of `href` below the listed directory, still percent-encoded; None to skip."""
    if not href or href.startswith(("#", "?")):
        return None  # anchors and column-sort links (`?C=N;O=D`)
    parts = urlsplit(href)
    if parts.query or parts.fragment:
        return None  # names with '?' or '#' are percent-encoded, so these are not entries
    if parts.scheme or parts.netloc or href.startswith("/"):
        # An absolute link (Apache's "Parent Directory", a logo, a mirror): it is an entry
        # only if it points inside the directory being listed.
        if parts.scheme and parts.scheme.lower() != base_scheme.lower():
            return None
        if parts.netloc and parts.netloc.lower() != base_netloc.lower():
            return None
        path, base = _canonical_path(parts.path), _canonical_path(base_path)
        if not path.startswith(base) or path == base:
            return None
        return path[len(base) :]
    if href in ("../", "..", "./", "."):
        return None  # parent and self links
    if href.startswith("./"):
        href = href[2:]  # Apache writes './a:b' so that a name never reads as a URL scheme
    return href


def parse_index(page: str, base_url: str) -> list[IndexLink]:
    """The entries of an autoindex page listing the directory `base_url` (ending in `/`).

    Skips parent, self and sort links, anchors, and absolute links outside the directory.
    Raises UnsafePathError naming the entry when a decoded name would escape the root
    (`..` components, absolute paths, NUL, `..%2f`, backslash traversal, non-UTF-8).
    """
    base = urlsplit(base_url)
    prefix = urlunsplit((base.scheme, base.netloc, base.path, "", ""))
    if not prefix.endswith("/"):
        prefix += "/"
    collector = _LinkCollector()
    collector.feed(page)
    collector.close()
    links: dict[tuple[str, bool], IndexLink] = {}
    for raw_href in collector.hrefs:
        href = raw_href.strip()
        try:
            href.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: not text any request could carry
            raise UnsafePathError(
                f"unsafe entry {href!r} in the listing of {redact_url(base_url)}: not valid Unicode"
            ) from None
        rel = _relative_href(href, base.scheme, base.netloc, base.path)
        if rel is None:
            continue
        is_dir = rel.endswith("/")
        raw_name = rel[:-1] if is_dir else rel
        try:
            name = safe_relpath(unquote(raw_name, errors="strict"))
            name.encode("utf-8")
        except UnicodeError:
            raise UnsafePathError(
                f"unsafe entry {href!r} in the listing of {redact_url(base_url)}: "
                "the name is not valid UTF-8"
            ) from None
        except UnsafePathError as exc:
            raise UnsafePathError(
                f"unsafe entry {href!r} in the listing of {redact_url(base_url)}: {exc}"
            ) from None
        url = prefix + quote(rel, safe=_PATH_SAFE)
        links.setdefault((name, is_dir), IndexLink(name, url, is_dir))
    return list(links.values())


# -- the source ---------------------------------------------------------------------------


def _describe(version: dict[str, str]) -> str:
    keys = ("etag", "last_modified", "size")
    return " ".join(f"{k}={version[k]}" for k in keys if k in version) or "(unpinned)"


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


@register
class HttpSource(Source):
    """A file URL, or a directory URL (ending in `/`) listed through autoindex pages.

    Options (see `sources.options`): `headers` (a mapping, sent with every request to the
    source's own origin, e.g. Authorization; secret: never stored in a manifest),
    `timeout` (seconds per request), `concurrency` (parallel listing requests), `verify`
    (TLS certificate check, a boolean), `follow_redirects` (none, same-host: the default,
    or any), `allow_link_local` (config only). Credentials in the URL (`user:pw@`) become
    a Basic Authorization header and leave the URL, so no entry's locator carries them.
    """

    schemes = ("http", "https")

    def __init__(
        self, uri: str, options: dict[str, Any] | None = None, fences: Fences | None = None
    ) -> None:
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError as exc:
            raise InvalidSourceError(f"invalid HTTP source {redact_url(uri)!r}: {exc}") from exc
        if parts.scheme.lower() not in self.schemes or not parts.hostname:
            raise InvalidSourceError(
                f"invalid HTTP source {redact_url(uri)!r}: expected http(s)://host/path"
            )
        try:
            parts.hostname.encode("idna")
        except UnicodeError as exc:
            raise InvalidSourceError(
                f"invalid HTTP source {redact_url(uri)[:200]!r}: bad host name ({exc})"
            ) from None
        super().__init__(strip_userinfo(uri), options, fences)
        opts = self.options
        self.timeout = float(opts.get("timeout", DEFAULT_TIMEOUT))
        self.concurrency = int(opts.get("concurrency", DEFAULT_CONCURRENCY))
        self.verify = bool(opts.get("verify", True))
        self.headers: dict[str, str] = dict(opts.get("headers", {}))
        if parts.username is not None and not any(
            k.lower() == "authorization" for k in self.headers
        ):
            userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode(
                "ascii"
            )
        self.redirects = RedirectPolicy(
            follow=str(opts.get("follow_redirects", "same-host")),
            allow_link_local=bool(opts.get("allow_link_local", False)),
            private_headers=frozenset(k.lower() for k in self.headers),
        )
        self.redirects.check_url(self.uri)
        self._pool = Pool(timeout=self.timeout, verify=self.verify)

    # -- listing ---------------------------------------------------------------------------

    async def list(self) -> Listing:
        async with httpx.AsyncClient(
            # Redirects are followed by `_Walk.send`, hop by hop, as the policy allows.
            follow_redirects=False,
            timeout=self.timeout,
            verify=self.verify,
            # Reads go through wire.Pool, which uses no proxy; listing must see the same
            # server. Sizes are of the identity encoding, which is what ranges address.
            trust_env=False,
            headers={"Accept-Encoding": "identity"},
        ) as client:
            walk = _Walk(client, trio.CapacityLimiter(self.concurrency), self)
            if urlsplit(self.uri).path.endswith("/"):
                await walk.run(walk.directory, self.uri, "", 0)
            else:
                await walk.run(walk.root_file, self.uri)
        return Listing(
            files=sorted(walk.files.values(), key=lambda e: e.path), dirs=sorted(walk.dirs)
        )

    # -- reads -----------------------------------------------------------------------------

    def read_into(self, entry: FileEntry, offset: int, buf: memoryview) -> None:
        want = len(buf)
        if want == 0:
            return
        version = entry.version
        size = pinned_size(entry, offset, want)
        url = redact_url(entry.locator)
        headers = dict(self.headers)
        etag = version.get("etag")
        last_modified = version.get("last_modified")
        if etag and not etag.startswith("W/"):
            headers["If-Match"] = etag  # a weak ETag cannot be used for If-Match
        elif last_modified:
            headers["If-Unmodified-Since"] = last_modified
        try:
            resp = self._pool.get_into(entry.locator, offset, buf, headers, self.redirects)
        except WireError as exc:
            raise SourceUnavailableError(f"cannot read {url}: {_cause(exc)}") from exc

        status = resp.status

        def changed(why: str) -> SourceChangedError:
            return SourceChangedError(
                f"source changed: {url} no longer has version {_describe(version)} ({why})"
            )

        if status in _GONE or status in (412, 416):
            raise changed(f"HTTP {status}")
        if status in _TEMPORARY or status >= 500:
            raise SourceUnavailableError(f"cannot read {url}: HTTP {status}")
        if status in (401, 403):  # asking again gets the same answer
            raise SourcePermanentError(
                f"cannot read {url}: HTTP {status}: the origin refused this node's "
                "credentials (headers in source_options of this node's config for "
                f"{redact_url(self.uri)}; credentials given with `dataset add` serve the "
                "listing only)"
            )
        if status not in (200, 206):
            raise SourcePermanentError(f"cannot read {url}: HTTP {status}")
        got_etag = resp.headers.get("etag")
        if etag and got_etag and _opaque(got_etag) != _opaque(etag):
            raise changed(f"now etag={got_etag}")
        got_modified = resp.headers.get("last-modified")
        if last_modified and got_modified and got_modified != last_modified:
            raise changed(f"now last_modified={got_modified}")
        check_range_body(resp, offset, want, size, url, changed)

    def close(self) -> None:
        self._pool.close()


class _Walk:
    """One listing run: index pages and HEADs in one nursery, the first error cancels all."""

    def __init__(
        self, client: httpx.AsyncClient, limiter: trio.CapacityLimiter, source: HttpSource
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.headers = source.headers
        self.redirects = source.redirects
        self._resolved: dict[str, list[str]] = {}  # host -> addresses, once per listing
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
        _check_status(resp, url)
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
        _check_status(resp, url)
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
        async with self.limiter, self._send("GET", url, range_) as resp:
            length = resp.headers.get("content-length", "")
            small = length.isdigit() and int(length) <= HEAD_SAMPLE
            start = resp.status_code == 200 or resp.headers.get("content-range", "").startswith(
                "bytes 0-"
            )
            if resp.status_code in (200, 206) and small and start:
                try:
                    return resp, await resp.aread()
                except httpx.HTTPError as exc:
                    raise _map_httpx(exc, url) from exc
            return resp, None  # headers only: leaving the block drops the body

    async def _head_sample(self, url: str, size: int, etag: str | None) -> str:
        """Digest of the file's first `head_length(size)` bytes (one small ranged GET); ""
        when the server ignores Range on a larger file (it can serve only whole-file reads,
        which the fetcher then checks against nothing but the size)."""
        n = head_length(size)
        async with self.limiter, self._send("GET", url, {"Range": f"bytes=0-{n - 1}"}) as resp:
            _check_status(resp, url)
            got = resp.headers.get("etag")
            if etag and got and _opaque(got) != _opaque(etag):
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
                raise _map_httpx(exc, url) from exc
        if len(data) != n:
            raise SourceUnavailableError(f"{redact_url(url)}: short read of its first {n} bytes")
        return digest(data)

    async def _probe(self, url: str) -> httpx.Response:
        async with self.limiter, self._send("GET", url, {"Range": "bytes=0-0"}) as resp:
            return resp  # headers only; leaving the block drops the body

    async def _head(self, url: str) -> httpx.Response:
        async with self._send("HEAD", url) as resp:
            return resp

    async def _page(self, url: str) -> tuple[httpx.Response, str]:
        """A GET of a listing page: the final response and its text (at most MAX_PAGE)."""
        async with self._send("GET", url) as resp:
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
                raise _map_httpx(exc, url) from exc
            return resp, body.decode(resp.encoding or "utf-8", errors="replace")

    @asynccontextmanager
    async def _send(
        self, method: str, url: str, extra: dict[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """`method url` with the dataset's headers, following redirects as its policy
        allows; inside the block, the final response with its body unread."""
        headers = {**self.headers, **(extra or {})}
        for _ in range(MAX_REDIRECTS + 1):
            await self._check_host(url)
            try:
                request = self.client.build_request(method, url, headers=headers)
                resp = await self.client.send(request, stream=True)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise _map_httpx(exc, url) from exc
            try:
                self._check_peer(resp, url)
                if resp.status_code in _REDIRECTS and "location" in resp.headers:
                    url, headers = self.redirects.next_hop(url, resp.headers["location"], headers)
                    continue
                yield resp
                return
            finally:
                await resp.aclose()
        raise InvalidSourceError(f"too many redirects, last to {redact_url(url)}")

    async def _check_host(self, url: str) -> None:
        """Refuse a host whose name resolves to a link-local address, before connecting."""
        if self.redirects.allow_link_local:
            return
        host = urlsplit(url).hostname or ""
        addresses = self._resolved.get(host)
        if addresses is None:
            try:
                infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                infos = []  # the request itself reports a name that does not resolve
            addresses = self._resolved[host] = [str(info[4][0]) for info in infos]
        for address in addresses:
            self.redirects.check_address(url, address)

    def _check_peer(self, resp: httpx.Response, url: str) -> None:
        """Refuse an answer from a link-local peer (a name that resolved elsewhere when
        `_check_host` asked): its body is never read."""
        stream = resp.extensions.get("network_stream")
        try:
            peer = stream.get_extra_info("server_addr") if stream is not None else None
        except Exception:  # a transport that cannot say: the check before connecting stands
            peer = None
        if peer:
            self.redirects.check_address(url, str(peer[0]))


def _map_httpx(exc: Exception, url: str) -> SyncbitError:
    where = redact_url(url)
    if isinstance(exc, httpx.TimeoutException):
        return SourceUnavailableError(f"cannot reach {where}: timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return InvalidSourceError(f"cannot request {where}: {_cause(exc)}")
    if isinstance(exc, httpx.TooManyRedirects):
        return InvalidSourceError(f"too many redirects from {where}")
    if isinstance(exc, httpx.TransportError):
        return SourceUnavailableError(f"cannot reach {where}: {_cause(exc)}")
    return SourceError(f"request to {where} failed: {_cause(exc)}")


def _check_status(resp: httpx.Response, url: str) -> None:
    status = resp.status_code
    if status in _GONE:
        raise InvalidSourceError(f"nothing at {redact_url(url)}: HTTP {status}")
    if status in _TEMPORARY or status >= 500:
        raise SourceUnavailableError(
            f"{redact_url(url)} is unavailable: HTTP {status} {resp.reason_phrase}".rstrip()
        )
    if not 200 <= status < 300:
        raise InvalidSourceError(
            f"cannot list {redact_url(url)}: HTTP {status} {resp.reason_phrase}".rstrip()
        )


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
