"""The HTTP plumbing every route on a node's port shares: answers (plain, JSON, the one error
table), bodies read within a limit, TLS and credential checks, dispatch to the first route
that takes a request. Knows no route itself; runs in the connection's thread.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
from typing import Any, Protocol

from syncbit import tls
from syncbit.auth import drain_refused
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
from syncbit.serving import BodyError, BoundedHandler, BoundedServer, body_length, loads_bounded

log = logging.getLogger("syncbit.peer")


class Route(Protocol):
    """One family of endpoints on the port. Runs in the connection's thread."""

    def handle(self, request: PortHandler, method: str) -> bool:
        """Answer the request and return True, or return False: not one of mine."""
        ...


class PortServer(BoundedServer):
    """The listening socket and what every route reads: TLS, credentials, routes."""

    def __init__(
        self,
        address: tuple[str, int],
        limits: Any,
        auth_required: bool,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.auth_required = auth_required
        self.verifier: Verifier | None = None
        self.tls = tls_context
        self.routes: list[Route] = []
        super().__init__(address, PortHandler, limits)


class PortHandler(BoundedHandler):
    """One connection: parses requests and hands each to the server's routes in order.
    Who may ask what is each route's call (`authorized(*roles)`), checked with the
    cluster's public key (`PortServer.verifier`) the node learns when it registers. A
    refusal before the body was read drains a small body or closes the connection, so
    the client always gets the answer."""

    protocol_version = "HTTP/1.1"
    server: PortServer

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def parse_request(self) -> bool:
        self._body_done = False  # per request: whether its body was read
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue` is answered once the body is accepted (`body`)."""
        return True

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.client_address[0]).is_loopback

    # -- answers ---------------------------------------------------------------------------

    def _close_if_body_unread(self) -> None:
        """A refusal leaves the request's body unread: it cannot be skipped safely, so the
        connection ends with this answer."""
        if self._body_done:
            return
        length = self.headers.get("Content-Length", "").strip()
        if length not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    def answer(self, status: int, body: bytes, content_type: str) -> None:
        self._close_if_body_unread()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def plain(self, status: int, text: str) -> None:
        self.answer(status, text.encode(), "text/plain")

    def json(self, status: int, doc: dict[str, Any]) -> None:
        self.answer(status, json.dumps(doc).encode(), "application/json")

    def error(self, exc: SyncbitError) -> None:
        """Answer `exc` with its status from the one error table, in JSON."""
        self.json(http_status(exc), error_doc(exc))

    def refuse(self, exc: SyncbitError) -> None:
        """An error answer before the request's body was read: a small body is read and
        dropped (closing on unread bytes resets the connection, and the client may lose
        this answer); a larger one ends the connection instead."""
        if drain_refused(self):
            self._body_done = True
        self.error(exc)

    # -- requests --------------------------------------------------------------------------

    def body(self, limit: int) -> dict[str, Any] | None:
        """The JSON object of the request, read only within `limit` bytes; None once a
        refusal (400/411/413) has been sent."""
        try:
            length = body_length(self.headers, limit)
        except BodyError as exc:
            self.error(exc)
            return None
        if length and self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        raw = self.rfile.read(length) if length else b""
        if len(raw) != length:
            raise ConnectionError(f"client sent {len(raw)} of {length} body bytes")
        self._body_done = True
        try:
            body = loads_bounded(raw) if raw else {}
        except ValueError as exc:
            self.error(UserError(f"request body is not valid JSON: {exc}"))
            return None
        if not isinstance(body, dict):
            self.error(UserError("request body must be a JSON object"))
            return None
        return body

    def secure(self, plain_ok: bool = False) -> bool:
        """TLS, or no TLS needed: none configured, a client on this host, or `plain_ok`
        (the route allows plain HTTP). Answers 403 itself when not."""
        if self.server.tls is None or tls.is_tls(self.connection) or plain_ok or self.loopback:
            return True
        self.refuse(ForbiddenError("this daemon requires TLS: use https://"))
        return False

    def authorized(self, *roles: Role) -> bool:
        """Whether the request's credential has one of `roles` (admin has all); answers
        401, 403 or 503 itself when not. Open when the daemon has no token_file."""
        server = self.server
        if not server.auth_required:
            return True
        verifier = server.verifier
        if verifier is None:  # registered with no scheduler yet: nothing to check with
            self.refuse(
                DaemonUnreachableError("daemon starting: it does not know the cluster's key yet")
            )
            return False
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        try:
            if scheme.lower() != "bearer" or not value.strip():
                raise UnauthorizedError("missing or wrong cluster token (see token_file)")
            principal = verifier.verify(value.strip())
        except UnauthorizedError as exc:
            self.refuse(exc)
            return False
        if not principal.allows(*roles):
            need = " or ".join(r.value for r in roles) or "admin"
            self.refuse(
                ForbiddenError(
                    f"a {principal.role.value} credential may not do this (needs {need})"
                )
            )
            return False
        return True

    # -- dispatch --------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        for route in self.server.routes:
            if route.handle(self, method):
                return
        self.refuse(NotFoundError("no such endpoint"))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self.refuse(MethodNotAllowedError("method not allowed"))

    def do_DELETE(self) -> None:
        self.refuse(MethodNotAllowedError("method not allowed"))
