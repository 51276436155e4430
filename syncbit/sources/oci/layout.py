"""One listing of an image as an OCI image layout: the manifests reachable from the pinned
one walked (every platform, or the one asked for), each manifest, index, config and layer
a file `blobs/sha256/<hex>`, plus `oci-layout` and an `index.json` naming the root. Bounds
what a registry may make it walk; reads nothing but manifests and one image config.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from syncbit.chunks import identity_digest
from syncbit.errors import InvalidSourceError, SourceError
from syncbit.manifest import FileEntry
from syncbit.sources.oci.client import RegistryClient
from syncbit.sources.oci.manifest import (
    IMAGE_TYPES,
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    UNSUPPORTED,
    Descriptor,
    Parsed,
    check_digest,
    parse_manifest,
    unsupported,
)
from syncbit.sources.oci.reference import OciReference, Platform

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'
MAX_MANIFESTS = 256  # manifests and indexes one listing may walk
MAX_DEPTH = 4  # indexes within indexes
MAX_BLOBS = 10_000  # files of one listing
# Manifests up to this size travel inside the dataset manifest (no registry round trip to
# read them); the total is capped so that a huge index cannot bloat the scheduler's state.
INLINE_LIMIT = 16 * 1024
INLINE_BUDGET = 256 * 1024


def _inline(data: bytes) -> str:
    return "data:" + base64.b64encode(data).decode()


def _blob_entry(path: str, digest: str, size: int, locator: str) -> FileEntry:
    hex_digest = digest.partition(":")[2]
    return FileEntry(
        path=path,
        size=size,
        mode=0o444,
        object=identity_digest("sha256", hex_digest),
        locator=locator,
        version={"sha256": hex_digest, "size": str(size)},
    )


class Walk:
    """One listing: the manifests reachable from the pinned one, as layout files."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.files: dict[str, FileEntry] = {}  # path -> entry
        self.manifests = 0
        self.inline_left = INLINE_BUDGET

    def fetch(
        self, desc: Descriptor | None, reference: str, what: str
    ) -> tuple[bytes, Parsed, Descriptor]:
        """A manifest by digest (`desc`) or by tag, checked against its digest."""
        self.manifests += 1
        if self.manifests > MAX_MANIFESTS:
            raise InvalidSourceError(f"{what}: more than {MAX_MANIFESTS} manifests in one image")
        body, ctype, served = self.client.manifest(
            reference, what, lambda detail: InvalidSourceError(f"no such image: {what}{detail}")
        )
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if desc is not None:
            check_digest(body, desc.digest, what)
            if len(body) != desc.size:
                raise SourceError(f"{what}: {len(body)} bytes, the index says {desc.size}")
        if served and served != digest and served.startswith("sha256:"):
            raise SourceError(
                f"{what}: the registry says digest {served[:80]}, its bytes are {digest}"
            )
        parsed = parse_manifest(body, ctype, what)
        if (
            desc is not None
            and desc.media_type in INDEX_TYPES | IMAGE_TYPES
            and desc.media_type != parsed.media_type
        ):
            raise SourceError(
                f"{what}: the index says {desc.media_type}, the manifest is {parsed.media_type}"
            )
        found = Descriptor(parsed.media_type, digest, len(body), desc.platform if desc else None)
        self.add_manifest(found, body)
        return body, parsed, found

    def add_manifest(self, desc: Descriptor, body: bytes) -> None:
        if len(body) <= INLINE_LIMIT and len(body) <= self.inline_left:
            self.inline_left -= len(body)
            locator = _inline(body)
        else:
            locator = f"manifest:{desc.digest}"
        self.add(desc, locator)

    def add(self, desc: Descriptor, locator: str) -> None:
        path = f"blobs/sha256/{desc.hex}"
        if len(self.files) >= MAX_BLOBS:
            raise InvalidSourceError(f"{self.client.ref}: more than {MAX_BLOBS} blobs in one image")
        known = self.files.get(path)
        if known is not None:
            if known.size != desc.size:
                raise SourceError(
                    f"{self.client.where}: blob {desc.digest} is listed with sizes "
                    f"{known.size} and {desc.size}"
                )
            return
        self.files[path] = _blob_entry(path, desc.digest, desc.size, locator)

    def image(self, parsed: Parsed, what: str) -> None:
        assert parsed.config is not None
        for blob in [parsed.config, *parsed.layers]:
            if blob.foreign:
                raise InvalidSourceError(
                    f"{what} has a foreign layer {blob.digest} ({blob.media_type}) that the "
                    "registry does not hold: choose another platform (-o platform=os/arch)"
                )
            self.add(blob, f"blob:{blob.digest}")

    def everything(self, parsed: Parsed, what: str, depth: int) -> None:
        """Every manifest, config and layer below an index or image."""
        if not parsed.children:
            if parsed.media_type in IMAGE_TYPES:
                self.image(parsed, what)
            return
        if depth >= MAX_DEPTH:
            raise InvalidSourceError(f"{what}: indexes nested deeper than {MAX_DEPTH}")
        for child in parsed.children:
            if child.media_type in UNSUPPORTED:
                raise unsupported(child.media_type, f"{what} -> {child.digest}")
            if child.media_type not in IMAGE_TYPES | INDEX_TYPES:
                raise InvalidSourceError(
                    f"{what} lists {child.digest} of media type {child.media_type[:100]}, "
                    "which syncbit does not support"
                )
            if f"blobs/sha256/{child.hex}" in self.files:
                continue  # listed twice (several indexes name it): walked already
            child_what = self.client.ref.at(child.digest)
            _, sub, _ = self.fetch(child, child.digest, child_what)
            self.everything(sub, child_what, depth + 1)

    def one_platform(
        self, want: Platform, parsed: Parsed, top: Descriptor, what: str
    ) -> Descriptor:
        """The one image of platform `want` under the pinned manifest (it, if it is an
        image), walked; its descriptor."""
        if parsed.media_type in IMAGE_TYPES:
            have = self._image_platform(parsed, what)
            if have is None or not want.matches(have):
                raise InvalidSourceError(
                    f"{what} is a single-platform image for {have or 'an unknown platform'}, "
                    f"not {want}"
                )
            self.image(parsed, what)
            return Descriptor(top.media_type, top.digest, top.size, have)
        matches = [
            c for c in parsed.children if c.platform is not None and want.matches(c.platform)
        ]
        digests = {c.digest for c in matches}
        if not matches:
            offered = sorted(
                {
                    str(c.platform)
                    for c in parsed.children
                    if c.platform and c.platform.os != "unknown"
                }
            )
            raise InvalidSourceError(
                f"{what} has no image for platform {want}; it has: {', '.join(offered) or 'none'}"
            )
        if len(digests) > 1:
            offered = sorted(str(c.platform) for c in matches)
            raise InvalidSourceError(
                f"{what} has several images for {want} ({', '.join(offered)}): name the variant"
            )
        child = matches[0]
        if child.media_type not in IMAGE_TYPES:
            raise unsupported(child.media_type, f"{what} -> {child.digest}")
        child_what = self.client.ref.at(child.digest)
        _, sub, found = self.fetch(child, child.digest, child_what)
        self.image(sub, child_what)
        return found

    def _image_platform(self, parsed: Parsed, what: str) -> Platform | None:
        """The platform an image's config names (read from the registry)."""
        config = parsed.config
        assert config is not None
        if config.size > MAX_MANIFEST_BYTES:
            raise SourceError(f"{what}: the image config is larger than {MAX_MANIFEST_BYTES} bytes")
        buf = bytearray(config.size)
        self.client.read_blob(config.digest, 0, memoryview(buf), config.size, f"config of {what}")
        check_digest(buf, config.digest, f"config of {what}")
        try:
            return Platform.of(json.loads(buf))
        except (ValueError, UnicodeDecodeError):
            raise SourceError(f"{what}: the image config is not JSON") from None


