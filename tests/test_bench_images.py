"""bench/images.py's reading of `ctr images pull`'s own timing: how long the fetch took
(its last progress line) and the unpack (its `done: <Go duration>`), so the benchmark
reports where a pull's time went, not only its total."""

from __future__ import annotations

import pytest
from benchload import load_bench

images = load_bench("images")

# What ctr 1.6 prints (progress frames with colour codes, then the unpack), shortened.
PULL = (
    "layer-sha256:355a02e0a1b0:    downloading    |\x1b[32m\x1b[0m---|    0.0 B/128.0 MiB \n"
    "elapsed: 0.1 s                total:  1.5 Ki (14.3 KiB/s)\n"
    "layer-sha256:355a02e0a1b0:    done           |\x1b[32m+++\x1b[0m| \n"
    "elapsed: 26.0s                total:  1.0 Gi (39.4 MiB/s)\n"
    "unpacking linux/amd64 sha256:b0edbb14e85d...\n"
)


@pytest.mark.parametrize(
    ("done", "unpack"),
    [("5.59240248s", 5.59240248), ("812.5ms", 0.8125), ("1m2.5s", 62.5), ("1h0m1s", 3601.0)],
)
def test_ctr_timing_splits_a_pull_into_fetch_and_unpack(done: str, unpack: float) -> None:
    assert images.ctr_timing(f"{PULL}done: {done}\t\n") == (26.0, pytest.approx(unpack))


def test_a_pull_without_an_unpack_has_no_split() -> None:
    assert images.ctr_timing(PULL) is None
    assert images.ctr_timing("ctr: failed to resolve reference\n") is None
