"""The registry mirror's node side: the `BlobSource` that serves blobs through the node's
store and fetch layer, so a blob comes from this node's cache, else from a peer that holds
it, else from the upstream registry once per cluster (the scheduler's claims, as for any
chunk), and is reported like any chunk so that the next node takes it from a peer.

Owns the mapping of a registry blob to an object: its id is `identity_digest("sha256",
hex)`, as the oci:// source names it, so a blob a dataset holds and one a pull brought are
one object; an object no dataset names is registered with the scheduler first. Also owns
warming: once an image manifest is handed out, its config and layers are fetched in the
background, in manifest order, before the client asks (containerd asks for three at a
time), each node claiming the registry read of one blob at a time, so that nodes pulling
at once read different layers from the registry and take the others from each other. Never
hands out a byte before the whole blob matched its sha256 (`Fetcher.ensure` checks it),
never offers a blob it read from the registry to peers before that (nor one it relays
before the cluster recorded all its chunk digests), never resolves a tag differently
from a reachable upstream (tags and manifests go to the mirror's own upstream source;
only when it cannot be reached, to what an image dataset pinned), and never reaches the
network for a blob the store holds complete. Trio thread only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

import trio

from syncbit.chunks import DEFAULT_CHUNK_SIZE, chunk_count, identity_digest
from syncbit.errors import (
    CacheFullError,
    InvalidSourceError,
    ReadDeadlineError,
    RegistryError,
    SchedulerError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
    SyncbitError,
    UserError,
)
from syncbit.fetch import ChunkDirectory, Fetcher, OpenFile, Priority
from syncbit.manifest import FileEntry, Manifest
from syncbit.mirror.backend import BLOB_TYPE, Blob, Content, Repository
from syncbit.mirror.cache import MAX_READ, CachedBlob, check_digest
from syncbit.mirror.config import MirrorConfig
from syncbit.mirror.upstream import UpstreamSource
from syncbit.scheduler.client import MAX_CLAIM_CHUNKS
from syncbit.sources.oci import (
    MAX_MANIFEST_BYTES,
    OciReference,
    OciSource,
    parse_manifest,
    parse_oci_uri,
)
from syncbit.sources.oci.manifest import IMAGE_TYPES
from syncbit.store import ObjectStore, StoredObject

__all__ = ["NodeBlobSource", "StoredBlob", "blob_entry"]

log = logging.getLogger("syncbit.mirror.node")

MAX_SOURCES = 64  # repositories with an open oci:// source (connections, a token) kept

# Asks the scheduler to record an object no dataset names: (object id, size, chunk size)
# -> the (size, chunk size) it records.
Register = Callable[[str, int, int], Awaitable[tuple[int, int]]]
CLAIM_TTL = 120.0  # seconds a whole-blob claim holds before this node's flights renew it
# Blobs one node reads from the registry at once while warming. One: the fetch layer reads
# a blob over several streams anyway, and a node that claims only what it reads now leaves
# the next blobs to the other nodes pulling the same image (and each finished blob goes
# on to them sooner than if all were read at once).
WARM_SOURCE_READS = 1
# A blob's registry slot is handed to the next blob once at most this many of its bytes
# are still to come: the next blob's claim and first requests (~0.1 s) then overlap the
# tail of this one, so the registry link does not idle between blobs (measured at N=1:
# 3.06 s per 128 MiB layer against 2.81 s of link time when handed over at the last byte).
# Only while this node alone reads the image from the registry: when other nodes read
# some of its blobs too, their streams keep the registry link busy between this node's
# blobs, and an earlier claim would only slow the tail of a blob they wait for.
WARM_TAIL_BYTES = 16 * 1024 * 1024
RELAY_POLL = 0.2  # seconds between looks at whether a warmed blob's digests are all recorded


def blob_entry(digest: str, size: int) -> FileEntry:
    """Blob `digest` of `size` bytes as the file the oci:// source lists for it: the same
    object id, locator and version facts (the whole-blob sha256 the fetch layer checks)."""
    hex_digest = check_digest(digest)
    return FileEntry(
        path=f"blobs/sha256/{hex_digest}",
        size=size,
        mode=0o444,
        object=identity_digest("sha256", hex_digest),
        locator=f"blob:{digest}",
        version={"sha256": hex_digest, "size": str(size)},
    )


@dataclass(eq=False)
class StoredBlob:
    """A blob held in the node's store (the `Blob` of the backend interface), its whole
    sha256 verified; held against eviction until the context that handed it out ends."""

    fetcher: Fetcher
    handle: OpenFile
    _content: Content

    @property
    def content(self) -> Content:
        return self._content

    async def read(self, offset: int, length: int) -> bytes:
        data = await self.fetcher.read(self.handle, offset, length)
        return bytes(data)  # a view of a staged chunk is valid only until a checkpoint


class NodeBlobSource:
    """`BlobSource` over the node's store, fetch layer and peers; tags and manifests from
    `upstream` (the mirror's own verified cache: small, and a tag must be the upstream's
    answer). Without the scheduler (down, or refusing the object) a blob comes from
    `upstream` alone, verified all the same."""

    def __init__(
        self,
        config: MirrorConfig,
        upstream: UpstreamSource,
        store: ObjectStore,
        fetcher: Fetcher,
        directory: ChunkDirectory,
        register: Register,
        datasets: Callable[[], Iterable[Manifest]] = tuple,
    ) -> None:
        self.config = config
        self.upstream = upstream
        self._store = store
        self._fetcher = fetcher
        self._register = register
        self._directory = directory
        self._datasets = datasets
        self._sources: OrderedDict[Repository, OciSource] = OrderedDict()
        self._fetched: set[str] = set()  # objects no dataset names this mirror fetched
        # Of those, the ones whose every chunk digest the cluster recorded while this node
        # warmed it from another node's registry read (see `shareable`).
        self._relayed: set[str] = set()
        # Warming: blobs of manifests handed out, fetched before the client asks (`run`).
        self._nursery: trio.Nursery | None = None
        self._warm_slots = trio.Semaphore(WARM_SOURCE_READS)
        self._warming: dict[str, _Warming] = {}  # by blob digest

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Warming in the background, until cancelled; without it, blobs come when asked."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def close(self) -> None:
        """Blocking (connections close): after serving ended."""
        sources = list(self._sources.values())
        self._sources.clear()
        for source in sources:
            source.close()

    def shareable(self, obj: StoredObject) -> bool:
        """Whether other nodes may be offered `obj`'s chunks (the reporter asks): a blob
        this mirror fetches only once its whole sha256 checked, so a registry's wrong
        bytes never reach a peer, not even chunk by chunk. Except a relayed one: once the
        cluster recorded every chunk's digest (the node that read it from the registry
        reports none before its own whole check), each chunk is offered as it arrives,
        so that a layer spreads from every node that has part of it, not from its first
        reader alone. Such chunks came from peers checked against that record; one this
        node read from the registry itself is checked against it by the scheduler when
        reported, and one that differs is never offered."""
        if obj.id not in self._fetched or obj.id in self._relayed:
            return True
        return self._fetcher.is_verified(obj.id)

    # -- the BlobSource interface -------------------------------------------------------------

    async def resolve_tag(self, repo: Repository, tag: str, accept: str | None) -> Content:
        """The upstream's answer; only when the upstream cannot be reached, the revision a
        dataset of this node pinned for `repo:tag` (what `dataset add` resolved it to)."""
        try:
            return await self.upstream.resolve_tag(repo, tag, accept)
        except RegistryError as exc:
            if exc.status != 503:
                raise
            pinned = self._pinned_tag(repo, tag)
            if pinned is None:
                raise
            log.warning(
                "%s:%s: the registry is unreachable (%s): answering the dataset's pinned %s",
                repo,
                tag,
                exc,
                pinned.digest,
            )
            return pinned

    @contextlib.asynccontextmanager
    async def manifest(self, repo: Repository, digest: str) -> AsyncIterator[Blob]:
        """From the mirror's own cache or the upstream; when the upstream cannot be reached,
        from a dataset of this node that holds it (verified as any blob)."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                found: Blob = await stack.enter_async_context(self.upstream.manifest(repo, digest))
            except RegistryError as exc:
                located = self._in_dataset(digest) if exc.status == 503 else None
                if located is None:
                    raise
                entry, manifest = located
                held = await stack.enter_async_context(self._held(repo, entry, manifest))
                found = await _as_manifest(held, f"manifest {digest} of {repo}")
            await self._warm_manifest(repo, found)
            yield found

    @contextlib.asynccontextmanager
    async def blob(
        self, repo: Repository, digest: str, size: int | None = None
    ) -> AsyncIterator[StoredBlob | CachedBlob]:
        what = f"blob {digest} of {repo}"
        warming = self._warming.get(digest)
        if warming is not None:
            # Its chunks come at prefetch priority, this node's registry reads in their own
            # lane beside the peer transfers: the request's own flights would raise every
            # chunk to a read, and reads of other nodes' blobs go before all prefetch
            # work, this node's registry reads included (measured: the registry link then
            # idled for 10-25 s while peers' blobs were read). After warming (done or
            # failed), the request finds it here or fetches it itself as before; so it
            # does after a read deadline's wait, bounded as any read.
            with trio.move_on_after(self._fetcher.read_deadline):
                await warming.done.wait()
        entry, chunk_size = await self._locate(repo, digest, size, what)
        if entry is None:
            async with self.upstream.blob(repo, digest, size) as cached:
                yield cached
            return
        if self._in_dataset(digest) is None:  # a dataset's object is the dataset's to share
            self._fetched.add(entry.object)
        await self._claim_whole(entry, chunk_size)
        async with self._held(repo, entry, chunk_size) as blob:
            yield blob

    async def _claim_whole(self, entry: FileEntry, chunk_size: int) -> bool:
        """Claim every missing chunk of the blob in one request, so that one node reads a
        blob from the registry whole and the others wait for it: chunks of one blob split
        between two nodes would each be held back until the blob verified, which neither
        could do. A split grant (another node claimed some already) is given back. Whether
        this node is to read it from the registry (as far as the cluster said)."""
        obj = self._store.get(entry.object)
        count = chunk_count(entry.size, chunk_size)
        missing = list(
            itertools.islice(
                (i for i in range(count) if obj is None or not obj.has(i)), MAX_CLAIM_CHUNKS
            )
        )
        if not missing:
            return False
        try:
            result = await self._directory.claim(entry.object, missing, CLAIM_TTL)
            if result.granted and result.busy:
                await self._directory.release(entry.object, result.granted)
        except SyncbitError as exc:  # the fetch layer claims chunk by chunk then
            log.debug("no whole claim on %s: %s", entry.locator[5:], exc)
            return True
        return bool(result.granted) and not result.busy

    # -- warming: a manifest's blobs before the client asks -------------------------------------

    async def _warm_manifest(self, repo: Repository, manifest: Blob) -> None:
        """Start warming the config and layers of an image manifest (an index's children
        are warmed when the client picks one). Never fails the manifest's request."""
        content = manifest.content
        if self._nursery is None or content.media_type not in IMAGE_TYPES:
            return
        if content.size > MAX_MANIFEST_BYTES:
            return
        try:
            body = await _read_all(manifest)
            parsed = parse_manifest(body, content.media_type, f"manifest {content.digest}")
        except (SyncbitError, RegistryError) as exc:
            log.debug("not warming %s of %s: %s", content.digest, repo, exc)
            return
        wanted = [d for d in [parsed.config, *parsed.layers] if d is not None]
        blobs = [(d.digest, d.size) for d in wanted if d.size > 0 and not d.foreign]
        fresh = list({d: s for d, s in blobs if d not in self._warming}.items())
        if not fresh:
            return
        for digest, _ in fresh:
            self._warming[digest] = _Warming()
        self._nursery.start_soon(self._warm_blobs, repo, fresh)

    async def _warm_blobs(self, repo: Repository, blobs: list[tuple[str, int]]) -> None:
        """In manifest order: a blob no node reads yet is claimed when this node has a
        registry slot free, and read; one another node claimed is fetched from it once it
        verified there. A client's request for a blob waits until it is warmed."""
        pull = _Pull()
        try:
            async with trio.open_nursery() as nursery:
                for digest, size in blobs:
                    warming = self._warming[digest]
                    started = False
                    try:
                        started = await self._warm_claim(nursery, repo, digest, size, warming, pull)
                    finally:
                        if not started:
                            warming.done.set()
        finally:
            for digest, _ in blobs:
                self._warming.pop(digest, None)

    async def _warm_claim(
        self,
        nursery: trio.Nursery,
        repo: Repository,
        digest: str,
        size: int,
        warming: _Warming,
        pull: _Pull,
    ) -> bool:
        """Decide who reads one blob from the registry and start warming it here (True),
        or leave it (False: held here already, or the cluster cannot take it)."""
        what = f"blob {digest} of {repo}"
        try:
            entry, chunk_size = await self._locate(repo, digest, size, what)
        except (SyncbitError, RegistryError) as exc:
            log.debug("not warming %s: %s", what, exc)
            return False
        obj = self._store.get(entry.object) if entry is not None else None
        if entry is None or (obj is not None and all(obj.has(i) for i in range(obj.chunks))):
            return False  # the registry's alone (the client's request reads it), or held here
        if self._in_dataset(digest) is None:
            self._fetched.add(entry.object)
        await self._warm_slots.acquire()
        try:
            mine = await self._claim_whole(entry, chunk_size)
        except BaseException:
            self._warm_slots.release()
            raise
        if not mine:
            self._warm_slots.release()  # another node reads it: no registry slot used here
            pull.alone = False
        log.debug("warming %s: %s", what, "from the registry" if mine else "from peers")
        nursery.start_soon(self._warm_one, repo, entry, chunk_size, mine, warming, pull)
        return True

    async def _warm_one(
        self,
        repo: Repository,
        entry: FileEntry,
        chunk_size: int,
        mine: bool,
        warming: _Warming,
        pull: _Pull,
    ) -> None:
        """One blob warmed, at prefetch priority: a flight waiting for another node's
        registry read has no deadline then (a client's request waits a read deadline). This
        node's registry slot is held until the blob's last WARM_TAIL_BYTES are on their
        way while it reads the image alone (else until its last byte), not through the
        whole-blob check: the link is the scarce part."""
        source = self._source(repo)
        what = f"{entry.locator} of {repo}"
        try:
            if mine:
                slot = _Slot(self._warm_slots)
                try:
                    chunks = range(chunk_count(entry.size, chunk_size))
                    async with trio.open_nursery() as nursery:
                        if pull.alone:
                            nursery.start_soon(self._hand_over_near_the_end, entry, slot)
                        await self._fetcher.fetch_chunks(
                            entry, chunk_size, source, chunks, Priority.PREFETCH
                        )
                        nursery.cancel_scope.cancel()
                except SyncbitError as exc:
                    await self._give_up(entry, chunk_size)  # the next node need not wait
                    raise RegistryError(f"{what}: {exc}", "UNAVAILABLE", 503) from exc
                finally:
                    slot.release()
            if mine:
                await self._ensure(entry, chunk_size, source, what, Priority.PREFETCH)
                return
            # Another node's: its chunks park at once and move to the peer lane when that
            # node reports them, instead of queueing in the source lane one by one ahead
            # of this node's own registry reads (a chunk nobody reads any more is still
            # taken over when the lane idles, and a client's request that waited a read
            # deadline raises it to a read, as before warming).
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay_once_recorded, entry, chunk_size)
                await self._ensure(
                    entry, chunk_size, source, what, Priority.PREFETCH, _not_from_the_registry
                )
                nursery.cancel_scope.cancel()
        except RegistryError as exc:
            log.info("warming %s failed: %s", what, exc)
        finally:
            warming.done.set()

    async def _hand_over_near_the_end(self, entry: FileEntry, slot: _Slot) -> None:
        """Release `slot` (this node's registry read of `entry`) once at most
        WARM_TAIL_BYTES of the blob are still to be written; until then, or cancelled,
        not. (Written, not merely received: a count, not a scan per chunk event.)"""
        while True:
            obj = self._store.get(entry.object)
            left = entry.size if obj is None else (obj.chunks - len(obj.written)) * obj.chunk_size
            if left <= WARM_TAIL_BYTES:
                slot.release()
                return
            await self._store.written_event.wait()

    async def _relay_once_recorded(self, entry: FileEntry, chunk_size: int) -> None:
        """Mark a blob warmed from another node's registry read relayed (`shareable`) once
        the cluster recorded every chunk's digest; until then, or cancelled, not."""
        count = chunk_count(entry.size, chunk_size)
        while True:
            try:
                info = await self._directory.chunk_info(entry.object, RELAY_POLL / 2)
            except SyncbitError as exc:
                log.debug("chunk map of %s: %s", entry.locator[5:], exc)
            else:
                if info.broken is None and all(i in info.digests for i in range(count)):
                    self._relayed.add(entry.object)
                    return
            await trio.sleep(RELAY_POLL)

    @contextlib.asynccontextmanager
    async def _held(
        self, repo: Repository, entry: FileEntry, chunk_size: int
    ) -> AsyncIterator[StoredBlob]:
        """`entry` present in the store and verified, held until the context ends."""
        source = self._source(repo)
        await self._ensure(entry, chunk_size, source, f"{entry.locator} of {repo}")
        handle = self._fetcher.open(entry, chunk_size, source)
        self._fetcher.hold(handle)
        try:
            digest = f"sha256:{entry.version['sha256']}"
            yield StoredBlob(self._fetcher, handle, Content(digest, entry.size, BLOB_TYPE))
        finally:
            self._fetcher.release(handle)

    # -- datasets: what `dataset add` pinned ---------------------------------------------------

    def _image_datasets(self) -> Iterator[tuple[OciReference, Manifest]]:
        for manifest in self._datasets():
            if manifest.source.startswith("oci://"):
                try:
                    yield parse_oci_uri(manifest.source), manifest
                except InvalidSourceError:
                    continue

    def _pinned_tag(self, repo: Repository, tag: str) -> Content | None:
        """The root manifest a dataset of `repo:tag` pinned (its layout's index.json)."""
        for ref, manifest in self._image_datasets():
            if (ref.registry, ref.repository, ref.tag) != (repo.registry, repo.name, tag):
                continue
            index = next((f for f in manifest.files if f.path == "index.json"), None)
            kind, _, data = index.locator.partition(":") if index else ("", "", "")
            if kind != "data":
                continue
            try:
                root = json.loads(base64.b64decode(data))["manifests"][0]
                return Content(str(root["digest"]), int(root["size"]), str(root["mediaType"]))
            except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
                continue
        return None

    def _in_dataset(self, digest: str) -> tuple[FileEntry, int] | None:
        """A file of an image dataset holding `digest`, and its chunk size."""
        path = f"blobs/sha256/{check_digest(digest)}"
        for _, manifest in self._image_datasets():
            entry = next((f for f in manifest.files if f.path == path), None)
            if entry is not None:
                return entry, manifest.chunk_size
        return None

    # -- blobs ----------------------------------------------------------------------------------

    async def _locate(
        self, repo: Repository, digest: str, size: int | None, what: str
    ) -> tuple[FileEntry | None, int]:
        """The blob as a file of the store's and its chunk size; (None, 0) when the
        cluster cannot take it (the scheduler unreachable or refusing it)."""
        object_id = identity_digest("sha256", check_digest(digest))
        obj = self._store.get(object_id)
        if obj is not None and obj.size > 0 and all(obj.has(i) for i in range(obj.chunks)):
            return blob_entry(digest, obj.size), obj.chunk_size  # no network for cached data
        named = self._in_dataset(digest)
        if named is not None:  # the scheduler knows it: no registry request, no registration
            return named
        if size is None:
            size = obj.size if obj is not None else await self.upstream.blob_size(repo, digest)
        if size == 0:
            return None, 0  # nothing to share: the empty blob comes straight from upstream
        if not 0 < size <= self.config.cache_size:
            # The registry's word (a HEAD, a manifest's descriptor): a size no mirror here
            # could keep is neither registered for the cluster nor turned into chunks.
            log.warning(
                "%s: the registry says %d bytes, more than the mirror keeps (%d): from the "
                "registry alone",
                what,
                size,
                self.config.cache_size,
            )
            return None, 0
        try:
            known = await self._register(object_id, size, DEFAULT_CHUNK_SIZE)
        except (SchedulerError, UserError) as exc:
            log.warning("%s: the scheduler cannot take it (%s): from the registry alone", what, exc)
            return None, 0
        if known[0] != size:
            log.warning(
                "%s: the cluster knows it as %d bytes, the registry says %d: from the "
                "registry alone",
                what,
                known[0],
                size,
            )
            return None, 0
        return blob_entry(digest, size), known[1]

    async def _ensure(
        self,
        entry: FileEntry,
        chunk_size: int,
        source: OciSource,
        what: str,
        prio: Priority = Priority.FOREGROUND,
        may_source: Callable[[int], bool] | None = None,
    ) -> None:
        """Every chunk of the blob present and the whole blob's sha256 checked (from the
        cache, peers, or the upstream under the cluster's claims), or a RegistryError."""
        try:
            await self._fetcher.ensure(entry, chunk_size, source, prio, may_source)
        except SourceChangedError as exc:
            log.warning("rejected %s (%s): %s; nothing served", entry.locator[5:], what, exc)
            await self._give_up(entry, chunk_size)
            raise RegistryError(
                f"{what}: the bytes do not match its digest: rejected, nothing served",
                "DIGEST_INVALID",
                502,
            ) from exc
        except (SourceUnavailableError, ReadDeadlineError, CacheFullError) as exc:
            raise RegistryError(f"{what}: {exc}", "UNAVAILABLE", 503) from exc
        except SourceError as exc:  # refused, or a whole blob read at once failing its digest
            log.warning("cannot fetch %s (%s): %s; nothing served", entry.locator[5:], what, exc)
            raise RegistryError(f"{what}: {exc}", "UNKNOWN", 502) from exc
        except SyncbitError as exc:
            raise RegistryError(f"{what}: {exc}", "UNAVAILABLE", 503) from exc

    async def _give_up(self, entry: FileEntry, chunk_size: int) -> None:
        """After a rejected blob: this node's claims on its chunks released, so the next
        node reads the upstream itself at once instead of waiting for them to lapse."""
        indexes = list(range(chunk_count(entry.size, chunk_size)))
        try:
            for start in range(0, len(indexes), MAX_CLAIM_CHUNKS):
                chunk = indexes[start : start + MAX_CLAIM_CHUNKS]
                await self._directory.release(entry.object, chunk)
        except SyncbitError as exc:
            log.debug("could not release claims on %s: %s", entry.locator[5:], exc)

    def _source(self, repo: Repository) -> OciSource:
        """The oci:// source of `repo`, with the mirror's options for its registry (the
        fetch layer reads blob ranges through it); the least recently used closed beyond
        MAX_SOURCES."""
        source = self._sources.pop(repo, None)
        if source is None:
            options = self.config.upstream(repo.registry)
            given: dict[str, object] = {"insecure": options.insecure, "timeout": options.timeout}
            if options.ca is not None:
                given["ca"] = str(options.ca)
            source = OciSource(f"oci://{repo.registry}/{repo.name}", given)
        self._sources[repo] = source
        while len(self._sources) > MAX_SOURCES:
            # Not closed: a flight may still read through it; its connections go with it.
            self._sources.popitem(last=False)
        return source


