"""One keep-alive HTTP(S) connection with the standard library: what the CLI talks to its
node's daemon and to the scheduler with. Importing httpx (with httpcore, and click and
rich through its own CLI) and trio costs ~0.15 s of every command's start here, more than
the calls themselves on loopback; `syncbit wait` runs in every initContainer.

Standard library only at import.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Mapping


class _TLSConnection(http.client.HTTPSConnection):
    """https whose certificate is checked for `name` (every daemon's certificate carries
    the same one, `peer_tls_name`) instead of the host dialled, when `name` is given."""

    def __init__(
        self, host: str, port: int, timeout: float, context: ssl.SSLContext, name: str | None
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._name = name
        self._tls = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._name or self.host)


class Connection:
    """Requests over one connection to `host:port`, dialled when first needed and again
    after a failure. `context`: TLS with this (verifying) context, None for plain HTTP;
    `tls_name`: the name the server's certificate must carry (default: `host`)."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        context: ssl.SSLContext | None = None,
        tls_name: str | None = None,
    ) -> None:
        host = host.strip("[]")  # an IPv6 literal as URLs bracket it
        self.timeout = timeout
        self._conn: http.client.HTTPConnection
        if context is not None:
            self._conn = _TLSConnection(host, port, timeout, context, tls_name)
        else:
            self._conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def exchange(
        self,
        method: str,
        target: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: float | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body) of one request (`target`: path and query). Raises what
        the standard library raises (OSError, including ssl's certificate failure, and
        http.client.HTTPException; TimeoutError when the answer takes over `timeout`
        seconds, default the connection's), after closing the connection."""
        wait = self.timeout if timeout is None else timeout
        self._conn.timeout = wait
        if self._conn.sock is not None:
            self._conn.sock.settimeout(wait)
        try:
            self._conn.request(method, target, body=body, headers=dict(headers))
            resp = self._conn.getresponse()
            return resp.status, resp.headers, resp.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()  # the next request dials again
            raise

    def close(self) -> None:
        self._conn.close()


__all__ = ["Connection"]
