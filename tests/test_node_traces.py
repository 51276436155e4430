"""A node's access traces: recorded per dataset version unless tracing is off, offered once
when quiet or full, retried a few times when the scheduler does not answer, and a kept
trace is followed (and stops this node's recording of that version). Virtual time."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from syncbit.errors import SchedulerError
from syncbit.manifest import FileEntry, Manifest
from syncbit.node.traces import Traces
from syncbit.trace import Run

CS = 100


def _manifest(options: dict[str, Any] | None = None) -> Manifest:
    files = [FileEntry(path=f"f{n}", size=300, object=f"o{n}", locator=f"f{n}") for n in range(2)]
    return Manifest(
        dataset="d",
        source="file:///x",
        source_options=options or {},
        revision="r1",
        chunk_size=CS,
        files=files,
    )


class _Client:
    """The scheduler's trace routes: keeps the first trace offered, or fails `failures`
    times first."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.offers: list[dict[str, Any]] = []
        self.kept: dict[str, Any] | None = None

    async def put_trace(self, name: str, node: str, trace: dict[str, Any]) -> dict[str, Any]:
        self.offers.append(trace)
        if self.failures:
            self.failures -= 1
            raise SchedulerError("scheduler unreachable")
        stored = self.kept is None
        if stored:
            self.kept = {"node": node, "trace": trace}
        return {"stored": stored, "trace": self.kept}

    async def trace(self, name: str) -> dict[str, Any]:
        return {"dataset": name, "revision": "r1", "trace": self.kept}


def _traces(client: _Client, quiet: float = 5.0) -> Traces:
    return Traces("n1", client, quiet=quiet)  # type: ignore[arg-type]


async def test_reads_are_offered_once_after_a_quiet_period(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client = _Client()
    traces = _traces(client)
    nursery.start_soon(traces.run)
    m = _manifest()
    recorder = traces.recorder(m)
    assert recorder is not None and traces.recorder(m) is recorder  # one per version
    recorder.record("f1", 250, 10)
    await trio.sleep(2)
    recorder.record("f0", 0, 10)
    await trio.sleep(4)  # 4 s after the last read: not quiet yet
    assert client.offers == []
    await trio.sleep(2)
    assert [o["runs"] for o in client.offers] == [[["f1", 2, 2], ["f0", 0, 0]]]
    assert client.offers[0]["complete"] is False
    await trio.sleep(20)
    assert len(client.offers) == 1 and traces.offered == 1
    assert traces.recorder(m) is None  # offered: this version is not recorded again


async def test_a_read_waiting_for_its_bytes_is_not_quiet(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A loader stalled on a slow origin mid-load has not finished: its trace is offered
    whole after the stall, not cut short at it."""
    client = _Client()
    traces = _traces(client)
    nursery.start_soon(traces.run)
    recorder = traces.recorder(_manifest())
    assert recorder is not None
    recorder.record("f0", 0, 10)
    recorder.reading += 1  # the mount's read of it waits for the origin, for 30 s
    await trio.sleep(30)
    assert client.offers == []
    recorder.reading -= 1
    recorder.record("f1", 0, 10)  # the load goes on
    await trio.sleep(4)
    assert client.offers == []
    await trio.sleep(2)
    assert [o["runs"] for o in client.offers] == [[["f0", 0, 0], ["f1", 0, 0]]]


async def test_a_full_recording_goes_at_once_and_tracing_off_records_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client = _Client()
    traces = _traces(client, quiet=3600)
    nursery.start_soon(traces.run)
    assert traces.recorder(_manifest({"trace": False})) is None
    assert traces.recorder(_manifest({"trace": "off"})) is None  # as an unknown scheme keeps it
    recorder = traces.recorder(_manifest())
    assert recorder is not None
    recorder.record("f0", 0, 300)
    recorder.record("f1", 0, 300)
    await trio.sleep(1)
    assert client.offers and client.offers[0]["complete"] is True


async def test_an_offer_is_retried_a_few_times_then_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client = _Client(failures=100)
    traces = _traces(client, quiet=1)
    nursery.start_soon(traces.run)
    recorder = traces.recorder(_manifest())
    assert recorder is not None
    recorder.record("f0", 0, 10)
    await trio.sleep(60)
    assert len(client.offers) == 5 and client.kept is None


async def test_a_kept_trace_is_followed_and_stops_recording_here() -> None:
    client = _Client()
    m = _manifest()
    traces = _traces(client)
    assert await traces.follow(m) is None  # none kept yet
    assert traces.recorder(m) is not None
    doc = {"format": 1, "revision": "r1", "complete": False, "runs": [["f1", 1, 2]]}
    client.kept = {"node": "n2", "trace": doc}
    trace = await traces.follow(m)
    assert trace is not None and trace.runs == (Run("f1", 1, 2),)
    assert traces.recorder(m) is None
    # A kept trace that does not fit the manifest is not followed.
    client.kept = {"node": "n2", "trace": {**doc, "runs": [["f9", 0, 0]]}}
    assert await _traces(client).follow(m) is None
    assert await _traces(client).follow(_manifest({"trace": False})) is None
