"""How many ranged requests to run against each source, and when a transfer is a straggler.

Owns the pure policy the fetcher consults for that: `SourceConcurrency` (per source key,
e.g. a host or a bucket: the number of concurrent requests this node may run, adapted to
what the origin delivers, its throttling answers and its errors; `Hedging`, in
`syncbit.hedging`, says when a transfer is a straggler). It never does I/O, never sleeps,
and reads time only through the injected clock: the fetcher reports events and does the
waiting.

Not thread-safe: call it from one thread (the fetcher's trio loop).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "ConcurrencyPolicy",
    "Phase",
    "SourceConcurrency",
    "SourceStats",
]

Clock = Callable[[], float]


# -- source concurrency ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConcurrencyPolicy:
    """The knobs of `SourceConcurrency`; the defaults are meant to be left alone.

    Args:
        initial: requests at once against a source not seen before (at most `cap`). A
            few, not one: the search doubles from here and each doubling costs a
            measurement, while a source that is fastest with one stream loses little to a
            few for the seconds it takes to come down.
        cap: never more than this many at once against one source (config, per node).
        gain: a step up is kept only if the total rose by at least this fraction: below it
            more streams cost the origin connections for nothing (and noise could
            otherwise ratchet the level up).
        keep: a step down is kept when the total stays at least this fraction of the
            held level's: the same bytes with fewer streams.
        min_epoch: shortest measurement (seconds) that judges a level.
        epoch_transfers: a measurement also waits for this many completed transfers per
            allowed stream (started at the level judged), so every stream has spoken.
        saturation: a level is judged only while demand kept at least this fraction of
            its slots busy on average; below it the reader, not the origin, set the pace.
        hold_epochs: measurements at a held level between two probes (one step up or
            down, alternately): the hysteresis that keeps the level from wandering.
        throttle_factor: the level is multiplied by this on a throttling answer (and
            rounded, at least one less): CUBIC's and the AWS SDKs' adaptive 0.7, since the
            throttled level also becomes a ceiling. At 0.5 an origin taking 4 connections
            that refused a fifth left 2 streams until a probe, 13% slower over 1 GiB.
        error_factor: and by this on a failed request.
        ceiling_memory: seconds a throttled level stays a ceiling probes do not reach.
        max_retry_after: a Retry-After longer than this (seconds) is cut to it: one
            answer must not stop a source for hours (the read deadline decides instead).
        failure_backoff: after a throttle without a Retry-After or a failure, no new
            request to the source for this long (seconds), doubling with each further one
            before a request delivers again, up to `max_failure_backoff`: a source that
            fails every request is asked a few times a second at most, however many
            chunks wait on it, not once per chunk per retry.
        max_keys: sources remembered; the least recently used idle one is forgotten.
    """

    initial: int = 4
    cap: int = 64
    gain: float = 0.10
    keep: float = 0.97
    min_epoch: float = 0.2
    epoch_transfers: float = 1.0
    saturation: float = 0.8
    hold_epochs: int = 8
    throttle_factor: float = 0.7
    error_factor: float = 0.75
    ceiling_memory: float = 60.0
    max_retry_after: float = 300.0
    failure_backoff: float = 0.25
    max_failure_backoff: float = 4.0
    max_keys: int = 1024

    def __post_init__(self) -> None:
        if self.cap < 1 or self.initial < 1:
            raise ValueError("need cap >= 1 and initial >= 1")
        if not (0 < self.throttle_factor < 1 and 0 < self.error_factor < 1):
            raise ValueError("throttle_factor and error_factor must be in (0, 1)")
        if not (self.gain > 0 and 0 < self.keep <= 1 and 0 < self.saturation <= 1):
            raise ValueError("need gain > 0, 0 < keep <= 1, 0 < saturation <= 1")
        if self.min_epoch <= 0 or self.epoch_transfers <= 0 or self.hold_epochs < 1:
            raise ValueError("need min_epoch > 0, epoch_transfers > 0, hold_epochs >= 1")
        if self.max_keys < 1 or self.max_retry_after < 0 or self.ceiling_memory < 0:
            raise ValueError("need max_keys >= 1, max_retry_after >= 0, ceiling_memory >= 0")
        if not 0 <= self.failure_backoff <= self.max_failure_backoff:
            raise ValueError("need 0 <= failure_backoff <= max_failure_backoff")


class Phase(Enum):
    """Where a source's level is in its search."""

    START = "start"  # doubling from `initial` while the total keeps rising
    HOLD = "hold"  # at the best level found; measuring it
    PROBE_UP = "probe-up"  # one step above the held level, being measured
    PROBE_DOWN = "probe-down"  # one step below it, being measured


