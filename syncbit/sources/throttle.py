"""What an origin says about its load, read at the boundary: an HTTP Retry-After as seconds,
and the key one concurrency level applies to (`source_key`: a host, a bucket, a Hub
endpoint). Pure: no I/O.
"""

from __future__ import annotations

import email.utils
import time
from urllib.parse import urlsplit

__all__ = ["parse_retry_after", "source_key"]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """An HTTP Retry-After value (delay-seconds or an HTTP-date) as seconds from now (never
    negative); None when absent or unparsable. `now`: wall-clock seconds, for dates."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 dates are GMT; anything else is not a valid HTTP-date
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)


def source_key(uri: str, endpoint: str | None = None) -> str:
    """The unit one concurrency level applies to: scheme and host[:port] for http(s)
    (credentials dropped), the bucket (and endpoint, if not AWS's) for s3, the endpoint for
    hf; the scheme alone for anything else (file://: the local disk)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme in ("http", "https"):
        port = f":{parts.port}" if parts.port else ""
        return f"{scheme}://{host}{port}"
    if scheme == "s3":
        where = _origin_of(endpoint) if endpoint else ""
        return f"s3://{parts.netloc}" + (f"@{where}" if where else "")
    if scheme == "hf":
        return "hf@" + (_origin_of(endpoint) if endpoint else "huggingface.co")
    return f"{scheme}:"


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{(parts.hostname or url).lower()}{port}"
