"""An HTTP origin that behaves like a real one under load, for tests: each connection's body
paced to a rate, an optional total rate shared by all, and throttling answers (429/503 with
Retry-After) on demand or above a number of requests at once.

Owns the pacing and the throttling on top of `syncbit_testing.origin.Origin` (which keeps
serving files, ranges and validators the same way), and counting what it refused and how
many bodies it sent at once. Loopback only; nothing in the product imports it.

In-process::

    with CappedOrigin(root, per_connection=4_000_000) as origin:
        origin.throttle(503, retry_after=2, count=3)   # the next 3 file requests
        ...
        origin.peak_streams, origin.throttled

As a process (`python -m syncbit_testing.capped --root DIR --per-connection 100MB`):
prints `READY <port>`, serves `GET /__stats` (with `throttled`, `peak_streams`),
`POST /__reset` and `POST /__throttle` (JSON `{"status": 503, "retry_after": 2,
"count": 3}`; `{}` ends throttling), stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from syncbit_testing._http import LoopbackServer
from syncbit_testing.origin import Origin, Style, _Handler, _Server, _State

__all__ = ["CappedOrigin", "RateLimit", "main"]

# Pacing granularity: sleeping once per block keeps the CPU cost of a fast stream low,
# small blocks keep a slow one smooth (each block goes out as one burst).
_MIN_BLOCK = 64 << 10
_MAX_BLOCK = 4 << 20
_BLOCK_SECONDS = 0.02
THROTTLE_STATUSES = frozenset({429, 503})


class RateLimit:
    """A rate in bytes/s shared by every caller: `reserve(n)` says when `n` bytes may be
    sent. No credit builds up while idle, so nothing ever goes out faster than `rate`."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError("rate must be > 0 bytes/s")
        self.rate = rate
        self._clock = clock
        self._next = -math.inf
        self._lock = threading.Lock()

    def reserve(self, n: int) -> float:
        """The clock time at which `n` bytes may start to go out."""
        with self._lock:
            start = max(self._clock(), self._next)
            self._next = start + n / self.rate
            return start


@dataclass
class _Throttle:
    status: int
    retry_after: float | None
    remaining: int | None  # answers left; None: until cleared


@dataclass
class _CappedState(_State):
    per_connection: float | None = None
    total: RateLimit | None = None
    throttle_above: int | None = None
    throttle_status: int = 503
    throttle_retry_after: float | None = None
    manual: _Throttle | None = None
    throttled: int = 0
    streams: int = 0  # bodies being sent now
    peak_streams: int = 0
    open_requests: int = 0  # file requests being answered now
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    extra_lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        super().reset()
        with self.extra_lock:
            self.throttled = 0
            self.peak_streams = self.streams

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        with self.extra_lock:
            stats.update(throttled=self.throttled, peak_streams=self.peak_streams)
        return stats

    def set_manual(self, throttle: _Throttle | None) -> None:
        with self.extra_lock:
            self.manual = throttle

    def refusal(self) -> _Throttle | None:
        """Count a new file request in; the throttle it meets, if any (then it is not
        counted as open)."""
        with self.extra_lock:
            manual = self.manual
            if manual is not None:
                if manual.remaining is not None:
                    manual.remaining -= 1
                    if manual.remaining <= 0:
                        self.manual = None
                self.throttled += 1
                return manual
            above = self.throttle_above
            if above is not None and self.open_requests >= above:
                self.throttled += 1
                return _Throttle(self.throttle_status, self.throttle_retry_after, None)
            self.open_requests += 1
            return None

    def request_done(self) -> None:
        with self.extra_lock:
            self.open_requests -= 1

    def body(self, delta: int) -> None:
        with self.extra_lock:
            self.streams += delta
            self.peak_streams = max(self.peak_streams, self.streams)


class _CappedServer(_Server):
    state: _CappedState

    def __init__(self, address: tuple[str, int], state: _CappedState) -> None:
        self.state = state
        LoopbackServer.__init__(self, address, _CappedHandler)


class _CappedHandler(_Handler):
    server: _CappedServer

    def do_POST(self) -> None:
        state = self.server.state
        if state.control and urlsplit(self.path).path == "/__throttle":
            try:
                length = int(self.headers.get("Content-Length", "0"))
                spec = json.loads(self.rfile.read(length) or b"{}")
                state.set_manual(_throttle_from(spec))
            except (ValueError, TypeError) as exc:
                self._simple(400, f"bad throttle: {exc}\n")
                return
            self._simple(200, "ok\n")
            return
        super().do_POST()

    def _dispatch(self, head: bool) -> None:
        state = self.server.state
        path = urlsplit(self.path).path
        if state.control and path.startswith("/__"):
            super()._dispatch(head)
            return
        refused = state.refusal()
        if refused is not None:
            extra = {}
            if refused.retry_after is not None:
                extra["Retry-After"] = str(math.ceil(refused.retry_after))
            self._simple(refused.status, "slow down\n", head=head, extra=extra)
            return
        try:
            super()._dispatch(head)
        finally:
            state.request_done()

    def _send_body(self, f: BinaryIO, start: int, length: int, key: str) -> None:
        state = self.server.state
        if state.per_connection is None and state.total is None:
            super()._send_body(f, start, length, key)
            return
        slowest = min(
            state.per_connection or math.inf, state.total.rate if state.total else math.inf
        )
        block = int(min(_MAX_BLOCK, max(_MIN_BLOCK, slowest * _BLOCK_SECONDS)))
        own = RateLimit(state.per_connection, state.clock) if state.per_connection else None
        state.body(+1)
        try:
            sent = 0
            while sent < length and not self.close_connection:
                n = min(block, length - sent)
                at = max(
                    own.reserve(n) if own else -math.inf,
                    state.total.reserve(n) if state.total else -math.inf,
                )
                wait = at - state.clock()
                if wait > 0:
                    state.sleep(wait)
                super()._send_body(f, start + sent, n, key)
                sent += n
        finally:
            state.body(-1)


