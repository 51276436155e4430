"""A simulated origin and a fetcher-shaped driver for `syncbit.fetch_control`, on a fake clock.

Owns an event-driven fluid model of an origin (a rate cap per connection, a total cap, a
first-byte latency, a loopback-like cost per extra stream, throttling answers with or
without Retry-After, noise) and a driver that keeps as many requests open as the
controller allows and the reader wants, reporting every end to the controller as the
fetcher will. Test code only: it never touches a socket or the real clock.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from fakes import Clock

from syncbit.fetch_control import SourceConcurrency

MB = 1_000_000
MiB = 1 << 20
KEY = "http://origin"


@dataclass
class OriginModel:
    """How an origin shares its bandwidth among `n` concurrent transfers.

    Each transfer gets min(per_connection, total_now / n), total_now being `total` shrunk
    by `overhead` per stream beyond the first (loopback: more streams only cost CPU). A
    request sent while more than `throttle_above` are open is answered, after `latency`,
    with a throttle (carrying `retry_after`, if set) instead of bytes. `noise` scales each
    transfer's rate by a factor drawn from [1 - noise, 1 + noise].
    """

    per_connection: float = math.inf
    total: float = math.inf
    latency: float = 0.002
    overhead: float = 0.0
    throttle_above: int | None = None
    retry_after: float | None = None
    noise: float = 0.0

    def rate(self, n: int) -> float:
        total = self.total / (1 + self.overhead * max(0, n - 1))
        return min(self.per_connection, total / max(1, n))


@dataclass
class _Request:
    started: float
    first_byte: float
    remaining: float
    factor: float
    throttle: bool


@dataclass
class Simulation:
    """Drive `ctl` against `model` for simulated seconds; everything observed is kept."""

    ctl: SourceConcurrency
    model: OriginModel
    clock: Clock
    chunk: int = 4 * MiB
    demand: float = math.inf  # requests the reader wants open at once
    key: str = KEY
    seed: int = 1
    starts: list[float] = field(default_factory=list)
    delivered: list[tuple[float, int]] = field(default_factory=list)
    throttles: list[float] = field(default_factory=list)
    # (time, limit, held) after every event: the limit in force from that time on.
    trace: list[tuple[float, int, int]] = field(default_factory=list)
    _open: list[_Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def run(self, seconds: float) -> Simulation:
        until = self.clock.now + seconds
        while self.clock.now < until:
            self._start_what_may()
            self._step(until)
        return self

    def pause(self, seconds: float) -> Simulation:
        """The reader goes away for `seconds`: its open requests are abandoned."""
        for _ in self._open:
            self.ctl.cancelled(self.key)
        self._open.clear()
        self.clock.now += seconds
        return self

    def _start_what_may(self) -> None:
        while len(self._open) < self.demand and self.ctl.may_start(self.key):
            now = self.clock.now
            self.ctl.started(self.key)
            limit = self.model.throttle_above
            noise = self.model.noise
            self._open.append(
                _Request(
                    started=now,
                    first_byte=now + self.model.latency,
                    remaining=float(self.chunk),
                    factor=1 + self._rng.uniform(-noise, noise),
                    throttle=limit is not None and len(self._open) + 1 > limit,
                )
            )
            self.starts.append(now)

    def _step(self, until: float) -> None:
        now = self.clock.now
        flowing = [r for r in self._open if not r.throttle and r.first_byte <= now]
        rate = self.model.rate(len(flowing))
        events = [until]
        events += [r.first_byte for r in self._open if r.first_byte > now]
        events += [r.first_byte for r in self._open if r.throttle]
        events += [now + r.remaining / (rate * r.factor) for r in flowing]
        if len(self._open) < self.demand:
            delay = self.ctl.delay(self.key)
            if delay > 0:
                events.append(now + delay)
        nxt = max(min(events), now + 1e-9)
        dt = nxt - now
        for r in flowing:
            r.remaining -= rate * r.factor * dt
        self.clock.now = nxt
        for r in list(self._open):
            if r.throttle and r.first_byte <= nxt:
                self._open.remove(r)
                self.throttles.append(nxt)
                self.ctl.throttled(self.key, self.model.retry_after)
            elif not r.throttle and r.first_byte <= now and r.remaining <= 1e-3:
                self._open.remove(r)
                self.delivered.append((nxt, self.chunk))
                self.ctl.finished(self.key, self.chunk, nxt - r.started)
        stats = self.ctl.stats(self.key)
        self.trace.append((nxt, stats.limit, stats.held))

    # -- what was observed ------------------------------------------------------------------

    def throughput(self, since: float, until: float | None = None) -> float:
        """Bytes/s delivered in [since, until) (clock times)."""
        end = self.clock.now if until is None else until
        got = sum(n for t, n in self.delivered if since <= t < end)
        return got / (end - since)

    def limits(self, since: float) -> list[int]:
        """Every limit in force at or after `since` (including the one in force then)."""
        before = [lim for t, lim, _ in self.trace if t < since]
        return before[-1:] + [lim for t, lim, _ in self.trace if t >= since]

    def held(self, since: float) -> list[int]:
        before = [h for t, _, h in self.trace if t < since]
        return before[-1:] + [h for t, _, h in self.trace if t >= since]

    def mean_limit(self, since: float) -> float:
        """Time-weighted mean of the limit from `since` to now."""
        points = [(t, lim) for t, lim, _ in self.trace]
        total = 0.0
        current = self.limits(since)[0]
        last = since
        for t, lim in points:
            if t < since:
                continue
            total += current * (t - last)
            current, last = lim, t
        total += current * (self.clock.now - last)
        return total / (self.clock.now - since)
