"""The adaptive source concurrency and the hedging policy, on a fake clock against a
simulated origin (tests/origin_model.py): where the level settles for each kind of origin,
how throttling, Retry-After and errors move it, and that it stays put once settled."""

from __future__ import annotations

import email.utils
import itertools
from statistics import median

import pytest
from fakes import Clock
from origin_model import KEY, MB, MiB, OriginModel, Simulation

from syncbit.fetch_control import ConcurrencyPolicy, Phase, SourceConcurrency
from syncbit.hedging import HedgePolicy, Hedging
from syncbit.sources.throttle import parse_retry_after, source_key

# An S3-like origin: 100 MB/s per connection, 1.2 GB/s in all (12 streams fill it).
CAPPED = OriginModel(per_connection=100 * MB, total=1200 * MB)
# A server that gives one connection all it has (a fast link, little latency).
UNCAPPED = OriginModel(total=1000 * MB, latency=0.0002)
# Loopback: one stream is the fastest; each extra one only costs CPU.
LOOPBACK = OriginModel(total=2000 * MB, overhead=0.05, latency=0.0001)


def simulate(
    model: OriginModel,
    seconds: float,
    policy: ConcurrencyPolicy | None = None,
    **kwargs: object,
) -> tuple[Simulation, float]:
    clock = Clock(1000.0)
    start = clock.now
    sim = Simulation(SourceConcurrency(policy, clock), model, clock, **kwargs)  # type: ignore[arg-type]
    return sim.run(seconds), start


# -- where it settles ---------------------------------------------------------------------------


def test_settles_at_several_streams_when_each_connection_is_capped() -> None:
    sim, t0 = simulate(CAPPED, 30)
    held = sim.held(t0 + 10)
    assert all(12 <= h <= 18 for h in held), held  # 12 fill the origin; a step above at most
    assert sim.throughput(t0 + 10) >= 0.9 * CAPPED.total


def test_few_streams_when_one_connection_gets_everything() -> None:
    sim, t0 = simulate(UNCAPPED, 30)
    assert set(sim.held(t0 + 5)) == {1}
    assert sim.mean_limit(t0 + 5) <= 1.25  # the periodic probe to 2, nothing more
    assert sim.throughput(t0 + 5) >= 0.9 * UNCAPPED.total


def test_one_stream_when_more_streams_only_cost() -> None:
    sim, t0 = simulate(LOOPBACK, 30)
    assert set(sim.held(t0 + 10)) == {1}
    assert sim.mean_limit(t0 + 10) <= 1.25
    assert sim.throughput(t0 + 10) >= 0.9 * LOOPBACK.rate(1)


def test_latency_is_hidden_by_more_streams() -> None:
    # 16 MiB transfers with 50 ms before the first byte, 60 MB/s per connection: more
    # streams than the bandwidth alone needs (2000/60 = 34) pay for the waiting.
    model = OriginModel(per_connection=60 * MB, total=2000 * MB, latency=0.05)
    sim, t0 = simulate(model, 30, chunk=16 * MiB)
    assert all(34 <= h <= 64 for h in sim.held(t0 + 10))
    assert sim.throughput(t0 + 10) >= 0.85 * model.total


def test_never_above_the_cap_nor_below_one() -> None:
    slow = OriginModel(per_connection=5 * MB)  # every stream adds 5 MB/s, without end
    sim, t0 = simulate(slow, 30)
    limits = sim.limits(t0)
    assert max(limits) == 64 and min(limits) >= 1
    assert set(sim.held(t0 + 10)) == {64}
    sim, t0 = simulate(slow, 30, ConcurrencyPolicy(cap=8))
    assert max(sim.limits(t0)) == 8
    one, t0 = simulate(slow, 10, ConcurrencyPolicy(initial=4, cap=1))
    assert set(one.limits(t0)) == {1}


def test_demand_below_the_limit_does_not_raise_it() -> None:
    # A reader that never keeps more than 3 requests open: the limit grows only as far as
    # a level that paid off, and no probe runs while the slots are not full.
    sim, t0 = simulate(CAPPED, 30, demand=3)
    assert max(sim.limits(t0)) <= 8
    assert set(sim.held(t0 + 5)) == {4}
    assert sim.throughput(t0 + 5) >= 0.95 * 3 * CAPPED.per_connection


def test_follows_an_origin_that_starts_capping_connections() -> None:
    sim, t0 = simulate(UNCAPPED, 20)
    assert sim.held(t0 + 19)[-1] == 1
    sim.model = CAPPED
    sim.run(30)
    assert all(12 <= h <= 18 for h in sim.held(t0 + 40))


