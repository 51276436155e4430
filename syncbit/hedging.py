"""When a transfer is a straggler: `Hedging` (per origin kind, e.g. "peer" or "source") keeps
the times of recent transfers by size class and says how long one may run before a second
request for the same bytes is worth sending elsewhere (about their p95).

Pure: no I/O, no sleeping; time only through the injected clock. Not thread-safe: call it
from one thread (the fetcher's trio loop).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["HedgePolicy", "Hedging"]

Clock = Callable[[], float]


@dataclass(frozen=True)
class HedgePolicy:
    """The knobs of `Hedging`.

    Args:
        quantile: a transfer running longer than this quantile of recent ones of its kind
            and size is a straggler.
        factor: the quantile is multiplied by this.
        floor: never hedge sooner than this (seconds): below it a second request costs
            more than waiting does.
        default: the delay while fewer than `min_samples` transfers are known.
        min_samples: transfers of a kind and size class needed before the quantile counts.
        window: recent transfers kept per kind and size class.
        max_age: seconds a transfer counts (the origin's speed changes).
        budget: at most this fraction of recent transfers (plus one) may be hedged, so a
            slow origin does not double its own load.
    """

    quantile: float = 0.95
    factor: float = 1.0
    floor: float = 0.1
    default: float = 1.0
    min_samples: int = 8
    window: int = 128
    max_age: float = 60.0
    budget: float = 0.1

    def __post_init__(self) -> None:
        if not (0 < self.quantile <= 1 and self.factor > 0 and 0 <= self.budget <= 1):
            raise ValueError("need 0 < quantile <= 1, factor > 0, 0 <= budget <= 1")
        if self.floor < 0 or self.default < self.floor:
            raise ValueError("need 0 <= floor <= default")
        if self.min_samples < 1 or self.window < self.min_samples or self.max_age <= 0:
            raise ValueError("need 1 <= min_samples <= window and max_age > 0")


def _size_class(nbytes: int) -> int:
    """Transfers in (2**(k-1), 2**k] bytes share class k: a 4 MiB chunk and a 16 MiB batch
    are judged apart, a short last chunk with its own kind."""
    return max(0, nbytes - 1).bit_length()


class Hedging:
    """Recent transfer times per origin kind ("peer", "source", or finer keys) and size
    class, and the delay after which a transfer is a straggler worth re-requesting.

    The fetcher calls `record(kind, nbytes, seconds)` for every transfer that completed
    (a hedge's winner with its own duration; losers are not recorded), and for one in
    progress asks `should_hedge(kind, nbytes, elapsed)`; when it sends a second request it
    calls `hedged(kind)`, which counts against the budget.
    """

    def __init__(self, policy: HedgePolicy | None = None, clock: Clock = time.monotonic):
        self.policy = policy or HedgePolicy()
        self._clock = clock
        self._samples: dict[tuple[str, int], deque[tuple[float, float]]] = {}
        self._sorted: dict[tuple[str, int], list[float]] = {}
        self._transfers: dict[str, deque[float]] = {}
        self._hedges: dict[str, deque[float]] = {}

    def record(self, kind: str, nbytes: int, seconds: float) -> None:
        now = self._clock()
        key = (kind, _size_class(nbytes))
        samples = self._samples.setdefault(key, deque(maxlen=self.policy.window))
        samples.append((now, max(0.0, seconds)))
        self._sorted.pop(key, None)
        self._times(self._transfers, kind).append(now)

    def delay(self, kind: str, nbytes: int) -> float:
        """Seconds after which a transfer of `nbytes` from `kind` counts as a straggler."""
        p = self.policy
        key = (kind, _size_class(nbytes))
        samples = self._recent(key)
        if len(samples) < p.min_samples:
            return p.default
        ordered = self._sorted.get(key)
        if ordered is None:
            ordered = self._sorted[key] = sorted(t for _, t in samples)
        rank = min(len(ordered) - 1, max(0, math.ceil(p.quantile * len(ordered)) - 1))
        return max(p.floor, p.factor * ordered[rank])

    def should_hedge(self, kind: str, nbytes: int, elapsed: float) -> bool:
        """A transfer of `nbytes` from `kind` running for `elapsed` seconds should be
        requested a second time elsewhere (if another holder exists), within the budget."""
        if elapsed < self.delay(kind, nbytes):
            return False
        transfers = len(self._prune(self._times(self._transfers, kind)))
        hedges = len(self._prune(self._times(self._hedges, kind)))
        return hedges < self.policy.budget * transfers + 1

    def outlasts_fresh(
        self,
        kind: str,
        nbytes: int,
        left: int,
        rate: float,
        beside: Sequence[float] = (),
        average: float | None = None,
    ) -> bool:
        """Whether a transfer of `nbytes` from `kind` with `left` bytes to go, receiving
        `rate` bytes/s lately (`average` since it began), would still take longer than a
        fresh one is expected to (the straggler delay over its factor: the quantile
        itself). A transfer that is slow but about to finish, as every transfer is on a
        link they share, is no straggler: a second request would only take the same
        link's bytes twice. A stalled one always is.

        While too few transfers are known to say what a fresh one takes, the default is a
        guess, and at N=8 on links every read shares it had nodes ask the origin twice (it
        sent 1.02-1.03x the dataset). Then the evidence is the average rates of the
        transfers of `kind` running `beside` it: a straggler receives less than their
        median over the factor (a trickling connection; one as fast as the rest is
        waited for). Alone, only its own pace says anything (the better of its recent rate
        and its average, so that one slow look on a busy machine does not count): it is a
        straggler if that pace leaves it more than `factor` straggler delays to go."""
        if left <= 0:
            return False
        if rate <= 0:
            return True  # stalled
        delay, factor = self.delay(kind, nbytes), self.policy.factor
        if self.known(kind, nbytes):
            return left / rate > delay / factor
        if beside:
            rates = sorted(beside)
            return (rate if average is None else average) * factor < rates[len(rates) // 2]
        pace = rate if average is None else max(rate, average)  # one slow look is no trend
        return left / pace > delay * factor

    def known(self, kind: str, nbytes: int) -> bool:
        """Whether enough recent transfers of the kind and size are known for `delay` to
        come from them rather than the default."""
        return len(self._recent((kind, _size_class(nbytes)))) >= self.policy.min_samples

    def _recent(self, key: tuple[str, int]) -> deque[tuple[float, float]]:
        """The samples of a kind and size class within `max_age` (older ones dropped)."""
        samples = self._samples.get(key)
        if not samples:
            return deque()
        cutoff = self._clock() - self.policy.max_age
        while samples and samples[0][0] < cutoff:
            samples.popleft()
            self._sorted.pop(key, None)
        return samples

    def hedged(self, kind: str) -> None:
        """A second request was sent for a straggler of `kind`."""
        self._times(self._hedges, kind).append(self._clock())

    def unhedged(self, kind: str) -> None:
        """The latest second request for a straggler of `kind` brought nothing (refused,
        or no stream was free for it): it leaves the budget again."""
        hedges = self._hedges.get(kind)
        if hedges:
            hedges.pop()

    def _times(self, table: dict[str, deque[float]], kind: str) -> deque[float]:
        return table.setdefault(kind, deque(maxlen=4 * self.policy.window))

    def _prune(self, times: deque[float]) -> deque[float]:
        cutoff = self._clock() - self.policy.max_age
        while times and times[0] < cutoff:
            times.popleft()
        return times
