"""OCI and Docker v2 manifests and indexes: media types, descriptors, and the parse that
refuses whatever is ambiguous, oversized or of another digest algorithm. Pure: bytes in,
parts out; nothing is fetched here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from syncbit.errors import InvalidSourceError, SourceError
from syncbit.sources.oci.reference import DIGEST, PRINTABLE, Platform, other_algorithm

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
ACCEPT = ", ".join(sorted(IMAGE_TYPES | INDEX_TYPES))
UNSUPPORTED = {
    "application/vnd.docker.distribution.manifest.v1+json": "Docker schema 1",
    "application/vnd.docker.distribution.manifest.v1+prettyjws": "Docker schema 1",
    "application/vnd.oci.artifact.manifest.v1+json": "OCI artifact manifest",
}
# Layers a registry may not hold: their bytes live at `urls` outside the registry.
_FOREIGN = (
    "application/vnd.docker.image.rootfs.foreign.",
    "application/vnd.oci.image.layer.nondistributable.",
)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution's own limit on a manifest's size
MAX_BLOB_SIZE = 1 << 44  # 16 TiB: a descriptor claiming more is not a real blob


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    foreign: bool = False

    @property
    def hex(self) -> str:
        return self.digest.partition(":")[2]


def _descriptor(doc: Any, where: str) -> Descriptor:
    if not isinstance(doc, dict):
        raise SourceError(f"{where}: a descriptor is not an object")
    media_type, digest, size = doc.get("mediaType"), doc.get("digest"), doc.get("size")
    if not isinstance(media_type, str) or not PRINTABLE.match(media_type):
        raise SourceError(f"{where}: a descriptor has no valid mediaType")
    if not isinstance(digest, str) or not DIGEST.match(digest):
        if isinstance(digest, str) and other_algorithm(digest):
            raise InvalidSourceError(
                f"{where}: blob {digest[:80]} uses a digest algorithm other than sha256 "
                "(unsupported)"
            )
        raise SourceError(f"{where}: a descriptor has no valid digest")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB_SIZE:
        raise SourceError(f"{where}: descriptor {digest} has an invalid size")
    foreign = media_type.startswith(_FOREIGN)
    return Descriptor(media_type, digest, size, Platform.of(doc.get("platform")), foreign)


@dataclass(frozen=True)
class Parsed:
    """A manifest's parts: an index's `children`, or an image's `config` and `layers`."""

    media_type: str
    children: list[Descriptor] = field(default_factory=list)
    config: Descriptor | None = None
    layers: list[Descriptor] = field(default_factory=list)


def unsupported(media_type: str, where: str) -> InvalidSourceError:
    kind = UNSUPPORTED.get(media_type, "this")
    return InvalidSourceError(
        f"{where} is a {kind} manifest ({media_type[:100]}), which syncbit does not support: "
        "OCI image manifests and indexes and Docker v2 schema 2 manifests and lists are"
    )


def parse_manifest(body: bytes, content_type: str | None, where: str) -> Parsed:
    """Parse an image manifest or index (OCI or Docker v2 schema 2). The registry's
    Content-Type and the document's own mediaType must agree where both are given."""
    ctype = (content_type or "").partition(";")[0].strip().lower()
    if ctype in UNSUPPORTED:
        raise unsupported(ctype, where)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SourceError(f"{where}: the manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{where}: the manifest is not a JSON object")
    declared = doc.get("mediaType")
    if declared is not None and (not isinstance(declared, str) or not PRINTABLE.match(declared)):
        raise SourceError(f"{where}: invalid mediaType in the manifest")
    if doc.get("schemaVersion") == 1 or declared in UNSUPPORTED:
        raise unsupported(declared or "application/vnd.docker.distribution.manifest.v1+json", where)
    known = IMAGE_TYPES | INDEX_TYPES
    if declared in known and ctype in known and declared != ctype:
        raise SourceError(
            f"{where}: the registry says {ctype} but the manifest says {declared}: refusing "
            "an ambiguous manifest"
        )
    media_type = declared if declared in known else ctype if ctype in known else ""
    if not media_type:
        if declared or ctype not in ("", "application/json", "application/octet-stream"):
            raise unsupported(declared or ctype, where)
        # OCI manifests may leave mediaType out: tell them apart by their fields.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if doc.get("schemaVersion") != 2:
        raise SourceError(f"{where}: schemaVersion is not 2")
    if media_type in INDEX_TYPES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise SourceError(f"{where}: the index has no manifests list")
        return Parsed(media_type, children=[_descriptor(c, where) for c in children])
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise SourceError(f"{where}: the image manifest has no layers list")
    return Parsed(
        media_type,
        config=_descriptor(doc.get("config"), where),
        layers=[_descriptor(layer, where) for layer in layers],
    )


def check_digest(body: bytes | bytearray | memoryview, digest: str, what: str) -> None:
    got = hashlib.sha256(body).hexdigest()
    if got != digest.partition(":")[2]:
        raise SourceError(
            f"{what}: the registry's bytes do not match digest {digest} (got sha256:{got})"
        )
