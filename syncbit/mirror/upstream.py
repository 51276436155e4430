"""The first `BlobSource`: straight from the upstream registry, through the oci:// source's
registry client (its auth, credentials and redirect rules), into the mirror's own cache.

Owns the requests a mirror makes of a registry: a HEAD (else GET) of a tag for its
digest, a GET of a manifest or blob by digest streamed into the cache, and the mapping of
the registry's answers to the distribution API's error codes. A blob or manifest is served
only from the cache, so only after its sha256 matched; the registry's credentials are the
node's own and never leave for another host. Blocking client calls run in worker threads,
at most `fetch_concurrency` at once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from syncbit.errors import RegistryError, SourceError, SourceUnavailableError
from syncbit.mirror.backend import Content, Repository
from syncbit.mirror.cache import BlobCache, CachedBlob, Sink
from syncbit.mirror.config import MirrorConfig
from syncbit.redact import redact_url
from syncbit.sources.oci import (
    ACCEPT,
    MAX_MANIFEST_BYTES,
    OciReference,
    RegistryClient,
    find_credentials,
)

__all__ = ["UpstreamClient", "UpstreamSource"]

log = logging.getLogger("syncbit.mirror.upstream")

T = TypeVar("T")
MAX_CLIENTS = 128  # repositories with a client (connections, a token) kept at once
ERROR_BODY = 64 * 1024  # what is read of an error answer
PIECE = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_MEDIA_TYPE = re.compile(r"^[\x21-\x7e]{1,255}$")
_ACCEPT = re.compile(r"^[\x20-\x7e]{1,1024}$")
_MESSAGE = re.compile(r"[^\x20-\x7e]")
# Error codes of the distribution API a registry may answer a read with; passed on as given.
_CODES = frozenset(
    {"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_INVALID", "TAG_INVALID"}
)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes  # an error answer's body (capped), or a 200's when nothing consumed it
    url: str  # where the answer came from (after redirects)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


class UpstreamClient(RegistryClient):
    """The registry client of one repository, with the requests a mirror makes: any
    method, the caller's Accept, a 200 body handed to `consume` as it streams in."""

    def exchange(
        self,
        method: str,
        path: str,
        accept: str,
        what: str,
        consume: Callable[[httpx.Response], None] | None = None,
    ) -> Answer:
        """`method` /v2/<repository>/<path>, authenticated as the registry asks (anonymous,
        then as challenged, then with a renewed token), following its redirects."""
        url = f"{self.base}/v2/{self.ref.repository}/{path}"
        try:
            for _ in range(3):
                auth, fresh = self.auth.authorization()
                headers = {"Accept": accept, **({"Authorization": auth} if auth else {})}
                answer = self._follow(method, url, headers, what, consume)
                if answer.status != 401 or _origin(answer.url) != self.origin:
                    break
                self.auth.challenged(answer.headers.get("www-authenticate"), auth, fresh)
        except SourceUnavailableError as exc:  # the token service, temporarily
            raise RegistryError(_clean(str(exc)), "UNAVAILABLE", 503) from exc
        except SourceError as exc:  # credentials or a token refused
            raise RegistryError(_clean(str(exc)), "DENIED", 403) from exc
        return answer

    def _follow(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        what: str,
        consume: Callable[[httpx.Response], None] | None,
    ) -> Answer:
        client = self._client()
        where = f"registry {self.ref.registry}"
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                with client.stream(method, url, headers=headers) as resp:
                    location = resp.headers.get("location")
                    if resp.status_code in _REDIRECTS and location:
                        url, headers = self._next_hop(url, urljoin(url, location), headers)
                        continue
                    if resp.status_code == 200 and consume is not None and method == "GET":
                        consume(resp)
                        return Answer(200, resp.headers, b"", url)
                    body = _read_capped(resp, ERROR_BODY if consume else MAX_MANIFEST_BYTES)
                    return Answer(resp.status_code, resp.headers, body, url)
            except SourceError as exc:  # a redirect the registry client's rules refuse
                raise RegistryError(f"{what}: {_clean(str(exc))}", "UNKNOWN", 502) from exc
            except httpx.HTTPError as exc:
                why = "timed out" if isinstance(exc, httpx.TimeoutException) else str(exc)
                raise RegistryError(
                    f"cannot reach {where} for {what}: {_clean(why) or type(exc).__name__}",
                    "UNAVAILABLE",
                    503,
                ) from exc
        raise RegistryError(f"{what}: too many redirects at {where}", "UNKNOWN", 502)


def _read_capped(resp: httpx.Response, cap: int) -> bytes:
    body = bytearray()
    for piece in resp.iter_raw():
        body += piece
        if len(body) > cap:
            raise RegistryError(
                f"the registry's answer is larger than {cap} bytes", "MANIFEST_INVALID", 502
            )
    return bytes(body)


