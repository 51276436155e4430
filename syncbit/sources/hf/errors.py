"""The Hub's failures as syncbit's: huggingface_hub exceptions while listing, and the
status and `X-Error-Code` of a read. Messages say what to do (grant access, set HF_TOKEN
on the node) and never carry a token or a signed storage URL.
"""

from __future__ import annotations

import contextlib
import importlib

from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
    SyncbitError,
)
from syncbit.redact import redact_url

_TEMPORARY = frozenset({408, 429})
# What a node lacking a token must be told: its reads never see the user's shell.
_NODE_TOKEN = (
    "the syncbit daemon on this node has no Hub token: set HF_TOKEN in its environment "
    "(or token in source_options['hf://'] of its config); a token given to `syncbit pull` "
    "or `dataset add` only resolves the revision and is never stored"
)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network-level exceptions of whichever HTTP client this huggingface_hub uses."""
    found: list[type[BaseException]] = [OSError]  # requests' ConnectionError is an OSError
    for module in ("httpx2", "httpx", "requests"):
        with contextlib.suppress(ImportError, AttributeError):
            mod = importlib.import_module(module)
            names = ("TransportError",) if module != "requests" else ("ConnectionError", "Timeout")
            found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(found)


def hub_error(
    exc: BaseException, where: str, *, has_token: bool, revision: str, uri: str, endpoint: str
) -> SyncbitError:
    """The syncbit error for a huggingface_hub failure about the repo `where` (its
    `revision`, listed from `endpoint` for the source `uri`)."""
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.GatedRepoError):
        if has_token:
            return InvalidSourceError(
                f"{where} is gated and the token (HF_TOKEN) has not been granted "
                "access: request access on the repo's page"
            )
        return InvalidSourceError(
            f"{where} is gated: request access on the repo's page and set HF_TOKEN"
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        hint = (
            "or the token (HF_TOKEN) cannot read it"
            if has_token
            else "if it is private or gated, set HF_TOKEN"
        )
        return InvalidSourceError(f"no such repo {where} ({hint})")
    if isinstance(exc, hf.RevisionNotFoundError):
        return InvalidSourceError(f"no revision {revision!r} in repo {where}")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return InvalidSourceError(
            f"cannot list {where}: huggingface_hub offline mode is on (HF_HUB_OFFLINE)"
        )
    if isinstance(exc, hf.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status == 401:
            return InvalidSourceError(
                f"the Hub refused the token for {where}: invalid credentials in HF_TOKEN"
            )
        if status is not None and (status in _TEMPORARY or status >= 500):
            return SourceUnavailableError(f"{where} is unavailable: HTTP {status}")
        return SourceError(f"request for {where} failed: HTTP {status}")
    if isinstance(exc, _transport_errors()):
        return SourceUnavailableError(f"cannot reach {redact_url(endpoint)}: {type(exc).__name__}")
    if isinstance(exc, ValueError):  # huggingface_hub's argument validation
        return InvalidSourceError(f"invalid HuggingFace source {uri!r}: {exc}")
    return SourceError(f"listing {where} failed: {type(exc).__name__}")


def read_error(status: int, code: str, what: str, has_token: bool) -> SyncbitError | None:
    """The error a read's answer stands for (HTTP `status`, the Hub's `X-Error-Code`
    `code`), None for 200 and 206; `has_token`: this node sent one."""
    if code == "RepoNotFound":
        if not has_token:
            return InvalidSourceError(
                f"cannot read {what}: the Hub hides it from anonymous requests; "
                f"if the repo is private, {_NODE_TOKEN}"
            )
        return SourceChangedError(
            f"source changed: {what} is gone (the repo was deleted, or HF_TOKEN cannot "
            f"read it): HTTP {status}"
        )
    if status in (401, 403):
        if code == "GatedRepo":
            if not has_token:
                return InvalidSourceError(f"cannot read {what}: the repo is gated; {_NODE_TOKEN}")
            return InvalidSourceError(
                f"cannot read {what}: the repo is gated and this node's token (HF_TOKEN) "
                "has no access to it"
            )
        if status == 401:
            return InvalidSourceError(f"cannot read {what}: the Hub refused HF_TOKEN")
        # A storage URL whose signature expired or was refused: the next try gets a new one.
        return SourceUnavailableError(f"cannot read {what}: HTTP {status} from storage")
    if status in (404, 410, 412, 416):
        return SourceChangedError(f"source changed: {what} is gone ({code or 'HTTP'} {status})")
    if status in _TEMPORARY or status >= 500:
        return SourceUnavailableError(f"cannot read {what}: HTTP {status}")
    if status not in (200, 206):
        return SourceError(f"cannot read {what}: HTTP {status}")
    return None
