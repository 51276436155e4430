"""Access traces: the order in which the first node to read a dataset version touched its
files and chunks, so that the other nodes' prefetch brings first what a workload reads first.

Owns the recording (`TraceRecorder`: reads in, runs of chunks out, bounded in size), the
wire form and its validation against the manifest (`AccessTrace`), and the prefetch order a
trace implies (`prefetch_order`). It never does I/O and keeps no clock of its own; a trace
comes from a node, so everything read from the wire is checked before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from syncbit.chunks import chunk_count, chunk_span
from syncbit.errors import UserError
from syncbit.manifest import FileEntry, Manifest
from syncbit.sources.options import parse_bool

__all__ = ["MAX_RUNS", "AccessTrace", "Run", "TraceRecorder", "prefetch_order", "tracing"]

MAX_RUNS = 4096  # a run is ~100 bytes of JSON: a trace stays under half a MiB
TRACE_FORMAT = 1


def tracing(manifest: Manifest) -> bool:
    """Whether traces are recorded and followed for this dataset: unless it was added with
    `--trace off` (the `trace` option, carried in the manifest)."""
    value = manifest.source_options.get("trace", True)
    try:
        return parse_bool(value)
    except ValueError:
        return True  # the scheduler checked the option of every scheme it knows


@dataclass(frozen=True)
class Run:
    """Chunks `first`..`last` (inclusive) of the file at `path`, read in that order."""

    path: str
    first: int
    last: int


@dataclass(frozen=True)
class AccessTrace:
    """A recorded order for one dataset version (`revision`), `runs` in first-read order;
    `complete` is false when the recorder stopped at its bound before the workload did."""

    revision: str
    runs: tuple[Run, ...]
    complete: bool = True

    def to_doc(self) -> dict[str, Any]:
        return {
            "format": TRACE_FORMAT,
            "revision": self.revision,
            "complete": self.complete,
            "runs": [[r.path, r.first, r.last] for r in self.runs],
        }

    @classmethod
    def from_doc(cls, doc: object, manifest: Manifest, max_runs: int = MAX_RUNS) -> AccessTrace:
        """The trace `doc` says, checked against `manifest`: the same revision, every path
        a file of it, every chunk index inside that file, at most `max_runs` runs. Anything
        else is a `UserError` naming what is wrong (the doc came from a node)."""
        if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT:
            raise UserError(f"not an access trace (format {TRACE_FORMAT} expected)")
        if doc.get("revision") != manifest.revision:
            raise UserError(
                f"access trace is for revision {str(doc.get('revision'))[:80]!r}, "
                f"dataset {manifest.dataset!r} is at {manifest.revision!r}"
            )
        runs = doc.get("runs")
        if not isinstance(runs, list) or len(runs) > max_runs:
            raise UserError(f"access trace runs: a list of at most {max_runs} expected")
        sizes = {f.path: f.size for f in manifest.files}
        checked = []
        for n, item in enumerate(runs):
            if (
                not isinstance(item, list)
                or len(item) != 3
                or not isinstance(item[0], str)
                or not all(type(i) is int for i in item[1:])
            ):
                raise UserError(f"access trace run {n}: [path, first, last] expected")
            path, first, last = item
            if path not in sizes:
                raise UserError(f"access trace run {n}: {path[:200]!r} is not a file of it")
            count = chunk_count(sizes[path], manifest.chunk_size)
            if not 0 <= first <= last < count:
                raise UserError(
                    f"access trace run {n}: chunks {first}..{last} outside {path!r} "
                    f"({count} chunks)"
                )
            checked.append(Run(path, first, last))
        return cls(manifest.revision, tuple(checked), complete=doc.get("complete") is True)


@dataclass
class TraceRecorder:
    """Records first reads of one dataset version as runs of chunks, in order.

    A read that continues the file's last run (the next chunk, or one inside it) extends
    that run; a chunk already recorded is not recorded again, so a loader that reads the
    same header twice leaves one entry. Recording stops for good at `max_runs` runs, or
    when every chunk has been read (`full`): from then on `record` does nothing."""

    manifest: Manifest
    max_runs: int = MAX_RUNS
    _runs: list[Run] = field(default_factory=list)
    _seen: dict[str, set[int]] = field(default_factory=dict)
    _seen_total: int = 0
    _total: int = 0
    stopped: bool = False
    # Reads of the version under way through the mount: a reader that waits for its bytes
    # (a slow or throttled origin) has not gone quiet, and its trace is not done yet.
    reading: int = 0

    def __post_init__(self) -> None:
        self._sizes = {f.path: f.size for f in self.manifest.files}
        self._total = sum(chunk_count(s, self.manifest.chunk_size) for s in self._sizes.values())

    @property
    def recorded(self) -> int:
        """Chunks recorded so far (grows with every first read of a chunk)."""
        return self._seen_total

    @property
    def full(self) -> bool:
        return self.stopped or self._seen_total >= self._total

    def record(self, path: str, offset: int, length: int) -> None:
        """A read of bytes [offset, offset+length) of the file at `path`."""
        size = self._sizes.get(path)
        if self.full or size is None or length <= 0 or offset >= size:
            return
        seen = self._seen.setdefault(path, set())
        for index in chunk_span(offset, length, size, self.manifest.chunk_size):
            if index in seen:
                continue
            if not self._extend(path, index):
                if len(self._runs) >= self.max_runs:
                    self.stopped = True
                    return
                self._runs.append(Run(path, index, index))
            seen.add(index)
            self._seen_total += 1

    def _extend(self, path: str, index: int) -> bool:
        """Grow the newest run when `index` follows it in the same file."""
        if not self._runs:
            return False
        last = self._runs[-1]
        if last.path != path or index != last.last + 1:
            return False
        self._runs[-1] = Run(path, last.first, index)
        return True

    def trace(self) -> AccessTrace:
        """What was recorded so far (complete when every chunk was read)."""
        whole = self._seen_total >= self._total
        return AccessTrace(self.manifest.revision, tuple(self._runs), complete=whole)

    def __len__(self) -> int:
        return len(self._runs)


def prefetch_order(manifest: Manifest, trace: AccessTrace | None) -> list[tuple[FileEntry, range]]:
    """The chunks of `manifest` as (file, chunk range) pieces in the order a prefetch should
    bring them: the traced runs first, in trace order; then the rest of the files the trace
    names, in the order it first names them (a trace cut short, or a loader that read a
    file's tensors but not all of it, still says which files it wants); then every other
    file in manifest order. Each chunk appears exactly once."""
    by_path = {f.path: f for f in manifest.files}
    taken: dict[str, list[range]] = {}
    order: list[tuple[FileEntry, range]] = []
    for run in trace.runs if trace is not None else ():
        entry = by_path.get(run.path)
        if entry is None:
            continue
        for piece in _minus(range(run.first, run.last + 1), taken.get(run.path, [])):
            order.append((entry, piece))
            taken.setdefault(run.path, []).append(piece)
    named = [by_path[path] for path in taken]  # dicts keep the order of first naming
    for entry in [*named, *(f for f in manifest.files if f.path not in taken)]:
        whole = range(chunk_count(entry.size, manifest.chunk_size))
        for piece in _minus(whole, taken.get(entry.path, [])):
            order.append((entry, piece))
    return order


def _minus(span: range, taken: list[range]) -> list[range]:
    """`span` without the chunk indexes in `taken`, as ordered contiguous ranges."""
    pieces = [span] if len(span) else []
    for cut in taken:
        rest = []
        for p in pieces:
            lo, hi = max(p.start, cut.start), min(p.stop, cut.stop)
            if lo >= hi:
                rest.append(p)
                continue
            if p.start < lo:
                rest.append(range(p.start, lo))
            if hi < p.stop:
                rest.append(range(hi, p.stop))
        pieces = rest
    return pieces
