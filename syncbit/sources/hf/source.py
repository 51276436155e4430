"""`HfSource`: a Hub repo at one commit, listed with huggingface_hub (worker threads) and
read by ranges of `resolve` URLs through `wire.Pool`, the Hub's redirects to its storage
followed without the token. The token never enters options, messages or logs.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import trio

from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
    SyncbitError,
)
from syncbit.hfenv import token_from_env
from syncbit.manifest import FileEntry
from syncbit.redact import redact_url, scrub
from syncbit.sources.base import (
    Listing,
    Source,
    abandon_on_cancel,
    check_range_body,
    pinned_size,
    register,
)
from syncbit.sources.fences import Fences, RedirectPolicy
from syncbit.sources.hf.errors import hub_error, read_error
from syncbit.sources.hf.repo import (
    URL_PREFIX,
    parse_hf_uri,
    split_globs,
    tree_entries,
)
from syncbit.sources.options import SCHEMES
from syncbit.wire import Abort, Pool, Response, WireError

T = TypeVar("T")

DEFAULT_ENDPOINT = "https://huggingface.co"
OPTION_KEYS = frozenset(SCHEMES["hf"])
DEFAULT_TIMEOUT = 30.0
# Seconds a file's storage URL (where the Hub's `resolve` redirected it: a signed URL,
# valid far longer on the real Hub) is read directly, without asking `resolve` again.
HOP_TTL = 60.0
HOPS_KEPT = 1024  # files whose storage URL is remembered
# What a remembered storage URL answers once it expired or was withdrawn: `resolve` again.
_STALE_HOP = frozenset({400, 401, 403, 404, 410})


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
    abortable = True  # reads go through `wire.Pool`, whose transfers `Abort` ends

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
        # resolve URL -> (storage URL, headers sent there, monotonic deadline): each range
        # read through `resolve` cost a second request (and a round trip to the Hub's API
        # host before every read of its storage); hf_transfer resolves once too.
        self._hops: dict[str, tuple[str, dict[str, str], float]] = {}
        self._hops_lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """The repo for messages: `datasets/org/name` style, endpoint without credentials."""
        return f"{URL_PREFIX[self.repo_type]}{self.repo_id} on {redact_url(self.endpoint)}"

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
            f"{self.endpoint}/{URL_PREFIX[self.repo_type]}{self.repo_id}/resolve/"
            f"{quote(commit, safe='')}/{quote(entry.locator)}"
        )

    def _map(self, exc: BaseException) -> SyncbitError:
        """The syncbit error for a huggingface_hub failure."""
        return hub_error(
            exc,
            self.where,
            has_token=self.token() is not None,
            revision=self.revision,
            uri=self.uri,
            endpoint=self.endpoint,
        )

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
        result: T = await trio.to_thread.run_sync(run, **abandon_on_cancel())
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

    def read_into(
        self, entry: FileEntry, offset: int, buf: memoryview, abort: Abort | None = None
    ) -> None:
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
            resp = self._get_into(url, offset, buf, headers, abort)
        except WireError as exc:
            raise SourceUnavailableError(f"cannot read {what}: {scrub(str(exc))}") from exc
        error = read_error(resp.status, resp.headers, what, has_token=token is not None)
        if error is not None:
            raise error
        check_range_body(
            resp,
            offset,
            want,
            size,
            what,
            lambda why: SourceChangedError(f"source changed: {what} is {why}, not {size}"),
        )

    def _get_into(
        self,
        url: str,
        offset: int,
        buf: memoryview,
        headers: dict[str, str],
        abort: Abort | None,
    ) -> Response:
        """A range of the file at `url` (its `resolve` URL): from the storage URL `resolve`
        redirected it to a moment ago, else through `resolve`, remembering where that
        led for `HOP_TTL`. A remembered URL that expired or was withdrawn (`_STALE_HOP`:
        its body is not taken) is forgotten and `resolve` asked again at once; one that
        fails otherwise is forgotten too (unless `abort` ended the read: a hedge's
        loser), the error left to the caller's retries. The
        headers sent there are those the redirect policy let through (never the token,
        to another host); a new connection there is vetted by the same policy."""
        with self._hops_lock:
            hop = self._hops.get(url)
        if hop is not None and time.monotonic() < hop[2]:
            target, sent, _ = hop
            try:
                resp = self._pool.get_into(target, offset, buf, sent, self.redirects, abort)
            except WireError:
                if abort is None or not abort.fired:  # ended by our own hedge: still good
                    self._forget(url, hop)
                raise
            if resp.status not in _STALE_HOP:
                return resp
            self._forget(url, hop)
        resp = self._pool.get_into(url, offset, buf, headers, self.redirects, abort)
        if resp.url != url and resp.status in (200, 206):
            with self._hops_lock:
                self._hops.pop(url, None)
                self._hops[url] = (resp.url, resp.sent, time.monotonic() + HOP_TTL)
                while len(self._hops) > HOPS_KEPT:
                    del self._hops[next(iter(self._hops))]
        return resp

    def _forget(self, url: str, hop: tuple[str, dict[str, str], float]) -> None:
        with self._hops_lock:
            if self._hops.get(url) is hop:
                del self._hops[url]

    def close(self) -> None:
        self._pool.close()


def warm() -> None:
    """Blocking (a thread at start-up, `sources.base.warm_up`): import what listing and
    reading a repository import (huggingface_hub, ~0.25 s), ahead of the first dataset."""
    import huggingface_hub.hf_api  # noqa: F401
    from huggingface_hub import get_hf_file_metadata  # noqa: F401