async def _as_manifest(blob: StoredBlob, what: str) -> CachedManifest:
    """A verified manifest of the store with the media type its own bytes name."""
    if blob.content.size > MAX_MANIFEST_BYTES:
        raise RegistryError(f"{what}: larger than a manifest may be", "MANIFEST_INVALID", 502)
    body = await _read_all(blob)
    try:
        media_type = str(json.loads(body)["mediaType"])
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"{what}: names no media type", "MANIFEST_INVALID", 502) from None
    content = blob.content
    return CachedManifest(Content(content.digest, content.size, media_type), body)


@dataclass
class _Pull:
    """The warming of one manifest's blobs: whether this node alone reads them from the
    registry (no other node had claimed one when this node came to it) so far."""

    alone: bool = True


class _Slot:
    """One acquired slot of a semaphore, released at most once."""

    def __init__(self, semaphore: trio.Semaphore) -> None:
        self._semaphore: trio.Semaphore | None = semaphore

    def release(self) -> None:
        if self._semaphore is not None:
            self._semaphore.release()
            self._semaphore = None


@dataclass(eq=False)
class _Warming:
    """One blob being warmed; `done` once it is here and verified, or warming failed."""

    done: trio.Event = field(default_factory=trio.Event)


def _not_from_the_registry(index: int) -> bool:
    """A warmed chunk another node reads from the registry: wait for a peer."""
    return False


async def _read_all(blob: Blob) -> bytes:
    """A small blob's bytes (a manifest: at most MAX_MANIFEST_BYTES)."""
    body = b""
    while len(body) < blob.content.size:
        piece = await blob.read(len(body), min(MAX_READ, blob.content.size - len(body)))
        if not piece:
            break
        body += piece
    return body


@dataclass(frozen=True)
class CachedManifest:
    """A manifest's verified bytes in memory (at most MAX_MANIFEST_BYTES)."""

    content: Content
    body: bytes

    async def read(self, offset: int, length: int) -> bytes:
        return self.body[offset : offset + length]
