"""The trio loop's stall log and blocking-call auditor (`syncbit.looptrace`): a stretch
without a checkpoint is logged with its task; a blocking call on the trio thread is
recorded with its stack, the same call in a worker thread is not."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from syncbit import looptrace
from syncbit.config import SchedulerConfig
from syncbit.errors import ConfigError
from syncbit.looptrace import BlockingAuditor, Finding, StallLogger, read_findings
from syncbit.scheduler import SchedulerServer


class ManualClock:
    """A clock the test advances: a task step "takes" what the test says it takes."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_step_over_the_threshold_is_logged_with_its_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, cpu = ManualClock(), ManualClock()
    stalls = StallLogger(threshold=0.1, clock=clock, cpu_clock=cpu)

    async def hog() -> None:
        looptrace.DOING.set("GET /v1/nodes")  # what a server's connection task says
        await trio.sleep(0)
        clock.now += 0.25  # one step of 250 ms
        cpu.now += 0.04  # of which the thread ran 40 ms: it waited for a CPU
        await trio.sleep(0)

    async def busy_but_polite() -> None:
        for _ in range(10):  # 10 x 50 ms, a checkpoint after each
            clock.now += 0.05
            await trio.sleep(0)

    caplog.set_level(logging.DEBUG, logger="syncbit.looptrace")
    trio.lowlevel.add_instrument(stalls)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog, name="hog")
            nursery.start_soon(busy_but_polite, name="polite")
    finally:
        trio.lowlevel.remove_instrument(stalls)
    stalled = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
    assert len(stalled) == 1, stalled
    assert (
        "task hog (GET /v1/nodes) ran 250 ms (40 ms of it on a CPU) without a checkpoint"
        in stalled[0]
    )
    assert "(now at hog:" in stalled[0]  # where it went on waiting
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "stalled" in r.message)


def test_the_daemon_instruments_follow_the_log_level_and_the_environment(
    tmp_path: Path,
) -> None:
    logger = logging.getLogger("syncbit.test_looptrace")
    logger.setLevel(logging.INFO)
    assert looptrace.instruments({}, logger) == []
    logger.setLevel(logging.DEBUG)
    (stalls,) = looptrace.instruments({}, logger)
    assert isinstance(stalls, StallLogger)
    logger.setLevel(logging.INFO)
    target = tmp_path / "audit.jsonl"
    (auditor,) = looptrace.instruments({looptrace.ENV: str(target)}, logger)
    assert isinstance(auditor, BlockingAuditor)
    auditor.close()
    nowhere = tmp_path / "missing" / "audit.jsonl"
    with pytest.raises(ConfigError, match=f"{looptrace.ENV}=.*cannot write there"):
        looptrace.instruments({looptrace.ENV: str(nowhere)}, logger)


@contextlib.contextmanager
def attached(tmp_path: Path) -> Iterator[BlockingAuditor]:
    """An auditor of this (the trio) thread for the block. Not a fixture: pytest-trio
    would install a fixture's Instrument into the test's run itself."""
    auditor = BlockingAuditor(tmp_path / "blocking.jsonl")
    auditor.attach()
    try:
        yield auditor
    finally:
        auditor.close()


def _blocking_calls(path: Path) -> None:
    """Blocking calls of every kind the auditor knows, in one function."""
    path.write_bytes(b"x")  # open
    os.stat(path)  # wrapped: no audit event
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 1, 0)
    finally:
        os.close(fd)
    time.sleep(0.001)
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket() as client:
        client.settimeout(5)  # a timeout is blocking mode underneath a deadline
        client.connect(server.getsockname())


async def test_blocking_calls_on_the_trio_thread_are_recorded(tmp_path: Path) -> None:
    async def handler() -> None:
        _blocking_calls(tmp_path / "f")

    with attached(tmp_path) as auditor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler, name="the-handler")
    findings = read_findings(auditor.path)
    events = {f.event for f in findings}
    expected = {"open", "os.stat", "os.pread", "time.sleep", "subprocess.Popen", "socket.connect"}
    assert expected <= events, findings
    opened = next(f for f in findings if f.event == "open")
    assert opened.task == "the-handler"
    assert str(tmp_path / "f") in opened.args
    assert opened.called_from("test_looptrace.py _blocking_calls")
    assert opened.called_from("handler")
    assert not opened.called_from("other.py handler")
    assert "_blocking_calls" in str(opened)


