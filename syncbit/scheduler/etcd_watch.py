"""One etcd watch over the JSON gateway (`EtcdClient.watch`): a streaming POST read by
one task, resumed on another endpoint from the first revision not yet delivered when its
member fails, goes silent or lets unread answers pile up. Never blocks the trio loop and
never buffers more than `MAX_WATCH_BUFFER` of unread answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import trio

from syncbit.errors import (
    StateUnavailableError,
)
from syncbit.retry import backoff_delays
from syncbit.scheduler.etcd_wire import (
    GRPC_PERMISSION_DENIED,
    GRPC_UNAUTHENTICATED,
    Event,
    EventType,
    KeyValue,
    WatchBatch,
    b64,
    gateway_error,
    raise_permanent,
)

if TYPE_CHECKING:
    from syncbit.scheduler.etcd import EtcdClient

log = logging.getLogger("syncbit.etcd")

# A watch connection whose unread answers exceed this is closed and resumed later, from
# the first revision not yet delivered: a slow consumer costs a reconnect, not memory.
MAX_WATCH_BUFFER = 64 * 2**20


class _Stream:
    """One watch connection: the bytes its reader task received, and how it ended.

    Its reader is the only code that iterates the response, and it is only ever stopped
    by cancellation while it awaits the network: httpx's byte iterators are nested async
    generators, and one abandoned between two chunks is finalised by the garbage collector
    (trio warns); cancelled inside an await, they all unwind at once."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ended = False
        self.arrived = trio.Event()
        self.scope = trio.CancelScope()

    def wake(self) -> None:
        self.arrived.set()
        self.arrived = trio.Event()

    async def read(self, resp: httpx.Response) -> None:
        with self.scope:
            try:
                async for chunk in resp.aiter_raw():
                    self.buffer += chunk
                    if len(self.buffer) > MAX_WATCH_BUFFER:
                        self.scope.cancel()  # lands inside the next read; the consumer resumes
                    self.wake()
            except httpx.HTTPError:
                pass
        with trio.CancelScope(shield=True):
            await resp.aclose()
        self.ended = True
        self.wake()


