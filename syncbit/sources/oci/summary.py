"""What `status` and `dataset ls` say of an image dataset: the digest its tag was pinned to
and the platforms it holds, read from its listing alone (the layout's `index.json` and the
manifests inlined in the dataset manifest). Pure: no registry request, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

from syncbit.manifest import FileEntry

__all__ = ["image_summary"]

_MAX_PLATFORMS = 64  # listed per image; a huge index says "+N more"


def _inline(entry: FileEntry | None) -> Any:
    """The JSON of a file whose bytes travel in the dataset manifest, else None."""
    if entry is None:
        return None
    kind, _, data = entry.locator.partition(":")
    if kind != "data":
        return None
    try:
        return json.loads(base64.b64decode(data, validate=True))
    except (ValueError, binascii.Error):
        return None


def _platform(desc: dict[str, Any]) -> str | None:
    platform = desc.get("platform")
    if not isinstance(platform, dict):
        return None
    parts = [str(platform.get(k, "")) for k in ("os", "architecture", "variant")]
    if parts[0] in ("", "unknown"):
        return None  # attestation manifests (buildkit) name no real platform
    return "/".join(p for p in parts if p)


def image_summary(files: Iterable[FileEntry]) -> dict[str, Any] | None:
    """{"digest": root manifest digest, "platforms": ["linux/amd64", ...]} of an image
    layout's files (platforms empty when the listing does not say), or None when the files
    are not one."""
    by_path = {f.path: f for f in files}
    index = _inline(by_path.get("index.json"))
    try:
        root = index["manifests"][0]
        digest = str(root["digest"])
    except (TypeError, KeyError, IndexError):
        return None
    platforms: list[str] = []
    own = _platform(root)
    if own is not None:
        platforms.append(own)
    else:
        hex_digest = digest.partition(":")[2]
        children = _inline(by_path.get(f"blobs/sha256/{hex_digest}"))
        found = children.get("manifests") if isinstance(children, dict) else None
        for child in found if isinstance(found, list) else []:
            name = _platform(child) if isinstance(child, dict) else None
            if name is not None and name not in platforms:
                platforms.append(name)
    if len(platforms) > _MAX_PLATFORMS:
        platforms = [*platforms[:_MAX_PLATFORMS], f"+{len(platforms) - _MAX_PLATFORMS} more"]
    return {"digest": digest, "platforms": platforms}
