"""Calls from one trio loop into another (`aio.OtherLoop`): what the node's port (a loop
of its own) does to run local API requests in the node's loop, a long poll included,
without a thread per call."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from syncbit.aio import OtherLoop


class Loop:
    """A trio loop in a thread of its own, serving OtherLoop calls until `stop`."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.other: OtherLoop | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.cancel: trio.CancelScope | None = None
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.thread.start()
        self.ready.wait(10)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self.cancel:
            async with trio.open_nursery() as nursery:
                self.other = OtherLoop(nursery)
                self.ready.set()
                await trio.sleep_forever()

    def stop(self) -> None:
        assert self.token is not None and self.cancel is not None
        self.token.run_sync_soon(self.cancel.cancel)
        self.thread.join(10)


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    try:
        yield running
    finally:
        if running.thread.is_alive():
            running.stop()


async def test_a_call_runs_in_the_other_loop_and_its_result_comes_back(loop: Loop) -> None:
    assert loop.other is not None

    async def where(x: int) -> tuple[int, int]:
        await trio.sleep(0.01)
        return x * 2, threading.get_ident()

    doubled, thread = await loop.other.run(where, 21)
    assert doubled == 42 and thread == loop.thread.ident
    ident = await loop.other.run_sync(threading.get_ident)
    assert ident == loop.thread.ident


async def test_calls_wait_together_without_a_thread_each(loop: Loop) -> None:
    """Many long polls at once: each a task in both loops, no thread."""
    assert loop.other is not None
    other = loop.other
    before = threading.active_count()
    release = trio.Event()
    token = trio.lowlevel.current_trio_token()
    waiting = 0

    async def poll() -> str:
        nonlocal waiting
        waiting += 1
        while not release.is_set():  # set from this test's loop, read from the other
            await trio.sleep(0.02)
        return "ready"

    results: list[str] = []

    async def ask() -> None:
        results.append(await other.run(poll))

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(ask)
        with trio.fail_after(10):
            while waiting < 100:
                await trio.sleep(0.01)
        assert threading.active_count() == before
        token.run_sync_soon(release.set)
    assert results == ["ready"] * 100


async def test_an_exception_of_the_call_is_raised_here(loop: Loop) -> None:
    assert loop.other is not None

    async def fails() -> Any:
        raise LookupError("no such dataset")

    with pytest.raises(LookupError, match="no such dataset"):
        await loop.other.run(fails)


async def test_a_stopping_loop_tells_its_callers_and_a_stopped_one_refuses(loop: Loop) -> None:
    assert loop.other is not None
    other = loop.other
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        caught: list[BaseException] = []

        async def ask() -> None:
            try:
                await other.run(forever)
            except trio.RunFinishedError as exc:
                caught.append(exc)

        nursery.start_soon(ask)
        await trio.to_thread.run_sync(started.wait, 10)
        await trio.to_thread.run_sync(loop.stop)  # its nursery cancels the call
    assert len(caught) == 1
    with pytest.raises(trio.RunFinishedError):
        await other.run(forever)
