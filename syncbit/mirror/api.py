"""The read side of the OCI distribution API, as an ASGI app (starlette routing): `GET /v2/`,
`HEAD`/`GET /v2/<name>/manifests/<reference>` and `HEAD`/`GET /v2/<name>/blobs/<digest>`
(with one `Range`), for the registry a request names with containerd's `?ns=<registry>`.

Owns request parsing, the response headers (`Docker-Content-Digest`, `Content-Type`,
`Content-Length`, `Content-Range`) and the distribution API's JSON errors. Tags are
resolved by the `BlobSource` (the upstream's answer); everything by digest is served from
what the source verified. Never serves a byte the source did not hand out as verified,
never echoes a request header, and never answers a write (405). Bodies stream with trio
directly (not anyio, whose trio backend needs trio >= 0.32, newer than some machines
have), and a client that goes away stops its stream.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from syncbit.errors import InvalidSourceError, RegistryError
from syncbit.mirror.backend import Blob, BlobSource, Content, Repository
from syncbit.mirror.cache import check_digest
from syncbit.mirror.config import MirrorConfig, registry_host
from syncbit.sources.oci import parse_oci_uri

__all__ = ["PIECE", "byte_range", "make_app"]

log = logging.getLogger("syncbit.mirror")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PIECE = 1024 * 1024  # bytes per body message
API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")
_MANIFEST = re.compile(r"^(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_BLOB = re.compile(r"^(?P<name>.+)/blobs/(?P<digest>[^/]+)$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")
UNSATISFIABLE = (-1, -1)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One `bytes=first-last` (or suffix `bytes=-n`) range of a `size`-byte body as
    (first, last); None to serve the whole body (no header, or one this server ignores, as
    RFC 9110 allows: several ranges, other units); UNSATISFIABLE past the end."""
    match = _RANGE.match((header or "").strip().replace(" ", ""))
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text or int(last_text) == 0 or size == 0:
            return UNSATISFIABLE if last_text else None
        return max(0, size - int(last_text)), size - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # invalid: ignored
    if first >= size:
        return UNSATISFIABLE
    return first, min(int(last_text) if last_text else size - 1, size - 1)


def _headers(content: Content, length: int) -> list[tuple[bytes, bytes]]:
    return [
        API_VERSION,
        (b"content-type", content.media_type.encode()),
        (b"content-length", str(length).encode()),
        (b"docker-content-digest", content.digest.encode()),
        (b"etag", f'"{content.digest}"'.encode()),
    ]


async def _stream(blob: Blob, first: int, last: int, receive: Receive, send: Send) -> None:
    """Bytes [first, last] of `blob` as body messages, until the client goes away."""

    async def sender(done: trio.CancelScope) -> None:
        position = first
        while position <= last:
            data = await blob.read(position, min(PIECE, last + 1 - position))
            if not data:
                raise RegistryError(f"{blob.content.digest}: ended early", "UNKNOWN", 500)
            position += len(data)
            await send({"type": "http.response.body", "body": data, "more_body": position <= last})
        done.cancel()

    async def disconnect(done: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        done.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, nursery.cancel_scope)
        nursery.start_soon(disconnect, nursery.cancel_scope)


class _Request:
    """One parsed request under /v2/: the repository, what is asked for, how."""

    def __init__(self, request: Request, config: MirrorConfig) -> None:
        self.head = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            raise RegistryError(
                f"{request.method} is not served: this mirror is read-only", "UNSUPPORTED", 405
            )
        rest = request.path_params["rest"]
        self.manifest = _MANIFEST.match(rest)
        blob = _BLOB.match(rest)
        match = self.manifest or blob
        if match is None:
            raise RegistryError(f"/v2/{rest[:200]} is not served here", "UNSUPPORTED", 404)
        self.repo = Repository(self._registry(request, config), match["name"])
        try:
            parsed = parse_oci_uri(f"oci://{self.repo.registry}/{self.repo.name}")
        except InvalidSourceError:
            parsed = None
        if parsed is None or parsed.tag is not None or parsed.digest is not None:
            raise RegistryError(
                f"invalid repository name {match['name'][:200]!r}", "NAME_INVALID", 400
            )
        self.repo = Repository(parsed.registry, parsed.repository)
        self.reference = match["ref"] if self.manifest else match["digest"]
        self.tag = None if ":" in self.reference else self.reference
        if self.tag is not None:
            if not self.manifest or not _TAG.match(self.tag):
                raise RegistryError(f"invalid tag {self.tag[:200]!r}", "TAG_INVALID", 400)
        else:
            try:
                check_digest(self.reference)
            except ValueError:
                code = (
                    "UNSUPPORTED" if not self.reference.startswith("sha256:") else "DIGEST_INVALID"
                )
                raise RegistryError(
                    f"invalid digest {self.reference[:200]!r}: sha256:<64 hex digits> only",
                    code,
                    400,
                ) from None

    @staticmethod
    def _registry(request: Request, config: MirrorConfig) -> str:
        """The upstream a request is for: containerd's ?ns=, else the configured default."""
        ns = request.query_params.get("ns")
        if ns is not None:
            try:
                registry = registry_host(ns)
            except ValueError:
                raise RegistryError(f"invalid ns {ns[:100]!r}", "NAME_INVALID", 400) from None
        elif config.default_registry is not None:
            registry = config.default_registry
        else:
            raise RegistryError(
                "no upstream registry: ask with ?ns=<registry> (containerd does) or set "
                "the mirror's default_registry",
                "NAME_UNKNOWN",
                404,
            )
        config.upstream(registry)  # refuses registries this mirror does not serve
        return registry


