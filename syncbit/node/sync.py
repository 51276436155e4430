"""The node's datasets (`manifests`, shown on the mount) and plan (assigned, prefetched and
pinned), in step with the scheduler and kept on disk for a restart without it. Never
reads or writes chunk data; blocking file writes go to worker threads. Trio thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio

from syncbit.diskspace import is_enospc
from syncbit.errors import SyncbitError
from syncbit.fetch import Fetcher, Jobs
from syncbit.fs.kernel import Session
from syncbit.fs.tree import Tree
from syncbit.fs.wire import ROOT_INODE
from syncbit.manifest import Manifest
from syncbit.node.logs import Throttled
from syncbit.node.status import Status
from syncbit.retry import backoff_delays
from syncbit.scheduler.client import SchedulerClient
from syncbit.sources.base import import_schemes
from syncbit.store import ObjectStore

log = logging.getLogger("syncbit.daemon")

_GENERATION_WAIT = 25.0  # seconds a long poll for a new scheduler generation may wait
_SYNC_RETRY_CAP = 30.0  # seconds at most between two syncs that keep failing
_RESYNC = 300.0  # seconds at most between two dataset listings while nothing changes


class Sync:
    """The node's datasets and plan; see the module docstring."""

    def __init__(
        self,
        node: str,
        cache_dir: Path,
        client: SchedulerClient,
        store: ObjectStore,
        fetcher: Fetcher,
        jobs: Jobs,
        status: Status,
        tree: Tree,
        session: Session,
        warnings: Throttled,
    ) -> None:
        self.node = node
        self._plan_file = cache_dir / "plan.json"
        self._client = client
        self._store = store
        self._fetcher = fetcher
        self._jobs = jobs
        self._status = status
        self._tree = tree
        self._session = session
        self._warnings = warnings
        self.manifests: dict[str, Manifest] = {}
        self.plan: dict[str, dict[str, Any]] = {}  # assigned dataset -> its plan entry
        self.plan_received = False  # until the first plan arrives, assignments are unknown
        self._generation = -1
        # The generation long poll is answered at the scheduler's pace: a change reaches
        # this node through it (see `apply_plan`).
        self.following = False
        self._over_budget_told = False
        # Written when possible: a full disk leaves them unsaved until space is back.
        self._plan_unsaved = False
        self._manifests_unsaved = False

    async def load(self) -> None:
        """What this node knew before a restart: readable, and pinned, with no scheduler
        (`sync_datasets` then takes the scheduler's current list)."""
        docs, plan = await trio.to_thread.run_sync(self._read_local)
        for name, doc in docs.items():
            try:
                self.manifests[name] = Manifest.model_validate_json(doc)
            except ValueError as exc:
                log.warning("ignoring stored manifest of %s: %s", name, exc)
        await _import_sources(self.manifests.values())
        self._show(self.manifests)
        self.plan = plan
        self._status.set_assigned(self.plan)
        self._pin()  # before any write can make room: the last plan's data stays

    def _read_local(self) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """Blocking: the stored manifests and plan.json (an unreadable plan is none)."""
        docs = self._store.load_manifests()
        try:
            plan = json.loads(self._plan_file.read_text())
        except (OSError, ValueError):
            plan = {}
        return docs, plan

    # -- datasets --------------------------------------------------------------------------

    async def dataset_loop(self) -> None:
        """Follow the scheduler's generation with a long poll: a dataset added, an
        assignment or a label change reaches this node at once (prefetch starts within
        milliseconds of `syncbit prefetch`, not at the next poll)."""
        delays = backoff_delays(base=1.0, cap=5.0)
        failed_syncs = backoff_delays(base=1.0, cap=_SYNC_RETRY_CAP)
        listed = trio.current_time()
        while True:
            seen: int | None = None
            answer: dict[str, Any] = {}
            asked = trio.current_time()
            try:
                answer = await self._client.wait_change(
                    self._generation, _GENERATION_WAIT, self.node
                )
                seen = answer["generation"]
            except SyncbitError:
                # Unreachable, or a scheduler without the long poll: ask less often the
                # longer it stays so, never more than `cap` apart.
                self.following = False
                await trio.sleep(max(0.5, next(delays)))
            generation = self._generation
            if seen == generation and trio.current_time() - asked < 1.0:
                # Nothing changed, yet answered at once (a scheduler stopping, or one
                # that does not wait): not in a tight loop either.
                self.following = False
                await trio.sleep(max(0.5, next(delays)))
            elif seen is not None:
                delays = backoff_delays(base=1.0, cap=5.0)
                self.following = True
            if seen == generation and trio.current_time() - listed < _RESYNC:
                # Nothing changed: no listing (5,000 nodes listing after every 25 s poll
                # for nothing are 200 requests a second), but one every few minutes.
                continue
            listed = trio.current_time()
            # A poll that saw a change carries the listing and this node's plan as of
            # it (`SchedulerClient.wait_change`): no request for either then.
            carried = "datasets" in answer
            failure = await self.sync_datasets(listing=answer if carried else None)
            if self._generation != generation:  # datasets, assignments or labels changed
                failed_syncs = backoff_delays(base=1.0, cap=_SYNC_RETRY_CAP)
                try:
                    # The carried plan only while it is of the generation now held (a
                    # heartbeat's sync may have taken a newer listing meanwhile).
                    if carried and self._generation == seen:
                        await self.apply_plan(answer["plan"])
                    else:
                        await self.apply_plan((await self._client.plan(self.node))["plan"])
                except SyncbitError as exc:
                    self._warnings.warn("plan refresh failed", exc)
            elif seen is not None and seen != generation:
                # Changed, but the sync failed: not in a tight loop, and the longer it
                # fails the less often (a busy scheduler says when: its Retry-After);
                # thousands of nodes asking again every second keep it busy.
                told = getattr(failure, "retry_after", None) or 0.0
                await trio.sleep(max(1.0, next(failed_syncs), told))

    async def sync_datasets(
        self, quiet: bool = False, force: bool = False, listing: dict[str, Any] | None = None
    ) -> SyncbitError | None:
        """Take the scheduler's dataset list (and the manifests of new versions); the
        error when that failed. `listing`: one the scheduler already sent (a long poll's
        answer), not asked for again."""
        try:
            if listing is None:
                listing = await self._client.datasets()
            if listing["generation"] == self._generation and not force:
                return None
            wanted: dict[str, Manifest] = {}
            for summary in listing["datasets"]:
                name = summary["name"]
                current = self.manifests.get(name)
                if current is not None and current.revision == summary["revision"]:
                    wanted[name] = current
                else:
                    wanted[name] = await self._client.manifest(name)
            await _import_sources(wanted.values())
        except SyncbitError as exc:
            if not quiet:
                self._warnings.warn("dataset sync failed", exc)
            return exc
        self._generation = listing["generation"]
        self._learn_broken(listing["datasets"], wanted)
        if wanted.keys() == self.manifests.keys() and all(
            wanted[n].revision == self.manifests[n].revision for n in wanted
        ):
            return None
        self._follow_jobs(wanted)
        self.manifests = wanted
        self._show(wanted)
        await self._persist_manifests()
        log.info("datasets: %s", ", ".join(sorted(wanted)) or "(none)")
        return None

    def _show(self, manifests: dict[str, Manifest]) -> None:
        """These versions on the mount and in status; the kernel forgets changed entries."""
        self._status.set_datasets(manifests)
        for name in self._tree.update(manifests):
            self._session.invalidate_entry(ROOT_INODE, name.encode())

    def _learn_broken(
        self, summaries: list[dict[str, Any]], manifests: dict[str, Manifest]
    ) -> None:
        """Files the scheduler found broken (their source changed under the recorded version)
        are refused by the fetcher from now on, cached or not; each is logged once."""
        for summary in summaries:
            manifest = manifests.get(summary["name"])
            if manifest is None or manifest.revision != summary["revision"]:
                continue
            for item in summary.get("broken", []):
                object_id = str(item["object"])
                if self._fetcher.mark_broken(object_id, str(item["reason"])):
                    self._status.object_changed(object_id)
                    log.error(
                        "%s/%s: this revision is broken (%s): reads fail with EIO until "
                        "`syncbit dataset add` picks up the source's current content",
                        summary["name"],
                        item["path"],
                        item["reason"],
                    )

    def _follow_jobs(self, wanted: dict[str, Manifest]) -> None:
        """Jobs follow the datasets: a removed dataset's job stops at once, whatever its
        kind (no request reaches its source after `dataset rm`); a pull of a dataset that
        got a new revision goes on with that revision (prefetch follows the plan)."""
        for name, job in list(self._jobs.jobs.items()):
            manifest = wanted.get(name)
            if manifest is None:
                self._jobs.cancel(name, f"dataset {name} was removed", forget=True)
            elif job.kind == "pull" and not job.done and manifest.revision != job.manifest.revision:
                self._jobs.start(manifest, "pull")

    # -- the plan ----------------------------------------------------------------------------

    async def apply_plan(self, plan: list[dict[str, Any]], heard: bool = False) -> None:
        """Prefetch what the scheduler assigned here; stop what it no longer does.
        `heard`: the plan came with a heartbeat answer (see `needs_sync`)."""
        wanted = {p["dataset"]: p for p in plan}
        if self.needs_sync(wanted, heard):
            await self.sync_datasets(force=True)
        for name in set(self.plan) - set(wanted):
            self._jobs.stop(name)
        first = not self.plan_received
        changed = wanted != self.plan
        self.plan = wanted
        self.plan_received = True
        self._status.set_assigned(wanted)
        if changed or first:
            self._pin()
        if changed or first or self._plan_unsaved:
            await self._persist_plan()
        if first:
            await self._store.enforce()  # a budget lowered across a restart
        self._start_prefetches()

    def needs_sync(self, wanted: dict[str, dict[str, Any]], heard: bool) -> bool:
        """Whether a plan naming `wanted` must list the datasets first (a manifest missing
        or of another revision). Not for a heartbeat's plan while the long poll follows:
        the change it shows woke that poll too, and the scheduler answers those at its
        pace (`admission.Pacer`); a heartbeat answer is not paced, and at 5,000 nodes
        every one of them syncing at once (~500 listings and manifests a second beside
        the paced ones) held the scheduler's loop up to a second behind. The prefetch
        starts when the poll brings the manifest (within its timeout)."""
        if heard and self.following:
            return False
        return any(
            n not in self.manifests or self.manifests[n].revision != p["revision"]
            for n, p in wanted.items()
        )

    def resume_prefetch(self) -> None:
        """Start again the assigned datasets' prefetches that stopped because the cache
        could not hold them (and any whose data is no longer all here)."""
        self._jobs.forget_full()
        self._start_prefetches()

    def _start_prefetches(self) -> None:
        for name, entry in self.plan.items():
            manifest = self.manifests.get(name)
            if manifest is not None and manifest.revision == entry["revision"]:
                self._jobs.start(manifest, "prefetch", list(entry["members"]), share_of(entry))

    def _pin(self) -> None:
        """Assigned datasets' objects are never evicted; the plan is kept on disk so a
        restart without the scheduler still knows what not to evict."""
        sizes: dict[str, int] = {}
        for name, entry in self.plan.items():
            manifest = self.manifests.get(name)
            if manifest is not None and manifest.revision == entry["revision"]:
                sizes.update({f.object: f.size for f in manifest.files if f.size})
        self._store.set_pins(sizes, sizes)
        self._status.set_pins(sizes)
        usage = self._store.usage(self._status.pinned())
        if usage["pinned_over_budget"] and not self._over_budget_told:
            log.warning(
                "assigned datasets need %d bytes, more than the cache budget of %d: they "
                "cannot all stay cached (raise --cache-size or assign less)",
                usage["pinned_size"],
                usage["budget"],
            )
        self._over_budget_told = usage["pinned_over_budget"]

    def kube_state(self) -> tuple[set[str], set[str] | None]:
        """What the Node's labels should say: datasets ready here that this node was asked
        to hold (assigned, or pulled); and the assignments, None until the first plan."""
        wanted = set(self.plan) | set(self._jobs.jobs)
        ready = {n for n in self._status.ready_datasets() if n in wanted}
        return ready, (set(self.plan) if self.plan_received else None)

    # -- on disk -----------------------------------------------------------------------------

    def _save_plan(self, plan: dict[str, dict[str, Any]]) -> None:
        """Blocking; a failed write leaves the previous plan.json whole (and no tmp file)."""
        tmp = self._plan_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(plan))
            tmp.replace(self._plan_file)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def _persist_plan(self) -> None:
        """Keep the plan on disk; on a full disk (or another write error) the node goes
        on with the plan in memory and saves it once it can."""
        try:
            await trio.to_thread.run_sync(self._save_plan, self.plan)
        except OSError as exc:
            self._plan_unsaved = True
            self._write_failed("the plan", exc)
        else:
            self._plan_unsaved = False

    async def _persist_manifests(self) -> None:
        """Keep the manifests in the cache index (see `_persist_plan`)."""
        docs = {n: m.model_dump_json() for n, m in self.manifests.items()}
        try:
            await trio.to_thread.run_sync(self._store.save_manifests, docs)
        except OSError as exc:
            self._manifests_unsaved = True
            self._write_failed("the manifests", exc)
        else:
            self._manifests_unsaved = False

    def _write_failed(self, what: str, exc: OSError) -> None:
        if is_enospc(exc):
            self._store.disk.refused(what, exc)  # logged once per episode
        else:
            self._warnings.warn(f"saving {what} failed", exc)

    async def disk_loop(self) -> None:
        """When space is back on the cache filesystem: save what could not be saved and
        resume the prefetches that stopped for lack of space."""
        while True:
            await self._store.disk.changed.wait()
            if self._store.disk.full:
                continue
            if self._manifests_unsaved:
                await self._persist_manifests()
            if self._plan_unsaved:
                await self._persist_plan()
            self.resume_prefetch()


async def _import_sources(manifests: Iterable[Manifest]) -> None:
    """Import the manifests' source modules in a worker thread, before a read opens one of
    their sources on the trio thread (an import reads files)."""
    await trio.to_thread.run_sync(import_schemes, [m.source for m in manifests])


def share_of(entry: dict[str, Any]) -> tuple[int, int] | None:
    """This node's share of a plan entry's source reads, (index, count), when the
    scheduler gave a valid one (it names the members only in small clusters)."""
    share = entry.get("share")
    if not isinstance(share, dict):
        return None
    index, count = share.get("index"), share.get("count")
    if type(index) is not int or type(count) is not int or not 0 <= index < count:
        return None
    return index, count
