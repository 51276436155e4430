"""A HuggingFace-Hub-compatible HTTP server for tests and benchmarks, on loopback only.

Owns repos (models and datasets) made of immutable commits over content-addressed blobs,
and exactly the endpoints huggingface_hub calls to resolve a revision, list a tree and
download a file: revision info, tree listing, refs, and `resolve` with the Hub's headers
and errors; LFS bodies come from a separate storage origin behind signed redirects, as on
the real Hub. It must never serve a file outside its root or listen beyond its host.

In-process::

    with Hub(tmp_path) as hub:
        sha = hub.add_commit("org/model", {"config.json": b"{}", "w.bin": big_bytes})
        # HF_ENDPOINT=hub.url: snapshot_download("org/model", endpoint=hub.url) works

As a process (`python -m syncbit_testing.hub --root DIR --port 0`): prints `READY <port>`
once listening, serves `GET /__stats` (JSON) and `POST /__reset` on the API port, stops on
SIGTERM/SIGINT. Repos can also be laid out as plain directories, imported at start:
`ROOT/<models|datasets>/<org>/<name>/<branch>/<files...>` (one commit per branch, made
again only when the directory's content changed).

On disk under ROOT/.hub/: `state.json` (repos, refs, commits: path -> blob sha256) and
`objects/<sha256>` (blobs given as bytes or as files outside ROOT; files inside ROOT are
served where they are).

The Hub's rules this server reproduces:

- Files of at least `lfs_threshold` bytes are LFS files: the tree lists them with the git
  oid of their LFS pointer and `lfs: {oid: sha256, size, pointerSize}`; `resolve` answers
  302 to the storage origin with `X-Linked-Etag: "<sha256>"` and `X-Linked-Size`. Smaller
  files are regular git blobs, served by `resolve` itself with `ETag: "<git oid>"`.
  Every `resolve` answer carries `X-Repo-Commit`.
- The storage origin is another port (so huggingface_hub, like on the real Hub, reads the
  file's metadata from the 302 and drops Authorization before following it). Its URLs are
  signed and expire; a request to it that carries Authorization is refused with 400, as
  S3 refuses a presigned request with a second auth mechanism. It honours Range and
  If-Match (`"<sha256>"`).
- Private repos, and unknown ones, answer 401 (anonymous) or 404 (with a valid token)
  with `X-Error-Code: RepoNotFound`. Gated repos show their info and tree to anyone, but
  `resolve` needs a token granted the repo: 401 anonymous, 403 otherwise, both with
  `X-Error-Code: GatedRepo`. An unknown token is 401 "Invalid credentials in
  Authorization header". An unknown revision is 404 `RevisionNotFound`, a missing file
  404 `EntryNotFound`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from syncbit_testing._http import (
    UNSATISFIABLE,
    CountingOwner,
    LoopbackServer,
    ServedCounts,
    TrackedHandler,
    parse_range,
    serve_until_signal,
)

__all__ = ["DEFAULT_LFS_THRESHOLD", "Hub", "RepoType", "git_blob_oid", "lfs_pointer", "main"]

RepoType = Literal["model", "dataset"]
Gated = Literal["auto", "manual", False]

DEFAULT_LFS_THRESHOLD = 1024
DEFAULT_TREE_PAGE_SIZE = 1000  # what the Hub returns per page (50 with expand=true)
SIGNED_URL_TTL = 3600.0
_PLURAL: dict[str, RepoType] = {"models": "model", "datasets": "dataset"}
_URL_PREFIX: dict[str, str] = {"model": "", "dataset": "datasets/"}
_API_ACTIONS = frozenset({"revision", "tree", "refs"})
_HASH_BLOCK = 8 * 1024 * 1024
_EPOCH = "2024-01-01T00:00:00.000Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id (SHA-1) of a blob holding `data`."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


# -- the model: blobs, commits, repos -----------------------------------------------------


@dataclass
class _Blob:
    sha256: str
    size: int
    file: str  # relative to the root when inside it, else absolute
    git_oid: str | None = None  # of the content; computed for regular (small) files only


@dataclass
class _Commit:
    sha: str
    parent: str | None
    title: str
    date: float
    files: dict[str, str]  # repo path -> blob sha256


@dataclass
class _Repo:
    repo_type: RepoType
    repo_id: str
    private: bool = False
    gated: Gated = False
    created: float = field(default_factory=time.time)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return _repo_key(self.repo_type, self.repo_id)

    def resolve(self, revision: str) -> str | None:
        """The commit sha a branch, tag, full ref or full sha names; None if none."""
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix) and revision[len(prefix) :] in refs:
                return refs[revision[len(prefix) :]]
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision in self.commits:
            return revision
        return None


def _repo_key(repo_type: str, repo_id: str) -> str:
    return f"{repo_type}/{repo_id}"


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or any(
        not p or p in (".", "..") or not all(c.isalnum() or c in "-_." for c in p) for p in parts
    ):
        raise ValueError(f"invalid repo id {repo_id!r}: expected 'name' or 'org/name'")


@dataclass
class _TreeItem:
    path: str
    is_dir: bool
    oid: str
    size: int
    lfs: dict[str, Any] | None = None


@dataclass
class _State(ServedCounts):
    """Everything handler threads share with the owner; guarded by `lock`."""

    root: Path
    lfs_threshold: int
    tree_page_size: int
    control: bool
    secret: bytes = field(default_factory=lambda: os.urandom(32))
    repos: dict[str, _Repo] = field(default_factory=dict)
    blobs: dict[str, _Blob] = field(default_factory=dict)
    # token -> repo keys it may read (private) and download (gated); None means every repo.
    tokens: dict[str, frozenset[str] | None] = field(default_factory=dict)
    trees: dict[str, list[_TreeItem]] = field(default_factory=dict)  # by commit sha
    storage_auth_rejected: int = 0
    redirects: int = 0  # `resolve` answers that sent a client to the storage origin
    storage_port: int = 0

    # -- persistence -----------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.root / ".hub"

    def load(self) -> None:
        path = self.state_dir / "state.json"
        if not path.exists():
            return
        data = json.loads(path.read_text())
        self.blobs = {k: _Blob(**v) for k, v in data.get("blobs", {}).items()}
        for raw in data.get("repos", []):
            commits = {c["sha"]: _Commit(**c) for c in raw.pop("commits")}
            repo = _Repo(**raw, commits=commits)
            self.repos[repo.key] = repo

    def save(self) -> None:
        repos = []
        for repo in self.repos.values():
            item = {k: v for k, v in repo.__dict__.items() if k != "commits"}
            item["commits"] = [c.__dict__ for c in repo.commits.values()]
            repos.append(item)
        data = {"version": 1, "blobs": {k: v.__dict__ for k, v in self.blobs.items()}}
        data["repos"] = repos
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(self.state_dir / "state.json")

    # -- blobs -----------------------------------------------------------------------------

    def blob_path(self, blob: _Blob) -> Path:
        return self.root / blob.file  # an absolute `file` stays absolute

    def is_lfs(self, blob: _Blob) -> bool:
        return blob.size >= self.lfs_threshold

    def git_oid(self, blob: _Blob) -> str:
        """The oid git lists for the file: of the content, or of its LFS pointer."""
        if self.is_lfs(blob):
            return git_blob_oid(lfs_pointer(blob.sha256, blob.size))
        if blob.git_oid is None:
            blob.git_oid = git_blob_oid(self.blob_path(blob).read_bytes())
        return blob.git_oid

    def store(self, content: bytes | os.PathLike[str] | str) -> _Blob:
        """Add one file's content as a blob (deduplicated by SHA-256)."""
        objects = self.state_dir / "objects"
        if isinstance(content, bytes | bytearray | memoryview):
            data = bytes(content)
            sha = hashlib.sha256(data).hexdigest()
            blob = self.blobs.get(sha)
            if blob is None or not self.blob_path(blob).exists():
                objects.mkdir(parents=True, exist_ok=True)
                target = objects / sha
                if not target.exists():
                    _write_atomic(target, data)
                blob = _Blob(sha, len(data), str(target.relative_to(self.root)))
            if blob.size < self.lfs_threshold and blob.git_oid is None:
                blob.git_oid = git_blob_oid(data)
            self.blobs[sha] = blob
            return blob
        src = Path(content).resolve()
        inside = src.is_relative_to(self.root.resolve())
        sha, size, small = _hash_file(src, self.lfs_threshold)
        blob = self.blobs.get(sha)
        if blob is not None and self.blob_path(blob).exists():
            return blob
        if inside:
            file = str(src.relative_to(self.root.resolve()))
        else:
            objects.mkdir(parents=True, exist_ok=True)
            target = objects / sha
            if not target.exists():
                tmp = objects / f".{sha}.tmp"
                shutil.copyfile(src, tmp)
                tmp.replace(target)
            file = str(target.relative_to(self.root))
        blob = _Blob(sha, size, file, git_blob_oid(small) if small is not None else None)
        self.blobs[sha] = blob
        return blob

    # -- trees -----------------------------------------------------------------------------

    def tree(self, commit: _Commit) -> list[_TreeItem]:
        """Every file and directory of a commit, sorted by path (commits never change)."""
        cached = self.trees.get(commit.sha)
        if cached is not None:
            return cached
        items: dict[str, _TreeItem] = {}
        children: dict[str, list[str]] = {}
        for path, sha in commit.files.items():
            blob = self.blobs[sha]
            lfs = None
            if self.is_lfs(blob):
                pointer = lfs_pointer(blob.sha256, blob.size)
                lfs = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(pointer)}
            items[path] = _TreeItem(path, False, self.git_oid(blob), blob.size, lfs)
            parent, _, _ = path.rpartition("/")
            child = path
            while True:
                children.setdefault(parent, []).append(child)
                if not parent or parent in items:
                    break
                items[parent] = _TreeItem(parent, True, "", 0)
                child = parent
                parent = parent.rpartition("/")[0]
        # A directory's oid: a hash over its entries, deepest directories first.
        for item in sorted(
            (i for i in items.values() if i.is_dir), key=lambda i: -i.path.count("/")
        ):
            entries = sorted(f"{c}:{items[c].oid}" for c in children.get(item.path, []))
            item.oid = hashlib.sha1("\n".join(entries).encode(), usedforsecurity=False).hexdigest()
        result = sorted(items.values(), key=lambda i: i.path)
        self.trees[commit.sha] = result
        return result

    # -- access ----------------------------------------------------------------------------

    def grants(self, token: str | None, repo: _Repo) -> bool:
        if token is None:
            return False
        repos = self.tokens.get(token)
        return repos is None or repo.key in repos

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.storage_auth_rejected = 0
            self.redirects = 0

    def sign(self, sha256: str, expires: int) -> str:
        mac = hmac.new(self.secret, f"{sha256}:{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def _write_atomic(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _hash_file(path: Path, threshold: int) -> tuple[str, int, bytes | None]:
    """(sha256, size, content if smaller than `threshold`) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            size += len(block)
    small = path.read_bytes() if size < threshold else None
    return h.hexdigest(), size, small


def _commit_sha(parent: str | None, files: Mapping[str, str], title: str) -> str:
    body = json.dumps({"parent": parent, "files": sorted(files.items()), "title": title})
    return hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()


# -- HTTP ---------------------------------------------------------------------------------


class _Server(LoopbackServer):
    def __init__(self, address: tuple[str, int], state: _State, storage: bool) -> None:
        self.state = state
        self.storage = storage
        super().__init__(address, _Handler)


class _HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.commit = commit


class _Handler(TrackedHandler):
    server_version = "syncbit-hub"
    server: _Server

    @property
    def state(self) -> _State:
        return self.server.state

    def _count(self, key: str, n: int) -> None:
        self.state.count(key, n)

    # -- methods ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        self._drain_body()
        if self.state.control and not self.server.storage and self.path == "/__reset":
            self.state.reset()
            self._simple(200, b"reset\n", "text/plain")
        else:
            self._error(_HubError(405, "Method not allowed"), head=False)

    def _dispatch(self, head: bool) -> None:
        url = urlsplit(self.path)
        try:
            if self.state.control and not self.server.storage and url.path == "/__stats":
                with self.state.lock:
                    stats = {
                        "bytes_served": self.state.bytes_served,
                        "by_path": dict(self.state.by_path),
                        "storage_auth_rejected": self.state.storage_auth_rejected,
                    }
                self._json(stats, head)
                return
            fail = self.state.fail_with
            if fail is not None:
                raise _HubError(fail, f"injected failure: HTTP {fail}")
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if self.server.storage:
                self._storage(url.path, query, head)
                return
            parts = url.path.split("/")[1:]
            if parts and parts[0] == "api":
                self._api(parts[1:], query, head)
            else:
                self._resolve(parts, head)
        except _HubError as exc:
            self._error(exc, head)

    # -- authorization ---------------------------------------------------------------------

    def _token(self) -> str | None:
        header = self.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, value = header.partition(" ")
        token = value.strip()
        with self.state.lock:
            known = token in self.state.tokens
        if scheme.lower() != "bearer" or not known:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return token

    def _repo(self, repo_type: RepoType, repo_id: str, token: str | None) -> _Repo:
        """The repo if this caller may see it; the Hub's RepoNotFound otherwise."""
        with self.state.lock:
            repo = self.state.repos.get(_repo_key(repo_type, repo_id))
            visible = repo is not None and (not repo.private or self.state.grants(token, repo))
        if repo is None or not visible:
            raise _HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _split_repo(self, repo_type: RepoType, segs: list[str], marks: Iterable[str]) -> int:
        """How many of `segs` form the repo id (1 or 2): the known repo wins, else the
        shape (`org/name` unless the second segment is an action)."""
        marks = frozenset(marks)
        with self.state.lock:
            for n in (2, 1):
                shaped = len(segs) >= n and (len(segs) == n or segs[n] in marks)
                if shaped and _repo_key(repo_type, "/".join(segs[:n])) in self.state.repos:
                    return n
        return 1 if len(segs) < 2 or segs[1] in marks else 2

    # -- /api ------------------------------------------------------------------------------

    def _api(self, parts: list[str], query: dict[str, str], head: bool) -> None:
        if not parts or parts[0] not in _PLURAL:
            raise _HubError(404, "Not found")
        repo_type = _PLURAL[parts[0]]
        segs = [unquote(p) for p in parts[1:]]
        if not segs or not segs[0]:
            raise _HubError(404, "Not found")
        n = self._split_repo(repo_type, segs, _API_ACTIONS)
        repo_id, rest = "/".join(segs[:n]), segs[n:]
        token = self._token()
        repo = self._repo(repo_type, repo_id, token)
        if not rest:
            self._info(repo, "main", head)
        elif rest[0] == "revision" and len(rest) >= 2:
            self._info(repo, "/".join(rest[1:]), head)
        elif rest[0] == "tree" and len(rest) >= 2:
            # huggingface_hub sends the revision and the path each as one %2F-escaped segment.
            raw = parts[1 + n :]
            revision = unquote(raw[1])
            path = unquote("/".join(raw[2:])).strip("/")
            self._tree(repo, revision, path, query, head)
        elif rest == ["refs"]:
            self._refs(repo, head)
        else:
            raise _HubError(404, "Not found")

    def _commit(self, repo: _Repo, revision: str) -> _Commit:
        with self.state.lock:
            sha = repo.resolve(revision)
            if sha is None:
                raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return repo.commits[sha]

    def _info(self, repo: _Repo, revision: str, head: bool) -> None:
        commit = self._commit(repo, revision)
        with self.state.lock:
            tree = self.state.tree(commit)
        siblings = []
        for item in tree:
            if item.is_dir:
                continue
            sibling: dict[str, Any] = {"rfilename": item.path, "size": item.size}
            sibling["blobId"] = item.oid
            if item.lfs is not None:
                sibling["lfs"] = {
                    "size": item.size,
                    "sha256": item.lfs["oid"],
                    "pointerSize": item.lfs["pointerSize"],
                }
            siblings.append(sibling)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.key.encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repo.repo_id,
            "author": author,
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(i.size for i in tree if not i.is_dir),
        }
        self._json(info, head)

    def _tree(
        self, repo: _Repo, revision: str, path: str, query: dict[str, str], head: bool
    ) -> None:
        commit = self._commit(repo, revision)
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        expand = query.get("expand", "false").lower() in ("1", "true")
        with self.state.lock:
            tree = self.state.tree(commit)
            page_size = self.state.tree_page_size
        if expand:
            page_size = min(page_size, 50)
        if path and not any(i.path == path and i.is_dir for i in tree):
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.sha)
        prefix = path + "/" if path else ""
        items = [
            i
            for i in tree
            if i.path.startswith(prefix) and (recursive or "/" not in i.path[len(prefix) :])
        ]
        try:
            start = int(base64.urlsafe_b64decode(query["cursor"].encode()).decode())
        except KeyError:
            start = 0
        except (ValueError, UnicodeDecodeError) as exc:
            raise _HubError(400, "Invalid cursor") from exc
        if "limit" in query:
            with contextlib.suppress(ValueError):
                page_size = max(1, min(page_size, int(query["limit"])))
        page = items[start : start + page_size]
        body = [self._tree_item(i, commit, expand) for i in page]
        extra: dict[str, str] = {}
        if start + page_size < len(items):
            params = {"recursive": str(recursive).lower(), "expand": str(expand).lower()}
            params["cursor"] = base64.urlsafe_b64encode(str(start + page_size).encode()).decode()
            host = (
                self.headers.get("Host") or f"{self.server.server_name}:{self.server.server_port}"
            )
            next_url = f"http://{host}{urlsplit(self.path).path}?{urlencode(params)}"
            extra["Link"] = f'<{next_url}>; rel="next"'
        self._json(body, head, extra)

    @staticmethod
    def _tree_item(item: _TreeItem, commit: _Commit, expand: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "directory" if item.is_dir else "file",
            "oid": item.oid,
            "size": item.size,
            "path": item.path,
        }
        if item.lfs is not None:
            out["lfs"] = dict(item.lfs)
        if expand:
            # Simplified: the commit listed is named as every entry's last commit.
            out["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": _iso(commit.date)}
        return out

    def _refs(self, repo: _Repo, head: bool) -> None:
        with self.state.lock:
            body = {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                    for n, s in sorted(repo.branches.items())
                ],
                "tags": [
                    {"name": n, "ref": f"refs/tags/{n}", "targetCommit": s}
                    for n, s in sorted(repo.tags.items())
                ],
                "converts": [],
            }
        self._json(body, head)

    # -- /{repo}/resolve/{revision}/{path} -----------------------------------------------

    def _resolve(self, parts: list[str], head: bool) -> None:
        repo_type: RepoType = "model"
        if parts and parts[0] in ("datasets", "models"):
            repo_type = _PLURAL[parts[0]]
            parts = parts[1:]
        if "resolve" not in parts[:3] or len(parts) < 3:
            raise _HubError(404, "Not found")
        n = self._split_repo(repo_type, [unquote(p) for p in parts], ("resolve",))
        if parts[n : n + 1] != ["resolve"] or len(parts) < n + 3:
            raise _HubError(404, "Not found")
        repo_id = unquote("/".join(parts[:n]))
        revision = unquote(parts[n + 1])
        path = unquote("/".join(parts[n + 2 :]))
        token = self._token()
        repo = self._repo(repo_type, repo_id, token)
        commit = self._commit(repo, revision)
        with self.state.lock:
            sha = commit.files.get(path)
            blob = self.state.blobs.get(sha) if sha is not None else None
            granted = self.state.grants(token, repo)
        if repo.gated and not granted:
            kind = "model" if repo_type == "model" else "dataset"
            if token is None:
                message = (
                    f"Access to {kind} {repo_id} is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in."
                )
            else:
                message = (
                    f"Access to {kind} {repo_id} is restricted and you are not in the "
                    "authorized list."
                )
            raise _HubError(401 if token is None else 403, message, "GatedRepo")
        if blob is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", commit.sha)
        headers = {"X-Repo-Commit": commit.sha, "Access-Control-Expose-Headers": "X-Repo-Commit"}
        if self.state.is_lfs(blob):
            expires = int(time.time() + SIGNED_URL_TTL)
            host = (self.headers.get("Host") or self.server.server_name).rsplit(":", 1)[0]
            query = urlencode(
                {"Expires": expires, "Signature": self.state.sign(blob.sha256, expires)}
            )
            location = f"http://{host}:{self.state.storage_port}/__lfs/{blob.sha256}?{query}"
            headers.update(
                {
                    "Location": location,
                    "ETag": f'"{blob.sha256}"',
                    "X-Linked-Etag": f'"{blob.sha256}"',
                    "X-Linked-Size": str(blob.size),
                }
            )
            with self.state.lock:
                self.state.redirects += 1
            self._simple(
                302, f"Found. Redirecting to {location}".encode(), "text/plain", head, headers
            )
            return
        with self.state.lock:
            oid = self.state.git_oid(blob)
        key = f"{_URL_PREFIX[repo_type]}{repo_id}/{path}"
        self._file(blob, f'"{oid}"', key, head, headers)

    # -- storage ---------------------------------------------------------------------------

    def _storage(self, path: str, query: dict[str, str], head: bool) -> None:
        prefix = "/__lfs/"
        sha = path[len(prefix) :] if path.startswith(prefix) else ""
        if "Authorization" in self.headers:
            with self.state.lock:
                self.state.storage_auth_rejected += 1
            raise _HubError(400, "Only one auth mechanism allowed")
        try:
            expires = int(query.get("Expires", ""))
        except ValueError:
            expires = 0
        good = hmac.compare_digest(query.get("Signature", ""), self.state.sign(sha, expires))
        if not sha or not good or expires < time.time():
            raise _HubError(403, "Request has expired or the signature does not match")
        with self.state.lock:
            blob = self.state.blobs.get(sha)
        if blob is None:
            raise _HubError(404, "The specified key does not exist.")
        self._file(blob, f'"{sha}"', f"__lfs/{sha}", head, {})

    # -- bodies ----------------------------------------------------------------------------

    def _file(self, blob: _Blob, etag: str, key: str, head: bool, headers: dict[str, str]) -> None:
        try:
            f = open(self.state.blob_path(blob), "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise _HubError(404, "Entry not found", "EntryNotFound") from exc
        with f:
            size = os.fstat(f.fileno()).st_size
            if_match = self.headers.get("If-Match")
            if if_match is not None:
                tags = [t.strip() for t in if_match.split(",")]
                if "*" not in tags and etag not in tags:
                    raise _HubError(412, "Precondition failed")
            span = parse_range(self.headers.get("Range"), size)
            headers = {**headers, "ETag": etag, "Accept-Ranges": "bytes"}
            if span == UNSATISFIABLE:
                headers["Content-Range"] = f"bytes */{size}"
                self._simple(416, b"Range not satisfiable", "text/plain", head, headers)
                return
            if span is None:
                status, start, length = 200, 0, size
            else:
                assert isinstance(span, tuple)
                status, start, length = 206, span[0], span[1] - span[0] + 1
                headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if not head and length:
                self._send_body(f, start, length, key)

    def _json(self, body: Any, head: bool, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self._simple(200, data, "application/json; charset=utf-8", head, extra)

    def _error(self, exc: _HubError, head: bool) -> None:
        headers = {"X-Error-Message": exc.message}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        if exc.commit:
            headers["X-Repo-Commit"] = exc.commit
        data = json.dumps({"error": exc.message}).encode()
        self._simple(exc.status, data, "application/json; charset=utf-8", head, headers)


# -- the owner ----------------------------------------------------------------------------


class Hub(CountingOwner):
    """A Hub-compatible server for the repos under `root` (created if missing), on
    `host:port` (0 = a free port).

    LFS bodies are served by a second listener on `storage_port` (0 = a free port).
    `bytes_served` and `bytes_by_path` count file body bytes actually sent by both: keys
    are `<repo path prefix><repo_id>/<path>` (e.g. `datasets/org/set/a.csv`) for regular
    files and `__lfs/<sha256>` for LFS bodies. While `fail_with` is set, every request is
    answered with that status. A stopped hub may be started again on the same ports.
    """

    _state: _State

    def __init__(
        self,
        root: str | os.PathLike[str],
        port: int = 0,
        host: str = "127.0.0.1",
        storage_port: int = 0,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        tree_page_size: int = DEFAULT_TREE_PAGE_SIZE,
        control: bool = False,
    ) -> None:
        os.makedirs(root, exist_ok=True)  # FileExistsError when it is not a directory
        real = Path(os.path.realpath(root))
        self.host = host
        self.port = port
        self.storage_port = storage_port
        self._state = _State(real, lfs_threshold, tree_page_size, control)
        self._servers: list[tuple[_Server, threading.Thread]] = []
        with self._state.lock:
            self._state.load()
            self._import_layout()

    # -- addresses and counters ------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self._state.root

    @property
    def url(self) -> str:
        """The endpoint (HF_ENDPOINT), without a trailing slash: `http://127.0.0.1:41234`."""
        return f"http://{self.host}:{self.port}"

    @property
    def storage_auth_rejected(self) -> int:
        """Storage requests refused because they carried Authorization (a client leak)."""
        with self._state.lock:
            return self._state.storage_auth_rejected

    @property
    def redirects(self) -> int:
        """`resolve` requests answered with a redirect to the storage origin."""
        with self._state.lock:
            return self._state.redirects

    def expire_signed_urls(self) -> None:
        """Every storage URL handed out so far is refused from now on (403, as an expired
        signature), as if their time had run out."""
        with self._state.lock:
            self._state.secret = os.urandom(32)

    # -- content ---------------------------------------------------------------------------

    def add_commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | os.PathLike[str]],
        branch: str = "main",
        repo_type: RepoType = "model",
        private: bool | None = None,
        gated: bool | Gated | None = None,
        delete: Iterable[str] = (),
        title: str | None = None,
    ) -> str:
        """Commit `files` (path -> bytes or a file to read) on top of `branch`; return the sha.

        Creates the repo (public, not gated unless told) and the branch as needed; given
        `private`/`gated` change the repo's flags. Paths in `delete` are removed. A commit
        that changes nothing returns the branch head unchanged.
        """
        with self._state.lock:
            repo = self._ensure_repo(repo_id, repo_type, private, gated)
            head = repo.branches.get(branch)
            tree = dict(repo.commits[head].files) if head is not None else {}
            for path in delete:
                tree.pop(path, None)
            for path, content in files.items():
                tree[_check_path(path)] = self._state.store(content).sha256
            sha = self._commit_tree(repo, branch, tree, title or f"Update {len(files)} files")
            self._state.save()
            return sha

    def add_tag(
        self, repo_id: str, tag: str, revision: str = "main", repo_type: RepoType = "model"
    ) -> str:
        """Point tag `tag` at `revision`; return the commit sha."""
        with self._state.lock:
            repo = self._get_repo(repo_id, repo_type)
            sha = repo.resolve(revision)
            if sha is None:
                raise ValueError(f"no revision {revision!r} in {repo.key}")
            repo.tags[tag] = sha
            self._state.save()
            return sha

    def set_repo(
        self,
        repo_id: str,
        repo_type: RepoType = "model",
        private: bool | None = None,
        gated: bool | Gated | None = None,
    ) -> None:
        """Change a repo's visibility flags."""
        with self._state.lock:
            self._ensure_repo(repo_id, repo_type, private, gated, create=False)
            self._state.save()

    def add_token(self, token: str, repos: Iterable[str] | None = None) -> None:
        """Accept `token`; it may read private and download gated repos among `repos`
        (`org/name` for models, `datasets/org/name` for datasets; None = every repo).
        Tokens live in memory only."""
        keys = None
        if repos is not None:
            keys = frozenset(
                _repo_key("dataset", r[len("datasets/") :])
                if r.startswith("datasets/")
                else _repo_key("model", r.removeprefix("models/"))
                for r in repos
            )
        with self._state.lock:
            self._state.tokens[token] = keys

    def resolve(self, repo_id: str, revision: str = "main", repo_type: RepoType = "model") -> str:
        """The commit sha `revision` names (for tests)."""
        with self._state.lock:
            sha = self._get_repo(repo_id, repo_type).resolve(revision)
        if sha is None:
            raise KeyError(revision)
        return sha

    def _get_repo(self, repo_id: str, repo_type: RepoType) -> _Repo:
        repo = self._state.repos.get(_repo_key(repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    def _ensure_repo(
        self,
        repo_id: str,
        repo_type: RepoType,
        private: bool | None,
        gated: bool | Gated | None,
        create: bool = True,
    ) -> _Repo:
        if repo_type not in _URL_PREFIX:
            raise ValueError(f"repo_type must be 'model' or 'dataset', not {repo_type!r}")
        _check_repo_id(repo_id)
        key = _repo_key(repo_type, repo_id)
        repo = self._state.repos.get(key)
        if repo is None:
            if not create:
                raise KeyError(f"no {repo_type} repo {repo_id!r}")
            repo = self._state.repos[key] = _Repo(repo_type, repo_id)
        if private is not None:
            repo.private = private
        if gated is not None:
            repo.gated = "auto" if gated is True else gated
        return repo

    def _commit_tree(self, repo: _Repo, branch: str, tree: dict[str, str], title: str) -> str:
        head = repo.branches.get(branch)
        if head is not None and repo.commits[head].files == tree:
            return head
        sha = _commit_sha(head, tree, title)
        repo.commits.setdefault(sha, _Commit(sha, head, title, time.time(), tree))
        repo.branches[branch] = sha
        return sha

    def _import_layout(self) -> None:
        """One commit per `ROOT/<models|datasets>/<org>/<name>/<branch>/` whose content changed."""
        changed = False
        for plural, repo_type in _PLURAL.items():
            base = self.root / plural
            if not base.is_dir():
                continue
            for org in sorted(p for p in base.iterdir() if p.is_dir()):
                for name in sorted(p for p in org.iterdir() if p.is_dir()):
                    repo = self._ensure_repo(f"{org.name}/{name.name}", repo_type, None, None)
                    for rev in sorted(p for p in name.iterdir() if p.is_dir()):
                        tree = {
                            f.relative_to(rev).as_posix(): self._state.store(f).sha256
                            for f in sorted(rev.rglob("*"))
                            if f.is_file() and f.resolve().is_relative_to(self.root)
                        }
                        before = repo.branches.get(rev.name)
                        after = self._commit_tree(repo, rev.name, tree, f"Import {rev.name}")
                        changed |= before != after
        if changed:
            self._state.save()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Hub:
        if self._servers:
            return self
        storage = _Server((self.host, self.storage_port), self._state, storage=True)
        try:
            api = _Server((self.host, self.port), self._state, storage=False)
        except OSError:
            storage.server_close()
            raise
        self.port, self.storage_port = api.server_port, storage.server_port
        self._state.storage_port = self.storage_port
        for server, name in ((api, "hub"), (storage, "hub-storage")):
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"{name}-{server.server_port}",
                daemon=True,
            )
            thread.start()
            self._servers.append((server, thread))
        return self

    def stop(self) -> None:
        """Stop listening and end every open connection; content and stats remain."""
        servers, self._servers = self._servers, []
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            server.drop_connections()
            thread.join()

    def __enter__(self) -> Hub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts) or "\x00" in path:
        raise ValueError(f"invalid path in repo: {path!r}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m syncbit_testing.hub", description="HuggingFace-Hub-compatible test server"
    )
    parser.add_argument("--root", required=True, help="hub directory (see the module doc)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="API port; 0 picks a free one")
    parser.add_argument("--storage-port", type=int, default=0, help="LFS storage port")
    parser.add_argument("--lfs-threshold", type=int, default=DEFAULT_LFS_THRESHOLD)
    parser.add_argument(
        "--token", action="append", default=[], help="accept this token for every repo"
    )
    args = parser.parse_args(argv)
    try:
        hub = Hub(
            args.root,
            port=args.port,
            host=args.host,
            storage_port=args.storage_port,
            lfs_threshold=args.lfs_threshold,
            control=True,
        )
        for token in args.token:
            hub.add_token(token)
        hub.start()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve_until_signal(hub)


if __name__ == "__main__":
    sys.exit(main())