class _Mirror:
    """The ASGI app of everything under /v2/ (starlette routes to it)."""

    def __init__(self, config: MirrorConfig, source: BlobSource) -> None:
        self.config = config
        self.source = source
        self.serving = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            if self.serving >= self.config.max_requests:
                raise RegistryError("too many requests at once", "TOOMANYREQUESTS", 429)
            self.serving += 1
            try:
                await self._serve(_Request(request, self.config), request, receive, tracked)
            finally:
                self.serving -= 1
        except RegistryError as exc:
            level = logging.WARNING if exc.status >= 500 else logging.INFO
            log.log(
                level, "%s %s: %d %s: %s", request.method, scope["path"], exc.status, exc.code, exc
            )
            if not started:
                writes = request.method not in ("GET", "HEAD")
                await _error(exc, request.method == "HEAD", send, close=writes)

    async def _serve(self, req: _Request, request: Request, receive: Receive, send: Send) -> None:
        if req.manifest:
            digest = req.reference
            if req.tag is not None:
                # Clients may send several Accept lines (skopeo does): one list.
                accept = ", ".join(request.headers.getlist("accept")) or None
                content = await self.source.resolve_tag(req.repo, req.tag, accept)
                if req.head:
                    await _start(send, 200, _headers(content, content.size))
                    await _end(send)
                    return
                digest = content.digest
            async with self.source.manifest(req.repo, digest) as blob:
                await self._send(blob, None, req.head, receive, send)
            return
        # A HEAD too is answered from the verified blob (fetched if need be): this mirror
        # states nothing about a blob it has not checked.
        async with self.source.blob(req.repo, req.reference) as blob:
            await self._send(blob, request.headers.get("range"), req.head, receive, send)

    @staticmethod
    async def _send(
        blob: Blob, range_header: str | None, head: bool, receive: Receive, send: Send
    ) -> None:
        content = blob.content
        size = content.size
        span = byte_range(range_header, size)
        if span == UNSATISFIABLE:
            raise RegistryError(
                f"range {range_header!s:.100} is past the end of {content.digest}",
                "RANGE_INVALID",
                416,
            )
        first, last = span if span is not None else (0, size - 1)
        headers = _headers(content, last + 1 - first)
        if content.media_type == "application/octet-stream" or span is not None:
            headers.append((b"accept-ranges", b"bytes"))
        if span is not None:
            headers.append((b"content-range", f"bytes {first}-{last}/{size}".encode()))
        await _start(send, 206 if span is not None else 200, headers)
        if head or last < first:
            await _end(send)
            return
        await _stream(blob, first, last, receive, send)


async def _start(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _end(send: Send) -> None:
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _error(exc: RegistryError, head: bool, send: Send, close: bool = False) -> None:
    """The distribution API's error body: {"errors": [{"code", "message", "detail"}]}.
    `close`: the connection ends after it (a refused write, whose body is not read: a
    client that sent the next request on it could lose it to the server's close)."""
    body = json.dumps(
        {"errors": [{"code": exc.code, "message": str(exc), "detail": None}]}
    ).encode()
    headers = [
        API_VERSION,
        (b"content-type", b"application/json; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await _start(send, exc.status, headers)
    await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})


class _Version:
    """`/v2/`: this speaks the distribution API (no auth: loopback, read-only)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            refused = RegistryError("this mirror is read-only", "UNSUPPORTED", 405)
            await _error(refused, False, send, close=True)
            return
        headers = [API_VERSION, (b"content-type", b"application/json"), (b"content-length", b"2")]
        await _start(send, 200, headers)
        body = b"" if scope["method"] == "HEAD" else b"{}"
        await send({"type": "http.response.body", "body": body, "more_body": False})


def make_app(config: MirrorConfig, source: BlobSource) -> Starlette:
    """The mirror's ASGI app over `source`."""
    mirror = _Mirror(config, source)
    return Starlette(routes=[Route("/v2/", _Version()), Route("/v2/{rest:path}", mirror)])