def layout(client: RegistryClient, platform: Platform | None) -> tuple[list[FileEntry], str]:
    """The files of the image `client.ref` names (only `platform`'s, if given), sorted by
    path, and the digest of the layout's root manifest."""
    ref = client.ref
    walk = Walk(client)
    what = str(ref)
    _, parsed, top = walk.fetch(None, ref.reference, what)
    if ref.digest and top.digest != ref.digest:
        raise SourceError(f"{what}: the registry's bytes do not match the digest asked for")
    root = top
    if platform is not None:
        root = walk.one_platform(platform, parsed, top, what)
    else:
        walk.everything(parsed, what, 0)
    files = list(walk.files.values())
    for path, data in (("oci-layout", LAYOUT_BYTES), ("index.json", _index(root, ref))):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        files.append(_blob_entry(path, digest, len(data), _inline(data)))
    return sorted(files, key=lambda e: e.path), root.digest


def _index(root: Descriptor, ref: OciReference) -> bytes:
    """index.json of a layout whose one manifest is `root` (named by the tag, if any)."""
    entry: dict[str, Any] = {
        "mediaType": root.media_type,
        "digest": root.digest,
        "size": root.size,
    }
    if root.platform is not None:
        entry["platform"] = root.platform.to_json()
    if ref.tag:
        entry["annotations"] = {REF_NAME: ref.tag}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    return json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