class Watch:
    """One watch (see `EtcdClient.watch`); iterate it inside its `async with` block. Never
    ends on its own: the consumer stops it by leaving the block (or by cancellation).
    Temporary failures reconnect with backoff and are logged; only permanent errors
    (authentication, permissions) raise."""

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        idle_timeout: float,
    ) -> None:
        self._client = client
        self._key = key
        self._range_end = range_end
        self._next = start_revision  # the first revision not delivered yet
        self._idle = idle_timeout
        self._stream: _Stream | None = None
        self._nursery: trio.Nursery | None = None
        self._lifetime: AbstractAsyncContextManager[Watch] | None = None
        self._delays = backoff_delays(base=0.05, cap=2.0)

    async def __aenter__(self) -> Watch:
        if self._lifetime is not None:
            raise RuntimeError("a Watch is entered once")
        if not self._next:  # "from now" is now, not when the stream happens to open
            self._next = await self._client.revision() + 1
        self._lifetime = self._open_nursery()
        return await self._lifetime.__aenter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._lifetime is not None
        return await self._lifetime.__aexit__(*exc)

    @asynccontextmanager
    async def _open_nursery(self) -> AsyncIterator[Watch]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def __aiter__(self) -> Watch:
        return self

    @property
    def next_revision(self) -> int:
        """The first revision this watch has not delivered yet."""
        return self._next

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.scope.cancel()  # its reader closes the response
            self._stream = None

    async def _open(self, endpoint: str) -> str | None:
        """Open the stream on `endpoint`; None, or why it failed."""
        client = self._client
        failed = await client._login(endpoint)
        if failed is not None:
            return failed.reason
        create: dict[str, Any] = {"key": b64(self._key)}
        if self._range_end:
            create["range_end"] = b64(self._range_end)
        if self._next:
            create["start_revision"] = str(self._next)
        request = client._request(
            endpoint + "/v3/watch",
            {"create_request": create},
            client._headers(stale_ok=False),
            httpx.Timeout(client.attempt_timeout, read=None),
        )
        resp: httpx.Response | None = None
        with trio.move_on_after(client.connect_timeout + client.attempt_timeout):
            try:
                resp = await client._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"
        if resp is None:
            return "no answer"
        if resp.status_code != 200:
            await resp.aclose()
            return f"HTTP {resp.status_code}"
        if self._nursery is None:
            await resp.aclose()
            raise RuntimeError("iterate a Watch inside its `async with` block")
        self._stream = _Stream()
        self._nursery.start_soon(self._stream.read, resp)
        return None

    async def _connect(self) -> None:
        """Open the stream on the first endpoint that takes it; with backoff, until one does."""
        client = self._client
        while True:
            failures: list[str] = []
            for endpoint in client._rotation():
                why = await self._open(endpoint)
                if why is None:
                    return
                failures.append(f"{endpoint}: {why}")
            log.warning("etcd watch: no endpoint answered: %s", "; ".join(failures))
            await trio.sleep(next(self._delays))

    async def _line(self, stream: _Stream) -> bytes | None:
        """The next JSON line of the stream; None when the stream ended or went silent."""
        with trio.move_on_after(self._idle):
            while True:
                end = stream.buffer.find(b"\n")
                if end >= 0:
                    line = bytes(stream.buffer[:end])
                    del stream.buffer[: end + 1]
                    return line
                if stream.ended:
                    return None
                await stream.arrived.wait()
        return None

    async def _now(self) -> int:
        """The store's revision now, however long etcd takes to answer."""
        while True:
            try:
                return await self._client.revision()
            except StateUnavailableError as exc:
                log.warning("etcd watch: cannot read the revision to resume at: %s", exc)
                await trio.sleep(next(self._delays))

    def _drop(self, why: str) -> None:
        """Close the stream and move to the next endpoint (a member that failed us)."""
        log.info("etcd watch: %s; reconnecting", why)
        self._close()
        client = self._client
        client._current = (client._current + 1) % len(client.endpoints)

    async def __anext__(self) -> WatchBatch:
        client = self._client
        while True:
            if self._stream is None:
                await self._connect()
            assert self._stream is not None
            line = await self._line(self._stream)
            if line is None:
                self._close()  # silent or closed: reconnect, resume at self._next
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                self._drop("unreadable answer")
                continue
            error = gateway_error(doc)
            if error is not None:
                code, message = error
                raise_permanent(code, message, "watch", client.username)
                if code == GRPC_UNAUTHENTICATED:
                    client._token = None
                self._drop(message)
                continue
            result = doc.get("result", {})
            header_rev = int(result.get("header", {}).get("revision", 0))
            if result.get("canceled"):
                if "compact_revision" in result:
                    # The history asked for is gone: the watcher re-reads at `now`.
                    self._close()
                    now = await self._now()
                    self._next = now + 1
                    return WatchBatch([], now, compacted=True)
                reason = str(result.get("cancel_reason", "canceled"))
                denied = GRPC_PERMISSION_DENIED if "denied" in reason else 0
                raise_permanent(denied, reason, "watch", client.username)
                if "auth token" in reason:
                    client._token = None
                self._drop(reason)
                continue
            self._delays = backoff_delays(base=0.05, cap=2.0)  # connected: reset the backoff
            if result.get("created"):
                continue
            events = [
                Event(EventType(ev.get("type", "PUT")), KeyValue.from_json(ev.get("kv", {})))
                for ev in result.get("events", [])
            ]
            if events:
                self._next = events[-1].kv.mod_revision + 1
                return WatchBatch(events, events[-1].kv.mod_revision)
            if header_rev >= self._next:  # a progress notification
                self._next = header_rev + 1
