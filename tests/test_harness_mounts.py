"""The integration harness's "is our daemon's mount up" check, against the race that made
a restart after `kill -9` flaky: the new daemon detaches the dead mount before it mounts
its own, so a listing taken after the mount table showed the dead mount may be the bare
directory's (empty, and it answers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from integration import cluster
from integration.cluster import MountEntry

FUSE = MountEntry(41, "0:52", "fuse.syncbit")


def _tables(monkeypatch: pytest.MonkeyPatch, *tables: list[MountEntry]) -> None:
    """`mount_entries` answers these, one per call."""
    answers: Iterator[list[MountEntry]] = iter(tables)
    monkeypatch.setattr(cluster, "mount_entries", lambda path: next(answers))


def test_a_mount_detached_during_the_listing_is_not_taken_for_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dead mount is in the table, then gone: the listing was the bare directory's.
    _tables(monkeypatch, [FUSE], [])
    assert not cluster.fuse_mount_answers(tmp_path)


def test_a_mount_in_the_table_before_and_after_a_listing_that_worked_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tables(monkeypatch, [FUSE], [FUSE])
    assert cluster.fuse_mount_answers(tmp_path)
    _tables(monkeypatch, [])  # nothing mounted: not even listed
    assert not cluster.fuse_mount_answers(tmp_path)
    ext4 = MountEntry(42, "8:1", "ext4")
    _tables(monkeypatch, [FUSE, ext4])  # something else mounted over it
    assert not cluster.fuse_mount_answers(tmp_path)