@dataclass(frozen=True)
class SourceStats:
    """One source's state, for status pages and logs."""

    limit: int  # requests allowed at once now
    held: int  # the level the search returns to between probes
    in_flight: int
    phase: Phase
    total_rate: float  # bytes/s measured at the held level (0: not measured yet)
    stream_rate: float  # bytes/s one request delivers, recent average (0: none yet)
    blocked_for: float  # seconds until the source may be asked again (Retry-After, backoff)
    throttles: int  # throttling answers so far
    failures: int  # failed requests so far


@dataclass
class _Source:
    level: int
    held: int
    phase: Phase = Phase.START
    held_rate: float = 0.0  # 0: the held level has not been measured since it was set
    in_flight: int = 0
    blocked_until: float = -math.inf  # a Retry-After: no request at all before then
    backoff_until: float = -math.inf  # after failures: no background request before then
    ceiling: int = 0  # 0: none
    ceiling_until: float = -math.inf
    last_cut: float = -math.inf
    transfer_time: float = 0.0  # EWMA of one request's seconds; 0: none yet
    stream_rate: float = 0.0  # EWMA of one request's bytes/s
    epochs_held: int = 0
    probe_up_next: bool = True
    throttles: int = 0
    failures: int = 0
    streak: int = 0  # throttles and failures since the last request that delivered
    # The measurement in progress: since `epoch_start`, at `level`.
    epoch_start: float = 0.0
    last_event: float = 0.0
    occupancy: float = 0.0  # integral of in_flight over time since epoch_start
    done: int = 0  # transfers started at or after epoch_start and finished since
    done_bytes: int = 0
    done_seconds: float = 0.0


_EWMA = 0.2  # weight of a new sample in the per-request averages
_HELD_EWMA = 0.5  # weight of a new measurement of the held level's total


