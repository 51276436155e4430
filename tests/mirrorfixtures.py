"""The registry mirror for tests: served for real on a free loopback port in a thread of
its own (`ServedMirror`), over an in-memory `BlobSource` (`MemoryBlobSource`, the one fake
of that interface) or over the upstream registries (no source given)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from syncbit.errors import RegistryError
from syncbit.mirror import BlobSource, Content, MirrorConfig, Repository, run_mirror, serve
from syncbit.mirror.backend import BLOB_TYPE


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class MemoryBlob:
    content: Content
    data: bytes
    source: MemoryBlobSource

    async def read(self, offset: int, length: int) -> bytes:
        self.source.reads += 1
        await trio.sleep(0)
        return self.data[offset : offset + length]


@dataclass
class MemoryBlobSource:
    """Content by digest and tags by repository, all in memory; records what was asked.
    `gate`, when set, holds every blob request until it is set from the test's thread."""

    content: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    tags: dict[tuple[Repository, str], str] = field(default_factory=dict)
    asked: list[tuple[str, Repository, str]] = field(default_factory=list)
    accepts: list[str | None] = field(default_factory=list)
    gate: threading.Event | None = None
    reads: int = 0
    held: int = 0  # blobs handed out and not yet given back

    def add(self, data: bytes, media_type: str = BLOB_TYPE) -> str:
        digest = sha256(data)
        self.content[digest] = (data, media_type)
        return digest

    def tag(self, repo: Repository, tag: str, digest: str) -> None:
        self.tags[(repo, tag)] = digest

    async def resolve_tag(self, repo: Repository, tag: str, accept: str | None) -> Content:
        self.asked.append(("tag", repo, tag))
        self.accepts.append(accept)
        digest = self.tags.get((repo, tag))
        if digest is None:
            raise RegistryError(f"{repo}:{tag}: not found", "MANIFEST_UNKNOWN", 404)
        data, media_type = self.content[digest]
        return Content(digest, len(data), media_type)

    @contextlib.asynccontextmanager
    async def manifest(self, repo: Repository, digest: str) -> AsyncIterator[MemoryBlob]:
        self.asked.append(("manifest", repo, digest))
        async with self._held(digest, "MANIFEST_UNKNOWN", manifest=True) as blob:
            yield blob

    @contextlib.asynccontextmanager
    async def blob(
        self, repo: Repository, digest: str, size: int | None = None
    ) -> AsyncIterator[MemoryBlob]:
        self.asked.append(("blob", repo, digest))
        if self.gate is not None:
            await trio.to_thread.run_sync(self.gate.wait)
        async with self._held(digest, "BLOB_UNKNOWN", manifest=False) as blob:
            yield blob

    @contextlib.asynccontextmanager
    async def _held(self, digest: str, code: str, manifest: bool) -> AsyncIterator[MemoryBlob]:
        if digest not in self.content:
            raise RegistryError(f"{digest}: not found", code, 404)
        data, media_type = self.content[digest]
        media_type = media_type if manifest else BLOB_TYPE
        self.held += 1
        try:
            yield MemoryBlob(Content(digest, len(data), media_type), data, self)
        finally:
            self.held -= 1


class ServedMirror:
    """The mirror served on 127.0.0.1 (a free port) in a thread with its own trio loop,
    over `source` (else the upstream registries, with the cache of `config`)."""

    def __init__(self, config: MirrorConfig, source: BlobSource | None = None) -> None:
        self.config = config.model_copy(update={"listen": "127.0.0.1:0"})
        self.source = source
        self.url = ""
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._shutdown: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mirror", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # handed to the test's thread
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            if self.source is None:
                binds = await nursery.start(run_mirror, self.config, self._shutdown)
            else:
                binds = await nursery.start(serve, self.config, self.source, self._shutdown)
            self.url = binds[0]
            self._ready.set()

    def __enter__(self) -> ServedMirror:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None or not self.url:
            raise RuntimeError(f"the mirror did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._shutdown is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._shutdown.set, trio_token=self._token)
        self._thread.join(60)
        if self._error is not None:
            raise self._error


def raw_get(url: str, target: str, close: bool = True) -> socket.socket:
    """A connection to the mirror at `url` that has sent `GET target` byte for byte (as
    no client library would send some targets)."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    extra = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: mirror\r\n{extra}\r\n".encode())
    return sock
