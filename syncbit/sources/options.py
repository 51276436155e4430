"""Source options: which keys each scheme takes, how their values parse, which are secret.

One table per scheme, read by the scheduler (a dataset's `-o` options and the config's
`source_options`), by every source's constructor and by the config loader, so an unknown
key or a bad value fails the same way everywhere: an `InvalidSourceError` naming the key
and listing the valid ones. It also decides what a manifest may keep of a source URI and
its options: never a secret (header values, tokens, URL credentials, signed query
strings). Imports no source client (boto3, huggingface_hub): the CLI uses it too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from syncbit.errors import InvalidSourceError
from syncbit.redact import redact_url, register_secret, signed_query_keys, strip_userinfo

__all__ = [
    "FOLLOW_REDIRECTS",
    "PREFETCH_ON_OPEN",
    "Option",
    "parse_bool",
    "public_options",
    "public_source",
    "register_secrets",
    "scheme_of",
    "split_globs",
    "validate_options",
]

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
FOLLOW_REDIRECTS = ("none", "same-host", "any")
_ADDRESSING_STYLES = ("auto", "path", "virtual")
# RFC 9110 token characters: a header name with anything else (CR, LF, ':') could split
# the request line syncbit writes itself (wire.py).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers syncbit sets for its own range reads and version checks: a dataset cannot
# replace them (a `Range` of its own would make every chunk the wrong bytes).
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "range",
        "if-match",
        "if-unmodified-since",
        "if-none-match",
        "if-range",
        "content-length",
        "transfer-encoding",
        "connection",
        "accept-encoding",
    }
)


def parse_bool(value: Any) -> bool:
    """True/False, or one of true/1/yes/on, false/0/no/off (any case); else ValueError."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected a boolean: true/1/yes/on or false/0/no/off")


def _number(kind: type[int] | type[float], low: float, high: float) -> Callable[[Any], Any]:
    def parse(value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected a number from {low:g} to {high:g}")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected a whole number from {low:g} to {high:g}")
        try:
            number = kind(value.strip() if isinstance(value, str) else value)
        except (ValueError, OverflowError):
            raise ValueError(f"expected a number from {low:g} to {high:g}") from None
        if (isinstance(number, float) and not math.isfinite(number)) or not low <= number <= high:
            raise ValueError(f"expected a number from {low:g} to {high:g}")
        return number

    return parse


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("control characters are not allowed")
    return value.strip()


