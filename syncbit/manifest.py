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
from syncbit.names import validate_dataset_name


class FileEntry(BaseModel):
    """One regular file of a dataset version.

    `uid`/`gid` are set by sources whose files have owners (`file://`): the mount then
    shows the source's owner and permission bits, so a file only root may read at the
    source is one only root may read on the mount. Without them a file is world-readable.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int = Field(ge=0)
    mode: int = 0o444
    uid: int | None = Field(default=None, ge=0)
    gid: int | None = Field(default=None, ge=0)
    object: str = Field(description="content identity: the key of the stored object")
    locator: str = Field(description="where the source finds the bytes (URL, key, path)")
    version: dict[str, str] = Field(default_factory=dict, description="pinned version facts")


class Perm(BaseModel):
    """Owner and permission bits of a directory (sources whose directories have them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: int = Field(ge=0, le=0o7777)
    uid: int = Field(ge=0)
    gid: int = Field(ge=0)


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
    dir_perms: dict[str, Perm] = Field(
        default_factory=dict,
        description="owner and mode by directory ('' is the dataset's top directory); "
        "directories without an entry are world-readable",
    )

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def safe_relpath(name: str) -> str:
    """Normalise a listed relative path, rejecting anything that could escape the root.

    Rejects empty names, NUL bytes, names that are not valid UTF-8 (lone surrogates: no
    reader could decode them, and the kernel protocol could not carry them), absolute
    paths, `.`/`..` components and backslashes used as separators. Returns the path with
    single `/` separators.
    """
    if not name or "\x00" in name:
        raise UnsafePathError(f"unsafe file name {name!r}: empty or contains NUL")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"unsafe file name {name!r}: not valid UTF-8") from None
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


_SECRET_WORDS = ("token", "secret", "password", "credential", "access_key", "auth", "header")


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
    dir_perms: dict[str, Perm] | None = None,
) -> Manifest:
    """Validate a listing and freeze it into a manifest with a content-derived revision.

    Modes lose their write and set-id bits (the mount is read-only, nosuid). A file with an
    owner keeps its read and execute bits as they are; one without is world-readable.
    """
    validate_dataset_name(dataset)
    seen: dict[str, FileEntry] = {}
    for entry in files:
        path = safe_relpath(entry.path)
        if path in seen:
            raise UnsafePathError(f"duplicate file name {path!r} in listing of {source}")
        mode = stat.S_IMODE(entry.mode) & 0o555
        if entry.uid is None or entry.gid is None:
            mode |= 0o444
        seen[path] = entry.model_copy(update={"path": path, "mode": mode})
    perms = {
        (safe_relpath(d) if d else ""): p.model_copy(update={"mode": p.mode & 0o555})
        for d, p in (dir_perms or {}).items()
    }
    all_dirs = {safe_relpath(d) for d in dirs}
    for path in seen:
        parent = posixpath.dirname(path)
        while parent:
            all_dirs.add(parent)
            parent = posixpath.dirname(parent)
    clash = all_dirs & seen.keys()
    if clash:
        raise UnsafePathError(f"name used as both file and directory: {sorted(clash)[0]!r}")
    stray = perms.keys() - all_dirs - {""}
    if stray:
        raise UnsafePathError(f"permissions for a directory not listed: {sorted(stray)[0]!r}")
    ordered = sorted(seen.values(), key=lambda e: e.path)
    revision = identity_digest(
        source,
        json.dumps(public_options(source_options), sort_keys=True),
        str(chunk_size),
        *(f"{e.path}|{e.size}|{e.mode}|{e.object}{_owner(e.uid, e.gid)}" for e in ordered),
        *sorted(all_dirs),
        *(f"{d}|{p.mode}{_owner(p.uid, p.gid)}" for d, p in sorted(perms.items())),
    )[:16]
    return Manifest(
        dataset=dataset,
        source=source,
        source_options=public_options(source_options),
        revision=revision,
        chunk_size=chunk_size,
        files=ordered,
        dirs=sorted(all_dirs),
        dir_perms=perms,
    )


def _owner(uid: int | None, gid: int | None) -> str:
    # Absent for sources without owners, so their revisions are what they always were.
    return "" if uid is None else f"|{uid}:{gid}"
