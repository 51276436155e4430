"""Leader election among scheduler replicas on an etcd lease: who leads, and since when.

Owns the election key, this replica's lease and its keep-alive; it tells the rest of the
scheduler whether it leads (`is_leader`, `leading()`, `fence()`) and who does (`leader`).
It must never let this replica act as leader once its lease may have expired on etcd.

How: each replica holds a lease and campaigns by writing the key `key` with that lease
only if the key does not exist (a transaction on create_revision == 0). The winner leads
until its key goes: resignation, the lease expiring or being revoked. The key's
create_revision names the term; `fence()` turns it into a compare that makes a write fail
once another term began, so even a leader that missed its own loss cannot overwrite the
next one's state.

Safety rule: a lease renewed by a keep-alive sent at local time t lives on etcd until at
least t + TTL (etcd starts counting when it receives the request, after t). So this
replica leads only until t + TTL - margin, on its own monotonic clock, whatever its
keep-alives do afterwards: `is_leader` turns False at that instant, `leading()` blocks are
cancelled by it, and another replica can win only after etcd deleted the key, later.

A lease revoked while its holder still renews it (an operator, or etcd 3.4.23's bug
where a stalled raft leader that resumes revokes live leases, etcd issue 15247) ends the
term at once for etcd, but this replica learns it only from its watch or its next
keep-alive: for that moment two replicas may believe they lead, and only the fence keeps
the old one's writes out. Every write of a leader must carry `fence()`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from syncbit.errors import (
    LeaseExpiredError,
    NotLeaderError,
    SchedulerError,
    StateUnavailableError,
)
from syncbit.retry import backoff_delays
from syncbit.scheduler.etcd import (
    Compare,
    DeleteOp,
    EtcdClient,
    EventType,
    KeyValue,
    Lease,
    PutOp,
    RangeOp,
    RangeResult,
)

log = logging.getLogger("syncbit.election")


@dataclass(frozen=True, slots=True)
class Leader:
    """The replica that leads: its id, the address where it takes requests, and its term
    (the create_revision of its election key: a later term has a larger one)."""

    id: str
    address: str
    term: int


@dataclass(eq=False)
class Term:
    """One period of this replica's leadership. `lost` is set when it ends."""

    key: bytes
    revision: int
    valid_until: float  # local monotonic time (trio clock) this term surely lasts to
    lost: trio.Event = field(default_factory=trio.Event)
    _scopes: set[trio.CancelScope] = field(default_factory=set)

    def fence(self) -> Compare:
        """A transaction compare that holds only while this term lasts on etcd."""
        return Compare.created_at(self.key, self.revision)

    def _extend(self, valid_until: float) -> None:
        self.valid_until = valid_until
        for scope in self._scopes:
            scope.deadline = valid_until

    def _end(self) -> None:
        self.valid_until = -float("inf")
        for scope in self._scopes:
            scope.cancel()
        self.lost.set()


def _leader_of(kv: KeyValue) -> Leader:
    try:
        doc = json.loads(kv.value)
        return Leader(str(doc["id"]), str(doc["address"]), kv.create_revision)
    except (ValueError, KeyError, TypeError):
        return Leader("?", "", kv.create_revision)  # someone else's key format: not ours


