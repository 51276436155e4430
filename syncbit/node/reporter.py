"""What the node tells the scheduler and does at its word: heartbeats (whose answers carry
the plan, re-checks, discards), chunk reports, credentials; backs off while it does not
answer. Never blocks the trio loop, never touches chunk bytes.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import trio

from syncbit.errors import SourceChangedError, SyncbitError, UnauthorizedError, UserError
from syncbit.fetch import Fetcher
from syncbit.node.directory import SchedulerDirectory
from syncbit.node.logs import Throttled
from syncbit.node.sources import SourceCache
from syncbit.node.status import Status
from syncbit.node.sync import Sync
from syncbit.nodeauth import NodeCredentials
from syncbit.peer import PeerClient, PeerServer
from syncbit.protocol import MAX_HEARTBEAT_INTERVAL, MAX_LOOKUP_INTERVAL
from syncbit.retry import backoff_delays
from syncbit.scheduler.client import SchedulerClient
from syncbit.store import ObjectStore, StoredObject

log = logging.getLogger("syncbit.daemon")
LEAVE_TIMEOUT = 2.0  # seconds a stopping node waits to tell the scheduler

_REPORT_BATCH = 4096  # chunks per report
_HELD_BACK_POLL = 0.2  # seconds between looks at chunks held back from reports
_BEAT_BACKOFF = 4  # missed heartbeats stretch the interval up to this many times


def heartbeat_delays(interval: float) -> Iterator[float]:
    """Seconds before each next heartbeat while the scheduler does not answer: growing,
    jittered (nodes do not come back in step), never over `_BEAT_BACKOFF` intervals, so a
    scheduler back from a restart hears from every node well within its node timeout."""
    failures = 1
    while True:
        yield random.uniform(interval, interval * min(2**failures, _BEAT_BACKOFF))
        failures += 1


def interval_in_force(told: object, configured: float) -> float:
    """Seconds to wait before the next heartbeat when the scheduler's answer asked for
    `told` ("heartbeat_interval", stretched with the cluster's size): never more often
    than this node's configured interval, never longer than MAX_HEARTBEAT_INTERVAL (unless
    configured longer). Anything but a finite positive number (an older scheduler sends
    none; a broken or hostile one, anything) is ignored: the configured interval holds."""
    seconds = _seconds(told)
    if seconds is None or seconds <= 0:
        return configured
    return max(configured, min(seconds, MAX_HEARTBEAT_INTERVAL))


def lookup_in_force(told: object) -> float:
    """Seconds between two chunk-map lookups of this node's parked prefetches, as the
    scheduler's answer asked ("lookup_interval", stretched with the cluster's size), at
    most MAX_LOOKUP_INTERVAL. Anything but a finite number >= 0 (an older scheduler sends
    none) is 0: the fetcher's own poll holds."""
    seconds = _seconds(told)
    return 0.0 if seconds is None else min(max(seconds, 0.0), MAX_LOOKUP_INTERVAL)


def _seconds(told: object) -> float | None:
    """A scheduler's answer's number of seconds, or None for anything but a finite number
    (a bool, a string, a list, NaN, infinity)."""
    if isinstance(told, bool) or not isinstance(told, int | float) or not math.isfinite(told):
        return None
    return float(told)


