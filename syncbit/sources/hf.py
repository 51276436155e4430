"""HuggingFace Hub sources: `hf://[models/|datasets/]<repo_id>[@revision]`.

Owns resolving a revision to its commit (the dataset version) and listing its files with
huggingface_hub (in worker threads), and range reads of `resolve` URLs at that commit
through `wire.Pool`, following the Hub's redirects to its storage. The token is read from
the environment (HF_TOKEN or the token file) and is never put in options, messages or logs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import inspect
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import trio

from syncbit.chunks import identity_digest
from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
    SyncbitError,
)
from syncbit.manifest import FileEntry, safe_relpath
from syncbit.redact import redact_url, scrub
from syncbit.sources.base import Listing, Source, check_range_body, pinned_size, register
from syncbit.sources.fences import Fences, RedirectPolicy
from syncbit.sources.options import SCHEMES
from syncbit.wire import Pool, WireError

__all__ = [
    "DEFAULT_ENDPOINT",
    "OPTION_KEYS",
    "HfSource",
    "parse_hf_uri",
    "split_globs",
    "token_from_env",
    "tree_entries",
]

T = TypeVar("T")

DEFAULT_ENDPOINT = "https://huggingface.co"
OPTION_KEYS = frozenset(SCHEMES["hf"])
DEFAULT_TIMEOUT = 30.0
_PREFIXES = {"models": "model", "datasets": "dataset"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TEMPORARY = frozenset({408, 429})
# What a node lacking a token must be told: its reads never see the user's shell.
_NODE_TOKEN = (
    "the syncbit daemon on this node has no Hub token: set HF_TOKEN in its environment "
    "(or token in source_options['hf://'] of its config); a token given to `syncbit pull` "
    "or `dataset add` only resolves the revision and is never stored"
)
# trio >= 0.23 renamed `cancellable` (now deprecated) to `abandon_on_cancel`.
_ABANDON: dict[str, Any] = (
    {"abandon_on_cancel": True}
    if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
    else {"cancellable": True}
)


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


def token_from_env() -> str | None:
    """HF_TOKEN, else the token file as huggingface_hub finds it (read now, not at import)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    path = os.environ.get("HF_TOKEN_PATH")
    if not path:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface",
        )
        path = os.path.join(os.path.expanduser(os.path.expandvars(home)), "token")
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            value = f.read().strip()
    except OSError:
        return None
    return value or None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network-level exceptions of whichever HTTP client this huggingface_hub uses."""
    found: list[type[BaseException]] = [OSError]  # requests' ConnectionError is an OSError
    for module in ("httpx2", "httpx", "requests"):
        with contextlib.suppress(ImportError, AttributeError):
            mod = importlib.import_module(module)
            names = ("TransportError",) if module != "requests" else ("ConnectionError", "Timeout")
            found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(found)


@register
class HfSource(Source):
    """Every file of a HuggingFace model or dataset repo at one commit.

    Options: `revision` (branch, tag or commit; overrides `@revision`, default `main`),
    `include` / `exclude` (globs on the path in the repo, as a list or one
    comma-separated string: a file is kept if it matches an include, or none is given, and
    no exclude), `endpoint` (default HF_ENDPOINT, else https://huggingface.co), `timeout`
    (seconds per read request), `token` (secret: taken out of `options` at once and never
    stored; an empty one is an error). Without a `token` option the token comes from
    HF_TOKEN or huggingface_hub's token file of the process that opens the source: the
    scheduler's listing may get the token of the user's shell with the request (`syncbit
    pull`), but a node's reads use the node's own. Reads follow the Hub's redirects to its
    storage on any host, over the same scheme, without the token.

    The version of every file is the commit sha the revision resolved to. Identity:
    `identity_digest("sha256", <LFS sha256>)` for LFS files, so one shard in two revisions
    or two repos is one object, and `identity_digest("hf-git", <git blob oid>)` for
    regular files. `version["sha256"]` (LFS files only) lets the caller verify a whole
    fetched file: see `expected_sha256`.
    """

    schemes = ("hf",)

    def __init__(
        self, uri: str, options: dict[str, Any] | None = None, fences: Fences | None = None
    ) -> None:
        super().__init__(uri, options, fences)
        explicit_token = self.options.pop("token", None)
        self.repo_type, self.repo_id, uri_revision = parse_hf_uri(uri)
        opts = self.options
        self.revision = str(opts.get("revision") or uri_revision or "main")
        self.include = split_globs(opts.get("include"), "include")
        self.exclude = split_globs(opts.get("exclude"), "exclude")
        endpoint = str(opts.get("endpoint") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidSourceError(
                f"invalid HuggingFace endpoint {redact_url(endpoint)!r}: expected http(s)://host"
            )
        self.endpoint = endpoint.rstrip("/")
        # The Hub redirects downloads to its storage (another host): followed over the
        # same scheme only, with the token dropped, never to a link-local address.
        self.redirects = RedirectPolicy(
            follow="any",
            allow_link_local=bool(opts.get("allow_link_local", False)),
            private_headers=frozenset({"authorization"}),
        )
        self.redirects.check_url(self.endpoint)
        try:
            self.timeout = float(opts.get("timeout", DEFAULT_TIMEOUT))
        except (TypeError, ValueError):
            raise InvalidSourceError(
                f"invalid HuggingFace option timeout={opts.get('timeout')!r}"
            ) from None
        self._token: str | None = str(explicit_token) if explicit_token else None
        self._token_read = bool(explicit_token)
        self._token_lock = threading.Lock()
        self._pool = Pool(timeout=self.timeout)

    # -- helpers ---------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """The repo for messages: `datasets/org/name` style, endpoint without credentials."""
        return f"{_URL_PREFIX[self.repo_type]}{self.repo_id} on {redact_url(self.endpoint)}"

    def token(self) -> str | None:
        """The token to send, read once: HF_TOKEN, the token file, then huggingface_hub's
        own lookup (OIDC, refreshed logins). Never logged."""
        with self._token_lock:
            if not self._token_read:
                self._token = token_from_env()
                if self._token is None:
                    with contextlib.suppress(Exception):
                        from huggingface_hub import get_token

                        self._token = get_token()
                self._token_read = True
            return self._token

    @staticmethod
    def expected_sha256(entry: FileEntry) -> str | None:
        """The Hub's SHA-256 of the whole file (LFS files), to check a fully fetched object
        against; None for regular files (their git oid covers a `blob <size>` header)."""
        return entry.version.get("sha256")

    def file_url(self, entry: FileEntry) -> str:
        commit = entry.version["commit"]
        return (
            f"{self.endpoint}/{_URL_PREFIX[self.repo_type]}{self.repo_id}/resolve/"
            f"{quote(commit, safe='')}/{quote(entry.locator)}"
        )

    def _map(self, exc: BaseException, revision: str | None = None) -> SyncbitError:
        """The syncbit error for a huggingface_hub failure."""
        from huggingface_hub import errors as hf

        has_token = self.token() is not None
        if isinstance(exc, hf.GatedRepoError):
            if has_token:
                return InvalidSourceError(
                    f"{self.where} is gated and the token (HF_TOKEN) has not been granted "
                    "access: request access on the repo's page"
                )
            return InvalidSourceError(
                f"{self.where} is gated: request access on the repo's page and set HF_TOKEN"
            )
        if isinstance(exc, hf.RepositoryNotFoundError):
            hint = (
                "or the token (HF_TOKEN) cannot read it"
                if has_token
                else "if it is private or gated, set HF_TOKEN"
            )
            return InvalidSourceError(f"no such repo {self.where} ({hint})")
        if isinstance(exc, hf.RevisionNotFoundError):
            rev = revision or self.revision
            return InvalidSourceError(f"no revision {rev!r} in repo {self.where}")
        if isinstance(exc, hf.OfflineModeIsEnabled):
            return InvalidSourceError(
                f"cannot list {self.where}: huggingface_hub offline mode is on (HF_HUB_OFFLINE)"
            )
        if isinstance(exc, hf.HfHubHTTPError):
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", None)
            if status == 401:
                return InvalidSourceError(
                    f"the Hub refused the token for {self.where}: invalid credentials in HF_TOKEN"
                )
            if status is not None and (status in _TEMPORARY or status >= 500):
                return SourceUnavailableError(f"{self.where} is unavailable: HTTP {status}")
            return SourceError(f"request for {self.where} failed: HTTP {status}")
        if isinstance(exc, _transport_errors()):
            return SourceUnavailableError(
                f"cannot reach {redact_url(self.endpoint)}: {type(exc).__name__}"
            )
        if isinstance(exc, ValueError):  # huggingface_hub's argument validation
            return InvalidSourceError(f"invalid HuggingFace source {self.uri!r}: {exc}")
        return SourceError(f"listing {self.where} failed: {type(exc).__name__}")

    async def _call(self, fn: Callable[[], T]) -> T:
        def run() -> T:
            try:
                return fn()
            except SyncbitError:
                raise
            except Exception as exc:
                raise self._map(exc) from exc

        # Listing has no side effects: a caller's deadline may walk away from the thread
        # (huggingface_hub's tree pagination has no timeout of its own).
        result: T = await trio.to_thread.run_sync(run, **_ABANDON)
        return result

    # -- listing ---------------------------------------------------------------------------

    async def list(self) -> Listing:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        token = await trio.to_thread.run_sync(self.token)
        api = HfApi(endpoint=self.endpoint, token=token or False)
        info = await self._call(
            lambda: api.repo_info(
                self.repo_id, repo_type=self.repo_type, revision=self.revision, timeout=self.timeout
            )
        )
        commit = info.sha
        if not commit:
            raise SourceError(f"{self.where} did not name the commit of {self.revision!r}")
        tree = await self._call(
            lambda: list(
                api.list_repo_tree(
                    self.repo_id, recursive=True, revision=commit, repo_type=self.repo_type
                )
            )
        )
        files = tree_entries(
            [item for item in tree if isinstance(item, RepoFile)],  # folders follow from paths
            commit,
            self.include,
            self.exclude,
        )
        if files and getattr(info, "gated", False) is not False:
            # Info and tree of a gated repo are public; only downloads need access. Ask
            # for one file's metadata now so that a missing grant fails here, clearly.
            await self._probe(files[0], token)
        return Listing(files=files)

    async def _probe(self, entry: FileEntry, token: str | None) -> None:
        from huggingface_hub import get_hf_file_metadata

        url = self.file_url(entry)
        await self._call(lambda: get_hf_file_metadata(url, token=token or False))

    # -- reads -----------------------------------------------------------------------------

    def read_into(self, entry: FileEntry, offset: int, buf: memoryview) -> None:
        want = len(buf)
        if want == 0:
            return
        size = pinned_size(entry, offset, want)
        commit = entry.version.get("commit", "?")
        what = f"{entry.path} at {commit[:12]} in {self.where}"
        headers = {"Accept-Encoding": "identity"}
        token = self.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = self.file_url(entry)
        try:
            resp = self._pool.get_into(url, offset, buf, headers, self.redirects)
        except WireError as exc:
            raise SourceUnavailableError(f"cannot read {what}: {scrub(str(exc))}") from exc
        status = resp.status
        code = resp.headers.get("x-error-code", "")
        if code == "RepoNotFound":
            if token is None:
                raise InvalidSourceError(
                    f"cannot read {what}: the Hub hides it from anonymous requests; "
                    f"if the repo is private, {_NODE_TOKEN}"
                )
            raise SourceChangedError(
                f"source changed: {what} is gone (the repo was deleted, or HF_TOKEN cannot "
                f"read it): HTTP {status}"
            )
        if status in (401, 403):
            if code == "GatedRepo":
                if token is None:
                    raise InvalidSourceError(
                        f"cannot read {what}: the repo is gated; {_NODE_TOKEN}"
                    )
                raise InvalidSourceError(
                    f"cannot read {what}: the repo is gated and this node's token (HF_TOKEN) "
                    "has no access to it"
                )
            if status == 401:
                raise InvalidSourceError(f"cannot read {what}: the Hub refused HF_TOKEN")
            # A storage URL whose signature expired or was refused: the next try gets a new one.
            raise SourceUnavailableError(f"cannot read {what}: HTTP {status} from storage")
        if status in (404, 410, 412, 416):
            raise SourceChangedError(f"source changed: {what} is gone ({code or 'HTTP'} {status})")
        if status in _TEMPORARY or status >= 500:
            raise SourceUnavailableError(f"cannot read {what}: HTTP {status}")
        if status not in (200, 206):
            raise SourceError(f"cannot read {what}: HTTP {status}")
        check_range_body(
            resp,
            offset,
            want,
            size,
            what,
            lambda why: SourceChangedError(f"source changed: {what} is {why}, not {size}"),
        )

    def close(self) -> None:
        self._pool.close()
