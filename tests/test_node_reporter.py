"""Heartbeats while the scheduler does not answer: less often the longer it stays down,
jittered so nodes do not return in step, never more than four intervals apart (a scheduler
back from a restart hears from every node well within its node timeout)."""

from __future__ import annotations

import itertools
import random

from syncbit.node.reporter import heartbeat_delays


def test_heartbeats_back_off_within_four_intervals() -> None:
    random.seed(3)
    delays = list(itertools.islice(heartbeat_delays(2.0), 200))
    assert all(2.0 <= d <= 8.0 for d in delays)
    assert delays[0] <= 4.0  # the first retry: at most two intervals
    assert max(delays[2:]) > 6.0  # later ones stretch towards four
    assert len(set(delays)) == len(delays)  # jittered: no two nodes in step