def _clean(text: str) -> str:
    """A message from elsewhere as one printable line, URLs without their query."""
    words = [redact_url(w) if "://" in w else w for w in text.split()]
    return _MESSAGE.sub("?", " ".join(words))[:300]


def _refusal(answer: Answer, what: str, registry: str, missing: str) -> RegistryError:
    """The error for a registry's non-200 answer: its own code where it gave a known one."""
    status, code, message = answer.status, "", ""
    try:
        errors = json.loads(answer.body).get("errors") or []
        first = errors[0] if isinstance(errors, list) and errors else {}
        code, message = str(first.get("code", "")), _clean(str(first.get("message", "")))
    except (ValueError, AttributeError, UnicodeDecodeError):
        pass
    said = f": {message}" if message else ""
    if status == 404:
        code = code if code in _CODES else missing
        return RegistryError(f"{what}: not found at registry {registry}{said}", code, 404)
    if status in (401, 403):
        return RegistryError(f"registry {registry} denied {what}{said}", "DENIED", 403)
    if status == 429:
        return RegistryError(f"registry {registry} is rate limiting", "TOOMANYREQUESTS", 429)
    if status == 408 or status >= 500:
        return RegistryError(
            f"registry {registry} is unavailable: HTTP {status}", "UNAVAILABLE", 503
        )
    return RegistryError(f"registry {registry} answered HTTP {status} for {what}", "UNKNOWN", 502)