def test_no_oscillation_when_the_origin_is_noisy() -> None:
    # Every transfer's rate is off by up to 30%: after settling the held level stays in a
    # band of one step around where it settled, and the limit leaves it only to probe.
    noisy = OriginModel(per_connection=100 * MB, total=1200 * MB, noise=0.3)
    for seed in range(4):
        sim, t0 = simulate(noisy, 120, seed=seed)
        held = sim.held(t0 + 20)
        settled = median(held)
        assert all(0.75 * settled <= h <= 1.34 * settled for h in held), (seed, held)
        changes = sum(1 for a, b in itertools.pairwise(held) if a != b)
        assert changes <= 10, (seed, changes)  # in 100 s
        for _, limit, h in sim.trace:
            assert h - max(1, h // 4) <= limit <= 2 * h  # a step down, or up (x2 in START)
        assert sim.throughput(t0 + 20) >= 0.85 * noisy.total


# -- throttling, Retry-After, errors ----------------------------------------------------------


def test_throttling_shrinks_it_below_the_throttle_point() -> None:
    # The origin answers 503 to any request beyond 8 open at once.
    model = OriginModel(per_connection=100 * MB, total=4000 * MB, throttle_above=8)
    sim, t0 = simulate(model, 130)
    assert sim.throttles
    assert all(4 <= h <= 8 for h in sim.held(t0 + 10))
    # Bursts of refusals (answers closer than a second together are one burst): one while
    # searching, then one per ceiling_memory (60 s) when the ceiling lapses.
    bursts = [t for i, t in enumerate(sim.throttles) if i == 0 or t - sim.throttles[i - 1] > 1]
    assert len([t for t in bursts if t >= t0 + 10]) <= 3, bursts
    assert sim.throughput(t0 + 10) >= 0.8 * 8 * model.per_connection


def test_retry_after_holds_every_new_request() -> None:
    clock = Clock(1000.0)
    ctl = SourceConcurrency(ConcurrencyPolicy(initial=8), clock)
    for _ in range(4):
        ctl.started(KEY)
    ctl.throttled(KEY, retry_after=2.5)
    for _ in range(3):
        ctl.cancelled(KEY)
    assert ctl.delay(KEY) == pytest.approx(2.5)
    assert ctl.limit(KEY) == 6 and ctl.in_flight(KEY) == 0
    assert not ctl.may_start(KEY)  # slots free, but the origin asked for a pause
    clock.now += 1.0
    ctl.started(KEY)  # a request the fetcher had sent before it knew
    ctl.throttled(KEY, retry_after=0.5)  # a shorter one does not shorten the wait
    assert ctl.delay(KEY) == pytest.approx(1.5)
    clock.now += 1.4
    assert not ctl.may_start(KEY)
    clock.now += 0.2
    assert ctl.may_start(KEY) and ctl.delay(KEY) == 0
    ctl.started(KEY)
    ctl.throttled(KEY, retry_after=86400)  # a day: cut to max_retry_after
    assert ctl.delay(KEY) == pytest.approx(ctl.policy.max_retry_after)


def test_no_request_starts_inside_a_retry_after() -> None:
    model = OriginModel(per_connection=100 * MB, total=4000 * MB, throttle_above=6, retry_after=1.5)
    sim, _ = simulate(model, 120)
    assert sim.throttles
    for refused in sim.throttles:
        assert not [s for s in sim.starts if refused < s < refused + 1.5 - 1e-9], refused


def test_a_burst_of_throttles_cuts_once() -> None:
    clock = Clock(1000.0)
    ctl = SourceConcurrency(ConcurrencyPolicy(initial=16), clock)
    for _ in range(16):
        ctl.started(KEY)
    for _ in range(16):  # every request open was refused at once
        ctl.throttled(KEY)
    assert ctl.limit(KEY) == 11  # 16 x 0.7, rounded
    stats = ctl.stats(KEY)
    assert stats.throttles == 16 and stats.in_flight == 0 and stats.phase is Phase.HOLD
    clock.now += ctl.policy.min_epoch
    ctl.started(KEY)
    ctl.throttled(KEY)  # a later answer is news: cut again
    assert ctl.limit(KEY) == 8


def test_answers_to_requests_sent_before_a_cut_never_cut_again() -> None:
    """An origin that takes 4 connections: at level 4 (with a fifth for a head sample)
    two requests are refused, the second answer a transfer time after the first. It
    cuts once, to 3 under a ceiling of 3; the second answer, for a request sent before
    the cut, leaves it there (it used to cut again, down to 1 under a ceiling of 1 for a
    minute at the factor of the time)."""
    clock = Clock(1000.0)
    ctl = SourceConcurrency(ConcurrencyPolicy(initial=4), clock)
    sent = [ctl.started(KEY) for _ in range(4)]
    clock.now += 0.1
    ctl.throttled(KEY, sent=sent[0])
    assert ctl.limit(KEY) == 3
    clock.now += 1.0  # well past a transfer time and min_epoch
    ctl.throttled(KEY, sent=sent[1])
    ctl.failed(KEY, sent=sent[2])  # a failure of the same burst: no cut either
    assert ctl.limit(KEY) == 3
    later = ctl.started(KEY)  # sent at 3: its refusal is news
    clock.now += 0.1
    ctl.throttled(KEY, sent=later)
    assert ctl.limit(KEY) == 2
    # Without knowing when a request went out, a second answer a transfer time later
    # still cuts (the rule before `sent`).
    ctl2 = SourceConcurrency(ConcurrencyPolicy(initial=4), clock)
    for _ in range(4):
        ctl2.started(KEY)
    ctl2.throttled(KEY)
    clock.now += 1.0
    ctl2.throttled(KEY)
    assert ctl2.limit(KEY) == 2


def test_a_cut_takes_at_least_one_stream_and_keeps_one() -> None:
    """A throttle multiplies the level by 0.7, an error by 0.75, each rounded and at
    least one less (never below 1)."""
    clock = Clock(1000.0)
    for level, throttled, failed in ((1, 1, 1), (2, 1, 1), (3, 2, 2), (4, 3, 3), (64, 45, 48)):
        ctl = SourceConcurrency(ConcurrencyPolicy(initial=level), clock)
        ctl.started(KEY)
        ctl.throttled(KEY)
        assert ctl.limit(KEY) == throttled, level
        ctl = SourceConcurrency(ConcurrencyPolicy(initial=level), clock)
        ctl.started(KEY)
        ctl.failed(KEY)
        assert ctl.limit(KEY) == failed, level


def test_throttled_level_is_a_ceiling_for_a_while() -> None:
    clock = Clock(1000.0)
    policy = ConcurrencyPolicy(initial=16)
    ctl = SourceConcurrency(policy, clock)
    ctl.started(KEY)
    ctl.throttled(KEY)  # at 16: 15 is the most it may try for ceiling_memory
    assert ctl.limit(KEY) == 11
    # An origin where every stream pays, so only the ceiling stops the climb.
    sim = Simulation(ctl, OriginModel(per_connection=100 * MB), clock)
    start = clock.now
    sim.run(30)
    assert max(sim.limits(start)) == 15
    sim.pause(policy.ceiling_memory)
    later = clock.now
    sim.run(10)
    assert max(sim.limits(later)) > 15


def test_errors_shrink_it_without_a_ceiling() -> None:
    clock = Clock(1000.0)
    ctl = SourceConcurrency(ConcurrencyPolicy(initial=16), clock)
    ctl.started(KEY)
    ctl.failed(KEY)
    assert ctl.limit(KEY) == 12
    ctl.started(KEY)
    ctl.failed(KEY)  # the same moment: the same cause
    assert ctl.limit(KEY) == 12
    for _ in range(20):
        clock.now += 1
        ctl.started(KEY)
        ctl.failed(KEY)
    assert ctl.limit(KEY) == 1 and ctl.stats(KEY).failures == 22
    assert ctl.delay(KEY) == ConcurrencyPolicy().max_failure_backoff  # held off, capped
    clock.now += ctl.delay(KEY)
    sim = Simulation(ctl, OriginModel(per_connection=100 * MB), clock)
    start = clock.now
    sim.run(20)
    assert max(sim.limits(start)) > 16  # no ceiling: it climbs back past where it was


def test_a_failing_source_is_asked_less_and_less_often_until_it_delivers() -> None:
    clock = Clock(1000.0)
    policy = ConcurrencyPolicy(initial=8, failure_backoff=0.25, max_failure_backoff=4.0)
    ctl = SourceConcurrency(policy, clock)
    waits = []
    for _ in range(8):
        assert ctl.may_start(KEY)
        ctl.started(KEY)
        ctl.throttled(KEY)  # a 503 without Retry-After
        waits.append(ctl.delay(KEY))
        assert not ctl.may_start(KEY)
        clock.now += ctl.delay(KEY)
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    ctl.started(KEY)
    ctl.finished(KEY, MB, 0.1)  # it delivers again: the next refusal starts over
    ctl.started(KEY)
    ctl.failed(KEY)
    assert ctl.delay(KEY) == 0.25
    # A Retry-After says how long itself; the backoff does not add to it.
    clock.now += 1
    ctl.started(KEY)
    ctl.throttled(KEY, retry_after=0.1)
    assert ctl.delay(KEY) == pytest.approx(0.1)


def test_cancelled_requests_free_their_slot_and_teach_nothing() -> None:
    clock = Clock(1000.0)
    ctl = SourceConcurrency(ConcurrencyPolicy(initial=2), clock)
    ctl.started(KEY)
    ctl.started(KEY)
    assert not ctl.may_start(KEY)
    ctl.cancelled(KEY)
    assert ctl.may_start(KEY) and ctl.in_flight(KEY) == 1
    stats = ctl.stats(KEY)
    assert stats.failures == stats.throttles == 0 and stats.stream_rate == 0


def test_sources_are_independent_and_bounded_in_number() -> None:
    clock = Clock(1000.0)
    ctl = SourceConcurrency(ConcurrencyPolicy(initial=8, max_keys=2), clock)
    ctl.started("a")
    ctl.throttled("a")
    assert ctl.limit("a") == 6 and ctl.limit("b") == 8  # 8 x 0.7, rounded
    ctl.started("b")  # "b" busy, "a" idle: a third source makes "a" forgotten
    assert ctl.limit("c") == 8 and ctl.limit("a") == 8
    assert ctl.in_flight("b") == 1  # a source with requests open is never forgotten


def test_reports_what_each_stream_and_the_total_deliver() -> None:
    sim, _ = simulate(CAPPED, 10)
    stats = sim.ctl.stats(KEY)
    assert stats.stream_rate == pytest.approx(CAPPED.per_connection, rel=0.15)
    assert stats.total_rate == pytest.approx(CAPPED.total, rel=0.15)


def test_policy_rejects_nonsense() -> None:
    for bad in (
        {"cap": 0},
        {"initial": 0},
        {"throttle_factor": 1.0},
        {"error_factor": 0.0},
        {"gain": 0.0},
        {"keep": 1.5},
        {"min_epoch": 0.0},
        {"hold_epochs": 0},
        {"max_keys": 0},
        {"failure_backoff": 5.0, "max_failure_backoff": 1.0},
    ):
        with pytest.raises(ValueError):
            ConcurrencyPolicy(**bad)
    with pytest.raises(ValueError):
        HedgePolicy(floor=2.0, default=1.0)
    with pytest.raises(ValueError):
        HedgePolicy(min_samples=200, window=100)


# -- hedging ----------------------------------------------------------------------------------


CHUNK = 4 * MiB


def test_hedge_delay_is_the_recent_p95_with_a_floor() -> None:
    clock = Clock(1000.0)
    hedging = Hedging(HedgePolicy(min_samples=8, floor=0.1, default=1.0), clock)
    assert hedging.delay("peer", CHUNK) == 1.0  # nothing known yet: the default
    for i in range(100):
        hedging.record("peer", CHUNK, 0.01 * (i + 1))  # 0.01 .. 1.00 s
    assert hedging.delay("peer", CHUNK) == pytest.approx(0.95)
    assert hedging.delay("source", CHUNK) == 1.0  # kinds are apart
    fast = Hedging(HedgePolicy(floor=0.1), clock)
    for _ in range(20):
        fast.record("peer", CHUNK, 0.002)
    assert fast.delay("peer", CHUNK) == 0.1


def test_stragglers_are_judged_against_transfers_of_their_size() -> None:
    clock = Clock(1000.0)
    hedging = Hedging(HedgePolicy(floor=0.01), clock)
    for _ in range(20):
        hedging.record("source", 16 * MiB, 0.8)
        hedging.record("source", CHUNK, 0.2)
    assert hedging.delay("source", CHUNK) == pytest.approx(0.2)
    assert hedging.delay("source", 16 * MiB) == pytest.approx(0.8)
    assert hedging.delay("source", CHUNK - 1000) == pytest.approx(0.2)  # same class


def test_should_hedge_a_straggler_within_the_budget() -> None:
    clock = Clock(1000.0)
    hedging = Hedging(HedgePolicy(budget=0.1, floor=0.05), clock)
    for _ in range(30):
        hedging.record("peer", CHUNK, 0.1)
    assert not hedging.should_hedge("peer", CHUNK, 0.09)
    sent = 0
    while hedging.should_hedge("peer", CHUNK, 5.0):
        hedging.hedged("peer")
        sent += 1
        assert sent < 100
    assert sent == 4  # 10% of 30 recent transfers, plus one
    hedging.unhedged("peer")  # the last one brought nothing: it leaves the budget
    assert hedging.should_hedge("peer", CHUNK, 5.0)
    hedging.hedged("peer")
    assert not hedging.should_hedge("peer", CHUNK, 5.0)
    clock.now += hedging.policy.max_age + 1  # budget and samples age out together
    assert hedging.delay("peer", CHUNK) == hedging.policy.default
    assert hedging.should_hedge("peer", CHUNK, hedging.policy.default)


def test_a_transfer_about_to_finish_is_no_straggler() -> None:
    """Past the delay, what decides is the time the transfer still needs at its recent
    rate against what a fresh one takes (the p95), or while that is not known, its rate
    against those running beside it: a slow link shared by every transfer is waited out,
    a stalled or trickling connection is not."""
    clock = Clock(1000.0)
    hedging = Hedging(HedgePolicy(factor=2.0, floor=0.1, default=2.0), clock)
    # Nothing known of a fresh transfer: judged against the transfers running beside it.
    slow = CHUNK / 8.0  # 2 s left
    assert not hedging.outlasts_fresh("source", CHUNK, CHUNK // 4, slow, [slow, slow * 1.5])
    assert hedging.outlasts_fresh("source", CHUNK, CHUNK // 4, slow, [slow * 3, slow * 4, 1.0])
    # ... judged by its average since it began, the steadier figure, when given
    assert not hedging.outlasts_fresh("source", CHUNK, CHUNK // 4, slow, [slow * 3], slow * 2)
    # Alone: a straggler only with more than factor x delay (4 s) to go at its pace.
    assert not hedging.outlasts_fresh("source", CHUNK, CHUNK // 4, slow)
    assert hedging.outlasts_fresh("source", CHUNK, CHUNK // 4, CHUNK / 20.0)  # 5 s left
    # ... one slow look with a steady average (a busy machine, not a trickle): waited for
    assert not hedging.outlasts_fresh("source", CHUNK, CHUNK // 4, CHUNK / 20.0, (), CHUNK / 4.0)
    assert hedging.outlasts_fresh("source", CHUNK, CHUNK // 4, 0.0)  # stalled
    assert not hedging.outlasts_fresh("source", CHUNK, 0, 0.0)  # all there
    assert not hedging.known("source", CHUNK)
    for _ in range(20):
        hedging.record("source", CHUNK, 0.2)  # known now: 0.2 s each
    assert hedging.known("source", CHUNK)
    assert hedging.outlasts_fresh("source", CHUNK, CHUNK // 4, CHUNK / 2.0)  # 0.5 s > 0.2
    assert not hedging.outlasts_fresh("source", CHUNK, CHUNK // 4, CHUNK / 0.5)


def test_old_transfers_stop_counting() -> None:
    clock = Clock(1000.0)
    hedging = Hedging(HedgePolicy(min_samples=4, max_age=10), clock)
    for _ in range(10):
        hedging.record("peer", CHUNK, 2.0)
    clock.now += 5
    for _ in range(10):
        hedging.record("peer", CHUNK, 0.2)
    assert hedging.delay("peer", CHUNK) == pytest.approx(2.0)
    clock.now += 6  # the slow ones are older than max_age now
    assert hedging.delay("peer", CHUNK) == pytest.approx(0.2)


# -- parsers at the boundary ------------------------------------------------------------------


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2024 00:00:00 GMT", "nan"):
        assert parse_retry_after(bad, now=now) is None, bad


def test_source_key_names_the_unit_that_throttles() -> None:
    assert source_key("https://user:pw@Files.Example.com/a/b?x=1") == "https://files.example.com"
    assert source_key("http://127.0.0.1:8080/ds/") == "http://127.0.0.1:8080"
    assert source_key("s3://models/llama/") == "s3://models"
    assert source_key("s3://models/x", "http://127.0.0.1:9000") == "s3://models@127.0.0.1:9000"
    assert source_key("hf://org/model") == "hf@huggingface.co"
    assert source_key("hf://org/model", "http://127.0.0.1:5000") == "hf@127.0.0.1:5000"
    assert source_key("file:///data/x") == "file:"
