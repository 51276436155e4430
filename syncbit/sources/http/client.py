"""The requests of one HTTP listing: the dataset's headers, redirects followed hop by hop
as its `RedirectPolicy` allows, a host that resolves (or answers) from a link-local
address refused before its body is read, and httpx failures and statuses mapped to
syncbit's errors. Never puts query strings or header values into a message.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httpx
import trio

from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
    SyncbitError,
)
from syncbit.redact import redact_url, scrub
from syncbit.sources.fences import RedirectPolicy

MAX_REDIRECTS = 10
TEMPORARY = frozenset({408, 429})
GONE = frozenset({404, 410})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def cause_text(exc: BaseException) -> str:
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


def opaque_etag(tag: str) -> str:
    """An ETag without its weak marker, for comparing two of them."""
    return tag[2:] if tag.startswith("W/") else tag


def check_etag(
    headers: dict[str, str], etag: str | None, changed: Callable[[str], SourceChangedError]
) -> None:
    """An answer to a read pinned to `etag` carries that ETag (or none): an origin that
    ignores If-Match answers with another version's, refused as a change."""
    got = headers.get("etag")
    if etag and got and opaque_etag(got) != opaque_etag(etag):
        raise changed(f"now etag={got}")


class ListingClient:
    """`send` for one listing run: requests with the dataset's `headers`, redirects under
    `redirects`, host addresses resolved once per listing."""

    def __init__(
        self, client: httpx.AsyncClient, headers: dict[str, str], redirects: RedirectPolicy
    ) -> None:
        self.client = client
        self.headers = headers
        self.redirects = redirects
        self._resolved: dict[str, list[str]] = {}  # host -> addresses, once per listing

    @asynccontextmanager
    async def send(
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
                raise map_httpx(exc, url) from exc
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


def map_httpx(exc: Exception, url: str) -> SyncbitError:
    """The syncbit error for an httpx failure requesting `url`."""
    where = redact_url(url)
    if isinstance(exc, httpx.TimeoutException):
        return SourceUnavailableError(f"cannot reach {where}: timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return InvalidSourceError(f"cannot request {where}: {cause_text(exc)}")
    if isinstance(exc, httpx.TooManyRedirects):
        return InvalidSourceError(f"too many redirects from {where}")
    if isinstance(exc, httpx.TransportError):
        return SourceUnavailableError(f"cannot reach {where}: {cause_text(exc)}")
    return SourceError(f"request to {where} failed: {cause_text(exc)}")


def check_status(resp: httpx.Response, url: str) -> None:
    """Refuse a listing answer that is not a 2xx, as the error its status stands for."""
    status = resp.status_code
    if status in GONE:
        raise InvalidSourceError(f"nothing at {redact_url(url)}: HTTP {status}")
    if status in TEMPORARY or status >= 500:
        raise SourceUnavailableError(
            f"{redact_url(url)} is unavailable: HTTP {status} {resp.reason_phrase}".rstrip()
        )
    if not 200 <= status < 300:
        raise InvalidSourceError(
            f"cannot list {redact_url(url)}: HTTP {status} {resp.reason_phrase}".rstrip()
        )
