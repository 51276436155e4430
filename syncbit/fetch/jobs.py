"""Background jobs that bring whole datasets to this node: `syncbit pull` and scheduler
assignments (prefetch), one per dataset, each within bounded requests to the source.
Never transfers a byte itself (`Fetcher.ensure` does) and never decides the plan.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum, StrEnum

import trio

from syncbit.chunks import chunk_count
from syncbit.errors import (
    CacheFullError,
    SourceChangedError,
    SourcePermanentError,
    SyncbitError,
    UserError,
)
from syncbit.fetch.fetcher import Fetcher
from syncbit.fetch.flight import Priority
from syncbit.fetch.plan import RoundRobin
from syncbit.manifest import FileEntry, Manifest
from syncbit.retry import retrying
from syncbit.sources.base import Source
from syncbit.trace import AccessTrace, prefetch_order

log = logging.getLogger("syncbit.fetch.jobs")

FILES_AT_ONCE = 4  # small files are latency-bound; a few at a time keep the pipe full
# Following an access trace: its pieces, cut to at most PIECE_CHUNKS chunks, PIECES_AT_ONCE
# at a time (their flights queue in trace order, so the lanes serve them in that order).
PIECE_CHUNKS = 16
PIECES_AT_ONCE = 16


class JobKind(StrEnum):
    PULL = "pull"  # asked for by a person (`syncbit pull`): reports its error and stops
    PREFETCH = "prefetch"  # a scheduler assignment: retried while it stays assigned


class JobState(Enum):
    """RUNNING (rounds and the waits between them) ends COMPLETE (every byte here and
    durable), FAILED (`error` says why) or CANCELLED (`Jobs.cancel`)."""

    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class Job:
    """Bringing every byte of one dataset version here."""

    manifest: Manifest
    kind: JobKind
    plan: RoundRobin  # who reads which chunk from the source (a pull: this node alone)
    state: JobState = JobState.RUNNING
    error: str | None = None
    # What the latest round's failures were, beyond temporary: no retry loop for these.
    full: bool = False  # the cache cannot hold it
    permanent: bool = False  # failed for good (see `_is_permanent`)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: trio.Event = field(default_factory=trio.Event)

    @property
    def done(self) -> bool:
        return self.state is not JobState.RUNNING

    @property
    def cancelled(self) -> bool:
        return self.state is JobState.CANCELLED

    def end(self, state: JobState) -> None:
        """The job ended so (the first end holds: a cancelled job stays cancelled)."""
        if self.state is JobState.RUNNING:
            self.state = state


def _failed(job: Job, entry: FileEntry, exc: SyncbitError, failures: list[SyncbitError]) -> bool:
    """Note a file's failure in its job's round; True when the round should stop: the
    source refused for good, or is down past the deadline, and the next file would meet
    the same. One file whose version is gone, or that does not fit, does not stop the
    others."""
    failures.append(exc)
    job.error = job.error or f"{entry.path}: {exc}"
    job.full = job.full or isinstance(exc, CacheFullError)
    job.permanent = job.permanent or _is_permanent(exc)
    return not isinstance(exc, SourceChangedError | CacheFullError)


def _is_permanent(exc: SyncbitError) -> bool:
    """A failure no later round can fix: the source refused for good (no Range support,
    access denied, the version gone) or a person must act (UserError)."""
    return isinstance(exc, SourcePermanentError | UserError)


class Jobs:
    """The running pull and prefetch jobs of a node, one per dataset.

    A job walks a dataset version's files through `Fetcher.ensure` at prefetch priority, a few
    files at a time. A prefetch job follows the scheduler's plan: every member of an assignment
    reads a different share of the chunks from the source (chunk k of the dataset, counted
    across its files in manifest order, belongs to member k mod N) and takes the rest from the
    other members, so the origin sends each byte about once however many nodes prefetch.
    A member that leaves the plan (down, unassigned) hands its share to the others at the
    next plan refresh.

    Every job's requests to the source are bounded. Within a round, each chunk transfer
    retries temporary failures until its deadline, and a permanent source error (no Range
    support, access denied) ends the round at once. A prefetch whose round failed
    temporarily (the source is down) tries again after a jittered backoff of up to a minute,
    for as long as the dataset stays assigned; one that failed permanently, or that the cache
    cannot hold (assigned data over the budget: what fits stays), is not tried again until
    the dataset changes. A pull reports its error to the CLI and stops. A job that ends
    (done, failed, cancelled by `syncbit pull --cancel`, its dataset removed or unassigned)
    abandons the transfers only it wanted, so nothing keeps asking the source on its behalf.
    """

    def __init__(
        self,
        node: str,
        fetcher: Fetcher,
        source_for: Callable[[Manifest], Source],
        is_ready: Callable[[Manifest], bool],
        flush: Callable[[], Awaitable[None]],
        order: Callable[[Manifest], Awaitable[AccessTrace | None]] | None = None,
    ) -> None:
        self.node = node
        self.fetcher = fetcher
        self.source_for = source_for
        self.is_ready = is_ready  # every byte here, durable and verified
        self.flush = flush  # makes written chunks durable
        self.order = order  # the access trace a prefetch follows, if the cluster has one
        self.jobs: dict[str, Job] = {}
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def start(
        self,
        manifest: Manifest,
        kind: str,
        members: list[str] | None = None,
        share: tuple[int, int] | None = None,
    ) -> Job:
        """Run a job for this dataset version unless one is running, or finished and the
        data is still all here (eviction may have taken an unpinned pull's bytes since).
        A prefetch's members are refreshed in place when only they changed. A prefetch
        that failed for good, or does not fit, is not started again by the plan (every
        heartbeat brings it): only a new revision, a new assignment or a pull does."""
        kind = JobKind(kind)
        name = manifest.dataset
        job = self.jobs.get(name)
        if (
            job is not None
            and job.manifest.revision == manifest.revision
            and (
                not job.done
                or (job.error is None and self.is_ready(manifest))
                or ((job.full or job.permanent) and kind is JobKind.PREFETCH)
            )
        ):
            if kind is JobKind.PREFETCH:
                job.plan.members = list(members or [])
                job.plan.share = share
                job.kind = kind  # an assignment outranks a pull of the same data
                if not job.done:
                    self.fetcher.plans.add(job.plan)  # its nodes share the source reads
            return job
        if job is not None:
            job.scope.cancel()  # an older revision: what it fetched stays, shared content too
            self.fetcher.plans.discard(job.plan)
        job = Job(manifest, kind, RoundRobin(self.node, list(members or []), share=share))
        self.jobs[name] = job
        if kind is JobKind.PREFETCH:
            self.fetcher.plans.add(job.plan)
        assert self._nursery is not None, "Jobs.bind() first"
        self._nursery.start_soon(self._run, job)
        return job

    def forget_full(self) -> list[str]:
        """Forget the finished prefetches that stopped because the cache could not hold
        their data (space came back on the disk): the next `start` runs them again. Their
        dataset names. (A pull that failed so is run again by its user.)"""
        names = [
            n for n, j in self.jobs.items() if j.kind is JobKind.PREFETCH and j.done and j.full
        ]
        for name in names:
            del self.jobs[name]
        return names

    def stop(self, name: str) -> None:
        """The dataset is no longer assigned here: stop fetching it (kept bytes stay)."""
        job = self.jobs.get(name)
        if job is not None and job.kind is JobKind.PREFETCH:
            job.scope.cancel()
            self.fetcher.plans.discard(job.plan)
            del self.jobs[name]
            log.info("prefetch of %s stopped: no longer assigned", name)

    def cancel(self, name: str, why: str, *, forget: bool = False) -> Job | None:
        """Stop the job of dataset `name`, whatever its kind, with `why` as its error
        (what `syncbit pull` shows); `forget` drops it too (the dataset is gone). Kept
        bytes stay. Returns the job, None if there was none."""
        job = self.jobs.get(name)
        if job is None:
            return None
        if not job.done:
            job.scope.cancel()
            self.fetcher.plans.discard(job.plan)
            job.end(JobState.CANCELLED)
            job.error = why
            log.info("%s of %s stopped: %s", job.kind, name, why)
        if forget:
            del self.jobs[name]
        return job

    def needs(self, object_id: str) -> bool:
        """A running job brings this object here (its transfers must not be abandoned)."""
        return any(
            not job.done and any(f.object == object_id for f in job.manifest.files)
            for job in self.jobs.values()
        )

    def _abandon(self, job: Job, why: str) -> None:
        """Stop the transfers of `job`'s objects that no other running job needs."""
        needed = {
            f.object
            for other in self.jobs.values()
            if other is not job and not other.done
            for f in other.manifest.files
        }
        mine = {f.object for f in job.manifest.files if f.size} - needed
        self.fetcher.abandon(mine, why)

    async def _run(self, job: Job) -> None:
        name = job.manifest.dataset

        def another_round(exc: BaseException) -> bool:
            # A pull reports its failure. A dataset the cache cannot hold is not fetched
            # again and again: what fits stays; status says the node is over budget. A
            # source that refused for good is not asked again until the dataset changes.
            return isinstance(exc, SyncbitError) and not (
                job.kind is JobKind.PULL or job.full or job.permanent
            )

        def retried(exc: Exception, delay: float) -> None:
            # Nothing of the failed round may keep asking the source during the wait.
            self._abandon(job, f"{job.kind} of {name} failed")
            log.warning("prefetch of %s failed: %s; retrying in %.0fs", name, job.error, delay)

        try:
            with job.scope:
                try:
                    # A prefetch retries for as long as its dataset stays assigned (the
                    # scope is cancelled when it is not), at most one round a minute.
                    await retrying(
                        functools.partial(self._round, job),
                        another_round,
                        until_cancelled=True,
                        base=2.0,
                        cap=60.0,
                        on_retry=retried,
                    )
                except SyncbitError:
                    self._abandon(job, f"{job.kind} of {name} failed")
                    job.end(JobState.FAILED)
                    log.warning("%s of %s failed: %s", job.kind, name, job.error)
                else:
                    await self.flush()  # complete means durable
                    job.end(JobState.COMPLETE)
                    log.info("%s of %s: complete", job.kind, name)
        finally:
            self.fetcher.plans.discard(job.plan)  # done: no more source reads of its own
            if not job.done or job.cancelled:  # cancelled: by `cancel`, `stop`, a new revision
                self._abandon(job, f"{job.kind} of {name} stopped")
            job.finished.set()

    async def _round(self, job: Job) -> None:
        """Bring every file of the job's dataset here once; the first error of the round
        is raised (`job.error` says it, `full` and `permanent` classify the round)."""
        job.error = None
        failures: list[SyncbitError] = []
        await self._fetch_all(job, failures)
        if failures:
            raise failures[0]

    async def _fetch_all(self, job: Job, failures: list[SyncbitError]) -> None:
        manifest = job.manifest
        source = self.source_for(manifest)
        position = 0
        bases: dict[str, int] = {}  # a file's first chunk, counted across the dataset
        for entry in manifest.files:
            bases[entry.path] = position
            position += chunk_count(entry.size, manifest.chunk_size)
        trace = await self.order(manifest) if self.order is not None else None
        if trace is not None and trace.runs:
            await self._follow(job, trace, bases, failures)
            if failures:
                return

        await _in_order(
            job,
            failures,
            FILES_AT_ONCE,
            (
                (
                    entry,
                    functools.partial(
                        self.fetcher.ensure,
                        entry,
                        manifest.chunk_size,
                        source,
                        Priority.PREFETCH,
                        may_source=_planned(job, bases[entry.path]),
                    ),
                )
                for entry in manifest.files
            ),
        )

    async def _follow(
        self, job: Job, trace: AccessTrace, bases: dict[str, int], failures: list[SyncbitError]
    ) -> None:
        """Bring the dataset's chunks in the order `trace` implies (`prefetch_order`): what
        its first reader read first comes first. `_fetch_all` then completes each file."""
        manifest = job.manifest
        source = self.source_for(manifest)

        def pieces() -> Iterator[tuple[FileEntry, Callable[[], Awaitable[None]]]]:
            for entry, piece in prefetch_order(manifest, trace):
                base = bases[entry.path]
                for start in range(piece.start, piece.stop, PIECE_CHUNKS):
                    chunks = range(start, min(start + PIECE_CHUNKS, piece.stop))
                    log.debug(
                        "prefetch of %s: %s chunks %d-%d",
                        manifest.dataset,
                        entry.path,
                        chunks.start,
                        chunks.stop - 1,
                    )
                    fetch = functools.partial(
                        self.fetcher.fetch_chunks,
                        entry,
                        manifest.chunk_size,
                        source,
                        chunks,
                        Priority.PREFETCH,
                        may_source=_planned(job, base),
                    )
                    yield entry, fetch

        await _in_order(job, failures, PIECES_AT_ONCE, pieces())


def _planned(job: Job, base: int) -> Callable[[int], bool]:
    """Whether the job's plan gives this node chunk i of the file whose first chunk is
    `base` in the dataset (see `RoundRobin`)."""
    return lambda i: job.plan.may_source(base + i)


async def _in_order(
    job: Job,
    failures: list[SyncbitError],
    at_once: int,
    work: Iterable[tuple[FileEntry, Callable[[], Awaitable[None]]]],
) -> None:
    """Run each (file, fetch) of `work`, `at_once` at a time, started in order: each takes
    its slot before the next is started, a checkpoint between, so their flights queue in
    that order (tasks started together run in whatever order trio picks). A failure that
    ends the job (`_failed`) cancels the rest."""
    limit = trio.CapacityLimiter(at_once)

    async def one(entry: FileEntry, fetch: Callable[[], Awaitable[None]], token: object) -> None:
        try:
            await fetch()
        except SyncbitError as exc:
            if _failed(job, entry, exc, failures):
                nursery.cancel_scope.cancel()
        finally:
            limit.release_on_behalf_of(token)

    async with trio.open_nursery() as nursery:
        for entry, fetch in work:
            token = object()
            await limit.acquire_on_behalf_of(token)
            nursery.start_soon(one, entry, fetch, token)
