"""The source interface and the scheme registry.

A source lists a dataset at a fixed revision and reads byte ranges of the files it listed,
checking that the recorded version still stands. It never stores anything; bulk reads are
blocking and run in worker threads, listing is async and may be slow.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourcePermanentError,
    SourceThrottledError,
    SourceUnavailableError,
)
from syncbit.manifest import FileEntry, Perm
from syncbit.redact import redact_url
from syncbit.sources.fences import Fences
from syncbit.sources.options import validate_options
from syncbit.sources.throttle import parse_retry_after
from syncbit.wire import Abort, Response, WireError, parse_content_range

_REGISTRY: dict[str, type[Source]] = {}
log = logging.getLogger("syncbit.sources")
_WARM_LOCK = threading.Lock()
_warmed = False

# Modules that register schemes; imported on first use so that optional clients (boto3,
# huggingface_hub) load only when a dataset of that kind exists.
_BUILTIN = {
    "http": "syncbit.sources.http",
    "https": "syncbit.sources.http",
    "file": "syncbit.sources.file",
    "s3": "syncbit.sources.s3",
    "hf": "syncbit.sources.hf",
    "oci": "syncbit.sources.oci",
}


@dataclass
class Listing:
    """What a source resolved: files (with identities and pinned versions), directories, and
    the owners and modes of directories for sources that have them ('' is the top)."""

    files: list[FileEntry]
    dirs: list[str] = field(default_factory=list)
    dir_perms: dict[str, Perm] = field(default_factory=dict)


class Source(ABC):
    """One kind of dataset source, bound to one source URI.

    `options` are checked and parsed against the scheme's table (`sources.options`):
    an unknown key or a bad value is an InvalidSourceError naming it. `fences` are the
    limits of the process that opens the source (its config), never the dataset's.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    # Whether `read_into` ends at once when its `abort` fires (its connection is shut):
    # then a straggling read may be raced by a second one and the loser costs nothing
    # more. Sources whose reads cannot be ended (a local file, boto3's streams) say no;
    # a source may change its mind (S3 when its reads go back to boto3).
    abortable: bool = False

    def __init__(
        self, uri: str, options: dict[str, Any] | None = None, fences: Fences | None = None
    ) -> None:
        self.uri = uri
        self.options = validate_options(uri, options)
        self.fences = fences or Fences()

    @abstractmethod
    async def list(self) -> Listing:
        """Resolve the URI to a fixed revision: every file with size, mode, identity, version.

        Raises InvalidSourceError when the URI names nothing, UnsafePathError for names that
        would escape the root, SourceUnavailableError for temporary failures.
        """

    @abstractmethod
    def read_into(
        self, entry: FileEntry, offset: int, buf: memoryview, abort: Abort | None = None
    ) -> None:
        """Fill `buf` with bytes [offset, offset+len(buf)) of `entry`. Blocking: thread only.

        Raises SourceChangedError if the recorded version is gone (never retried) and
        SourceUnavailableError for temporary failures, also when `abort` fired from
        another thread ended the read (`abortable` sources; others ignore it).
        """

    def close(self) -> None:
        """Release connections; the source may not be used afterwards."""
        return None  # sources without connections have nothing to release

    @staticmethod
    def is_temp_failure(exc: BaseException) -> bool:
        """Whether a read that failed with `exc` may succeed if tried again: only
        `SourceUnavailableError` (network, timeouts, 5xx, 429). Anything else a source
        raises (SourcePermanentError, SourceChangedError, a refused credential) is never
        retried."""
        return isinstance(exc, SourceUnavailableError)


@functools.cache
def abandon_on_cancel() -> dict[str, Any]:
    """Keyword arguments for `trio.to_thread.run_sync` that let a caller's deadline walk
    away from a thread that only reads (a listing). trio 0.23 renamed `cancellable` to
    `abandon_on_cancel`; both are supported. trio loads here, not with this module."""
    import trio

    parameters = inspect.signature(trio.to_thread.run_sync).parameters
    return {"abandon_on_cancel" if "abandon_on_cancel" in parameters else "cancellable": True}


def pinned_size(entry: FileEntry, offset: int, want: int) -> int:
    """The recorded size of `entry`; ValueError if [offset, offset+want) is outside it."""
    size = int(entry.version.get("size", entry.size))
    if offset < 0 or offset + want > size:
        raise ValueError(f"range {offset}+{want} outside {entry.path} ({size} bytes)")
    return size


