"""Prefetch on open with a real daemon and mount: an open() of a cold file fetches it whole
in the background (the node's threshold, or the dataset's `--prefetch-on-open`), reads
meanwhile go first, each byte comes from the origin once, and a close before the end stops
it without the file counting as present."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from integration.cluster import (
    CHUNK_SIZE,
    Cluster,
    Dataset,
    Origin,
    fresh_dataset,
    sha256_file,
    wait_until,
)
from syncbit.chunks import HEAD_SAMPLE

CLUSTER_NODES = 1
MiB = 1 << 20
# Larger than what prefetch transfers hold at once (6 source reads of up to 16 MiB): a
# read of a chunk one of them carries waits for it, cap included.
SIZE = 128 * MiB
# Files of 16 MiB or more; the cap keeps a whole-file fetch of SIZE busy for ~8 s, so the
# tests see it under way (foreground reads are not capped); readahead of one chunk, so
# what a small read brings without it stays small.
NODE_CONFIG = {
    "n1": {
        "prefetch_on_open_min_size": "16MiB",
        "prefetch_bandwidth": "16MB",
        "readahead_chunks": 1,
    }
}


def _progress(cluster: Cluster, name: str) -> dict[str, object]:
    url = f"http://{cluster.node('n1').address}/v1/local/datasets/{name}"
    doc: dict[str, object] = httpx.get(url, timeout=10, trust_env=False).json()
    return doc


def _present(cluster: Cluster, name: str) -> int:
    value = _progress(cluster, name)["present_bytes"]
    assert isinstance(value, int)
    return value


def _add(cluster: Cluster, name: str, url: str, *flags: str) -> None:
    done = cluster.cli("dataset", "add", name, url, *flags)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: cluster.node("n1").path(name).is_dir(), 20, f"{name} on n1")


def _big(cluster: Cluster, origin: Origin, root: Path, name: str) -> tuple[Dataset, Path]:
    """A new dataset `name` of one cold file of SIZE bytes; the file's path on the mount."""
    ds = fresh_dataset(root, name, {"big.bin": SIZE})
    _add(cluster, name, origin.url + name + "/")
    return ds, cluster.node("n1").path(name, "big.bin")


def _quiet(origin: Origin, path: str) -> int:
    """The origin's bytes of `path` once they stopped growing (two equal looks 1 s apart)."""
    seen = [-1]

    def settled() -> bool:
        now = origin.served(path)
        same = now == seen[0]
        seen[0] = now
        return same

    wait_until(settled, 60, f"the origin to stop sending {path}", interval=1.0)
    return seen[0]


@pytest.mark.timeout(300)
def test_an_open_fetches_the_cold_file_whole_while_reads_go_first(
    cluster: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds, path = _big(cluster, origin, origin_root, "onopen")
    with open(path, "rb") as f:
        assert len(f.read(4096)) == 4096
        # A read far ahead while the whole-file fetch runs: answered before it ends.
        f.seek(SIZE - 2 * MiB)
        tail = f.read(MiB)
        assert _progress(cluster, "onopen")["ready"] is False
        # Kept open and not read further: the file still arrives whole.
        wait_until(
            lambda: _present(cluster, "onopen") >= SIZE,
            60,
            "the opened file to be fetched whole",
            evidence=lambda: str(_progress(cluster, "onopen")),
        )
    with open(ds.root / "big.bin", "rb") as f:
        f.seek(SIZE - 2 * MiB)
        assert tail == f.read(MiB)
    assert sha256_file(path) == ds.files["big.bin"].sha256
    # Readahead, the far read and the whole-file fetch shared their transfers: each chunk
    # once (a duplicate is 4 MiB), beside the head sample every source read checks.
    served = origin.served("onopen/big.bin")
    assert SIZE <= served <= SIZE + SIZE // CHUNK_SIZE * HEAD_SAMPLE, served


@pytest.mark.timeout(300)
def test_closing_before_the_end_stops_the_fetch_and_the_file_is_not_present(
    cluster: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds, path = _big(cluster, origin, origin_root, "onclose")
    with open(path, "rb") as f:
        assert len(f.read(4096)) == 4096
    sent = _quiet(origin, "onclose/big.bin")
    assert 0 < sent < SIZE
    doc = _progress(cluster, "onclose")
    assert doc["ready"] is False and _present(cluster, "onclose") <= sent, doc
    # What did arrive is good, and the rest comes when read.
    assert sha256_file(path) == ds.files["big.bin"].sha256
    assert _progress(cluster, "onclose")["ready"] is True


@pytest.mark.timeout(300)
def test_off_for_a_dataset_and_below_the_threshold_an_open_fetches_only_what_is_read(
    cluster: Cluster, origin: Origin, origin_root: Path
) -> None:
    fresh_dataset(origin_root, "onoff", {"big.bin": SIZE})
    _add(cluster, "onoff", origin.url + "onoff/", "--prefetch-on-open", "off")
    fresh_dataset(origin_root, "onsmall", {"mid.bin": 12 * MiB})
    _add(cluster, "onsmall", origin.url + "onsmall/")
    for name, rel in (("onoff", "big.bin"), ("onsmall", "mid.bin")):
        with open(cluster.node("n1").path(name, rel), "rb") as f:
            assert len(f.read(4096)) == 4096
            sent = _quiet(origin, f"{name}/{rel}")
        # The chunk read and its readahead (and their head samples) at most, not the file
        # (128 MiB / 12 MiB).
        assert sent <= 2 * CHUNK_SIZE + 4 * HEAD_SAMPLE, (name, sent)
    # A bad value is refused by name, nothing registered.
    bad = cluster.cli("dataset", "add", "onbad", origin.url + "onoff/", "--prefetch-on-open", "x")
    assert bad.returncode == 2 and "prefetch_on_open" in bad.stderr, bad.stderr
