"""The node's local API on its port, beside chunk data: probes, `/metrics` and node-local
control (`/v1/local/...`), handed to the node's callbacks. Never lets an error drop the
connection: the one error table answers it, anything unexpected a 500 and an error doc.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from syncbit.credentials import Role
from syncbit.errors import (
    INTERNAL_ERROR,
    DaemonUnreachableError,
    ForbiddenError,
    SyncbitError,
    error_doc,
    http_status,
)
from syncbit.peer import PortHandler

log = logging.getLogger("syncbit.node.http")

# (method, path, JSON body) -> the JSON answer; runs in a connection thread. A SyncbitError
# it raises is answered with the status of `errors.HTTP_STATUS`, anything else with a 500.
Control = Callable[[str, str, dict[str, Any]], dict[str, Any]]
Readiness = Callable[[], tuple[bool, str]]  # (ready?, why)
Metrics = Callable[[], tuple[bytes, str]]  # (exposition text, content type)

_PROGRESS_PATH = re.compile(r"^/v1/local/datasets/[^/?]+$")
_CONTROL_BODY = 64 * 2**10  # a control request body: {"dataset": name, "force": bool}
_INTERNAL = "internal daemon error; see the daemon log"


class LocalApi:
    """The routes of the node's local API (a `peer.Route`), in the port's threads.

    Until `set_control`, control requests are answered 503 "daemon starting" (`syncbit
    wait` then tries again); until `set_probes`, `/readyz` says the same and `/metrics` is
    not there. Probes and metrics are open; from loopback any control request, from
    elsewhere only reading a dataset's progress (what `syncbit wait` in a pod's
    initContainer asks). With a token_file: reading progress and the cache listing take a
    reader credential or better, anything that changes the node (pull, evict, gc, verify)
    admin. With TLS, plain HTTP only from loopback. A control body is judged by its
    Content-Length once the caller is known to be allowed, refused (413) unread over
    `_CONTROL_BODY`, and nests at most a few levels.
    """

    def __init__(self) -> None:
        self.control: Control | None = None
        self.readiness: Readiness = lambda: (False, "daemon starting")
        self.metrics: Metrics | None = None

    def set_control(self, control: Control) -> None:
        """Serve node-local control requests (`/v1/local/...`) with `control`."""
        self.control = control

    def set_probes(self, readiness: Readiness, metrics: Metrics) -> None:
        """`/readyz` answers `readiness()` (ready?, why); `/metrics` serves `metrics()`."""
        self.readiness = readiness
        self.metrics = metrics

    def handle(self, request: PortHandler, method: str) -> bool:
        path = request.path
        if path.startswith("/v1/local/"):
            self._local(request, method)
        elif method != "GET":
            return False
        elif path == "/healthz":
            request.plain(200, "ok\n")
        elif path == "/readyz":
            self._answer(request, path, self._readyz)
        elif path == "/metrics" and self.metrics is not None:
            self._answer(request, path, self._metrics)
        else:
            return False
        return True

    def _readyz(self, request: PortHandler) -> None:
        ready, why = self.readiness()
        request.plain(200 if ready else 503, f"{why}\n")

    def _metrics(self, request: PortHandler) -> None:
        assert self.metrics is not None
        body, content_type = self.metrics()
        request.answer(200, body, content_type)

    def _answer(
        self, request: PortHandler, what: str, respond: Callable[[PortHandler], None]
    ) -> None:
        """`respond(request)`, or a 500 with an error document if it fails before answering:
        one request's failure must not drop the connection."""
        try:
            respond(request)
        except Exception as exc:
            log.exception("%s failed", what)
            request.json(INTERNAL_ERROR, error_doc(exc, _INTERNAL))

    def _local(self, request: PortHandler, method: str) -> None:
        """Node-local control: JSON both ways. Loopback clients may do anything; others may
        only read a dataset's progress."""
        control = self.control
        if control is None:
            # Listening already, not serving yet: the daemon is starting. 503 tells
            # `syncbit wait` (an initContainer racing the daemon) to try again.
            request.refuse(DaemonUnreachableError("daemon starting"))
            return
        route = request.path.partition("?")[0]  # `syncbit wait` long-polls with ?wait=S
        progress = method == "GET" and bool(_PROGRESS_PATH.match(route))
        if not request.loopback and not progress:
            request.refuse(ForbiddenError("local control is for this host only"))
            return
        if not request.secure():
            return
        if progress or (method == "GET" and route in ("/v1/local/datasets", "/v1/local/cache")):
            roles: tuple[Role, ...] = (Role.READER,)
        else:
            roles = ()  # pull, cancel, evict, gc, verify: admin
        if not request.authorized(*roles):
            return
        body = request.body(_CONTROL_BODY)  # only now: the caller may make this request
        if body is None:
            return
        try:
            status, doc = 200, control(method, request.path, body)
        except SyncbitError as exc:
            status, doc = http_status(exc), error_doc(exc)
            if status == INTERNAL_ERROR:
                log.warning("control request %s %s failed: %s", method, route, exc)
        except Exception as exc:  # one request's failure must not drop the connection
            log.exception("control request %s %s failed", method, route)
            status, doc = INTERNAL_ERROR, error_doc(exc, _INTERNAL)
        request.json(status, doc)
