"""One replica of a highly available scheduler on etcd: the election, the state it answers
from as leader or as follower, and the forwarding of the rest to the leader.

As leader: a fresh state (a new epoch, so nodes report their chunks again: holders, loads
and claims are soft state) loaded from etcd and writing through a store fenced on the
term; it answers only while `Election.is_leader` holds. As follower: a mirror of the
durable facts, loaded and kept current by a watch, answers `FOLLOWER_READS`; any other
request goes to the leader. It must never answer as leader outside its term, and never
forward a request that was forwarded to it (two replicas that disagree would loop).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from urllib.parse import quote

import httpx
import trio

from syncbit import tls
from syncbit.errors import NotLeaderError, SchedulerError, StateUnavailableError
from syncbit.httpd import Request, Response
from syncbit.protocol import RESOLVE_TIMEOUT
from syncbit.retry import backoff_delays
from syncbit.scheduler.api import Api
from syncbit.scheduler.chunkapi import Call
from syncbit.scheduler.election import Election
from syncbit.scheduler.etcd import EtcdClient
from syncbit.scheduler.kv import Bumped, DurableStore, Resync
from syncbit.scheduler.kv_etcd import EtcdStore
from syncbit.scheduler.state import SchedulerState

log = logging.getLogger("syncbit.scheduler")

# Routes a follower answers from its mirror of the durable facts: the probes, datasets,
# manifests and assignments. Everything else needs the leader's soft state or is a write.
FOLLOWER_READS = frozenset({"healthz", "readyz", "datasets", "manifest", "assignments"})
FORWARDED = "x-syncbit-forwarded-by"  # on a forwarded request: the replica that sent it
_PASSED = ("authorization", "content-type")  # what of a request's head is forwarded
# What the leader may take to answer: a long poll waits up to 60 s, adding a dataset lists
# its source for up to RESOLVE_TIMEOUT.
FORWARD_TIMEOUT = httpx.Timeout(10.0, read=RESOLVE_TIMEOUT + 30.0)

OpenState = Callable[[DurableStore], AbstractAsyncContextManager[SchedulerState]]


class Replica:
    """A scheduler replica (see the module docstring); `run` it in a nursery.

    Args:
        etcd: the etcd client (shared by the election and the stores).
        root: the key prefix of this cluster's state in etcd (ends with "/").
        my_id: this replica's name among the others (unique).
        my_url: where the other replicas reach this one (forwarded requests).
        ttl: the election lease's seconds: a dead leader is replaced within about this.
        open_state: opens a state on a store (`SchedulerState.open` with the config).
        make_api: the handlers over a state.
        tend: what runs beside a leader's state while it leads (its periodic upkeep).
        ca: the CA the other replicas' https certificates chain to (None: system CAs).
    """

    def __init__(
        self,
        etcd: EtcdClient,
        *,
        root: str,
        my_id: str,
        my_url: str,
        ttl: int,
        open_state: OpenState,
        make_api: Callable[[SchedulerState], Api],
        tend: Callable[[SchedulerState], Awaitable[None]],
        ca: Path | None = None,
    ) -> None:
        self.etcd = etcd
        self.election = Election(etcd, root + "leader", my_id, my_url, ttl)
        self.store = EtcdStore(etcd, root)  # reads (and a follower never writes)
        self.fenced = EtcdStore(etcd, root, fence=self.election.fence)
        self._open_state = open_state
        self._make_api = make_api
        self._tend = tend
        self._leader_api: Api | None = None
        self._mirror_api: Api | None = None
        https = my_url.lower().startswith("https://")
        self._http = httpx.AsyncClient(
            trust_env=False,
            timeout=FORWARD_TIMEOUT,
            verify=tls.client_context(ca) if https else False,
        )

    @property
    def leader_api(self) -> Api | None:
        """The handlers over this replica's state while it leads, else None."""
        return self._leader_api if self.election.is_leader else None

    @property
    def state(self) -> SchedulerState | None:
        """The state this replica leads with, else None."""
        api = self.leader_api
        return api.state if api is not None else None

    def api_for(self, route: str, request: Request) -> Api | None:
        """The handlers that answer `route` here; None: the leader must (`forward`)."""
        leader = self.leader_api
        if leader is not None:
            return leader
        if route in FOLLOWER_READS:
            return self._mirror_api
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Campaign, and serve as follower or leader by turns, until cancelled."""
        async with self.election, self._http:
            task_status.started()
            while True:
                await self._follow()
                await self._lead()

    # -- leading ---------------------------------------------------------------------------

    async def _lead(self) -> None:
        """Serve one term: a state loaded anew; it stops the instant the term may end."""
        async with self.election.leading() as term:
            try:
                async with self._open_state(self.fenced) as state:
                    # The previous leader's grants are in flight; the nodes report again
                    # within a heartbeat or two (at the interval the cluster's size asks).
                    state.claims.inherit(settle=state.live.reports_due())
                    self._leader_api = self._make_api(state)
                    log.info("leading (term %d): nodes report what they hold", term.revision)
                    try:
                        await self._tend(state)
                    finally:
                        self._leader_api = None
            except SchedulerError as exc:  # etcd failed while loading: try again soon
                log.warning("leading: reading the state failed: %s", exc)
                await trio.sleep(1.0)

    # -- following -------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Keep a mirror of the durable facts until this replica leads."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._mirror)
            await self.election.wait_leading()
            nursery.cancel_scope.cancel()

    async def _mirror(self) -> None:
        delays = backoff_delays(base=0.2, cap=5.0)
        try:
            while True:
                try:
                    since = await self.etcd.revision()
                    async with self._open_state(self.store) as state:
                        self._mirror_api = self._make_api(state)
                        await self._watch(state, since)  # returns when history is lost
                except SchedulerError as exc:
                    log.warning("following: reading the state failed: %s", exc)
                    await trio.sleep(next(delays))
        finally:
            self._mirror_api = None

    async def _watch(self, state: SchedulerState, since: int) -> None:
        """Apply what the leader commits after revision `since` to `state`'s facts; return
        when the watch lost history (the caller reads the state anew)."""
        delays = backoff_delays(base=0.2, cap=5.0)
        while True:
            try:
                async with self.store.watch("", since) as changes:
                    async for change in changes:
                        if isinstance(change, Resync):
                            return
                        if isinstance(change, Bumped):
                            state.facts.follow_generation(change.revision)
                        else:
                            state.facts.apply(change.key, change.value)
                        since = change.revision
            except StateUnavailableError as exc:  # the mirror stays as it is meanwhile
                log.warning("following: the state's watch failed: %s", exc)
                await trio.sleep(next(delays))

    # -- forwarding ------------------------------------------------------------------------

    async def forward(self, request: Request, call: Call) -> Response:
        """The leader's answer to `call` (already authorized and read here; the leader
        checks the same credential again). NotLeaderError (503: the client tries another
        replica) when no other replica leads or it cannot be reached."""
        election = self.election
        leader = election.leader
        me = election.my_id
        if request.headers.get(FORWARDED):
            raise NotLeaderError(
                f"scheduler {me} does not lead (asked by {request.headers[FORWARDED][:64]})",
                leader=leader.address if leader else None,
            )
        if leader is None or leader.id == me or not leader.address:
            raise NotLeaderError(f"no scheduler leads now (asked {me}); try again shortly")
        path = "/" + "/".join(quote(s, safe="") for s in call.seg)
        headers = {k: v for k in _PASSED if (v := request.headers.get(k)) is not None}
        headers[FORWARDED] = me
        try:
            resp = await self._http.request(
                call.method,
                leader.address + path,
                params=call.query,
                content=call.body,
                headers=headers,
            )
        except httpx.HTTPError as exc:
            raise NotLeaderError(
                f"the leading scheduler {leader.id} at {leader.address} did not answer: "
                f"{exc or type(exc).__name__}",
                leader=leader.address,
            ) from None
        kept = {"Allow": allow} if (allow := resp.headers.get("allow")) else {}
        content_type = resp.headers.get("content-type", "application/json")
        return Response(resp.status_code, resp.content, content_type, kept)


__all__ = ["FOLLOWER_READS", "FORWARDED", "Replica"]
