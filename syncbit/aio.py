"""Small trio helpers shared by the node's layers and its servers. No I/O of their own."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio

log = logging.getLogger("syncbit")

T = TypeVar("T")


async def first_of(*events: trio.Event) -> None:
    """Until one of `events` is set (at once if one is)."""
    if any(event.is_set() for event in events):
        return
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


class OtherLoop:
    """Calls from one trio loop into another (each `trio.run` in a thread of its own)
    without a thread per call: the call runs as a task of `nursery`, in the other loop,
    and its result comes back through the asking loop's token. A long poll in the other
    loop costs a task there and a task here, nothing more.

    Made in the loop that runs the calls (`OtherLoop(nursery)` there). A call whose
    asker gave up runs to its end anyway (its answer is dropped); one the other loop
    cancels (it is stopping) raises trio.RunFinishedError here, as does a call made
    after that loop ended.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._nursery = nursery

    async def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`await afn(*args)` in the other loop; its result or exception, here."""
        back = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[tuple[T | None, BaseException | None]] = []

        def deliver(value: T | None, error: BaseException | None) -> None:
            box.append((value, error))
            done.set()

        def tell(value: T | None, error: BaseException | None) -> None:
            with contextlib.suppress(trio.RunFinishedError):  # the asker's loop ended
                back.run_sync_soon(deliver, value, error)

        async def call() -> None:
            value: T | None = None
            error: BaseException | None = trio.RunFinishedError("the other loop is stopping")
            try:
                value, error = await afn(*args), None
            except Exception as exc:
                error = exc
            finally:  # a cancellation of that loop is told here as it stopping
                tell(value, error)

        def start() -> None:  # in the other loop: an exception here would end it
            try:
                self._nursery.start_soon(call)
            except RuntimeError:  # its nursery is closed: it is stopping
                tell(None, trio.RunFinishedError("the other loop is stopping"))

        self._token.run_sync_soon(start)
        await done.wait()
        value, error = box[0]
        if error is not None:
            raise error
        return value  # type: ignore[return-value]  # T, None when T allows it

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the other loop's thread (a function that must run there)."""

        async def call() -> T:
            return fn(*args)

        return await self.run(call)


def run_in_thread(
    main: Callable[[threading.Event], Awaitable[None]],
    name: str,
    what: str,
    instruments: Sequence[trio.abc.Instrument] = (),
) -> threading.Thread:
    """`trio.run(main, ready)` in a daemon thread named `name`: a server's own loop beside
    the node's. Returns the thread once `main` set `ready`; what ended `main` before that
    is raised here (the thread joined), what ends it later is logged as `what` stopping
    on an error."""
    ready = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            trio.run(main, ready, instruments=instruments)
        except BaseException as exc:  # told to the starter, or logged when it ended later
            if not ready.is_set():
                failed.append(exc)
            else:
                log.exception("%s stopped on an error", what)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    if failed:
        thread.join()
        raise failed[0]
    return thread
