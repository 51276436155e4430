"""What node-local control requests do: pull and cancel, a dataset's progress (and the long
poll of `syncbit wait`), cache ls/evict/gc/verify. Raises errors of `syncbit.errors` for
the HTTP side to answer by the one table; never blocks the trio thread it runs on.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any
from urllib.parse import parse_qs, unquote

import trio

from syncbit.errors import NotFoundError, UserError
from syncbit.fetch import Jobs
from syncbit.names import validate_dataset_name
from syncbit.node.status import Status
from syncbit.node.sync import Sync, share_of
from syncbit.store import ObjectStore, VerifyRun

log = logging.getLogger("syncbit.daemon")

_PROGRESS_WAIT_MAX = 60.0  # seconds `GET /v1/local/datasets/NAME?wait=S` may hold a request
_PROGRESS_RECHECK = 1.0  # changes nothing announces (a failed pull, a new plan) show this soon


class Control:
    """The node-local control API's actions; `handle` is the one entry, `verify_loop`
    runs the verification passes it (or the start-up) asks for, one at a time."""

    def __init__(self, store: ObjectStore, sync: Sync, jobs: Jobs, status: Status) -> None:
        self._store = store
        self._sync = sync
        self._jobs = jobs
        self._status = status
        self.verify_run: VerifyRun | None = None  # the current or last `cache verify` pass
        # At most one pass waits: a request while one is queued or running gets that one.
        self._verify_send, self._verify_receive = trio.open_memory_channel[VerifyRun](1)

    async def handle(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One node-local control request: its JSON answer."""
        route, _, query = path.partition("?")
        parts = [unquote(p) for p in route.split("/") if p]
        if method == "POST" and parts == ["v1", "local", "pull"]:
            return await self.pull(validate_dataset_name(str(body.get("dataset", ""))))
        if method == "POST" and parts == ["v1", "local", "pull", "cancel"]:
            return self.cancel_pull(validate_dataset_name(str(body.get("dataset", ""))))
        if parts[:3] == ["v1", "local", "cache"]:
            return await self._cache(method, parts[3:], body, query)
        if method == "GET" and parts == ["v1", "local", "datasets"]:
            return {"datasets": [self.progress(n) for n in sorted(self._sync.manifests)]}
        if method == "GET" and parts[:3] == ["v1", "local", "datasets"] and len(parts) == 4:
            # Added or updated a moment ago? A waiter's first request must see the
            # current revision. Its long polls that follow need no scheduler call:
            # the dataset loop follows the generation and applies updates at once.
            validate_dataset_name(parts[3])
            wait = wait_seconds(query)
            unknown = parts[3] not in self._sync.manifests
            if unknown or not wait:
                await self._sync.sync_datasets(quiet=True, force=unknown)
            return await self._progress_within(parts[3], wait)
        raise NotFoundError(f"no such endpoint {method} {path}")

    # -- datasets ----------------------------------------------------------------------------

    async def pull(self, name: str) -> dict[str, Any]:
        """Start bringing every byte of dataset `name` here (idempotent); its progress."""
        await self._sync.sync_datasets(force=True)  # it may have been added a moment ago
        manifest = self._sync.manifests.get(name)
        if manifest is None:
            raise NotFoundError(f"no dataset {name!r} on this node's scheduler")
        self._jobs.start(manifest, "pull")
        return self.progress(name)

    def cancel_pull(self, name: str) -> dict[str, Any]:
        """`syncbit pull --cancel NAME`: stop the pull of `name` here (what it brought
        stays); its progress. An assignment is not a pull: `syncbit prefetch --remove`."""
        job = self._jobs.jobs.get(name)
        if job is None or job.done:
            raise NotFoundError(f"no pull of {name!r} is running on this node")
        if job.kind != "pull":
            raise UserError(
                f"{name} is assigned to this node, not pulled: remove the assignment with "
                "`syncbit prefetch --remove`"
            )
        self._jobs.cancel(name, f"cancelled by `syncbit pull --cancel {name}`")
        return self.progress(name)

    def progress(self, name: str) -> dict[str, Any]:
        """How much of a dataset this node holds: the document `pull` and `wait` poll."""
        manifest = self._sync.manifests.get(name)
        if manifest is None:
            raise NotFoundError(f"no dataset {name!r} on this node")
        job = self._jobs.jobs.get(name)
        if job is not None and job.manifest.revision != manifest.revision:
            job = None
        ready = self._status.ready(name)
        return {
            "dataset": name,
            "revision": manifest.revision,
            "files": len(manifest.files),
            "size": self._status.size(name),
            "present_bytes": self._status.present(name),
            "ready": ready,
            "complete": ready,  # the name `syncbit pull` has always read
            "assigned": name in self._sync.plan,
            "pulling": job is not None and not job.done,
            "error": job.error if job else None,
            "cancelled": job is not None and job.cancelled,
        }

    async def _progress_within(self, name: str, wait: float) -> dict[str, Any]:
        """`progress(name)` once the dataset is ready here (or its pull failed for good), or
        after `wait` seconds: a long poll, so `syncbit wait` returns the moment the data is
        ready without polling the daemon (and, through it, the scheduler) several times a
        second. Wakes on every chunk commit, verification and discard."""
        with trio.move_on_after(wait):
            while True:
                doc = self.progress(name)
                if doc["ready"] or (doc["error"] and not doc["pulling"]):
                    return doc
                with trio.move_on_after(_PROGRESS_RECHECK):
                    await self._store.written_event.wait()
        return self.progress(name)

    # -- the cache ---------------------------------------------------------------------------

    async def _cache(
        self, method: str, rest: list[str], body: dict[str, Any], query: str = ""
    ) -> dict[str, Any]:
        """`syncbit cache ls | evict NAME | gc | verify`."""
        if method == "GET" and not rest:
            return {"usage": self._store.usage(), "objects": self._listing()}
        if method == "POST" and rest == ["evict"]:
            return await self._evict(str(body.get("dataset", "")), bool(body.get("force")))
        if method == "POST" and rest == ["gc"]:
            referenced = {f.object for m in self._sync.manifests.values() for f in m.files}
            freed = await self._store.gc(referenced)
            return {"freed": freed, "usage": self._store.usage()}
        if method == "POST" and rest == ["verify"]:
            run = self.verify_run
            if run is None or run.done.is_set():
                run = self.start_verify("requested", only_unverified=False)
            return self._verify_doc(run)
        if method == "GET" and rest == ["verify"]:
            if self.verify_run is None:
                raise NotFoundError("no verification has run since the daemon started")
            run = self.verify_run
            with trio.move_on_after(wait_seconds(query)):
                await run.done.wait()
            return self._verify_doc(run)
        raise NotFoundError(f"no such cache endpoint {method} /{'/'.join(rest)}")

    def _files_of(self) -> dict[str, list[str]]:
        """Object -> the dataset files it backs ("dataset/path")."""
        files: dict[str, list[str]] = defaultdict(list)
        for name, manifest in sorted(self._sync.manifests.items()):
            for entry in manifest.files:
                files[entry.object].append(f"{name}/{entry.path}")
        return files

    def _listing(self) -> list[dict[str, Any]]:
        """The store's objects, each with the dataset files it backs."""
        files = self._files_of()
        return [{**row, "files": files.get(row["id"], [])} for row in self._store.listing()]

    async def _evict(self, name: str, force: bool) -> dict[str, Any]:
        manifests, plan = self._sync.manifests, self._sync.plan
        manifest = manifests.get(name)
        if manifest is None:
            raise NotFoundError(f"no dataset {name!r} on this node")
        if name in plan and not force:
            raise UserError(
                f"{name} is assigned to this node (pinned): remove the assignment with "
                "`syncbit prefetch --remove`, or evict anyway with --force (it is fetched again)"
            )
        keep = {
            f.object
            for other, m in manifests.items()
            if other != name and other in plan
            for f in m.files
        }
        ids = {f.object for f in manifest.files} - keep
        result = await self._store.evict(ids)
        if name in plan:
            self._jobs.stop(name)  # forced: fetch it again from scratch
            entry = plan[name]
            self._jobs.start(manifest, "prefetch", list(entry["members"]), share_of(entry))
        return {
            "dataset": name,
            "freed": result.freed,
            "evicted": len(result.evicted),
            "in_use": len(result.skipped),
            "shared": len({f.object for f in manifest.files} & keep),
        }

    # -- verification ------------------------------------------------------------------------

    def start_verify(self, reason: str, only_unverified: bool) -> VerifyRun:
        """Re-read the cached chunks against their digests in the background (one pass at
        a time); see `ObjectStore.verify`."""
        run = self.verify_run = VerifyRun(reason, only_unverified)
        if only_unverified:
            log.warning(
                "re-verifying %d cached chunks %s, in the background (a read checks a chunk "
                "first if the pass has not reached it yet)",
                self._store.unverified_chunks(),
                reason,
            )
        self._verify_send.send_nowait(run)
        return run

    async def verify_loop(self) -> None:
        async for run in self._verify_receive:
            await self._store.verify(run)
            log.info(
                "verification (%s): %d chunks of %d objects checked in %.0fs, %d dropped",
                run.reason,
                run.checked,
                run.objects,
                (run.finished or run.started) - run.started,
                len(run.dropped),
            )
            if run.dropped:
                self._sync.resume_prefetch()  # fetch what was dropped of the assigned datasets

    def _verify_doc(self, run: VerifyRun) -> dict[str, Any]:
        """A verification pass for `syncbit cache verify`: progress, and each dropped
        chunk with the dataset files it belongs to."""
        files = self._files_of()
        return {
            "reason": run.reason,
            "running": not run.done.is_set(),
            "started": run.started,
            "finished": run.finished,
            "total": run.total,
            "checked": run.checked,
            "checked_bytes": run.checked_bytes,
            "objects": run.objects,
            "dropped": [
                {"object": oid, "chunk": index, "files": files.get(oid, [])}
                for oid, index in run.dropped
            ],
            "usage": self._store.usage(),
        }


def wait_seconds(query: str) -> float:
    """The `wait=S` of a progress request: 0 (answer at once) when absent."""
    values = parse_qs(query).get("wait")
    if not values:
        return 0.0
    try:
        wait = float(values[-1])
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= _PROGRESS_WAIT_MAX:  # also rejects nan
        raise UserError(f"wait must be 0-{_PROGRESS_WAIT_MAX:g} seconds, not {values[-1]!r}")
    return wait
