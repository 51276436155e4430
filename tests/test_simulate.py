"""bench/simulate.py's logic: the Kumar-Ross bound, the link model, the figures, and a small
simulated prefetch over the real scheduler planning (bytes conserved, no run beats the
bound, the origin sends each piece once)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from benchload import load_bench

GiB = 2**30
MiB = 2**20


sim = load_bench("simulate")


# -- the Kumar-Ross bound ------------------------------------------------------------------------


def test_bound_is_the_origin_when_its_uplink_is_the_narrowest() -> None:
    # 100 GiB, 10 Gbit/s origin, 25 Gbit/s nodes: the origin must send every byte once.
    size, origin, link = 100 * GiB, 10e9 / 8, 25e9 / 8
    assert sim.kumar_ross(size, 1000, origin, link, link) == pytest.approx(size / origin)
    assert sim.kumar_ross(size, 1000, origin, link, link) == pytest.approx(85.899, rel=1e-4)


def test_bound_is_the_download_when_a_node_link_is_the_narrowest() -> None:
    size = 8 * GiB
    assert sim.kumar_ross(size, 4, 100.0, 10.0, 1000.0) == pytest.approx(size / 10.0)


def test_bound_is_the_total_upload_when_uplinks_are_scarce() -> None:
    # 10 nodes that upload 1 B/s each: N*D bytes leave an uplink of 10 + 10*1 B/s in all.
    size = 1000.0
    assert sim.kumar_ross(size, 10, 10.0, 1e6, 1.0) == pytest.approx(10 * size / 20.0)


def test_bound_with_equal_rates_is_one_transfer_of_the_dataset() -> None:
    # bench/swarm.py's set-up: every link the same rate r, T_min = D / r.
    size, rate = 512 * MiB, 400e6 / 8
    assert sim.kumar_ross(size, 8, rate, rate, rate) == pytest.approx(size / rate)


@pytest.mark.parametrize(
    "args", [(1.0, 0, 1.0, 1.0, 1.0), (1.0, 3, 0.0, 1.0, 1.0), (1.0, 3, 1.0, 0.0, 1.0)]
)
def test_bound_refuses_impossible_set_ups(args: tuple[float, int, float, float, float]) -> None:
    with pytest.raises(ValueError):
        sim.kumar_ross(*args)


# -- the link model ----------------------------------------------------------------------------


def _rates(pairs: list[tuple[int, int]], up: list[float], down: list[float]) -> list[float]:
    src = np.array([s for s, _ in pairs], dtype=np.int64)
    dst = np.array([d for _, d in pairs], dtype=np.int64)
    return [float(r) for r in sim.share_rates(src, dst, np.array(up), np.array(down))]


def test_one_transfer_runs_at_the_slower_end() -> None:
    assert _rates([(0, 1)], [5.0, 9.0], [9.0, 3.0]) == [3.0]
    assert _rates([(0, 1)], [2.0, 9.0], [9.0, 3.0]) == [2.0]


def test_a_sender_splits_its_uplink_evenly() -> None:
    # node 0 sends to 1, 2 and 3, each of which could take 100
    assert _rates([(0, 1), (0, 2), (0, 3)], [9.0, 0, 0, 0], [0, 100.0, 100.0, 100.0]) == [
        3.0,
        3.0,
        3.0,
    ]


def test_a_receiver_scales_its_transfers_to_its_downlink() -> None:
    # 1 and 2 would send 8 and 4 into node 0's downlink of 6: scaled by 1/2 together
    assert _rates([(1, 0), (2, 0)], [0, 8.0, 4.0], [6.0, 0, 0]) == [4.0, 2.0]


def test_the_origin_shares_its_uplink_over_every_source_read() -> None:
    # sender 3 is the origin (uplink 10) reading to nodes 0, 1, 2; node 0 also gets a peer
    # transfer from node 1 (uplink 25) into its downlink of 25: both into node 0 scale
    # down together, the other source reads keep their third of the origin
    rates = _rates([(3, 0), (3, 1), (3, 2), (1, 0)], [25.0, 25.0, 25.0, 10.0], [25.0] * 3)
    assert rates[1:3] == pytest.approx([10 / 3] * 2)
    scale = 25.0 / (10 / 3 + 25.0)
    assert rates[0] == pytest.approx(10 / 3 * scale)
    assert rates[3] == pytest.approx(25.0 * scale)
    assert rates[0] + rates[3] == pytest.approx(25.0)


def test_no_transfers_no_rates() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert len(sim.share_rates(empty, empty, np.ones(2), np.ones(2))) == 0


# -- figures -----------------------------------------------------------------------------------


def test_spread_of_per_node_figures() -> None:
    got = sim.spread([4.0, 1.0, 3.0, 2.0])
    assert got["min"] == 1.0 and got["max"] == 4.0 and got["p50"] == 3.0
    assert got["max_over_mean"] == pytest.approx(4.0 / 2.5)


# -- a small simulated prefetch over the real planning -----------------------------------------


def _small(nodes: int, **kw: Any) -> Any:
    params = sim.Params(
        nodes=nodes,
        size=64 * MiB,
        files=2,
        grain=4 * MiB,
        origin_rate=20 * MiB,
        link_rate=50 * MiB,
        **kw,
    )
    return sim.Sim(params)


def test_every_node_gets_every_byte_and_the_origin_sends_each_once() -> None:
    s = _small(5)
    result = s.run()
    assert not result.stuck
    assert result.ready and all(t < float("inf") for t in result.ready)
    assert result.origin_bytes == 64 * MiB
    assert result.source_reads == result.pieces == 16
    # bytes are conserved: what the nodes received came from the origin or a node's uplink
    assert sum(s.uploaded) + result.origin_bytes == pytest.approx(5 * 64 * MiB)


def test_no_simulated_prefetch_beats_the_bound() -> None:
    for nodes in (1, 2, 7):
        result = _small(nodes).run()
        assert result.last_ready_s >= result.bound_s * (1 - 1e-9)


def test_the_real_plan_makes_every_node_a_member_and_splits_the_source_reads() -> None:
    s = _small(4)
    assert [job.members for job in s.jobs] == [s.names] * 4
    shares = [len(own) for own in s.own]  # pieces each node reads from the source
    assert sum(shares) == s.P and max(shares) - min(shares) <= 1


def test_peers_are_chosen_among_holders_with_a_free_upload_slot() -> None:
    s = _small(3, upload_slots=1)
    s._heartbeat()
    s.visible[0] = [1, 2]
    s.uploads_now[1] = 1  # busy: its only slot is taken
    assert {s._choose_peer(0, 0) for _ in range(20)} == {2}
    s.uploads_now[2] = 1
    assert s._choose_peer(0, 0) is None


def test_swarm_mode_is_swarm_py_set_up() -> None:
    args = sim.parse_args(["--swarm"])
    assert args.counts == [8] and args.files == 1 and args.size == 512 * MiB
    assert args.origin_rate == args.link_rate == 200e6 / 8  # bench/swarm.py's default rate


@pytest.mark.parametrize("text", ["", "0", "10,-1", "ten"])
def test_bad_node_counts_are_a_usage_error(text: str) -> None:
    with pytest.raises(SystemExit) as exc:
        sim.parse_args(["--nodes", text])
    assert exc.value.code == 2


def test_the_grain_is_the_real_chunk_unless_the_run_would_be_too_long() -> None:
    assert sim.default_grain(100 * GiB, 100) == 4 * MiB
    assert sim.default_grain(100 * GiB, 1000) == 16 * MiB
    assert sim.default_grain(100 * GiB, 10_000) == 128 * MiB
    assert sim.default_grain(1 * MiB, 10**9) == 4 * MiB  # never beyond the dataset


def test_first_k_offers_only_the_earliest_holders() -> None:
    s = _small(6, first_k=2)
    s._heartbeat()
    s.visible[0] = [3, 1, 4, 5]  # in the order their reports arrived
    assert {s._choose_peer(0, 0) for _ in range(30)} == {3, 1}