def options_for(
    uri: str, configured: dict[str, dict[str, Any]], given: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Options for opening `uri`: the config's longest matching URI prefix, then the
    dataset's own options on top."""
    matches = [prefix for prefix in configured if uri.startswith(prefix)]
    base = dict(configured[max(matches, key=len)]) if matches else {}
    return {**base, **(given or {})}


def changed_error(
    where: str, version: dict[str, str], keys: tuple[str, ...], why: str
) -> SourceChangedError:
    """The error for a read that found `where` no longer at its pinned `version` (the
    `keys` of it that identify a version at this kind of source, in that order)."""
    pinned = " ".join(f"{k}={version[k]}" for k in keys if k in version) or "(unpinned)"
    return SourceChangedError(f"source changed: {where} no longer has version {pinned} ({why})")


THROTTLING = frozenset({429, 503})  # statuses an origin uses to say "slow down"


def unavailable(status: int, headers: dict[str, str], message: str) -> SourceUnavailableError:
    """The error for a temporary failure answered with HTTP `status`: a
    `SourceThrottledError` carrying the answer's Retry-After when the origin asked to slow
    down (429, 503), else a plain `SourceUnavailableError`. `headers`: lower-case names."""
    if status in THROTTLING:
        return SourceThrottledError(message, parse_retry_after(headers.get("retry-after")))
    return SourceUnavailableError(message)


def check_range_body(
    resp: Response,
    offset: int,
    want: int,
    size: int,
    what: str,
    changed: Callable[[str], SourceChangedError],
) -> None:
    """After a 200 or 206 to a range GET of a `size`-byte file: the body received is
    exactly bytes [offset, offset+want) of that same file, else the right error."""
    length = resp.headers.get("content-length")
    if resp.status == 200:
        if offset != 0 or want != size:
            # Every retry would fetch the whole file again and fail the same way.
            raise SourcePermanentError(f"cannot read {what}: the server ignores Range requests")
        if length != str(size):
            raise changed(f"now {length or 'unknown'} bytes")
        return
    content_range = resp.headers.get("content-range", "")
    try:
        first, last, total = parse_content_range(content_range)
    except WireError as exc:
        raise SourceError(f"cannot read {what}: {exc}") from exc
    if total is not None and total != size:
        raise changed(f"now {total} bytes")
    if first != offset or last != offset + want - 1 or length != str(want):
        raise SourceError(
            f"cannot read {what}: asked for bytes {offset}-{offset + want - 1}, "
            f"got {content_range!r} with Content-Length {length}"
        )


def register(cls: type[Source]) -> type[Source]:
    """Class decorator: make `cls` the source for each of its schemes."""
    for scheme in cls.schemes:
        _REGISTRY[scheme] = cls
    return cls


def _import_scheme(scheme: str) -> None:
    if scheme not in _REGISTRY and scheme in _BUILTIN:
        importlib.import_module(_BUILTIN[scheme])


def import_schemes(uris: Iterable[str]) -> None:
    """Blocking (a worker thread): import the modules of these URIs' schemes, so that
    `open_source` for them later reads no file (the daemon opens sources on the trio
    thread). Invalid and unknown schemes, and a module that fails to import, are left
    for `open_source` to report."""
    for uri in uris:
        with contextlib.suppress(ValueError, ImportError):
            _import_scheme(urlsplit(uri).scheme.lower())


def warm_up() -> None:
    """Blocking (a thread of its own, at a daemon's start, embedded scheduler included;
    once per process): import the S3 and Hub sources and what their clients load
    (boto3's service model, huggingface_hub), so that the first `dataset add` or read of
    such a dataset does not wait ~0.3 s for it (+35 MiB of RSS). Not in a standalone
    scheduler: bench/scale.py at 5,000 nodes answered heartbeats slower with it (p50
    250-544 ms vs 28-166 ms, three alternating pairs), for a cost paid once by the first
    such dataset. Never fails: what goes wrong here goes wrong again, reported, when a
    source is opened."""
    global _warmed
    with _WARM_LOCK:
        if _warmed:
            return
        _warmed = True
    started = time.monotonic()
    for scheme in ("s3", "hf"):
        try:
            _import_scheme(scheme)
            importlib.import_module(_BUILTIN[scheme]).warm()
        except Exception:  # only ahead of time: open_source reports what fails
            log.debug("could not warm up the %s source", scheme, exc_info=True)
    log.info("S3 and Hub clients warmed up in %.2fs", time.monotonic() - started)


def open_source(
    uri: str, options: dict[str, Any] | None = None, fences: Fences | None = None
) -> Source:
    """Build the source for `uri` from the scheme registry, inside `fences`."""
    try:
        scheme = urlsplit(uri).scheme.lower()
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise InvalidSourceError(f"invalid source URI {redact_url(uri)!r}: {exc}") from None
    _import_scheme(scheme)
    try:
        cls = _REGISTRY[scheme]
    except KeyError:
        known = ", ".join(sorted(set(_REGISTRY) | set(_BUILTIN)))
        raise InvalidSourceError(
            f"unsupported source {redact_url(uri)!r}: scheme must be one of {known}"
        ) from None
    return cls(uri, options, fences=fences)
