"""syncbit's async HTTP/1.1 servers (trio + h11): a coroutine per connection, never a
thread; connection caps, TLS and plain HTTP on one port, bodies read only on demand.

Re-exports `listener` and `connection`; holds no logic and starts nothing on import.
"""

from syncbit.httpd.connection import (
    Body,
    BodySender,
    Request,
    Response,
    connection_error,
    serve_connection,
)
from syncbit.httpd.listener import (
    HANDSHAKE_TIMEOUT,
    Listener,
    bind,
    descriptor_budget,
    raise_descriptor_limit,
)

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "Body",
    "BodySender",
    "Listener",
    "Request",
    "Response",
    "bind",
    "connection_error",
    "descriptor_budget",
    "raise_descriptor_limit",
    "serve_connection",
]
