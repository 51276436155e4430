"""Manifests: the immutable description of one dataset version (paths, sizes, modes, identity).

A manifest is built from a source listing before any file body is downloaded. This module
validates names (nothing may escape the dataset root) and never touches the network.
"""

from __future__ import annotations

import json
import posixpath
import stat
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from syncbit.chunks import DEFAULT_CHUNK_SIZE, identity_digest
from syncbit.errors import UnsafePathError


class FileEntry(BaseModel):
    """One regular file of a dataset version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int = Field(ge=0)
    mode: int = 0o444
    object: str = Field(description="content identity: the key of the stored object")
    locator: str = Field(description="where the source finds the bytes (URL, key, path)")
    version: dict[str, str] = Field(default_factory=dict, description="pinned version facts")


class Manifest(BaseModel):
    """A resolved, immutable dataset version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    source: str
    source_options: dict[str, Any] = Field(
        default_factory=dict,
        description="non-secret options every node needs to open the source (endpoint, "
        "region, include/exclude); credentials never go here",
    )
    revision: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    created: float = Field(default_factory=time.time)
    files: list[FileEntry]
    dirs: list[str] = Field(default_factory=list)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def safe_relpath(name: str) -> str:
    """Normalise a listed relative path, rejecting anything that could escape the root.

    Rejects empty names, NUL bytes, absolute paths, `.`/`..` components and backslashes
    used as separators. Returns the path with single `/` separators.
    """
    if not name or "\x00" in name:
        raise UnsafePathError(f"unsafe file name {name!r}: empty or contains NUL")
    if name.startswith("/"):
        raise UnsafePathError(f"unsafe file name {name!r}: absolute path")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePathError(f"unsafe file name {name!r}: '{part or '//'}' component")
        if ".." in part.split("\\"):
            # A backslash is a legal byte in a POSIX name, but '..\\x' escapes on readers
            # that treat it as a separator; refuse it.
            raise UnsafePathError(f"unsafe file name {name!r}: backslash traversal")
    return "/".join(parts)


def validate_dataset_name(name: str) -> str:
    """A dataset name is one path component under the mount."""
    if not name or "/" in name or name in (".", "..") or "\x00" in name or name.startswith("."):
        raise UnsafePathError(f"invalid dataset name {name!r}: must be one path component")
    return name


_SECRET_WORDS = ("token", "secret", "password", "credential", "access_key", "auth")


def public_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The source options a manifest may carry: secret-looking keys are dropped, so
    credentials never reach the scheduler's state, status output or other nodes."""
    return {
        k: v for k, v in (options or {}).items() if not any(w in k.lower() for w in _SECRET_WORDS)
    }


def build_manifest(
    dataset: str,
    source: str,
    files: list[FileEntry],
    dirs: list[str] = (),  # type: ignore[assignment]
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    source_options: dict[str, Any] | None = None,
) -> Manifest:
    """Validate a listing and freeze it into a manifest with a content-derived revision."""
    validate_dataset_name(dataset)
    seen: dict[str, FileEntry] = {}
    for entry in files:
        path = safe_relpath(entry.path)
        if path in seen:
            raise UnsafePathError(f"duplicate file name {path!r} in listing of {source}")
        mode = stat.S_IMODE(entry.mode) & 0o555 | 0o444
        seen[path] = entry.model_copy(update={"path": path, "mode": mode})
    all_dirs = {safe_relpath(d) for d in dirs}
    for path in seen:
        parent = posixpath.dirname(path)
        while parent:
            all_dirs.add(parent)
            parent = posixpath.dirname(parent)
    clash = all_dirs & seen.keys()
    if clash:
        raise UnsafePathError(f"name used as both file and directory: {sorted(clash)[0]!r}")
    ordered = sorted(seen.values(), key=lambda e: e.path)
    revision = identity_digest(
        source,
        json.dumps(public_options(source_options), sort_keys=True),
        str(chunk_size),
        *(f"{e.path}|{e.size}|{e.mode}|{e.object}" for e in ordered),
        *sorted(all_dirs),
    )[:16]
    return Manifest(
        dataset=dataset,
        source=source,
        source_options=public_options(source_options),
        revision=revision,
        chunk_size=chunk_size,
        files=ordered,
        dirs=sorted(all_dirs),
    )
