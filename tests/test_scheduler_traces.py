"""Access traces at the scheduler: kept with the dataset's revision, the first one wins,
checked against the manifest, none for a dataset added with tracing off."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fakes import MemSource
from test_scheduler_api import OBJ_A, OBJ_B, listing

from syncbit.errors import NotFoundError, UserError
from syncbit.scheduler import SchedulerClient

# a.bin: 10 bytes, 3 chunks of 4; dir/b.bin: 8 bytes, 2 chunks.
FILES = {"a.bin": (10, OBJ_A), "dir/b.bin": (8, OBJ_B)}


@pytest.fixture(autouse=True)
def sources() -> Iterator[None]:
    with MemSource.serving({"mem://one/": listing("mem://one/", FILES)}):
        yield


def _doc(revision: str, runs: list[list[Any]]) -> dict[str, Any]:
    return {"format": 1, "revision": revision, "complete": False, "runs": runs}


async def test_the_first_trace_of_a_revision_is_kept_and_shown(client: SchedulerClient) -> None:
    revision = (await client.add_dataset("ds", "mem://one/"))["dataset"]["revision"]
    assert await client.trace("ds") == {"dataset": "ds", "revision": revision, "trace": None}
    first = _doc(revision, [["dir/b.bin", 0, 1], ["a.bin", 2, 2]])
    put = await client.put_trace("ds", "n1", first)
    assert put["stored"] is True
    assert put["trace"]["node"] == "n1" and put["trace"]["runs"] == 2
    assert put["trace"]["trace"] == first
    # A second node's recording of the same revision: the first one stays.
    later = await client.put_trace("ds", "n2", _doc(revision, [["a.bin", 0, 2]]))
    assert later["stored"] is False and later["trace"]["node"] == "n1"
    shown = await client.trace("ds")
    assert shown["trace"]["trace"] == first and shown["revision"] == revision


async def test_a_trace_that_does_not_fit_the_manifest_is_refused(client: SchedulerClient) -> None:
    revision = (await client.add_dataset("ds", "mem://one/"))["dataset"]["revision"]
    bad: list[tuple[dict[str, Any], str]] = [
        (_doc(revision, [["nope.bin", 0, 0]]), "not a file of it"),
        (_doc(revision, [["a.bin", 0, 3]]), "outside"),
        (_doc("0" * 16, [["a.bin", 0, 0]]), "revision"),
        (_doc(revision, [["a.bin", 0, 0]] * 5000), "at most"),
        ({"format": 2}, "not an access trace"),
    ]
    for doc, why in bad:
        with pytest.raises(UserError, match=why):
            await client.put_trace("ds", "n1", doc)
    assert (await client.trace("ds"))["trace"] is None
    with pytest.raises(NotFoundError):
        await client.trace("gone")


async def test_a_new_revision_or_tracing_off_has_no_trace(client: SchedulerClient) -> None:
    revision = (await client.add_dataset("ds", "mem://one/"))["dataset"]["revision"]
    await client.put_trace("ds", "n1", _doc(revision, [["a.bin", 0, 0]]))
    # The source changed: a new revision, whose trace is still to come.
    MemSource.listings["mem://one/"] = listing("mem://one/", {"a.bin": (12, "c" * 64)})
    newer = (await client.add_dataset("ds", "mem://one/"))["dataset"]["revision"]
    assert newer != revision
    assert (await client.trace("ds"))["trace"] is None
    with pytest.raises(UserError, match="is for revision"):  # a node that read the old one
        await client.put_trace("ds", "n1", _doc(revision, [["a.bin", 0, 0]]))
    assert (await client.put_trace("ds", "n1", _doc(newer, [["a.bin", 1, 2]])))["stored"]
    MemSource.listings["mem://off/"] = listing("mem://off/", {"a.bin": (10, "d" * 64)})
    await client.add_dataset("off", "mem://off/", {"trace": "off"})
    off = (await client.trace("off"))["revision"]
    with pytest.raises(UserError, match="--trace off"):
        await client.put_trace("off", "n1", _doc(off, [["a.bin", 0, 0]]))