async def test_the_same_calls_in_a_worker_thread_are_not(tmp_path: Path) -> None:
    with attached(tmp_path) as auditor:
        await trio.to_thread.run_sync(_blocking_calls, tmp_path / "f")
    assert read_findings(auditor.path) == []


async def test_calls_that_do_not_block_are_not_recorded(tmp_path: Path) -> None:
    socket.getaddrinfo("127.0.0.1", 80)  # its first call imports the idna codec
    with attached(tmp_path) as auditor:
        with socket.create_server(("127.0.0.1", 0)) as server:
            # What trio's own sockets do: a non-blocking connect, a numeric lookup.
            stream = await trio.open_tcp_stream(*server.getsockname()[:2])
            await stream.aclose()
        socket.getaddrinfo("127.0.0.1", 80)
        time.sleep(0)
        with open(tmp_path / "f", "wb") as file, open(file.fileno(), closefd=False):
            # open(fd) wraps a descriptor (the open of the path is recorded, once)
            r, w = os.pipe()
            os.set_blocking(r, False)
            with pytest.raises(BlockingIOError):
                os.read(r, 1)  # the FUSE device is read like this
            os.close(r)
            os.close(w)
    findings = read_findings(auditor.path)
    assert [f.event for f in findings] == ["open"], findings
    assert str(tmp_path / "f") in findings[0].args


async def test_one_record_per_call_site(tmp_path: Path) -> None:
    with attached(tmp_path) as auditor:
        for _ in range(3):
            os.stat(tmp_path)
        os.stat(tmp_path)
    assert [f.event for f in read_findings(auditor.path)] == ["os.stat", "os.stat"]


async def test_detached_means_nothing_is_recorded_and_os_is_itself_again(
    tmp_path: Path,
) -> None:
    stat = os.stat
    with attached(tmp_path) as auditor:
        assert os.stat is not stat
    assert os.stat is stat
    (tmp_path / "f").write_bytes(b"")
    assert read_findings(auditor.path) == []


async def test_one_auditor_at_a_time(tmp_path: Path) -> None:
    other = BlockingAuditor(tmp_path / "other.jsonl")
    try:
        with attached(tmp_path), pytest.raises(RuntimeError, match="another"):
            other.attach()
    finally:
        other.close()


def test_findings_read_back_as_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    assert read_findings(path) == []
    path.write_text(
        '{"event": "open", "args": "(\'/x\', \'r\', 0)", "task": "t", '
        '"stack": ["syncbit/daemon.py:12 _load_plan"]}\n'
    )
    assert read_findings(path) == [
        Finding("open", "('/x', 'r', 0)", "t", ("syncbit/daemon.py:12 _load_plan",))
    ]


def test_the_scheduler_logs_its_loop_stalls_at_debug_and_never_audits(
    config: SchedulerConfig,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scheduler's own loop (a thread of the daemon when embedded) gets the stall log
    with --log-level debug, as the daemon's does; the blocking-call auditor stays the
    daemon loop's (one per process)."""
    caplog.set_level(logging.DEBUG, logger="syncbit.looptrace")
    target = tmp_path / "audit.jsonl"
    monkeypatch.setenv(looptrace.ENV, str(target))
    server = SchedulerServer(config)
    server.start()
    try:
        token = server._token
        assert token is not None

        async def hog() -> None:
            time.sleep(0.3)  # a step of the scheduler's loop with no checkpoint

        token.run_sync_soon(trio.lowlevel.spawn_system_task, hog)
        deadline = time.monotonic() + 10
        while "stalled" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
    assert "trio loop stalled: task " in caplog.text and "hog ran 3" in caplog.text
    assert "ms of it on a CPU" in caplog.text
    assert not target.exists()
