"""bench/origin.py's reading of a pull's transfer alone from the daemon's log: from the
dataset registered (the embedded scheduler's line) to the pull complete (the daemon's),
so the benchmark shows what the pull spent beyond what boto3's call or hf_transfer, timed
without their start and listing, are compared on."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchload import load_bench

origin = load_bench("origin", "bench_origin")

LOG = (
    "2026-12-07 16:14:26,087 INFO syncbit.sources: S3 and Hub clients warmed up in 0.35s\n"
    "2026-12-07 16:14:27,857 INFO syncbit.scheduler: dataset other added: revision 1, 1 files\n"
    "2026-12-07 16:14:27,900 INFO syncbit.scheduler: dataset bench added: revision a24e, 1 files,"
    " 1073741824 bytes from s3://bench/1024m/ (generation 2)\n"
    "2026-12-07 16:14:27,905 INFO syncbit.daemon: datasets: bench\n"
    "  a continuation line without a time\n"
    "2026-12-07 16:14:30,048 INFO syncbit.fetch.jobs: pull of bench: complete\n"
    "2026-12-07 16:14:31,000 INFO syncbit.fetch.jobs: pull of other: complete\n"
)


def test_the_span_from_registered_to_complete(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    log.write_text(LOG)
    assert origin.transfer_seconds(log, "bench") == pytest.approx(2.148, abs=1e-6)
    assert origin.transfer_seconds(log, "other") == pytest.approx(3.143, abs=1e-6)


@pytest.mark.parametrize(
    "drop", ["dataset bench added", "pull of bench: complete"], ids=["unregistered", "unfinished"]
)
def test_no_span_without_both_lines(tmp_path: Path, drop: str) -> None:
    log = tmp_path / "daemon.log"
    log.write_text("".join(line for line in LOG.splitlines(True) if drop not in line))
    assert origin.transfer_seconds(log, "bench") is None
