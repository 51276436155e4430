"""The node's local API on its port, beside chunk data: probes, `/metrics` and node-local
control (`/v1/local/...`), handed to the node's callbacks (which run in the node's own
loop: see `aio.OtherLoop`). Never lets an error drop the connection: the one error table
answers it, anything unexpected a 500 and an error doc.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from syncbit.credentials import Role
from syncbit.errors import (
    INTERNAL_ERROR,
    DaemonUnreachableError,
    ForbiddenError,
    SyncbitError,
    error_doc,
    http_status,
)
from syncbit.httpd import Response
from syncbit.peer import PortRequest, json_answer, plain

log = logging.getLogger("syncbit.node.http")

# (method, target, JSON body) -> the JSON answer. A SyncbitError it raises is answered
# with the status of `errors.HTTP_STATUS`, anything else with a 500.
Control = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]
Readiness = Callable[[], Awaitable[tuple[bool, str]]]  # (ready?, why)
Metrics = Callable[[], Awaitable[tuple[bytes, str]]]  # (exposition text, content type)

_PROGRESS_PATH = re.compile(r"^/v1/local/datasets/[^/?]+$")
_CONTROL_BODY = 64 * 2**10  # a control request body: {"dataset": name, "force": bool}
_INTERNAL = "internal daemon error; see the daemon log"


async def _not_yet() -> tuple[bool, str]:
    return False, "daemon starting"


class LocalApi:
    """The routes of the node's local API (a `peer.Route`), in the port's loop.

    Until `set_control`, control requests are answered 503 "daemon starting" (`syncbit
    wait` then tries again); until `set_probes`, `/readyz` says the same and `/metrics` is
    not there. Probes and metrics are open; from loopback any control request, from
    elsewhere only reading a dataset's progress (what `syncbit wait` in a pod's
    initContainer asks). With a token_file: reading progress and the cache listing take a
    reader credential or better, anything that changes the node (pull, evict, gc, verify)
    admin. With TLS, plain HTTP only from loopback. A control body is judged by its
    Content-Length once the caller is known to be allowed, refused (413) unread over
    `_CONTROL_BODY`, and nests at most a few levels. A long poll (`?wait=S`) costs a task
    here and one in the node's loop, not a thread.
    """

    def __init__(self) -> None:
        self.control: Control | None = None
        self.readiness: Readiness = _not_yet
        self.metrics: Metrics | None = None

    def set_control(self, control: Control) -> None:
        """Serve node-local control requests (`/v1/local/...`) with `control`."""
        self.control = control

    def set_probes(self, readiness: Readiness, metrics: Metrics) -> None:
        """`/readyz` answers `readiness()` (ready?, why); `/metrics` serves `metrics()`."""
        self.readiness = readiness
        self.metrics = metrics

    async def handle(self, request: PortRequest) -> Response | None:
        path = request.path
        if path.startswith("/v1/local/"):
            return await self._local(request)
        if request.method != "GET":
            return None
        if path == "/healthz":
            return plain(200, "ok\n")
        if path == "/readyz":
            return await self._answer(path, self._readyz)
        if path == "/metrics" and self.metrics is not None:
            return await self._answer(path, self._metrics)
        return None

    async def _readyz(self) -> Response:
        ready, why = await self.readiness()
        return plain(200 if ready else 503, f"{why}\n")

    async def _metrics(self) -> Response:
        assert self.metrics is not None
        body, content_type = await self.metrics()
        return Response(200, body, content_type)

    async def _answer(self, what: str, respond: Callable[[], Awaitable[Response]]) -> Response:
        """`respond()`, or a 500 with an error document if it fails: one request's
        failure must not drop the connection."""
        try:
            return await respond()
        except trio.RunFinishedError:
            return plain(503, "daemon stopping\n")
        except Exception as exc:
            log.exception("%s failed", what)
            return json_answer(INTERNAL_ERROR, error_doc(exc, _INTERNAL))

    async def _local(self, request: PortRequest) -> Response:
        """Node-local control: JSON both ways. Loopback clients may do anything; others may
        only read a dataset's progress."""
        control = self.control
        if control is None:
            # Listening already, not serving yet: the daemon is starting. 503 tells
            # `syncbit wait` (an initContainer racing the daemon) to try again.
            raise DaemonUnreachableError("daemon starting")
        method, route = request.method, request.path  # `syncbit wait` long-polls with ?wait=S
        progress = method == "GET" and bool(_PROGRESS_PATH.match(route))
        if not request.loopback and not progress:
            raise ForbiddenError("local control is for this host only")
        request.secure()
        if progress or (method == "GET" and route in ("/v1/local/datasets", "/v1/local/cache")):
            roles: tuple[Role, ...] = (Role.READER,)
        else:
            roles = ()  # pull, cancel, evict, gc, verify: admin
        request.authorize(*roles)
        body = await request.json_body(_CONTROL_BODY)  # only now: the caller may ask this
        try:
            status, doc = 200, await control(method, request.target, body)
        except trio.RunFinishedError:
            status, doc = 503, error_doc(DaemonUnreachableError("daemon stopping"))
        except SyncbitError as exc:
            status, doc = http_status(exc), error_doc(exc)
            if status == INTERNAL_ERROR:
                log.warning("control request %s %s failed: %s", method, route, exc)
        except Exception as exc:  # one request's failure must not drop the connection
            log.exception("control request %s %s failed", method, route)
            status, doc = INTERNAL_ERROR, error_doc(exc, _INTERNAL)
        return json_answer(status, doc)
