"""The scheduler's HTTP application: every request handled in steps, each before the next
costs anything: the TLS rule, who asks (from the headers), where to (the route, which sets
the body limit), when (`admission`: heartbeats at once, the rest as the loop keeps up),
then at most that limit of body (else 413, unread), then the handler.

Owns the request target's parsing, the error answers (status and `{"error", "kind"}` from
`syncbit.errors`' table, never a traceback), `/metrics`, and the request counts. It never
keeps state of its own beyond counters and never logs a credential.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from syncbit import tls
from syncbit.credentials import Issuer
from syncbit.errors import (
    ForbiddenError,
    MethodNotAllowedError,
    NotFoundError,
    NotLeaderError,
    SchedulerBusyError,
    StateUnavailableError,
    error_doc,
    http_status,
)
from syncbit.httpd import Body, Request, Response
from syncbit.metrics import Snapshot, render, request_latency
from syncbit.scheduler.admission import Admission
from syncbit.scheduler.api import Api, Call
from syncbit.scheduler.metrics import collect
from syncbit.scheduler.routes import Route, authorize, route_of

if TYPE_CHECKING:
    from syncbit.scheduler.replica import Replica

log = logging.getLogger("syncbit.scheduler")

_PROBES = (["healthz"], ["readyz"])


class App:
    """`httpd` application of the scheduler API over `api`, or over what `replica` says
    answers each request here (`Replica.api_for`; None: the leader, by `forward`).

    Args:
        api: the handlers of a single scheduler (None with `replica`).
        tls_required: a TLS certificate is configured: plain HTTP is admitted only for the
            probes and metrics, and from loopback (the node's own CLI).
        auth: the cluster secret's issuer (None: every route open, loopback only).
        replica: this scheduler is one replica of several (`replica.Replica`).
        admission: paces all but heartbeats when the loop falls behind (None: never).
    """

    def __init__(
        self,
        api: Api | None,
        tls_required: bool,
        *,
        auth: Issuer | None = None,
        replica: Replica | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.api = api
        self.admission = admission
        self.replica = replica
        self.auth = auth
        self.tls_required = tls_required
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, route) -> count
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Snapshot(self._collect))
        self.latency = request_latency(self.registry)

    def _collect(self) -> Iterator[Metric]:
        if self.replica is None:
            yield from collect(self.api, self.requests, admission=self.admission)
        else:
            leader = self.replica.leader_api
            yield from collect(
                leader, self.requests, leading=leader is not None, admission=self.admission
            )

    async def __call__(self, request: Request, body: Body) -> Response:
        began = time.perf_counter()
        method = request.method
        # The target is a path, never parsed as a URL: `//host` is a path here too.
        path, _, query_string = request.target.partition("?")
        segments = [unquote(s) for s in path.partition("#")[0].strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(query_string.partition("#")[0]).items()}
        try:
            if method == "GET" and segments == ["metrics"]:
                await body.read(0)
                payload, content_type = render(self.registry)
                return Response(200, payload, content_type)
            if not self._secure(request) and segments not in _PROBES:
                raise ForbiddenError("this scheduler requires TLS: use https://")
            # 1. Who asks, from the headers alone: nothing of the body is read for a
            # client that may not make this request.
            principal = authorize(self.auth, method, segments, request.headers.get("authorization"))
            # 2. Where to: an unknown route or method costs no body either.
            route = route_of(method, segments)
            call = Call(method, segments, query, b"", principal)  # the body comes later
            try:
                # 3. When: heartbeats at once, the rest at the rate the loop keeps up with.
                admission = self.admission
                if admission is None or admission.is_live(route.name):
                    return await self._serve(route, request, body, call)
                async with admission.admit():
                    response = await self._serve(route, request, body, call)
                admission.charge(len(response.body))  # a large answer costs more turns
                return response
            finally:
                self.latency.labels(route.name).observe(time.perf_counter() - began)
        except ConnectionError:
            raise  # the client is gone or stalled: nobody to answer
        except Exception as exc:
            return _error_answer(exc, method, path)

    async def _serve(self, route: Route, request: Request, body: Body, call: Call) -> Response:
        """Read the body (at most the route's limit, else 413 unread) and answer `call`."""
        call = dataclasses.replace(call, body=await body.read(route.body_limit))
        name = route.name
        self.requests[(call.method, name)] += 1
        api = self.api if self.replica is None else self.replica.api_for(name, request)
        if api is None:
            return await self._elsewhere(name, request, call)
        try:
            return Response(200, await api.call(name, call))
        except NotFoundError as missing:
            if self.replica is None or api is self.replica.leader_api:
                raise
            # A follower's mirror trails the leader by a moment: a dataset just added
            # (through this very replica, say) is the leader's to say is missing.
            return await self._from_leader(request, call, missing)

    async def _from_leader(self, request: Request, call: Call, missing: NotFoundError) -> Response:
        """The leader's answer to a read this follower's mirror found nothing for; that
        it found nothing stands when the leader cannot be asked (or forwarded it here)."""
        assert self.replica is not None
        try:
            return await self.replica.forward(request, call)
        except NotLeaderError:
            raise missing from None

    async def _elsewhere(self, route: str, request: Request, call: Call) -> Response:
        """A request no state here answers: the probes about this replica are answered
        as such; everything else goes to the leader."""
        assert self.replica is not None
        if route == "healthz":
            return Response(200, b'{"ok":true}')
        if route == "readyz":
            raise StateUnavailableError("this scheduler replica has not read the state yet")
        return await self.replica.forward(request, call)

    def _secure(self, request: Request) -> bool:
        """TLS, or no TLS needed: none configured, or a client on this host."""
        return not self.tls_required or request.tls or tls.is_loopback(request.client)


def _error_answer(exc: Exception, method: str, path: str) -> Response:
    """The answer to a request that failed with `exc`: its status and document from the
    errors table; a bug is a 500 that is logged here and shows nothing of itself."""
    status = http_status(exc)
    if status == 500:
        log.exception("%s %s failed", method, path[:200])
        message = f"internal scheduler error ({type(exc).__name__}); see scheduler log"
        doc = error_doc(exc, message)
    else:
        doc = error_doc(exc)
    headers = {}
    if isinstance(exc, MethodNotAllowedError):
        headers["Allow"] = ", ".join(exc.allow)
    if isinstance(exc, SchedulerBusyError) and exc.retry_after is not None:
        headers["Retry-After"] = str(math.ceil(exc.retry_after))
    return Response(status, json.dumps(doc, separators=(",", ":")).encode(), headers=headers)


__all__ = ["App"]
