"""Connection limits of syncbit's HTTP servers (the scheduler API, the daemon's peer and
control API: both `syncbit.httpd`, a coroutine per connection), and the request-body
rules they share.

Owns how many connections may be open (`Limits`): at most `max_connections` in all and
`max_per_client` from one client address, each dropped once idle for `idle_timeout`
(the listener keeps them). Never parses a request beyond the body framing headers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from email.message import Message
from typing import Any

# Body refusals are errors of the one tree (servers answer them by its status table);
# BodyError is re-exported for the servers that catch it.
from syncbit.errors import BodyError, LengthRequiredError, PayloadTooLargeError

log = logging.getLogger("syncbit.serving")

IDLE_TIMEOUT = 120.0  # seconds a connection may sit between (or inside) requests
MAX_JSON_DEPTH = 32  # nesting of arrays/objects in a request body: every body is shallow


@dataclass(frozen=True)
class Limits:
    """How many connections a server keeps open, and for how long when idle."""

    max_connections: int = 1024  # in all: each a descriptor and a coroutine
    max_per_client: int = 256  # from one client address
    idle_timeout: float = IDLE_TIMEOUT  # seconds between (or inside) requests


def body_length(headers: Message, limit: int) -> int:
    """The Content-Length of a request, checked before a byte of the body is read.

    Raises BodyError: LengthRequiredError for a chunked body (no length to check),
    PayloadTooLargeError for one over `limit` (the route's limit), BodyError itself for a
    malformed length.
    """
    if headers.get("Transfer-Encoding", "").strip().lower() not in ("", "identity"):
        raise LengthRequiredError("request bodies need a Content-Length")
    raw = headers.get("Content-Length")
    if raw is None or not raw.strip():
        return 0
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 18:  # isdigit also admits no sign, no spaces
        raise BodyError(f"invalid Content-Length {raw[:40]!r}")
    length = int(raw)
    if length > limit:
        what = "takes no request body" if limit == 0 else f"takes at most {limit} bytes"
        raise PayloadTooLargeError(f"request body of {length} bytes refused: this endpoint {what}")
    return length


def json_depth_ok(doc: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `doc` (decoded JSON) nests arrays/objects at most `limit` deep. Iterative:
    a deep document must not recurse here either."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def loads_bounded(raw: bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` of a request body whose nesting is at most `limit` deep.

    Raises ValueError (with the reason) for invalid JSON and for nesting deeper than the
    limit: the C decoder recurses once per level and raises RecursionError around a
    thousand levels, which must be a client error, not a server failure.
    """
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ValueError(f"nested deeper than {limit} levels") from None
    if not json_depth_ok(doc, limit):
        raise ValueError(f"nested deeper than {limit} levels")
    return doc


__all__ = [
    "IDLE_TIMEOUT",
    "MAX_JSON_DEPTH",
    "BodyError",
    "Limits",
    "body_length",
    "json_depth_ok",
    "loads_bounded",
]
