"""The client of a node daemon's local control API (`/v1/local/...`): JSON over one
keep-alive connection, with the standard library only. Never imports httpx, trio or
pydantic: `syncbit wait` runs in every initContainer and in scripts' loops.
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any
from urllib.parse import urlencode

from syncbit import tls
from syncbit.auth import bearer, client_ca, client_tls_name, client_token
from syncbit.blocking_http import Connection
from syncbit.errors import (
    DaemonUnreachableError,
    ForbiddenError,
    SyncbitError,
    UnauthorizedError,
    UserError,
    error_class,
)


class DaemonClient:
    """JSON requests to a node's daemon (`/v1/local/...`) over one keep-alive connection.

    The standard library's http.client, not httpx: importing httpx (with httpcore and
    trio) and building its TLS context cost ~0.15 s of CPU per start for a plain-HTTP
    loopback call. `https://host:port` speaks TLS, trusting $SYNCBIT_TLS_CA (one file: no
    system bundle to load) and checking the name $SYNCBIT_TLS_NAME when set.
    """

    def __init__(self, address: str, timeout: float) -> None:
        scheme, sep, rest = address.partition("://")
        if not sep:
            scheme, rest = "http", address
        host, _, port = rest.rstrip("/").rpartition(":")
        if (
            scheme not in ("http", "https")
            or not host
            or not port.isdigit()
            or not 0 < int(port) < 65536
        ):
            raise UserError(
                f"--daemon must be host:port or https://host:port (port 1-65535), not {address!r}"
            )
        self.address = f"{scheme}://{rest.rstrip('/')}"
        context = tls.client_context(client_ca()) if scheme == "https" else None
        self._conn = Connection(host, int(port), timeout, context, client_tls_name())
        self._headers = {"Accept": "application/json", **bearer(client_token())}

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """One request to `/v1/local/<path>`; the JSON answer, or the daemon's error as a
        SyncbitError (see `error_for`)."""
        url = f"/v1/local/{path}" + (f"?{urlencode(params)}" if params else "")
        headers = dict(self._headers)
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            status, _, raw = self._conn.exchange(method, url, payload, headers)
        except ssl.SSLCertVerificationError as exc:  # not worth retrying: the same one comes back
            raise tls.trust_error(
                f"daemon at {self.address}",
                exc,
                "set SYNCBIT_TLS_CA to the cluster's CA file (and SYNCBIT_TLS_NAME to the "
                "daemons' certificate name, peer_tls_name)",
            ) from None
        except (OSError, http.client.HTTPException) as exc:  # the next call dials again
            raise DaemonUnreachableError(
                f"no syncbit daemon answers at {self.address} ({type(exc).__name__}): "
                "start one with `syncbit daemon` or pass --daemon host:port"
            ) from exc
        try:
            doc: dict[str, Any] = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        error = error_for(status, raw, doc, url, self.address)
        if error is not None:
            raise error
        return doc


def error_for(
    status: int, raw: bytes, doc: dict[str, Any], url: str, address: str
) -> SyncbitError | None:
    """The error a daemon's answer stands for (None for 200), as the one status table in
    syncbit.errors names it (NotFoundError for 404, ...); DaemonUnreachableError while the
    daemon is still starting. `doc` is the parsed body ({} if not JSON)."""
    if status == 200:
        return None
    if not isinstance(doc, dict):
        doc = {}
    cls = error_class(status, doc.get("kind"))
    if cls is DaemonUnreachableError or (cls is None and status == 503):
        # Listening, but still starting up (a daemon before JSON errors: a bare 503).
        return DaemonUnreachableError(f"the syncbit daemon at {address} is starting")
    reason = str(doc.get("error") or raw.decode(errors="replace").strip())[:500]
    if cls is UnauthorizedError:
        reason = reason or "missing or wrong cluster token"
        return cls(f"daemon at {address}: {reason} (set SYNCBIT_TOKEN_FILE)")
    if cls is ForbiddenError:
        return cls(f"daemon at {address}: {reason or 'forbidden'}")
    return (cls or SyncbitError)(reason or f"daemon answered HTTP {status} to {url}")


def local(daemon: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request to the daemon's node-local control API (`/v1/local/<path>`)."""
    with DaemonClient(daemon, timeout=120) as client:
        return client.call(method, path, body)
