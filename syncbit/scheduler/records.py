"""The scheduler's small value types and the pure rules over them: a node's record, a
dataset's summary, assignment targets, and the checks of names, object ids and digests.

No state and no I/O: every function here answers from its arguments alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from syncbit.chunks import chunk_count
from syncbit.errors import DatasetExistsError, UserError
from syncbit.manifest import Manifest

OID_LEN = 32  # bytes of an object id (64 hex digits)
DIGEST_LEN = 32
MAX_NAME_BYTES = 255
MAX_CHUNK_INDEX = 2**32 - 1  # chunk indexes are u32 on the wire and in keys


@dataclass(frozen=True)
class NodeInfo:
    """One node as the scheduler sees it; `up` is derived from `last_seen` when read."""

    name: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    last_seen: float = 0.0
    load: int = 0
    cache_bytes: int = 0
    cache_size: int = 0
    reports: int = 0
    label_overrides: dict[str, str | None] = field(default_factory=dict)
    ready: dict[str, str] = field(default_factory=dict)  # dataset -> revision ready here
    pinned_bytes: int = 0
    pinned_over_budget: bool = False
    disk_full: bool = False  # its cache filesystem has no space left (new chunks not cached)
    disk_free: int = 0
    up: bool = False
    quarantined: dict[str, Any] | None = None  # {"since", "reason"}

    def to_json(self) -> dict[str, Any]:
        # Not `asdict`: it deep-copies, and every heartbeat answer carries one of these.
        return {name: getattr(self, name) for name in _NODE_FIELDS}


_NODE_FIELDS = tuple(f.name for f in fields(NodeInfo))


def effective_labels(base: dict[str, str], overrides: dict[str, str | None]) -> dict[str, str]:
    """The daemon's own labels with operator edits applied (None removes a label)."""
    labels = dict(base)
    for key, value in overrides.items():
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    return labels


def matches(target: dict[str, Any], name: str, labels: dict[str, str]) -> bool:
    """Whether an assignment target names the node `name` with `labels`: {"node": name}
    or {"selector": {k: v}} (every pair must match; an empty selector matches all)."""
    if "node" in target:
        return bool(target["node"] == name)
    selector: dict[str, str] = target.get("selector", {})
    return all(labels.get(k) == v for k, v in selector.items())


def describe_target(target: dict[str, Any]) -> str:
    if "node" in target:
        return f"node {target['node']}"
    selector = target.get("selector", {})
    return "selector " + (",".join(f"{k}={v}" for k, v in selector.items()) or "(all nodes)")


def dataset_summary(manifest: Manifest) -> dict[str, Any]:
    """The listing entry of a dataset: everything but its files (for an image, the
    digest its tag was pinned to and its platforms, as `image`)."""
    summary: dict[str, Any] = {
        "name": manifest.dataset,
        "source": manifest.source,
        "revision": manifest.revision,
        "files": len(manifest.files),
        "size": manifest.total_size,
        "created": manifest.created,
    }
    if manifest.source.startswith("oci://"):
        from syncbit.sources.oci.summary import image_summary

        image = image_summary(manifest.files)
        if image is not None:
            summary["image"] = image
    return summary


def held_bytes(mask: int, size: int, chunk_size: int) -> int:
    """Bytes covered by the set bits of `mask` in an object of `size` bytes."""
    count = chunk_count(size, chunk_size)
    mask &= (1 << count) - 1
    total = mask.bit_count() * chunk_size
    if count and mask >> (count - 1) & 1:
        total -= count * chunk_size - size  # the last chunk is short
    return total


def chunk_bytes(index: int, size: int, chunk_size: int) -> int:
    """The length of chunk `index` of an object of `size` bytes."""
    return max(0, min(chunk_size, size - index * chunk_size))


def check_oid(object_id: str) -> str:
    """`object_id` in lower case; UserError unless it is 64 hex digits."""
    if not is_oid(object_id):
        raise UserError(f"invalid object id {object_id!r}: expected {2 * OID_LEN} hex digits")
    return object_id.lower()


def is_oid(object_id: str) -> bool:
    try:
        return len(bytes.fromhex(object_id)) == OID_LEN and len(object_id) == 2 * OID_LEN
    except ValueError:
        return False


def check_digest(index: int, value: str) -> str:
    """`value` in lower case; UserError unless it is a digest (64 hex digits)."""
    try:
        ok = len(bytes.fromhex(value)) == DIGEST_LEN and len(value) == 2 * DIGEST_LEN
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"invalid digest {value!r} for chunk {index}: expected 64 hex digits")
    return value.lower()


def check_name(kind: str, name: str) -> str:
    """A node or dataset name fit for keys and logs: 1-255 bytes, no control character."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        size = 0  # a lone surrogate: no key could hold it
    if not 0 < size <= MAX_NAME_BYTES or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UserError(f"invalid {kind} name {name!r}: 1-{MAX_NAME_BYTES} printable bytes")
    return name


__all__ = [
    "DatasetExistsError",
    "NodeInfo",
    "check_digest",
    "check_name",
    "check_oid",
    "chunk_bytes",
    "dataset_summary",
    "describe_target",
    "effective_labels",
    "held_bytes",
    "is_oid",
    "matches",
]
