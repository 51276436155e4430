"""Pulling byte ranges of objects from other nodes' chunk servers, over a small transport
(`PeerTransport`; keep-alive `wire.Pool` by default). Blocking: worker threads only.
Never judges the bytes: the caller verifies them against a known digest before use.
"""

from __future__ import annotations

import ssl
from typing import Protocol

from syncbit.auth import bearer
from syncbit.errors import PeerBusyError, PeerError, PeerUnreachableError
from syncbit.peer.server import PRIORITY_HEADER
from syncbit.wire import Abort, ConnectError, Pool, Response, WireError, parse_content_range


class PeerTransport(Protocol):
    """How range GETs reach a peer: `wire.Pool`, or a fake in tests."""

    def get_into(
        self,
        url: str,
        offset: int,
        buf: memoryview,
        headers: dict[str, str] | None = None,
        *,
        abort: Abort | None = None,
    ) -> Response:
        """GET bytes [offset, offset+len(buf)) of `url` into `buf`; any status is returned
        (a 206 with `buf` filled); raises WireError when no answer came (or `abort` fired)."""
        ...

    def close(self) -> None: ...


class PeerClient:
    """Pulls byte ranges of objects from peers (blocking; worker threads only).

    Args:
        token: the node's peer credential (`set_token` replaces it when renewed).
        tls_context: dial peers over TLS, verifying their certificates with it.
        tls_name: the name peers' certificates carry (`peer_tls_name`); default: the
            address dialled.
        transport: what carries the requests (default: a keep-alive `wire.Pool` built
            from `timeout`, `tls_context` and `tls_name`).
    """

    def __init__(
        self,
        timeout: float = 10.0,
        token: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        tls_name: str | None = None,
        transport: PeerTransport | None = None,
    ) -> None:
        if transport is None:
            transport = Pool(timeout=timeout, ssl_context=tls_context, server_name=tls_name)
        self._transport = transport
        self._scheme = "https" if tls_context is not None else "http"
        self._headers = bearer(token)

    def set_token(self, token: str | None) -> None:
        self._headers = bearer(token)

    def get_into(
        self,
        address: str,
        object_id: str,
        offset: int,
        buf: memoryview,
        prefetch: bool = False,
        abort: Abort | None = None,
    ) -> None:
        """Fill `buf` with the object's bytes at `offset` from the peer. A `prefetch`
        transfer may be refused (PeerBusyError) when the peer's upload slots are taken;
        `abort` ends it from another thread (PeerError)."""
        url = f"{self._scheme}://{address}/v1/objects/{object_id}/data"
        headers = {**self._headers, PRIORITY_HEADER: "prefetch"} if prefetch else self._headers
        try:
            resp = self._transport.get_into(url, offset, buf, headers, abort=abort)
        except ConnectError as exc:
            raise PeerUnreachableError(f"peer {address}: {exc}") from exc
        except WireError as exc:
            raise PeerError(f"peer {address}: {exc}") from exc
        if resp.status == 503:
            raise PeerBusyError(f"peer {address} is busy")
        if resp.status != 206:
            raise PeerError(f"peer {address} answered HTTP {resp.status} for {object_id[:12]}")
        try:
            first, last, _ = parse_content_range(resp.headers.get("content-range", ""))
        except WireError as exc:
            raise PeerError(f"peer {address}: {exc}") from exc
        if first != offset or last != offset + len(buf) - 1:
            raise PeerError(f"peer {address} sent the wrong range")

    def close(self) -> None:
        self._transport.close()