class UpstreamSource:
    """`BlobSource` over the upstream registries, with a `BlobCache` of its own."""

    def __init__(
        self, config: MirrorConfig, cache: BlobCache, max_clients: int = MAX_CLIENTS
    ) -> None:
        self.config = config
        self.cache = cache
        self.max_clients = max_clients
        self._limiter = trio.CapacityLimiter(config.fetch_concurrency)
        self._clients: OrderedDict[Repository, tuple[UpstreamClient, int]] = OrderedDict()

    async def close(self) -> None:
        clients = [client for client, _ in self._clients.values()]
        self._clients.clear()
        for client in clients:
            await trio.to_thread.run_sync(client.close)

    # -- the BlobSource interface -------------------------------------------------------------

    async def resolve_tag(self, repo: Repository, tag: str, accept: str | None) -> Content:
        accept = accept if accept and _ACCEPT.match(accept) else ACCEPT
        what = f"{repo}:{tag}"
        answer = await self._call(
            repo, lambda c: c.exchange("HEAD", f"manifests/{tag}", accept, what)
        )
        digest = answer.headers.get("docker-content-digest", "")
        media_type = answer.headers.get("content-type", "").partition(";")[0].strip()
        length = answer.headers.get("content-length", "")
        if answer.status == 200 and _DIGEST.match(digest) and length.isdigit():
            if not _MEDIA_TYPE.match(media_type):
                raise RegistryError(f"{what}: the registry names no media type", "UNKNOWN", 502)
            return Content(digest, int(length), media_type)
        if answer.status not in (200, 404):
            raise _refusal(answer, what, repo.registry, "MANIFEST_UNKNOWN")
        # No digest in the HEAD answer, or a 404 without a body to say why: a GET.
        answer = await self._call(
            repo, lambda c: c.exchange("GET", f"manifests/{tag}", accept, what)
        )
        if answer.status != 200:
            raise _refusal(answer, what, repo.registry, "MANIFEST_UNKNOWN")
        body = answer.body
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        served = answer.headers.get("docker-content-digest")
        if served and served != digest:
            log.warning("%s: the registry says %s, its bytes are %s", what, served[:80], digest)
            raise RegistryError(
                f"{what}: the registry says {served[:80]} but its bytes are {digest}",
                "DIGEST_INVALID",
                502,
            )
        media_type = _manifest_type(answer.headers, what)
        await self.cache.ensure(digest, lambda sink: _put(sink, body, media_type), None, what, True)
        return Content(digest, len(body), media_type)

    async def blob_size(self, repo: Repository, digest: str) -> int:
        """The size the upstream registry gives blob `digest` (a HEAD: no bytes move). A
        claim is only as good as this number: the blob's bytes are checked against the
        digest all the same, so a wrong size fails the blob, never passes it."""
        what = f"blob {digest} of {repo}"
        answer = await self._call(
            repo, lambda c: c.exchange("HEAD", f"blobs/{digest}", f"{ACCEPT}, */*", what)
        )
        if answer.status != 200:
            raise _refusal(answer, what, repo.registry, "BLOB_UNKNOWN")
        length = answer.headers.get("content-length", "")
        if not length.isdigit() or len(length) > 18:
            raise RegistryError(f"{what}: the registry names no size", "UNKNOWN", 502)
        return int(length)

    @contextlib.asynccontextmanager
    async def manifest(self, repo: Repository, digest: str) -> AsyncIterator[CachedBlob]:
        what = f"manifest {digest} of {repo}"
        async with self._held(repo, digest, None, what, manifest=True) as blob:
            yield blob

    @contextlib.asynccontextmanager
    async def blob(
        self, repo: Repository, digest: str, size: int | None = None
    ) -> AsyncIterator[CachedBlob]:
        what = f"blob {digest} of {repo}"
        async with self._held(repo, digest, size, what, manifest=False) as blob:
            yield blob

    # -- fetching -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _held(
        self, repo: Repository, digest: str, size: int | None, what: str, manifest: bool
    ) -> AsyncIterator[CachedBlob]:
        for _ in range(3):  # evicted between fill and open: fill again
            content = self.cache.lookup(digest, manifest)
            if content is None:
                content = await self._fill(repo, digest, size, what, manifest)
            async with self.cache.held(content) as blob:
                if blob is not None:
                    yield blob
                    return
        raise RegistryError(f"{what}: evicted as soon as fetched", "UNAVAILABLE", 503)

    async def _fill(
        self, repo: Repository, digest: str, size: int | None, what: str, manifest: bool
    ) -> Content:
        """`digest` into the cache: a GET streamed into the cache's sink (in a worker
        thread, under the fetch limit)."""
        kind = "manifests" if manifest else "blobs"
        limit = min(size or MAX_MANIFEST_BYTES, MAX_MANIFEST_BYTES) if manifest else size

        def fetch(client: UpstreamClient, sink: Sink) -> str | None:
            found: list[str] = []

            def consume(resp: httpx.Response) -> None:
                _check_headers(resp, digest, size, what)
                if manifest:
                    found.append(_manifest_type(resp.headers, what))
                for piece in resp.iter_raw(PIECE):
                    sink.write(piece)

            # By digest, any media type: the digest decides what it is, not the Accept.
            answer = client.exchange("GET", f"{kind}/{digest}", f"{ACCEPT}, */*", what, consume)
            if answer.status != 200:
                raise _refusal(answer, what, repo.registry, kind.upper()[:-1] + "_UNKNOWN")
            return found[0] if manifest else None

        async with self._using(repo) as client:
            return await self.cache.ensure(
                digest, functools.partial(fetch, client), size, what, manifest, self._limiter, limit
            )

    async def _call(self, repo: Repository, call: Callable[[UpstreamClient], T]) -> T:
        async with self._using(repo) as client:
            result: T = await trio.to_thread.run_sync(call, client, limiter=self._limiter)
            return result

    @contextlib.asynccontextmanager
    async def _using(self, repo: Repository) -> AsyncIterator[UpstreamClient]:
        """The client of `repo` (made on first use; idle ones beyond `max_clients` closed,
        least recently used first)."""
        if repo in self._clients:
            client, users = self._clients.pop(repo)
        else:
            options = self.config.upstream(repo.registry)
            ref = OciReference(repo.registry, repo.name, None, None)
            ca = str(options.ca) if options.ca else None
            client = UpstreamClient(
                ref, options.insecure, ca, options.timeout, lambda: find_credentials(ref.registry)
            )
            users = 0
        self._clients[repo] = (client, users + 1)
        try:
            yield client
        finally:
            client, users = self._clients.pop(repo, (client, 1))
            self._clients[repo] = (client, users - 1)
            idle = [r for r, (_, n) in self._clients.items() if n == 0]
            excess = max(0, len(self._clients) - self.max_clients)
            victims = [self._clients.pop(r)[0] for r in idle[:excess]]
            with trio.CancelScope(shield=True):
                for victim in victims:
                    await trio.to_thread.run_sync(victim.close)


def _put(sink: Sink, body: bytes, media_type: str) -> str:
    sink.write(body)
    return media_type


def _manifest_type(headers: httpx.Headers, what: str) -> str:
    media_type = str(headers.get("content-type", "")).partition(";")[0].strip()
    if not _MEDIA_TYPE.match(media_type):
        raise RegistryError(f"{what}: the registry names no media type", "MANIFEST_INVALID", 502)
    return media_type


def _check_headers(resp: httpx.Response, digest: str, size: int | None, what: str) -> None:
    """Refuse a 200 whose headers already say it is not `digest` (before a byte is read)."""
    served = resp.headers.get("docker-content-digest")
    if served and served != digest:
        log.warning("rejected %s (%s): the registry served %s", digest, what, served[:80])
        raise RegistryError(
            f"{what}: the registry served {served[:80]} instead: rejected, nothing served",
            "DIGEST_INVALID",
            502,
        )
    length = resp.headers.get("content-length", "")
    if size is not None and length.isdigit() and int(length) != size:
        raise RegistryError(
            f"{what}: the registry sends {length} bytes, not {size}: rejected, nothing served",
            "SIZE_INVALID",
            502,
        )
