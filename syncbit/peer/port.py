"""The node's port: syncbit's async HTTP server (`syncbit.httpd`: a coroutine and a socket
per connection, never a thread) in a trio loop of its own thread, and the plumbing every
route on it shares: answers (plain, JSON, the one error table), bodies read within a
limit, TLS and credential checks, dispatch to the first route that takes a request.

Its own loop keeps the peers' requests off the trio loop that serves FUSE; a route that
needs that loop reaches it through `aio.OtherLoop` (a task there, no thread), and one that
blocks (a file read) through a worker thread of this loop. Knows no route itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from syncbit import tls
from syncbit.aio import run_in_thread
from syncbit.credentials import Role, Verifier
from syncbit.errors import (
    DaemonUnreachableError,
    ForbiddenError,
    MethodNotAllowedError,
    NotFoundError,
    SyncbitError,
    UnauthorizedError,
    UserError,
    error_doc,
    http_status,
)
from syncbit.httpd import Body, Listener, Request, Response, bind, connection_error
from syncbit.serving import Limits, loads_bounded

log = logging.getLogger("syncbit.peer")

_METHODS = ("GET", "POST")


def plain(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain")


def json_answer(status: int, doc: dict[str, Any]) -> Response:
    return Response(status, json.dumps(doc).encode())


def error_answer(exc: SyncbitError) -> Response:
    """`exc` answered with its status from the one error table, in JSON."""
    headers = {}
    if isinstance(exc, MethodNotAllowedError) and exc.allow:
        headers["Allow"] = ", ".join(exc.allow)
    return Response(http_status(exc), json.dumps(error_doc(exc)).encode(), headers=headers)


class Route(Protocol):
    """One family of endpoints on the port, run in the port's loop."""

    async def handle(self, request: PortRequest) -> Response | None:
        """The answer, or None: not one of mine. A SyncbitError raised is answered with
        its status (`error_answer`)."""
        ...


@dataclass
class PortRequest:
    """A request as the routes see it: its head (header names in lower case), the body
    on demand, and the port's checks."""

    method: str
    target: str  # as asked: path and query
    path: str  # the target without its query
    headers: dict[str, str]
    client: str
    tls: bool
    body: Body
    port: Port

    @property
    def loopback(self) -> bool:
        return tls.is_loopback(self.client)

    async def json_body(self, limit: int) -> dict[str, Any]:
        """The request's JSON object, read only within `limit` bytes (BodyError: 411/413
        unread); UserError when it is not a JSON object."""
        raw = await self.body.read(limit)
        try:
            doc = loads_bounded(raw) if raw else {}
        except ValueError as exc:
            raise UserError(f"request body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise UserError("request body must be a JSON object")
        return doc

    def secure(self, plain_ok: bool = False) -> None:
        """TLS, or no TLS needed: none configured, a client on this host, or `plain_ok`
        (the route allows plain HTTP). ForbiddenError when not."""
        if self.port.tls is None or self.tls or plain_ok or self.loopback:
            return
        raise ForbiddenError("this daemon requires TLS: use https://")

    def authorize(self, *roles: Role) -> None:
        """The request's credential has one of `roles` (admin has all); else 401, 403, or
        503 while the daemon does not know the cluster's key. Open when the daemon has no
        token_file."""
        port = self.port
        if not port.auth_required:
            return
        verifier = port.verifier
        if verifier is None:  # registered with no scheduler yet: nothing to check with
            raise DaemonUnreachableError("daemon starting: it does not know the cluster's key yet")
        scheme, _, value = self.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise UnauthorizedError("missing or wrong cluster token (see token_file)")
        principal = verifier.verify(value.strip())
        if not principal.allows(*roles):
            need = " or ".join(r.value for r in roles) or "admin"
            raise ForbiddenError(
                f"a {principal.role.value} credential may not do this (needs {need})"
            )


class Port:
    """The port's application: each request to the first route that takes it. Who may
    ask what is each route's call (`PortRequest.authorize`), checked with the cluster's
    public key (`verifier`) the node learns when it registers. A refusal before the body
    was read is the connection layer's to finish (a small body drained, else closed)."""

    def __init__(self, auth_required: bool, tls_context: ssl.SSLContext | None) -> None:
        self.auth_required = auth_required
        self.tls = tls_context
        self.verifier: Verifier | None = None
        self.routes: list[Route] = []

    async def __call__(self, request: Request, body: Body) -> Response:
        path = request.target.partition("?")[0]
        asked = PortRequest(
            method=request.method,
            target=request.target,
            path=path,
            headers=request.headers,
            client=request.client,
            tls=request.tls,
            body=body,
            port=self,
        )
        try:
            if request.method not in _METHODS:
                raise MethodNotAllowedError("method not allowed", _METHODS)
            for route in self.routes:
                answer = await route.handle(asked)
                if answer is not None:
                    return answer
            raise NotFoundError("no such endpoint")
        except SyncbitError as exc:
            return error_answer(exc)


class PortServer:
    """The listening socket of `address` and the loop that serves it (`start`, `stop`):
    connections capped by `limits` (in all, per client, idle), TLS when a client opens
    it (with `tls_context`), plain HTTP otherwise. OSError if the address cannot be had."""

    def __init__(
        self,
        address: tuple[str, int],
        limits: Limits,
        auth_required: bool,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.limits = limits
        self.port = Port(auth_required, tls_context)
        self._sock = bind(host, port, family)
        self.server_address: tuple[str, int] = self._sock.getsockname()[:2]
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None

    def start(self, name: str = "syncbit-port") -> None:
        """Serve in a thread of its own, from now until `stop`. What keeps it from
        starting is raised here."""

        async def main(ready: threading.Event) -> None:
            self._token = trio.lowlevel.current_trio_token()
            listener = Listener(self._sock, self.port, self.limits, connection_error, self.port.tls)
            with trio.CancelScope() as self._cancel:
                async with trio.open_nursery() as nursery:
                    await nursery.start(listener.serve)
                    ready.set()

        self._thread = run_in_thread(main, name, "the node's port")

    def stop(self) -> None:
        """Stop serving: every connection ends. Idempotent; from any thread or loop."""
        thread, token, cancel = self._thread, self._token, self._cancel
        if thread is not None:
            if token is not None and cancel is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(cancel.cancel)
            thread.join(timeout=30)
        self._thread = self._token = self._cancel = None
        self._sock.close()


__all__ = [
    "Port",
    "PortRequest",
    "PortServer",
    "Route",
    "error_answer",
    "json_answer",
    "plain",
]
