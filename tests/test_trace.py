"""Access traces: recording first reads as runs, the bound, the wire form checked against
the manifest (a trace comes from a node), and the prefetch order a trace implies."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncbit.errors import UserError
from syncbit.manifest import FileEntry, Manifest
from syncbit.trace import AccessTrace, Run, TraceRecorder, prefetch_order

CS = 100


def manifest(*sizes: int, revision: str = "r1") -> Manifest:
    files = [
        FileEntry(path=f"f{n}", size=size, object=f"o{n}", locator=f"f{n}")
        for n, size in enumerate(sizes)
    ]
    return Manifest(dataset="d", source="file:///x", revision=revision, chunk_size=CS, files=files)


def test_sequential_reads_make_one_run_per_file_in_read_order() -> None:
    m = manifest(1000, 450)
    rec = TraceRecorder(m)
    rec.record("f1", 0, 50)  # the header of the second file first, as safetensors does
    for offset in range(0, 1000, 64):
        rec.record("f0", offset, 64)
    rec.record("f1", 50, 400)
    assert rec.trace().runs == (Run("f1", 0, 0), Run("f0", 0, 9), Run("f1", 1, 4))
    assert rec.trace().complete and rec.full


def test_rereads_and_unknown_files_record_nothing() -> None:
    m = manifest(1000)
    rec = TraceRecorder(m)
    rec.record("f0", 500, 10)
    rec.record("f0", 500, 10)
    rec.record("f0", 0, 10)
    rec.record("nope", 0, 10)
    rec.record("f0", 2000, 10)  # past the end
    rec.record("f0", 10, 0)
    assert rec.trace().runs == (Run("f0", 5, 5), Run("f0", 0, 0))
    assert not rec.trace().complete


def test_recording_stops_at_the_bound() -> None:
    m = manifest(100_000)
    rec = TraceRecorder(m, max_runs=3)
    for index in (10, 20, 30, 40, 50):  # random access: one run per read
        rec.record("f0", index * CS, 1)
    assert len(rec) == 3 and rec.stopped and rec.full
    assert not rec.trace().complete
    rec.record("f0", 0, 1)
    assert len(rec) == 3


def test_the_wire_form_round_trips() -> None:
    m = manifest(1000, 450)
    trace = AccessTrace("r1", (Run("f1", 0, 0), Run("f0", 0, 9)), complete=False)
    doc = json.loads(json.dumps(trace.to_doc()))
    assert AccessTrace.from_doc(doc, m) == trace


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ("runs", "not an access trace"),
        ({"format": 2, "revision": "r1", "runs": []}, "not an access trace"),
        ({"format": 1, "revision": "r0", "runs": []}, "is at 'r1'"),
        ({"format": 1, "revision": "r1", "runs": {}}, "a list of at most"),
        ({"format": 1, "revision": "r1", "runs": [["f0", 0, 0]] * 5}, "a list of at most 4"),
        ({"format": 1, "revision": "r1", "runs": [["f0", 0]]}, "[path, first, last]"),
        ({"format": 1, "revision": "r1", "runs": [["f0", 0, True]]}, "[path, first, last]"),
        ({"format": 1, "revision": "r1", "runs": [["f0", "0", 1]]}, "[path, first, last]"),
        ({"format": 1, "revision": "r1", "runs": [["../etc", 0, 0]]}, "not a file of it"),
        ({"format": 1, "revision": "r1", "runs": [["f0", 3, 2]]}, "outside"),
        ({"format": 1, "revision": "r1", "runs": [["f0", -1, 2]]}, "outside"),
        ({"format": 1, "revision": "r1", "runs": [["f0", 0, 10]]}, "outside 'f0' (10 chunks)"),
    ],
)
def test_a_bad_trace_from_a_node_is_refused(doc: object, says: str) -> None:
    with pytest.raises(UserError) as info:
        AccessTrace.from_doc(doc, manifest(1000), max_runs=4)
    assert says in str(info.value)


def test_prefetch_follows_the_trace_then_the_files_it_names_then_the_rest() -> None:
    m = manifest(1000, 450, 0, 1000, 300)
    trace = AccessTrace("r1", (Run("f1", 0, 0), Run("f3", 4, 6), Run("f1", 0, 2)))
    order = [(e.path, r) for e, r in prefetch_order(m, trace)]
    assert order == [
        ("f1", range(0, 1)),
        ("f3", range(4, 7)),
        ("f1", range(1, 3)),  # chunk 0 came already
        # The rest of the files the trace names, in the order it first names them (a
        # trace cut short still says which files the loader wants)...
        ("f1", range(3, 5)),
        ("f3", range(0, 4)),
        ("f3", range(7, 10)),
        # ...then the others in manifest order.
        ("f0", range(0, 10)),
        ("f4", range(0, 3)),
    ]
    assert [(e.path, r) for e, r in prefetch_order(m, None)] == [
        ("f0", range(0, 10)),
        ("f1", range(0, 5)),
        ("f3", range(0, 10)),
        ("f4", range(0, 3)),
    ]


sizes = st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=5)


@given(
    sizes=sizes,
    reads=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2100), st.integers(1, 700))),
)
def test_any_trace_orders_every_chunk_exactly_once(
    sizes: list[int], reads: list[tuple[int, int, int]]
) -> None:
    m = manifest(*sizes)
    rec = TraceRecorder(m, max_runs=6)
    for file, offset, length in reads:
        rec.record(f"f{file}", offset, length)
    trace = AccessTrace.from_doc(rec.trace().to_doc(), m, max_runs=6)
    order = [(e.path, i) for e, r in prefetch_order(m, trace) for i in r]
    every = [(f.path, i) for f in m.files for i in range(-(-f.size // CS))]
    assert sorted(order) == sorted(every) and len(order) == len(set(order))
    first = [(run.path, i) for run in trace.runs for i in range(run.first, run.last + 1)]
    assert order[: len(first)] == first  # recorded chunks are never repeated in a trace
