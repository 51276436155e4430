"""What the registry mirror needs from whoever holds the bytes: the `BlobSource` interface,
and the values that cross it (`Repository`, `Content`, `Blob`).

Owns the contract only. A `BlobSource` answers a tag with the upstream registry's digest
and hands out blobs and manifests by digest, each verified against that digest before
the mirror sees a byte of it; it must never resolve a tag differently from the upstream,
and never hand out bytes it has not verified.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import trio

__all__ = ["Background", "Blob", "BlobSource", "Content", "Repository"]

BLOB_TYPE = "application/octet-stream"  # what registries say a blob is, whatever it holds


@dataclass(frozen=True)
class Repository:
    """One repository of one upstream registry: `registry` as image references name it
    (host[:port], `docker.io` for Docker Hub), `name` the repository path."""

    registry: str
    name: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.name}"


@dataclass(frozen=True)
class Content:
    """What a manifest or blob is: its digest (`sha256:<hex>`), size and media type."""

    digest: str
    size: int
    media_type: str


class Blob(Protocol):
    """A blob or manifest whose bytes were verified against `content.digest`, held (not
    evicted, not replaced) for as long as the context that handed it out is open."""

    @property
    def content(self) -> Content: ...

    async def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) (fewer only at the end); length <= 4 MiB."""
        ...


class BlobSource(Protocol):
    """The node side of the mirror. Errors are `RegistryError`s carrying the distribution
    API's code and status (the upstream's own code where it gave one)."""

    async def resolve_tag(self, repo: Repository, tag: str, accept: str | None) -> Content:
        """The manifest the upstream registry names `tag` now (asked with the client's
        `accept`, so that it answers as it would answer the client)."""
        ...

    def manifest(self, repo: Repository, digest: str) -> AbstractAsyncContextManager[Blob]:
        """The manifest (or index) `digest` of `repo`, verified."""
        ...

    def blob(
        self, repo: Repository, digest: str, size: int | None = None
    ) -> AbstractAsyncContextManager[Blob]:
        """The blob `digest` of `repo` (of `size` bytes, when known), verified."""
        ...


@runtime_checkable
class Background(Protocol):
    """A `BlobSource` with work of its own (warming what a manifest names), run by the
    server for as long as it serves and cancelled when serving ends."""

    async def run(self, task_status: trio.TaskStatus[None] = ...) -> None: ...
