"""The scheduler API's handlers: one coroutine per route (`routes`), from a routed,
authorized request whose body was read within its limit, to the JSON of the answer.

Owns what each route does with its body: validation (`bodies`), the call into the state,
the shape of the answer. It never reads a body itself (`app` does, after authorizing),
never keeps state of its own beyond counters, never logs a credential. Source listing for
`POST /v1/datasets` runs in a worker thread; long polls wait as coroutines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from syncbit.credentials import PEER, Issuer, Role, public_key_text
from syncbit.errors import ForbiddenError, UserError
from syncbit.manifest import Manifest
from syncbit.names import validate_dataset_name
from syncbit.protocol import LOOKUP_RATE
from syncbit.scheduler import traces
from syncbit.scheduler.admission import WAKE_RATE, Pacer
from syncbit.scheduler.bodies import (
    DatasetBody,
    HeartbeatBody,
    LabelsBody,
    ObjectName,
    TargetsBody,
    TokenBody,
    parse,
)
from syncbit.scheduler.chunkapi import Call, ChunkHandlers, json_bytes
from syncbit.scheduler.records import DatasetExistsError, check_name
from syncbit.scheduler.routes import RULES, check_owner
from syncbit.scheduler.state import SchedulerState
from syncbit.sources.base import options_for
from syncbit.sources.options import (
    SCHEMES,
    public_source,
    register_secrets,
    scheme_of,
    validate_options,
)

log = logging.getLogger("syncbit.scheduler")

NODE_CREDENTIAL_TTL = 24 * 3600.0
"""Seconds a node credential issued at registration is valid; the daemon renews it with
itself at half-life, so a copy taken from a node stops working within a day of that
node's leaving (rotating the cluster secret revokes every credential at once)."""

Resolver = Callable[[str, str, dict[str, Any], int], Manifest]


def _is_secret(source: str, key: str) -> bool:
    option = SCHEMES.get(scheme_of(source), {}).get(key)
    return option is not None and option.secret