class Election:
    """Campaign for `key` as replica `my_id` reachable at `my_address`.

        async with Election(client, "/syncbit/leader", "sched-1", "10.0.0.1:7070", ttl=5) as e:
            async with e.leading() as term:   # waits until this replica leads
                ...                           # cancelled when leadership is lost

    Args:
        client: the etcd client (its endpoints are all tried for keep-alives).
        key: the election key; every replica of one cluster uses the same.
        my_id, my_address: what other replicas see in `leader` (for redirects).
        ttl: lease seconds: how long a dead leader keeps the office (etcd may raise it
            to its minimum, 1.5 election timeouts).
        margin: seconds before the lease's earliest possible expiry at which this replica
            stops leading (clock drift and scheduling delay); default min(1, ttl / 10).
    """

    def __init__(
        self,
        client: EtcdClient,
        key: bytes | str,
        my_id: str,
        my_address: str,
        ttl: int = 5,
        *,
        margin: float | None = None,
    ) -> None:
        if ttl < 1:
            raise ValueError(f"election TTL must be at least 1 s, not {ttl}")
        self.client = client
        self.key = key.encode() if isinstance(key, str) else key
        self.my_id = my_id
        self.my_address = my_address
        self.ttl = ttl
        self.margin = min(1.0, ttl / 10) if margin is None else margin
        self._value = json.dumps({"id": my_id, "address": my_address}).encode()
        self._leader: Leader | None = None
        self._term: Term | None = None
        self._lease: Lease | None = None
        self._changed = trio.Event()
        self._lifetime: AbstractAsyncContextManager[Election] | None = None

    # -- what the scheduler reads -----------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this replica leads now: it won, and its lease cannot have expired yet."""
        term = self._term
        return term is not None and trio.current_time() < term.valid_until

    @property
    def term(self) -> Term | None:
        """The current term if this replica leads, else None."""
        return self._term if self.is_leader else None

    @property
    def leader(self) -> Leader | None:
        """The leader as last seen (this replica included); None while there is none."""
        return self._leader

    @property
    def changed(self) -> trio.Event:
        """Set at the next change of `leader` or `is_leader`; read it, check the state,
        then wait on it (a new event replaces it after each change)."""
        return self._changed

    def fence(self) -> Compare:
        """The compare a leader's write carries (see `Term.fence`); NotLeaderError naming
        the leader's address when this replica does not lead."""
        term = self.term
        if term is None:
            leader = self._leader
            where = f"; {leader.id} at {leader.address} leads" if leader else "; none leads now"
            raise NotLeaderError(
                f"scheduler {self.my_id} is not the leader{where}",
                leader=leader.address if leader else None,
            )
        return term.fence()

    async def wait_leading(self) -> Term:
        """Until this replica leads; its term."""
        while True:
            changed = self._changed
            term = self.term
            if term is not None:
                return term
            await changed.wait()

    @asynccontextmanager
    async def leading(self) -> AsyncIterator[Term]:
        """Wait until this replica leads, then run the block; the block is cancelled when
        leadership ends (lease deadline, loss or resignation) and the `async with` exits
        normally. Run it in a loop to serve every term this replica wins."""
        term = await self.wait_leading()
        with trio.CancelScope(deadline=term.valid_until) as scope:
            term._scopes.add(scope)
            try:
                if term.lost.is_set():
                    scope.cancel()
                yield term
            finally:
                term._scopes.discard(scope)

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> Election:
        if self._lifetime is not None:
            raise RuntimeError("an Election runs once")
        self._lifetime = self._run_while_open()
        return await self._lifetime.__aenter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._lifetime is not None
        return await self._lifetime.__aexit__(*exc)

    @asynccontextmanager
    async def _run_while_open(self) -> AsyncIterator[Election]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await self._resign()

    async def _resign(self) -> None:
        """Stop leading first, then delete our key and revoke our lease (bounded)."""
        term = self._term
        lease = self._lease
        self._step_down("resigned")
        self._lease = None
        if lease is None:
            return
        with trio.move_on_after(self.client.timeout):
            try:
                if term is not None:
                    await self.client.txn([term.fence()], [DeleteOp(self.key)])
                await self.client.lease_revoke(lease.id, timeout=self.client.timeout)
            except SchedulerError as exc:
                log.warning("election %s: resigning cleanly failed: %s", self.key.decode(), exc)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _set_leader(self, leader: Leader | None) -> None:
        if leader != self._leader:
            self._leader = leader
            self._notify()

    def _take_office(self, revision: int, valid_until: float) -> None:
        self._term = Term(self.key, revision, valid_until)
        log.info("election %s: %s leads (term %d)", self.key.decode(), self.my_id, revision)
        self._notify()

    def _step_down(self, why: str) -> None:
        term = self._term
        if term is None:
            return
        self._term = None
        term._end()
        if self._leader is not None and self._leader.term == term.revision:
            self._leader = None
        log.warning("election %s: %s stops leading: %s", self.key.decode(), self.my_id, why)
        self._notify()

    # -- the loops -------------------------------------------------------------------------

    async def _run(self) -> None:
        delays = backoff_delays(base=0.2, cap=max(1.0, self.ttl / 2))
        while True:
            try:
                await self._session()
                why = "lease lost"
            except (StateUnavailableError, LeaseExpiredError) as exc:
                why = str(exc)
            self._step_down(why)
            self._lease = None
            log.info("election %s: new lease after: %s", self.key.decode(), why)
            await trio.sleep(next(delays))

    async def _session(self) -> None:
        """Hold one lease: keep it alive and campaign with it; returns when it is lost."""
        sent = trio.current_time()
        lease = await self.client.lease_grant(self.ttl)
        self._lease = lease
        valid_until = sent + lease.ttl - self.margin
        async with trio.open_nursery() as nursery:
            renewed = _Renewal(valid_until)
            nursery.start_soon(self._campaign, lease, renewed)
            await self._keepalive(lease, renewed)
            nursery.cancel_scope.cancel()

    async def _keepalive(self, lease: Lease, renewed: _Renewal) -> None:
        """Renew the lease every TTL/3; return once it may have expired or is gone."""
        interval = lease.ttl / 3
        next_at = trio.current_time() + interval
        while True:
            await trio.sleep_until(min(next_at, renewed.valid_until))
            now = trio.current_time()
            if now >= renewed.valid_until:
                self._step_down("no keep-alive answered in time; the lease may expire")
                return
            try:
                ttl = await self.client.lease_keepalive(
                    lease.id, timeout=max(0.001, min(interval, renewed.valid_until - now))
                )
            except StateUnavailableError as exc:
                log.warning("election %s: keep-alive failed: %s", self.key.decode(), exc)
                next_at = trio.current_time() + min(0.2, interval)
                continue
            if ttl <= 0:
                self._step_down("the lease is gone (expired or revoked)")
                return
            renewed.valid_until = now + ttl - self.margin
            if self._term is not None:
                self._term._extend(renewed.valid_until)
            next_at = now + interval

    async def _campaign(self, lease: Lease, renewed: _Renewal) -> None:
        """Win the key or follow whoever holds it, for as long as the lease lives."""
        delays = backoff_delays(base=0.1, cap=1.0)
        while True:
            try:
                result = await self.client.txn(
                    [Compare.absent(self.key)],
                    [PutOp(self.key, self._value, lease.id)],
                    [RangeOp(self.key)],
                )
            except StateUnavailableError as exc:
                # The put may have happened: the next attempt reads the key and finds ours.
                log.warning("election %s: campaign failed: %s", self.key.decode(), exc)
                await trio.sleep(next(delays))
                continue
            if result.succeeded:
                current, mine = Leader(self.my_id, self.my_address, result.revision), True
            else:
                found = result.results[0] if result.results else None
                if not isinstance(found, RangeResult) or not found.kvs:
                    continue  # gone in between: campaign again
                current = _leader_of(found.kvs[0])
                mine = found.kvs[0].lease == lease.id  # ours, from an answer we never saw
            self._set_leader(current)
            if mine and trio.current_time() < renewed.valid_until:
                self._take_office(current.term, renewed.valid_until)
            await self._follow(current, result.revision + 1)
            self._step_down("the election key was deleted")
            self._set_leader(None)
            delays = backoff_delays(base=0.1, cap=1.0)

    async def _follow(self, current: Leader, start_revision: int) -> None:
        """Until the key of term `current.term` is deleted (or replaced); leader updates of
        the same term (a new address) are applied on the way."""
        idle = max(1.0, self.ttl / 2)  # a silent member is left within about a TTL
        async with self.client.watch(
            self.key, start_revision=start_revision, idle_timeout=idle
        ) as w:
            async for batch in w:
                if batch.compacted:
                    kv = await self._read_key()
                    if kv is None or kv.create_revision != current.term:
                        return
                    continue
                for event in batch.events:
                    if event.type is EventType.DELETE or event.kv.create_revision != current.term:
                        return
                    self._set_leader(_leader_of(event.kv))

    async def _read_key(self) -> KeyValue | None:
        delays = backoff_delays(base=0.1, cap=1.0)
        while True:
            try:
                return await self.client.get(self.key)
            except StateUnavailableError:
                await trio.sleep(next(delays))


@dataclass
class _Renewal:
    """Until when (local trio clock) the current lease surely lives on etcd."""

    valid_until: float