def _secret_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("empty: give a value, or leave the option out")
    return _text(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value.strip().lower()

    return parse


def _endpoint(value: Any) -> str:
    text = _text(value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise ValueError("expected an http(s)://host[:port][/path] URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http(s)://host[:port][/path] URL")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            "credentials, query strings and fragments are not allowed in an endpoint "
            "(credentials belong in the nodes' environment or config)"
        )
    return text.rstrip("/")


def split_globs(value: Any) -> list[str]:
    """A glob list: a list of strings, or one comma-separated string (from a flag)."""
    if value is None or value == "":
        return []
    items: list[Any]
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError("expected globs: a list, or one comma-separated string")
    globs: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a glob")
        globs += [g.strip() for g in item.split(",") if g.strip()]
    return globs


def _headers(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(
            "expected a mapping of header names to values (set it in source_options of the "
            "config, or as a JSON object through the API)"
        )
    headers: dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ValueError(f"{str(name)[:40]!r} is not a valid header name")
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"header {name} is set by syncbit itself")
        if not isinstance(text, str) or any(c in text for c in "\r\n\x00"):
            raise ValueError(f"the value of header {name} must be text on one line")
        headers[name] = text
    return headers


@dataclass(frozen=True)
class Option:
    """One option of a scheme: how its value parses, what it means, who may set it.

    `secret` values are never stored or shown (a manifest drops them); `operator_only`
    options are taken from the config's `source_options` only, never from a dataset's
    own options (they loosen a fence an API client must not be able to loosen).
    """

    parse: Callable[[Any], Any]
    doc: str
    secret: bool = False
    operator_only: bool = False


# How nodes read a dataset, not how its source is opened: every scheme takes them, and
# they ride in the manifest so every node of the dataset applies the same.
PREFETCH_ON_OPEN = ("auto", "on", "off")
_READS = {
    "prefetch_on_open": Option(
        _choice(*PREFETCH_ON_OPEN),
        "auto (the node's setting), on or off: an open() of a cold file fetches it whole",
    ),
    "trace": Option(parse_bool, "record the first reader's access order; prefetch follows it"),
}
_COMMON = {
    **_READS,
    "include": Option(split_globs, "only files whose path matches one of these globs"),
    "exclude": Option(split_globs, "skip files whose path matches one of these globs"),
}
_HTTP = {
    **_COMMON,
    "headers": Option(_headers, "extra request headers (e.g. Authorization)", secret=True),
    "timeout": Option(_number(float, 0.1, 3600), "seconds per request"),
    "concurrency": Option(_number(int, 1, 256), "parallel listing requests"),
    "verify": Option(parse_bool, "verify the server's TLS certificate"),
    "follow_redirects": Option(
        _choice(*FOLLOW_REDIRECTS),
        "none, same-host (default) or any: which redirects are followed",
    ),
    "allow_link_local": Option(
        parse_bool,
        "allow requests to link-local addresses (cloud metadata services)",
        operator_only=True,
    ),
}
SCHEMES: dict[str, dict[str, Option]] = {
    "http": _HTTP,
    "https": _HTTP,
    "file": {**_COMMON, "max_open_files": Option(_number(int, 1, 65536), "descriptors kept")},
    "s3": {
        **_COMMON,
        "endpoint_url": Option(_endpoint, "S3-compatible endpoint"),
        "region": Option(_text, "AWS region"),
        "addressing_style": Option(_choice(*_ADDRESSING_STYLES), "auto, path or virtual"),
        "profile": Option(_text, "AWS profile (credentials stay in the profile)"),
        "max_attempts": Option(_number(int, 1, 100), "botocore tries per request"),
        "max_connections": Option(_number(int, 1, 1024), "connection pool size"),
        "direct_reads": Option(
            parse_bool, "ranged reads by presigned URL on syncbit's HTTP client (default true)"
        ),
    },
    "hf": {
        **_COMMON,
        "revision": Option(_text, "branch, tag or commit"),
        "endpoint": Option(_endpoint, "Hub endpoint (default HF_ENDPOINT or huggingface.co)"),
        "timeout": Option(_number(float, 0.1, 3600), "seconds per read request"),
        "token": Option(_secret_text, "Hub token (default HF_TOKEN)", secret=True),
        "allow_link_local": Option(
            parse_bool, "allow an endpoint on a link-local address", operator_only=True
        ),
    },
    # No include/exclude: an image layout is whole or not at all.
    "oci": {
        **_READS,
        "platform": Option(_text, "os/arch[/variant]: only that image of an index"),
        "insecure": Option(parse_bool, "plain HTTP to the registry (as skopeo's --tls-verify)"),
        "ca": Option(_text, "a CA bundle trusted besides the system's"),
        "timeout": Option(_number(float, 0.1, 3600), "seconds per request"),
    },
}


def scheme_of(uri: str) -> str:
    """The lower-cased scheme of `uri` ('' without one)."""
    scheme, sep, _ = uri.partition("://")
    return scheme.lower() if sep else ""


def _shown(option: Option, value: Any) -> str:
    return "***" if option.secret else repr(value)[:80]


def validate_options(
    uri: str, options: Mapping[str, Any] | None, *, from_dataset: bool = False
) -> dict[str, Any]:
    """`options` for a source at `uri`, each value parsed (booleans as booleans, numbers as
    numbers, globs as lists). Unknown schemes pass through untouched (opening the source
    says what is wrong with them).

    Raises InvalidSourceError naming the key: unknown keys (with the valid ones), bad
    values (with what is expected), and, with `from_dataset`, operator-only keys.
    """
    scheme = scheme_of(uri)
    table = SCHEMES.get(scheme)
    if table is None or not options:
        return dict(options or {})
    parsed: dict[str, Any] = {}
    for key, value in options.items():
        option = table.get(key) if isinstance(key, str) else None
        if option is None:
            raise InvalidSourceError(
                f"unknown option {str(key)[:60]!r} for {scheme}:// sources; "
                f"valid options: {', '.join(sorted(table))}"
            )
        if from_dataset and option.operator_only:
            raise InvalidSourceError(
                f"option {key} can only be set in source_options of the scheduler's and the "
                "nodes' config, not per dataset"
            )
        try:
            parsed[key] = option.parse(value)
        except ValueError as exc:
            raise InvalidSourceError(
                f"invalid option {key}={_shown(option, value)} for {scheme}:// sources: {exc}"
            ) from None
    return parsed


def public_options(uri: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options a manifest may carry: no secret, and no operator-only option (each node
    takes those from its own config, never from what a scheduler sends). Keys of unknown
    schemes that look secret are dropped too."""
    table = SCHEMES.get(scheme_of(uri))
    kept: dict[str, Any] = {}
    for key, value in (options or {}).items():
        option = table.get(key) if table is not None else None
        if option is not None and (option.secret or option.operator_only):
            continue
        if option is None and any(w in str(key).lower() for w in _SECRET_WORDS):
            continue
        kept[key] = value
    return kept


_SECRET_WORDS = ("token", "secret", "password", "credential", "access_key", "auth", "header")


def register_secrets(uri: str, options: Mapping[str, Any] | None) -> None:
    """Tell the log scrubber about every secret value in `options` (and URL credentials)."""
    table = SCHEMES.get(scheme_of(uri), {})
    for key, value in (options or {}).items():
        option = table.get(key)
        if option is None or not option.secret:
            continue
        if isinstance(value, Mapping):
            for item in value.values():
                register_secret(item)
        else:
            register_secret(value)
    try:
        password = urlsplit(uri).password
    except ValueError:
        password = None
    register_secret(password)


def public_source(uri: str) -> tuple[str, bool]:
    """The source URI a manifest may keep, and whether credentials were taken out of it.

    URL credentials (`user:password@`) are dropped: they served this listing only, and the
    nodes read with their own. A signed query string (X-Amz-Signature, sig, token, ...) is
    refused: it is a credential every node would need, and it expires.
    """
    signed = signed_query_keys(uri) if scheme_of(uri) in ("http", "https") else []
    if signed:
        raise InvalidSourceError(
            f"the source URL {redact_url(uri)} carries credentials in its query string "
            f"({', '.join(signed)}): a signed URL expires and every node would need it. "
            "Use s3://bucket/key (credentials from each node's AWS configuration), or the "
            "unsigned URL with `headers` in source_options of the scheduler's and nodes' config"
        )
    public = strip_userinfo(uri)
    return public, public != uri
