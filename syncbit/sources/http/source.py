"""`HttpSource`: a file URL, or a directory tree behind autoindex pages, listed by `walk`
and read by ranged GETs through `wire.Pool` that refuse any other version than the one
pinned (If-Match / If-Unmodified-Since, then the answer's validators and range checked).
Never puts query strings, credentials or header values into messages, logs or entries.
"""

from __future__ import annotations

import base64
import functools
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import trio

from syncbit.errors import (
    InvalidSourceError,
    SourcePermanentError,
    SourceUnavailableError,
)
from syncbit.manifest import FileEntry
from syncbit.redact import redact_url, strip_userinfo
from syncbit.sources.base import (
    Listing,
    Source,
    changed_error,
    check_range_body,
    pinned_size,
    register,
    unavailable,
)
from syncbit.sources.fences import Fences, RedirectPolicy
from syncbit.sources.http.client import (
    GONE,
    TEMPORARY,
    ListingClient,
    cause_text,
    check_etag,
)
from syncbit.sources.http.walk import Walk
from syncbit.wire import Abort, Pool, WireError

DEFAULT_CONCURRENCY = 16
DEFAULT_TIMEOUT = 30.0


_VERSION_KEYS = ("etag", "last_modified", "size")  # what pins a file, in messages


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
    abortable = True  # reads go through `wire.Pool`, whose transfers `Abort` ends

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
            # Redirects are followed by `ListingClient.send`, hop by hop, as the policy
            # allows.
            follow_redirects=False,
            timeout=self.timeout,
            verify=self.verify,
            # Reads go through wire.Pool, which uses no proxy; listing must see the same
            # server. Sizes are of the identity encoding, which is what ranges address.
            trust_env=False,
            headers={"Accept-Encoding": "identity"},
        ) as client:
            http = ListingClient(client, self.headers, self.redirects)
            walk = Walk(http, trio.CapacityLimiter(self.concurrency))
            if urlsplit(self.uri).path.endswith("/"):
                await walk.run(walk.directory, self.uri, "", 0)
            else:
                await walk.run(walk.root_file, self.uri)
        return Listing(
            files=sorted(walk.files.values(), key=lambda e: e.path), dirs=sorted(walk.dirs)
        )

    # -- reads -----------------------------------------------------------------------------

    def read_into(
        self, entry: FileEntry, offset: int, buf: memoryview, abort: Abort | None = None
    ) -> None:
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
            resp = self._pool.get_into(entry.locator, offset, buf, headers, self.redirects, abort)
        except WireError as exc:
            raise SourceUnavailableError(f"cannot read {url}: {cause_text(exc)}") from exc

        status = resp.status

        changed = functools.partial(changed_error, url, version, _VERSION_KEYS)

        if status in GONE or status in (412, 416):
            raise changed(f"HTTP {status}")
        if status in TEMPORARY or status >= 500:
            raise unavailable(status, resp.headers, f"cannot read {url}: HTTP {status}")
        if status in (401, 403):  # asking again gets the same answer
            raise SourcePermanentError(
                f"cannot read {url}: HTTP {status}: the origin refused this node's "
                "credentials (headers in source_options of this node's config for "
                f"{redact_url(self.uri)}; credentials given with `dataset add` serve the "
                "listing only)"
            )
        if status not in (200, 206):
            raise SourcePermanentError(f"cannot read {url}: HTTP {status}")
        check_etag(resp.headers, etag, changed)
        got_modified = resp.headers.get("last-modified")
        if last_modified and got_modified and got_modified != last_modified:
            raise changed(f"now last_modified={got_modified}")
        check_range_body(resp, offset, want, size, url, changed)

    def close(self) -> None:
        self._pool.close()
