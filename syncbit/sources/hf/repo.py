"""HuggingFace Hub names and listings, without the Hub: `hf://` URIs parsed to repo type,
id and revision, glob options, a repo tree's files as pinned entries, and the token of the
environment (HF_TOKEN or the token file). Pure but for reading that file; never logs it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from syncbit.chunks import identity_digest
from syncbit.errors import InvalidSourceError, SourceError
from syncbit.manifest import FileEntry, safe_relpath

_PREFIXES = {"models": "model", "datasets": "dataset"}
URL_PREFIX = {"model": "", "dataset": "datasets/"}  # a repo type's part of Hub URLs
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_hf_uri(uri: str) -> tuple[str, str, str | None]:
    """`hf://[models/|datasets/]<repo_id>[@revision]` -> (repo_type, repo_id, revision)."""
    scheme, sep, rest = uri.partition("://")
    if scheme.lower() != "hf" or not sep:
        raise InvalidSourceError(f"invalid HuggingFace source {uri!r}: expected hf://<repo_id>")
    if "?" in rest or "#" in rest:
        raise InvalidSourceError(
            f"invalid HuggingFace source {uri!r}: no query or fragment allowed; "
            "give the revision as hf://<repo_id>@<revision>"
        )
    repo, at, revision = rest.partition("@")
    repo = repo.strip("/")
    repo_type = "model"
    head, _, tail = repo.partition("/")
    if head in _PREFIXES and tail:
        repo_type, repo = _PREFIXES[head], tail
    elif head == "spaces":
        raise InvalidSourceError(f"unsupported HuggingFace source {uri!r}: Spaces are not datasets")
    parts = repo.split("/")
    if not 1 <= len(parts) <= 2 or not all(
        _REPO_PART.match(p) and "--" not in p and ".." not in p for p in parts
    ):
        raise InvalidSourceError(
            f"invalid HuggingFace source {uri!r}: the repo id must be 'name' or 'org/name' "
            "(letters, digits, '-', '_', '.')"
        )
    if at and not revision:
        raise InvalidSourceError(f"invalid HuggingFace source {uri!r}: empty revision after '@'")
    return repo_type, repo, unquote(revision) if at else None


def split_globs(value: Any, name: str) -> list[str]:
    """A glob list option: a list of strings, or one comma-separated string (from a flag)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items: Iterable[Any] = value.split(",")
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise InvalidSourceError(f"invalid HuggingFace option {name}={value!r}: expected globs")
    globs = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidSourceError(f"invalid HuggingFace option {name}: {item!r} is not a glob")
        globs += [g.strip() for g in item.split(",") if g.strip()]
    return globs


def _matches(path: str, globs: list[str]) -> bool:
    # fnmatchcase: `*` also crosses `/`, so `*.safetensors` selects shards in any folder.
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def tree_entries(
    items: Iterable[Any], commit: str, include: list[str], exclude: list[str]
) -> list[FileEntry]:
    """The entries of the files (`RepoFile`-like: path, size, blob_id, lfs) of a repo tree
    at `commit` that the globs keep, sorted by path.

    Whatever the tree says, every entry has a safe path: UnsafePathError otherwise, and
    SourceError for an item that is not what the Hub sends.
    """
    files: list[FileEntry] = []
    for item in items:
        path = safe_relpath(str(getattr(item, "path", "")))
        if include and not _matches(path, include):
            continue
        if _matches(path, exclude):
            continue
        files.append(_entry(path, item, commit))
    return sorted(files, key=lambda e: e.path)


def _entry(path: str, item: Any, commit: str) -> FileEntry:
    size = getattr(item, "size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise SourceError(f"the Hub listed {path!r} without a valid size ({size!r})")
    version = {"commit": commit, "size": str(size)}
    lfs = getattr(item, "lfs", None)
    if lfs is not None:
        sha256 = str(getattr(lfs, "sha256", "")).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise SourceError(f"the Hub listed {path!r} with an invalid LFS sha256")
        version["sha256"] = sha256
        identity = identity_digest("sha256", sha256)
    else:
        oid = str(getattr(item, "blob_id", ""))
        version["oid"] = oid
        identity = identity_digest("hf-git", oid)
    return FileEntry(
        path=path, size=size, mode=0o444, object=identity, locator=path, version=version
    )