class Reporter:
    """The heartbeat and chunk report loops (`run`), and what their answers ask."""

    def __init__(
        self,
        node: str,
        heartbeat_interval: float,
        cache_size: int,
        advertise: str,
        labels: Callable[[], dict[str, str]],
        client: SchedulerClient,
        credentials: NodeCredentials,
        peers: tuple[PeerClient, PeerServer],
        store: ObjectStore,
        parts: tuple[Fetcher, SchedulerDirectory, SourceCache],
        status: Status,
        sync: Sync,
        warnings: Throttled,
    ) -> None:
        self.node = node
        self.interval = heartbeat_interval  # configured: the shortest this node beats at
        self.in_force = heartbeat_interval  # what the last answer asked (`interval_in_force`)
        self.cache_size = cache_size
        self.advertise = advertise
        self.labels = labels
        self._client = client
        self._credentials = credentials
        self._peer_client, self._peer_server = peers
        self._store = store
        self._fetcher, self._directory, self._sources = parts
        self._status = status
        self._sync = sync
        self._warnings = warnings
        self._rechecking: set[tuple[str, int]] = set()  # re-checks running (object, chunk)
        self._quarantine_told = False
        # The scheduler instance that knows what this node holds (the heartbeat's "epoch"):
        # holders are its soft state, so another one (a restart, a new leader) is told it
        # all again.
        self._scheduler_epoch: str | None = None
        # Whether the chunks of an object may be offered to other nodes yet: the registry
        # mirror holds a blob back until its whole sha256 checked (`NodeBlobSource`).
        self.shareable: Callable[[StoredObject], bool] = lambda obj: True
        self._beating = trio.CancelScope()  # the heartbeat loop: `leave` ends it

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat_loop, nursery)
            nursery.start_soon(self._report_loop)
            task_status.started()

    # -- credentials -------------------------------------------------------------------------

    async def refresh_credentials(self, quiet: bool = False) -> None:
        """Obtain or renew this node's credentials when due, and use them everywhere."""
        creds = self._credentials
        try:
            changed = await creds.refresh(self._client)
        except SyncbitError as exc:
            if not quiet:
                self._warnings.warn("node credentials", exc)
            return
        if changed:
            self._client.set_token(creds.token)
            self._peer_client.set_token(creds.peer_token)
            if creds.verifier is not None:
                self._peer_server.set_verifier(creds.verifier)

    # -- heartbeats --------------------------------------------------------------------------

    async def leave(self) -> None:
        """A clean shutdown: no more heartbeats, and the scheduler is told this node is
        stopping, so it stops naming it as a peer now rather than after the node timeout
        (a rollout restarts every node of a DaemonSet). At most LEAVE_TIMEOUT seconds: an
        unreachable scheduler finds it down by the timeout as before."""
        self._beating.cancel()
        with trio.move_on_after(LEAVE_TIMEOUT):
            try:
                await self._client.leave(self.node)
                log.info("told the scheduler this node is leaving")
            except SyncbitError as exc:
                log.warning("could not tell the scheduler this node is leaving: %s", exc)

    async def _heartbeat_loop(self, nursery: trio.Nursery) -> None:
        with self._beating:
            await self._beat_forever(nursery)

    async def _beat_forever(self, nursery: trio.Nursery) -> None:
        """Heartbeats at the interval the last answer asked for; chunk reports do not wait
        for them (`_report_loop`), so a stretched interval slows no prefetch."""
        delays = heartbeat_delays(self.interval)
        while True:
            await self.refresh_credentials()
            if self._credentials.required and self._credentials.token is None:
                await trio.sleep(self.interval)  # no credential yet: nothing to send
                continue
            if await self._heartbeat(nursery):
                # Retries back off from the interval in force too: a scheduler that asked
                # a large cluster to beat slowly is not met by all of it at once.
                delays = heartbeat_delays(self.in_force)
                await trio.sleep(self.in_force)
            else:
                await trio.sleep(next(delays))

    async def _heartbeat(self, nursery: trio.Nursery) -> bool:
        """One heartbeat and what its answer asks; whether the scheduler answered."""
        usage = self._store.usage(self._status.pinned())
        try:
            record = await self._client.heartbeat(
                self.node,
                address=self.advertise,
                labels=self.labels(),
                load=self._peer_server.load,
                cache_bytes=self._store.cached_bytes(),
                cache_size=self.cache_size,
                ready=self._status.ready_datasets(),
                pinned_bytes=usage["pinned_size"],
                pinned_over_budget=usage["pinned_over_budget"],
                disk_full=usage["disk_full"],
                disk_free=usage["disk_free"],
            )
            self.in_force = interval_in_force(record.get("heartbeat_interval"), self.interval)
            self._fetcher.lookup_interval = lookup_in_force(record.get("lookup_interval"))
            self._status.heard(self.in_force)
            self._heard(record, nursery)
            await self._sync.apply_plan(list(record.get("plan", [])), heard=True)
        except UnauthorizedError as exc:
            self._warnings.warn("heartbeat refused", exc)
            self._credentials.invalidate()  # expired or revoked: ask again
            return False
        except SyncbitError as exc:
            self._warnings.warn("heartbeat failed", exc)
            return False
        return True

    def _heard(self, record: dict[str, Any], nursery: trio.Nursery) -> None:
        """What the scheduler's heartbeat answer asks of this node beyond its plan: chunks
        to re-check against the source, objects to discard; and whether it is quarantined."""
        quarantined = record.get("quarantined")
        if quarantined and not self._quarantine_told:
            log.error(
                "the scheduler quarantined this node: %s (its reports are ignored and it is not "
                "offered as a peer until an operator runs `syncbit node trust %s`)",
                quarantined.get("reason"),
                self.node,
            )
        self._quarantine_told = bool(quarantined)
        for ask in record.get("rechecks", []):
            key = (str(ask["object"]), int(ask["chunk"]))
            if key not in self._rechecking:
                self._rechecking.add(key)
                nursery.start_soon(self._recheck, ask, key)
        for object_id in record.get("discard", []):
            nursery.start_soon(self._discard, str(object_id))
        epoch = record.get("epoch")
        if epoch and self._scheduler_epoch not in (None, epoch):
            log.info("a new scheduler instance answers: reporting every chunk held here again")
            self._store.changes.durable(_held(self._store))  # the report loop sends them
        self._scheduler_epoch = epoch or self._scheduler_epoch

    async def _recheck(self, ask: dict[str, Any], key: tuple[str, int]) -> None:
        """Read one disputed chunk from the source and tell the scheduler what it holds."""
        object_id, index = key
        try:
            manifest = self._sync.manifests.get(str(ask["dataset"]))
            entry = None
            if manifest is not None:
                entry = next((f for f in manifest.files if f.object == object_id), None)
            if manifest is None or entry is None:
                log.info(
                    "asked to re-check %s/%s, which this node does not list",
                    ask["dataset"],
                    ask["path"],
                )
                return  # not synced yet: the scheduler asks again, or someone else
            digest: str | None = None
            changed = ""
            try:
                digest = await self._fetcher.recheck(
                    entry, manifest.chunk_size, self._sources(manifest), index
                )
            except SourceChangedError as exc:
                changed = str(exc)
            outcome = await self._client.check(self.node, object_id, index, digest, changed)
            log.warning(
                "re-checked chunk %d of %s/%s against the source for the scheduler: %s",
                index,
                manifest.dataset,
                entry.path,
                outcome,
            )
        except SyncbitError as exc:
            log.warning("re-check of chunk %d of object %s failed: %s", index, object_id[:16], exc)
        finally:
            self._rechecking.discard(key)

    async def _discard(self, object_id: str) -> None:
        """The scheduler found digests of this object false: drop this node's copy."""
        obj = self._store.get(object_id)
        if obj is None:
            return
        self._directory.forget(object_id)
        log.warning(
            "discarding cached object %s: the scheduler revoked digests its chunks were "
            "checked against",
            object_id[:16],
        )
        await self._store.discard(obj)

    # -- chunk reports -----------------------------------------------------------------------

    async def _report_loop(self) -> None:
        """Tell the scheduler which chunks became durable here (with their digests)."""
        backlog = _held(self._store)
        unsent: list[tuple[StoredObject, list[int]]] = []  # removals a failed report kept
        held_back: list[tuple[StoredObject, int, str]] = []  # not shareable yet
        delays = backoff_delays(base=1.0, cap=5.0)
        while True:
            changes = self._store.changes.take()
            if not backlog and not unsent and not changes:
                # Held-back chunks are looked at again now and then: becoming shareable is
                # no store change.
                with trio.move_on_after(_HELD_BACK_POLL if held_back else math.inf):
                    changes = await self._store.changes.next()
            backlog.extend(changes.durable)
            backlog, held_back = backlog + held_back, []
            removed, unsent = unsent + changes.removed, []
            # Say what is true now: a chunk evicted and fetched again since the last report
            # is held (added, not removed); one evicted after it became durable is not.
            backlog = [b for b in backlog if b[1] in b[0].durable]
            held_back = [b for b in backlog if not self.shareable(b[0])]
            if held_back:
                backlog = [b for b in backlog if self.shareable(b[0])]
            batch, backlog = backlog[:_REPORT_BATCH], backlog[_REPORT_BATCH:]
            remove = [
                {"object": o.id, "chunks": gone}
                for o, idx in removed
                if (gone := [i for i in idx if i not in o.durable])
            ]
            if not batch and not remove:
                continue
            try:
                await self._report(batch, remove)
            except SyncbitError as exc:
                if isinstance(exc, UserError) and not isinstance(exc, UnauthorizedError):
                    # Refused as it is (4xx): sending it again gets the same answer forever.
                    log.warning("scheduler refused a chunk report (%s); not sending it again", exc)
                    continue
                self._warnings.warn("chunk report failed", exc)
                backlog = batch + backlog
                unsent = removed
                told = getattr(exc, "retry_after", None) or 0.0  # a busy scheduler's word
                await trio.sleep(max(0.5, next(delays), told))  # longer while it stays down
            else:
                delays = backoff_delays(base=1.0, cap=5.0)
                await trio.sleep(0.05)  # batch what arrives meanwhile

    async def _report(
        self, batch: list[tuple[StoredObject, int, str]], remove: list[dict[str, Any]]
    ) -> None:
        answer = await self._client.report_chunks(self.node, add=_group(batch), remove=remove)
        if answer.refused or answer.conflicts:
            # Kept here for this node's readers; not offered to other nodes.
            self._warnings.warn(
                "chunk digests not recorded",
                SyncbitError(
                    f"the scheduler refused {len(answer.refused)} chunk digests (no "
                    f"source read granted) and disputes {len(answer.conflicts)}"
                ),
            )
        if batch or remove:
            log.debug("reported %d chunks held, %d objects lost chunks", len(batch), len(remove))


def _group(batch: list[tuple[StoredObject, int, str]]) -> list[dict[str, Any]]:
    by_object: dict[StoredObject, list[list[Any]]] = defaultdict(list)
    for obj, index, digest in batch:
        by_object[obj].append([index, digest])
    return [
        {"object": o.id, "size": o.size, "chunk_size": o.chunk_size, "chunks": chunks}
        for o, chunks in by_object.items()
    ]


def _held(store: ObjectStore) -> list[tuple[StoredObject, int, str]]:
    """Every chunk durable here, with its digest: what a scheduler is told it holds."""
    return [(obj, i, obj.digests[i]) for obj in store.objects() for i in sorted(obj.durable)]
