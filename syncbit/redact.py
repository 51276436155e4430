"""Keeping secrets out of messages and logs: URLs without credentials, free text scrubbed.

Owns the list of query parameters that carry credentials (signed URLs), the redaction of
URLs and text, and a log formatter that scrubs every line a process writes. Secret values
a process learns (configured headers, tokens) are registered here so that a library's
debug line that repeats one is scrubbed too. Nothing here does I/O or raises on bad input.
"""

from __future__ import annotations

import logging
import re
import threading
from urllib.parse import parse_qsl, urlsplit, urlunsplit

__all__ = [
    "SIGNED_QUERY_KEYS",
    "ScrubbingFormatter",
    "redact_url",
    "register_secret",
    "scrub",
    "signed_query_keys",
    "strip_userinfo",
]

# Query parameters that make a URL a credential (AWS SigV2/V4, GCS, CloudFront, Azure SAS)
# or carry one (API keys and tokens passed in the URL). Compared case-insensitively.
SIGNED_QUERY_KEYS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "awsaccesskeyid",
        "x-goog-signature",
        "x-goog-credential",
        "googleaccessid",
        "signature",
        "sig",
        "policy",
        "key-pair-id",
        "token",
        "access_token",
        "api_key",
        "apikey",
        "key",
        "password",
        "secret",
    }
)
_MASK = "***"
_URL_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)
# `Authorization: Bearer x`, `Bearer x`, `token=x` as free text (a library's repr of a
# request), whatever the URL scrubbing did not see.
_BEARER = re.compile(
    r"(?i)\b(?:(bearer|basic)(\s+)([A-Za-z0-9._~+/-]{8,}=*)|(token|access_token)(=)([^\s&'\"]+))"
)
_AUTH_HEADER = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)([^'\"\r\n,}]+)")
# `X-Amz-Signature=...` outside a full URL: a relative Location header, a library's repr.
# Not a bare `key=`: in free text that is mostly prose ("expected key=value").
_SIGNED_PAIR = re.compile(
    r"(?i)(?<![A-Za-z0-9_.-])("
    + "|".join(re.escape(k) for k in sorted(SIGNED_QUERY_KEYS - {"key"}, key=len, reverse=True))
    + r"|x-amz-[a-z-]+|x-goog-[a-z-]+)=([^&\s'\"<>]+)"
)
_MIN_SECRET = 6  # shorter registered values would mask ordinary words
_MAX_SECRETS = 1024

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: object) -> None:
    """Remember `value` (a configured header value, a token) so that `scrub` masks it
    wherever it appears. Short values are ignored; the set is bounded."""
    if not isinstance(value, str):
        return
    value = value.strip()
    if len(value) < _MIN_SECRET:
        return
    with _secrets_lock:
        if len(_secrets) < _MAX_SECRETS:
            _secrets.add(value)
        # A Basic/Bearer header value: its credential part alone may be logged too.
        scheme, _, rest = value.partition(" ")
        if rest and scheme.lower() in ("bearer", "basic", "token") and len(rest) >= _MIN_SECRET:
            _secrets.add(rest.strip())


def strip_userinfo(url: str) -> str:
    """`url` without `user:password@` (everything else kept)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def signed_query_keys(url: str) -> list[str]:
    """The credential-carrying query parameters of `url` (as written), in order."""
    try:
        query = urlsplit(url).query
    except ValueError:
        return []
    pairs = parse_qsl(query, keep_blank_values=True)
    return [k for k, _ in pairs if k.lower() in SIGNED_QUERY_KEYS]


def redact_url(url: str) -> str:
    """`url` without credentials, query string or fragment: safe for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _scrub_url(url: str) -> str:
    """One URL in free text: userinfo dropped, credential query values masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = []
        for item in query.split("&"):
            key, sep, _ = item.partition("=")
            if key.lower() in SIGNED_QUERY_KEYS or _looks_signed(key):
                pairs.append(f"{key}{sep}{_MASK}")
            else:
                pairs.append(item)
        query = "&".join(pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _looks_signed(key: str) -> bool:
    lowered = key.lower()
    return lowered.startswith(("x-amz-", "x-goog-")) or "signature" in lowered


def scrub(text: str) -> str:
    """`text` with credentials masked: URL userinfo and signed query values, bearer and
    basic credentials, Authorization header values, and every registered secret."""
    text = _URL_IN_TEXT.sub(lambda m: _scrub_url(m.group(0)), text)
    text = _SIGNED_PAIR.sub(lambda m: f"{m.group(1)}={_MASK}", text)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + _MASK, text)
    text = _BEARER.sub(_mask_credential, text)
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, _MASK)
    return text


def _mask_credential(match: re.Match[str]) -> str:
    if match.group(1):
        return match.group(1) + match.group(2) + _MASK
    return match.group(4) + match.group(5) + _MASK


class ScrubbingFormatter(logging.Formatter):
    """A formatter whose every line (message, arguments and traceback) goes through
    `scrub`: a library that logs a signed URL or a header at debug level leaks nothing."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))