class Api(ChunkHandlers):
    """The handlers over `state` (see the module docstring)."""

    def __init__(
        self,
        state: SchedulerState,
        chunk_size: int,
        resolve: Resolver,
        source_options: dict[str, dict[str, Any]] | None = None,
        auth: Issuer | None = None,
        wake_rate: float = WAKE_RATE,
        lookup_rate: float = LOOKUP_RATE,
    ) -> None:
        self.state = state
        self.wakes = Pacer(wake_rate)  # generation long polls answered after a change
        self.lookup_rate = lookup_rate  # chunk-map lookups a second of parked prefetches
        self.chunk_size = chunk_size
        self.resolve = resolve
        self.source_options = source_options or {}
        self.auth = auth  # None: no cluster secret, every route open (loopback only)
        self.refused: dict[str, int] = {}  # digests not recorded, by why (for /metrics)

    async def call(self, name: str, call: Call) -> bytes:
        """Run route `name` (its body already read within the route's limit)."""
        rule = RULES.get(name)
        if rule is not None and rule.own and rule.own != "path" and call.principal is not None:
            check_owner(call.principal, call.doc().get(rule.own))
        handler = getattr(self, f"_{name}")
        result: bytes = await handler(call)
        return result

    # -- probes, nodes, plans -------------------------------------------------------------------

    async def _healthz(self, c: Call) -> bytes:
        return json_bytes({"ok": True})

    async def _readyz(self, c: Call) -> bytes:
        """Ready while the state is open (a closed state answers 503)."""
        self.state.facts.check_open()
        return json_bytes({"ok": True, "generation": self.state.generation()})

    async def _nodes(self, c: Call) -> bytes:
        """Every registered node, encoded a slice at a time (`SchedulerState.nodes_json`)."""
        return ('{"nodes":' + await self.state.nodes_json() + "}").encode()

    async def _heartbeat(self, c: Call) -> bytes:
        req: HeartbeatBody = parse(HeartbeatBody, c.doc())
        node = c.seg[2]
        info = await self.state.heartbeat(
            node,
            req.address,
            req.labels,
            req.load,
            req.cache_bytes,
            req.cache_size,
            req.ready,
            req.pinned_bytes,
            req.pinned_over_budget,
            disk_full=req.disk_full,
            disk_free=req.disk_free,
        )
        return json_bytes(
            {
                **info.to_json(),
                "plan": self._plan_of(node),
                "rechecks": await self.state.trust.rechecks_for(node),
                "discard": self.state.trust.take_notices(node),
                # Another value than before: a new scheduler (a restart, another leader)
                # that knows no holders yet; the node reports all it holds again.
                "epoch": self.state.epoch,
                # Seconds to wait before the next heartbeat, at least: stretched with the
                # cluster's size (`live.Liveness.interval`); older nodes ignore it.
                "heartbeat_interval": self.state.live.told(node),
                # Seconds between this node's chunk-map lookups for prefetches parked on
                # other nodes' reads: every node looking every 0.1 s is 10 x nodes x objects
                # requests a second, beyond any scheduler at thousands of nodes.
                "lookup_interval": self.state.live.lookup_interval(self.lookup_rate),
            }
        )

    async def _leave(self, c: Call) -> bytes:
        return json_bytes(self.state.leave(c.seg[2]).to_json())

    async def _labels(self, c: Call) -> bytes:
        req: LabelsBody = parse(LabelsBody, c.doc())
        return json_bytes((await self.state.edit_labels(c.seg[2], req.set, req.remove)).to_json())

    async def _generation(self, c: Call) -> bytes:
        """`?after=G&timeout=S`: answers when the generation is no longer G, or after S
        seconds (at most 60); without `after`, at once. With `&node=N` (a node's own
        poll), an answer that moved also carries what that node asks next: the dataset
        listing (`GET /v1/datasets`) and its plan (`GET /v1/nodes/N/plan`), both as of
        that generation. Two requests fewer per node at every change: at 5,000 nodes the
        wakes' listings, manifests and plans, which no admission may hold, filled the
        loop for the first 20-30 s of a prefetch and heartbeats waited behind them."""
        node = c.query.get("node")
        try:
            after = int(c.query["after"]) if "after" in c.query else None
            timeout = float(c.query.get("timeout", "30"))
            if not math.isfinite(timeout):
                raise ValueError(timeout)
        except ValueError:
            raise UserError("after must be an integer, timeout a number of seconds") from None
        if node is not None:
            check_name("node", node)
            if c.principal is not None and not c.principal.allows(Role.NODE):
                raise ForbiddenError("only a node may ask for a plan with its poll")
            check_owner(c.principal, node)
        if after is None:
            return json_bytes({"generation": self.state.generation()})
        timeout = min(max(timeout, 0.0), 60.0)
        deadline = trio.current_time() + timeout
        generation = await self.state.wait_generation(after, timeout)
        if generation == after:
            return json_bytes({"generation": generation})
        # Every node's poll wakes at this change: answered at the pacer's rate, so the
        # syncs they start do not all arrive at once (see `admission.Pacer`).
        await self.wakes.wait(deadline)
        generation = self.state.generation()
        if node is None or generation == after:
            return json_bytes({"generation": generation})
        # No await from here: the listing and the plan are of the same generation.
        return json_bytes({**self._listing(), "plan": self._plan_of(node)})

    async def _plan(self, c: Call) -> bytes:
        return json_bytes({"generation": self.state.generation(), "plan": self._plan_of(c.seg[2])})

    def _plan_of(self, node: str) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.state.plan(node)]

    def _listing(self) -> dict[str, Any]:
        """The dataset listing and the generation it is of."""
        return {"generation": self.state.generation(), "datasets": self.state.catalog.datasets()}

    # -- datasets and assignments ---------------------------------------------------------------

    async def _assignments(self, c: Call) -> bytes:
        return json_bytes({"assignments": self.state.catalog.targets()})

    async def _add_targets(self, c: Call) -> bytes:
        req: TargetsBody = parse(TargetsBody, c.doc())
        targets = [t.doc() for t in req.targets or []] or [{"selector": {}}]  # none: all
        return json_bytes(
            {
                "dataset": c.seg[2],
                "targets": await self.state.catalog.add_targets(c.seg[2], targets),
            }
        )

    async def _remove_targets(self, c: Call) -> bytes:
        req: TargetsBody = parse(TargetsBody, c.doc() if c.body else {})
        targets = None if req.targets is None else [t.doc() for t in req.targets]
        left = await self.state.catalog.remove_targets(c.seg[2], targets)
        return json_bytes({"dataset": c.seg[2], "targets": left})

    async def _datasets(self, c: Call) -> bytes:
        return json_bytes(self._listing())

    async def _manifest(self, c: Call) -> bytes:
        return self.state.catalog.get_dataset_json(c.seg[2])

    async def _trace(self, c: Call) -> bytes:
        return json_bytes(traces.answer(self.state, c.seg[2]))

    async def _put_trace(self, c: Call) -> bytes:
        return json_bytes(await traces.store(self.state, c.seg[2], c.doc(), self.state.clock()))

    async def _remove_dataset(self, c: Call) -> bytes:
        await self.state.catalog.remove_dataset(c.seg[2])
        return json_bytes({"removed": c.seg[2]})

    async def _add_dataset(self, c: Call) -> bytes:
        """Resolve and register a dataset. Credentials that come with the request (URL
        user:password, secret options such as `headers` or a Hub `token`) serve this
        listing only: the manifest keeps the source without them, and nodes read with
        the credentials of their own config or environment."""
        req: DatasetBody = parse(DatasetBody, c.doc())
        validate_dataset_name(req.name)
        register_secrets(req.source, req.options)  # masked in any log line from now on
        public, had_userinfo = public_source(req.source)
        given = validate_options(req.source, req.options, from_dataset=True)
        existing = self.state.facts.datasets.get(req.name)
        if existing is not None and existing.summary["source"] != public:
            # refused before a possibly slow listing; put_dataset checks again atomically
            raise DatasetExistsError(
                f"dataset {req.name} already exists with source "
                f"{existing.summary['source']}; remove it first"
            )
        options = options_for(public, self.source_options, req.options)
        manifest = await trio.to_thread.run_sync(
            self.resolve, req.name, req.source, options, self.chunk_size
        )
        summary, changed = await self.state.catalog.put_dataset(manifest)
        secret = sorted(k for k in given if _is_secret(req.source, k))
        if had_userinfo:
            secret.insert(0, "user:password in the URL")
        warnings = []
        if secret:
            warnings.append(
                f"the credentials given with this request ({', '.join(secret)}) served the "
                f"listing only and are not stored: nodes read {public} with their own "
                "(source_options in their config, or their environment)"
            )
        return json_bytes({"dataset": summary, "changed": changed, "warnings": warnings})

    async def _lift_quarantine(self, c: Call) -> bytes:
        await self.state.trust.lift_quarantine(c.seg[2])
        return json_bytes({"node": c.seg[2], "quarantined": False})

    async def _status(self, c: Call) -> bytes:
        return await self.state.status_json()

    # -- credentials -----------------------------------------------------------------------------

    def _issuer(self) -> Issuer:
        if self.auth is None:
            raise UserError(
                "this scheduler has no cluster secret (token_file): it issues no credentials"
            )
        return self.auth

    async def _credential(self, c: Call) -> bytes:
        """A node's credentials: one for the scheduler, one for its peers (audience "peer":
        a peer that receives it cannot use it here). A node renews its own; a bootstrap
        credential gets one only for a name that is not registered and up, so that it cannot
        take over a running node."""
        issuer = self._issuer()
        name = parse(ObjectName, {"name": c.seg[2]}).name
        principal = c.principal
        bootstrap = principal is not None and principal.role is Role.BOOTSTRAP
        if bootstrap and name in self.state.facts.nodes and self.state.live.is_up(name):
            raise ForbiddenError(
                f"node {name} is registered and up: a bootstrap credential cannot take "
                "its name (it renews its own credential; a new daemon of that name gets "
                "one once the old one is down)"
            )
        token, expires = issuer.issue(Role.NODE, name, NODE_CREDENTIAL_TTL)
        peer_token, _ = issuer.issue(Role.NODE, name, NODE_CREDENTIAL_TTL, audience=PEER)
        log.info(
            "issued node credentials of %s (%s)",
            name,
            principal.describe() if principal else "open",
        )
        return json_bytes(
            {
                "node": name,
                "token": token,
                "peer_token": peer_token,
                "expires": expires,
                "public_key": public_key_text(issuer.public),
                "key_id": issuer.key_id,
            }
        )

    async def _issue(self, c: Call) -> bytes:
        """`syncbit token create`: a credential of any role (admin only)."""
        req: TokenBody = parse(TokenBody, c.doc())
        if (req.role is Role.NODE) != (req.node is not None):
            raise UserError("--node goes with --role node, and only with it")
        token, expires = self._issuer().issue(req.role, req.node or "", req.ttl)
        log.info("issued a %s credential%s", req.role.value, f" for {req.node}" * bool(req.node))
        return json_bytes(
            {"token": token, "role": req.role.value, "node": req.node, "expires": expires}
        )


__all__ = ["NODE_CREDENTIAL_TTL", "Api", "Call"]
