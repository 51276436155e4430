"""Access traces on a node: records the order of the mount's reads of each dataset version
the cluster has no trace of yet, offers it to the scheduler once, and fetches the kept
trace for this node's prefetch to follow.

Recording is a `TraceRecorder` per dataset version, fed by the FUSE read path (a dict
lookup and the recorder's few steps per read; no lock, no clock, no I/O). A recording is
offered once, when it is full (every chunk read, or `MAX_RUNS` runs) or when reads of the
version went quiet for `quiet` seconds (no new chunk read, no read waiting for its bytes:
a stall of the origin mid-load does not cut the trace short); after that, or once this
node learns the cluster keeps a trace of the version, it records that version no more.
Datasets added with `--trace off` are neither recorded nor followed. Trio thread; never
blocks it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import trio

from syncbit.errors import SyncbitError
from syncbit.manifest import Manifest
from syncbit.scheduler.bodies import TRACE_BODY
from syncbit.scheduler.client import SchedulerClient
from syncbit.trace import MAX_RUNS, AccessTrace, TraceRecorder, tracing

log = logging.getLogger("syncbit.daemon")

_TICK = 0.5  # seconds between looks at the recorders
_TRIES = 5  # offers of one recording (the scheduler down, say) before it is dropped


@dataclass(eq=False)
class _Recording:
    recorder: TraceRecorder
    quiet_since: float  # when the recorder last grew (or was made)
    seen: int = 0  # chunks recorded at the last look
    tries: int = 0


class Traces:
    """This node's access-trace recordings and the traces its prefetch follows."""

    def __init__(
        self, node: str, client: SchedulerClient, quiet: float = 10.0, max_runs: int = MAX_RUNS
    ) -> None:
        self.node = node
        self.client = client
        self.quiet = quiet
        self.max_runs = max_runs
        self._recording: dict[tuple[str, str], _Recording] = {}  # (dataset, revision)
        self._done: set[tuple[str, str]] = set()  # offered, or the cluster has a trace
        self.offered = 0  # recordings offered to the scheduler (tests, metrics)

    def recorder(self, manifest: Manifest) -> TraceRecorder | None:
        """The recorder for the reads of this dataset version (None: not recorded). On
        open: no I/O."""
        key = (manifest.dataset, manifest.revision)
        recording = self._recording.get(key)
        if recording is not None:
            return recording.recorder
        if key in self._done or not tracing(manifest) or not manifest.files:
            return None
        recording = _Recording(TraceRecorder(manifest, self.max_runs), trio.current_time())
        self._recording[key] = recording
        return recording.recorder

    async def run(self) -> None:
        """Offer each recording when it is full or quiet; until cancelled."""
        while True:
            await trio.sleep(_TICK)
            now = trio.current_time()
            for key, recording in list(self._recording.items()):
                recorder = recording.recorder
                if not recorder.full:
                    if recorder.recorded != recording.seen or recorder.reading:
                        recording.seen, recording.quiet_since = recorder.recorded, now
                        continue
                    if now - recording.quiet_since < self.quiet:
                        continue
                if len(recorder):  # opened and never read: nothing to offer yet
                    await self._offer(key, recording)

    async def _offer(self, key: tuple[str, str], recording: _Recording) -> None:
        name, revision = key
        doc = _fitted(recording.recorder.trace())
        try:
            answer = await self.client.put_trace(name, self.node, doc)
        except SyncbitError as exc:
            recording.tries += 1
            if recording.tries < _TRIES:
                log.info("access trace of %s not offered yet: %s", name, exc)
                return
            log.warning("access trace of %s dropped: %s", name, exc)
        else:
            self.offered += 1
            kept = answer.get("trace") or {}
            log.info(
                "access trace of %s (revision %s, %d runs) %s",
                name,
                revision,
                len(doc["runs"]),
                "kept by the scheduler"
                if answer.get("stored")
                else f"not kept: the scheduler has node {kept.get('node')}'s",
            )
        self._recording.pop(key, None)
        self._done.add(key)

    async def follow(self, manifest: Manifest) -> AccessTrace | None:
        """The trace the cluster keeps for this dataset version, for prefetch to follow
        (None: none yet, tracing off, or the scheduler does not answer)."""
        if not tracing(manifest):
            return None
        try:
            answer = await self.client.trace(manifest.dataset)
            record = answer.get("trace")
            if not isinstance(record, dict):
                return None
            trace = AccessTrace.from_doc(record.get("trace"), manifest)
        except SyncbitError as exc:
            log.info("prefetch of %s: no access trace to follow: %s", manifest.dataset, exc)
            return None
        key = (manifest.dataset, manifest.revision)
        self._done.add(key)  # the cluster has one: no need to record this version here
        self._recording.pop(key, None)
        log.info(
            "prefetch of %s follows the access trace of node %s (%d runs)",
            manifest.dataset,
            record.get("node"),
            len(trace.runs),
        )
        return trace


def _fitted(trace: AccessTrace) -> dict[str, Any]:
    """The trace's wire form, its latest runs dropped (and marked incomplete) until the
    request fits the scheduler's body limit: long paths make runs large."""
    doc = trace.to_doc()
    runs: list[Any] = doc["runs"]
    while runs and len(json.dumps(doc)) > TRACE_BODY - 4096:
        del runs[len(runs) * 3 // 4 :]
        doc["complete"] = False
    return doc