def _throttle_from(spec: Any) -> _Throttle | None:
    if not isinstance(spec, dict):
        raise ValueError("expected a JSON object")
    if not spec:
        return None
    status = int(spec.get("status", 503))
    if status not in THROTTLE_STATUSES:
        raise ValueError(f"status must be one of {sorted(THROTTLE_STATUSES)}")
    retry_after = spec.get("retry_after")
    count = spec.get("count")
    return _Throttle(
        status,
        None if retry_after is None else float(retry_after),
        None if count is None else int(count),
    )


class CappedOrigin(Origin):
    """`Origin` with each body paced to `per_connection` bytes/s (per request, as nginx's
    `limit_rate`), all bodies together to `total` bytes/s, and throttling answers: every
    request beyond `throttle_above` open at once gets `throttle_status` (with
    `Retry-After: throttle_retry_after` when set), and `throttle()` refuses the next
    requests on demand (control requests, `/__*`, are never refused). `clock` and `sleep`
    are injectable: they are the pacing's only timing."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        per_connection: float | None = None,
        total: float | None = None,
        throttle_above: int | None = None,
        throttle_status: int = 503,
        throttle_retry_after: float | None = None,
        port: int = 0,
        style: Style = "nginx",
        host: str = "127.0.0.1",
        control: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(root, port=port, style=style, host=host, control=control)
        for name, rate in (("per_connection", per_connection), ("total", total)):
            if rate is not None and not rate > 0:
                raise ValueError(f"{name} must be > 0 bytes/s")
        if throttle_above is not None and throttle_above < 0:
            raise ValueError("throttle_above must be >= 0")
        if throttle_status not in THROTTLE_STATUSES:
            raise ValueError(f"throttle_status must be one of {sorted(THROTTLE_STATUSES)}")
        base = self._state
        self._state = _CappedState(
            base.root,
            base.style,
            base.control,
            per_connection=per_connection,
            total=RateLimit(total, clock) if total else None,
            throttle_above=throttle_above,
            throttle_status=throttle_status,
            throttle_retry_after=throttle_retry_after,
            clock=clock,
            sleep=sleep,
        )

    @property
    def state(self) -> _CappedState:
        assert isinstance(self._state, _CappedState)
        return self._state

    def throttle(
        self, status: int = 503, retry_after: float | None = 1.0, count: int | None = None
    ) -> None:
        """Refuse the next `count` file requests (all, until `unthrottle()`, when None)."""
        spec = {"status": status, "retry_after": retry_after, "count": count}
        self.state.set_manual(_throttle_from(spec))

    def unthrottle(self) -> None:
        self.state.set_manual(None)

    @property
    def throttled(self) -> int:
        """Throttling answers sent since start (or the last `reset_stats`)."""
        with self.state.extra_lock:
            return self.state.throttled

    @property
    def peak_streams(self) -> int:
        """The most bodies sent at once since start (or the last `reset_stats`)."""
        with self.state.extra_lock:
            return self.state.peak_streams

    @property
    def streams(self) -> int:
        with self.state.extra_lock:
            return self.state.streams

    def _make_server(self) -> _CappedServer:
        return _CappedServer((self.host, self.port), self.state)


def main(argv: list[str] | None = None) -> int:
    from syncbit.config import parse_size
    from syncbit_testing._http import serve_until_signal

    def rate(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be > 0")
        return value

    parser = argparse.ArgumentParser(
        prog="python -m syncbit_testing.capped",
        description="HTTP/1.1 test origin with per-connection and total rate caps",
    )
    parser.add_argument("--root", required=True, help="directory to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--per-connection", type=rate, help="bytes/s per body, e.g. 100MB")
    parser.add_argument("--total", type=rate, help="bytes/s for all bodies together")
    parser.add_argument("--throttle-above", type=int, help="refuse requests beyond this many")
    parser.add_argument("--throttle-status", type=int, default=503, choices=[429, 503])
    parser.add_argument("--retry-after", type=float, help="seconds, sent with refusals")
    args = parser.parse_args(argv)
    try:
        origin = CappedOrigin(
            args.root,
            per_connection=args.per_connection,
            total=args.total,
            throttle_above=args.throttle_above,
            throttle_status=args.throttle_status,
            throttle_retry_after=args.retry_after,
            port=args.port,
            host=args.host,
            control=True,
        )
        origin.start()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve_until_signal(origin)


if __name__ == "__main__":
    sys.exit(main())