class SourceConcurrency:
    """Adaptive per-source concurrency: a hill climb on the total a source delivers.

    The fetcher asks `may_start(key)` (or compares `in_flight(key)` with `limit(key)` and
    waits `delay(key)`) before each request, calls `started(key)` when it sends one and
    exactly one of `finished`, `throttled`, `failed` or `cancelled` when it ends.

    The search: from `initial`, double while each doubling raises the total by at least
    `gain` (START); then hold the best level, and every `hold_epochs` measurements probe
    one step (a quarter of the level) up or down, alternately, keeping a step only if it
    pays (up: `gain` more; down: `keep` of the total with fewer streams) and then trying
    the next step the same way. Only measurements in which demand kept the slots busy
    judge a level. A throttling answer multiplies the level by `throttle_factor` (once per
    transfer time, however many answers arrive together), makes the throttled level a
    ceiling for `ceiling_memory` seconds, and blocks new requests until its Retry-After;
    a failure multiplies it by `error_factor`. A throttle without a Retry-After, or a
    failure, blocks new requests for a backoff that doubles with each one in a row until a
    request delivers. The total is measured by Little's law:
    average requests in flight times the bytes per second of the requests that finished,
    so a measurement needs no more than about one transfer time per stream.
    """

    def __init__(self, policy: ConcurrencyPolicy | None = None, clock: Clock = time.monotonic):
        self.policy = policy or ConcurrencyPolicy()
        self._clock = clock
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    # -- what the fetcher asks --------------------------------------------------------------

    def limit(self, key: str) -> int:
        """Requests allowed at once against `key` now (at least 1)."""
        return self._get(key).level

    def in_flight(self, key: str) -> int:
        return self._get(key).in_flight

    def delay(self, key: str, backoff: bool = True) -> float:
        """Seconds until a new request to `key` may be sent (0: now): a Retry-After, and
        with `backoff` the source-wide wait after failures (a reader's own request skips
        that one: its flight retries with its own backoff, and a reader is one request at a
        time, not a burst)."""
        s = self._get(key)
        until = max(s.blocked_until, s.backoff_until) if backoff else s.blocked_until
        return max(0.0, until - self._clock())

    def may_start(self, key: str, backoff: bool = True) -> bool:
        """A request to `key` may be sent now: a slot is free and no wait holds."""
        s = self._get(key)
        return s.in_flight < s.level and self.delay(key, backoff) == 0

    def stream_rate(self, key: str) -> float:
        """Bytes/s one request to `key` delivered lately (0: none has yet)."""
        return self._get(key).stream_rate

    def stats(self, key: str) -> SourceStats:
        s = self._get(key)
        return SourceStats(
            limit=s.level,
            held=s.held,
            in_flight=s.in_flight,
            phase=s.phase,
            total_rate=s.held_rate,
            stream_rate=s.stream_rate,
            blocked_for=self.delay(key),
            throttles=s.throttles,
            failures=s.failures,
        )

    # -- what the fetcher reports -----------------------------------------------------------

    def started(self, key: str) -> float:
        """A request to `key` was sent; returns when (this controller's clock), for
        `throttled` and `failed`."""
        s = self._get(key)
        now = self._advance(s)
        s.in_flight += 1
        return now

    def finished(self, key: str, nbytes: int, seconds: float) -> None:
        """A request to `key` delivered `nbytes` in `seconds` (from sending it to its last
        byte). Ends a measurement when it has enough."""
        s = self._get(key)
        now = self._advance(s)
        self._ended(s)
        s.streak = 0  # it delivers again: no more backoff
        s.backoff_until = -math.inf
        seconds = max(seconds, 1e-6)
        nbytes = max(nbytes, 0)
        s.transfer_time = _ewma(s.transfer_time, seconds, _EWMA)
        s.stream_rate = _ewma(s.stream_rate, nbytes / seconds, _EWMA)
        if now - seconds >= s.epoch_start - 1e-9:  # started at the level being judged
            s.done += 1
            s.done_bytes += nbytes
            s.done_seconds += seconds
        self._maybe_judge(s, now)

    def throttled(
        self, key: str, retry_after: float | None = None, sent: float | None = None
    ) -> None:
        """A request to `key` was refused as too many (HTTP 429/503, S3 SlowDown);
        `retry_after`: the answer's Retry-After in seconds, if it had one; `sent`: when
        the request went out (what `started` returned), if known."""
        s = self._get(key)
        now = self._advance(s)
        self._ended(s)
        s.throttles += 1
        if retry_after is not None and retry_after > 0:
            wait = min(retry_after, self.policy.max_retry_after)
            s.blocked_until = max(s.blocked_until, now + wait)
        else:
            self._back_off(s, now)
        if self._may_cut(s, now, sent):
            active = s.ceiling if now < s.ceiling_until and s.ceiling else self.policy.cap
            s.ceiling = max(1, min(active, s.level - 1))
            s.ceiling_until = now + self.policy.ceiling_memory
            self._cut(s, now, self.policy.throttle_factor)
        else:
            self._restart(s, max(now, s.blocked_until))

    def failed(self, key: str, sent: float | None = None) -> None:
        """A request to `key` failed (connection error, timeout, a 5xx that is not a
        throttle): fewer requests at once, without a ceiling. `sent`: as for
        `throttled`."""
        s = self._get(key)
        now = self._advance(s)
        self._ended(s)
        s.failures += 1
        self._back_off(s, now)
        if self._may_cut(s, now, sent):
            self._cut(s, now, self.policy.error_factor)

    def cancelled(self, key: str) -> None:
        """A request to `key` was abandoned (a hedge's loser, a reader gone): no sample."""
        s = self._get(key)
        self._advance(s)
        self._ended(s)

    # -- the search -------------------------------------------------------------------------

    def _get(self, key: str) -> _Source:
        s = self._sources.get(key)
        if s is not None:
            self._sources.move_to_end(key)
            return s
        if len(self._sources) >= self.policy.max_keys:
            idle = next((k for k, v in self._sources.items() if v.in_flight == 0), None)
            if idle is not None:
                del self._sources[idle]
        now = self._clock()
        level = min(self.policy.initial, self.policy.cap)
        s = _Source(level=level, held=level, epoch_start=now, last_event=now)
        self._sources[key] = s
        return s

    def _advance(self, s: _Source) -> float:
        """Bring the occupancy integral up to now; returns now."""
        now = self._clock()
        since = max(s.last_event, s.epoch_start)
        if now > since:
            s.occupancy += s.in_flight * (now - since)
        s.last_event = max(s.last_event, now)
        return now

    @staticmethod
    def _ended(s: _Source) -> None:
        s.in_flight = max(0, s.in_flight - 1)

    def _ceiling(self, s: _Source, now: float) -> int:
        if s.ceiling and now < s.ceiling_until:
            return min(self.policy.cap, s.ceiling)
        return self.policy.cap

    def _restart(self, s: _Source, at: float) -> None:
        """A new measurement from `at` (later than now while a Retry-After holds)."""
        s.epoch_start = at
        s.last_event = at
        s.occupancy = 0.0
        s.done = s.done_bytes = 0
        s.done_seconds = 0.0

    def _set(self, s: _Source, level: int, phase: Phase, now: float) -> None:
        s.level = max(1, level)
        s.phase = phase
        self._restart(s, max(now, s.blocked_until))

    def _back_off(self, s: _Source, now: float) -> None:
        """No new request for a while after an unexplained refusal, longer with each one
        in a row: the source-wide backoff (each flight's own retry comes on top)."""
        p = self.policy
        wait = min(p.max_failure_backoff, p.failure_backoff * 2 ** min(s.streak, 30))
        s.streak += 1
        s.backoff_until = max(s.backoff_until, now + wait)

    def _may_cut(self, s: _Source, now: float, sent: float | None = None) -> bool:
        """One cut per transfer time: the answers to requests sent before a cut say
        nothing about the level after it. With `sent` known exactly that: a request sent
        at or before the last cut never cuts again (at the start of a prefetch against an
        origin with 4 connections, two 503s 0.2 s apart, both for requests sent at level
        8, cut it to 2 and then to 1 with a ceiling of 1 for a minute: 1 stream of 4)."""
        if sent is not None and sent <= s.last_cut:
            return False
        window = max(self.policy.min_epoch, s.transfer_time)
        return now - s.last_cut >= window

    def _cut(self, s: _Source, now: float, factor: float) -> None:
        s.last_cut = now
        # The nearest level to the cut one, at least one below the level cut.
        level = min(max(1, min(s.level - 1, round(s.level * factor))), self._ceiling(s, now))
        s.held = level
        s.held_rate = 0.0
        s.epochs_held = 0
        self._set(s, level, Phase.HOLD, now)

    def _maybe_judge(self, s: _Source, now: float) -> None:
        span = now - s.epoch_start
        needed = max(2, math.ceil(self.policy.epoch_transfers * s.level))
        if span < self.policy.min_epoch or s.done < needed:
            return
        occupancy = s.occupancy / span
        total = occupancy * s.done_bytes / s.done_seconds
        saturated = occupancy >= self.policy.saturation * s.level
        self._judge(s, now, total, saturated)

    def _judge(self, s: _Source, now: float, total: float, saturated: bool) -> None:
        p = self.policy
        ceiling = self._ceiling(s, now)
        if s.phase is Phase.HOLD:
            if saturated:
                first = s.held_rate == 0
                s.held_rate = total if first else _ewma(s.held_rate, total, _HELD_EWMA)
                s.epochs_held += 1
                if s.epochs_held >= p.hold_epochs:
                    self._probe(s, now, ceiling)
                    return
            self._restart(s, now)
            return
        if s.phase is Phase.START and s.held_rate == 0:
            if not saturated:
                self._restart(s, now)  # demand below even the first level: wait for more
                return
            s.held_rate = total
            self._step_up(s, now, min(ceiling, s.level * 2), Phase.START)
            return
        if s.phase is Phase.PROBE_DOWN:
            if saturated and total >= s.held_rate * p.keep:
                s.held, s.held_rate = s.level, total
                lower = s.level - _step(s.level)
                if lower >= 1:  # as many bytes with fewer streams: try fewer still
                    self._set(s, lower, Phase.PROBE_DOWN, now)
                    return
            self._hold(s, now)
            return
        # START or PROBE_UP: a level above the held one.
        if total >= s.held_rate * (1 + p.gain):
            s.held, s.held_rate = s.level, total
            if saturated:  # demand filled it: the next step may pay too
                nxt = s.level * 2 if s.phase is Phase.START else s.level + _step(s.level)
                self._step_up(s, now, min(ceiling, nxt), s.phase)
                return
        if s.phase is Phase.START:
            s.probe_up_next = False  # a step up just failed: the first probe looks below
        self._hold(s, now)

    def _step_up(self, s: _Source, now: float, level: int, phase: Phase) -> None:
        if level <= s.held:
            self._hold(s, now)
        else:
            self._set(s, level, phase, now)

    def _hold(self, s: _Source, now: float) -> None:
        s.epochs_held = 0
        self._set(s, s.held, Phase.HOLD, now)

    def _probe(self, s: _Source, now: float, ceiling: int) -> None:
        s.epochs_held = 0
        up = min(ceiling, s.held + _step(s.held))
        down = max(1, s.held - _step(s.held))
        options = [(up, Phase.PROBE_UP), (down, Phase.PROBE_DOWN)]
        if not s.probe_up_next:
            options.reverse()
        s.probe_up_next = not s.probe_up_next
        for level, phase in options:
            if level != s.held:
                self._set(s, level, phase, now)
                return
        self._restart(s, now)  # at 1 with a ceiling of 1: nothing to try


def _step(level: int) -> int:
    return max(1, level // 4)


def _ewma(old: float, new: float, weight: float) -> float:
    return new if old == 0 else old + weight * (new - old)
