"""Digest provenance, disputes, quarantine and broken versions in the scheduler: `Claims`
establish rights and `SchedulerState` on a temporary LMDB, then the routes that carry them
through a real SchedulerServer on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import Clock, MemSource
from schedulerfixtures import CHUNK, TIMEOUT

from syncbit.errors import NotFoundError, UserError
from syncbit.manifest import FileEntry, Manifest, build_manifest
from syncbit.scheduler import SchedulerClient, SchedulerServer
from syncbit.scheduler.claims import Claims
from syncbit.scheduler.state import (
    MAX_DISPUTES,
    RECHECK_TIMEOUT,
    SchedulerState,
    open_lmdb_state,
)
from syncbit.sources import Listing

OBJ_A = "a" * 64
OBJ_B = "b" * 64
OBJ_C = "c" * 64
TRUE = "1" * 64  # what the source holds
FALSE = "2" * 64  # what a liar says
OTHER = "3" * 64


@pytest.fixture
async def state(tmp_path: Path, clock: Clock) -> AsyncIterator[SchedulerState]:
    async with open_lmdb_state(tmp_path / "state", TIMEOUT, clock=clock) as st:
        yield st


def dataset(name: str = "ds", files: dict[str, tuple[int, str]] | None = None) -> Manifest:
    files = files or {"a.bin": (3 * CHUNK, OBJ_A), "b.bin": (CHUNK, OBJ_B)}
    entries = [
        FileEntry(path=p, size=size, object=obj, locator=p) for p, (size, obj) in files.items()
    ]
    return build_manifest(name, f"mem://{name}/", entries, chunk_size=CHUNK)


async def nodes(state: SchedulerState, *names: str) -> None:
    for i, name in enumerate(names):
        await state.heartbeat(name, f"127.0.0.1:{i + 1}")


async def establish(state: SchedulerState, node: str, obj: str, chunks: dict[int, str]) -> None:
    """`node` was granted the source reads of `chunks` and reports them."""
    size = 3 * CHUNK if obj == OBJ_A else CHUNK
    report = await state.chunks.add_chunks(
        node, obj, size, CHUNK, sorted(chunks.items()), set(chunks)
    )
    assert (report.conflicts, report.refused) == ([], [])


def peers(state: SchedulerState, obj: str, index: int) -> list[str]:
    return [p["node"] for p in state.chunk_map(obj)["peers"].get(index, [])]


# -- claims: who may establish --------------------------------------------------------------


def test_a_grant_is_the_right_to_establish_until_reported_or_lapsed() -> None:
    now = [0.0]
    claims = Claims(clock=lambda: now[0], grace=100)
    assert claims.claim("n1", OBJ_A, [0, 1, 2], ttl=10, up={"n1"}) == ([0, 1, 2], {})
    assert claims.may_establish("n1", OBJ_A, [0, 1, 2, 3]) == {0, 1, 2}
    assert claims.may_establish("n2", OBJ_A, [0, 1, 2]) == set()
    claims.release("n1", OBJ_A, [0])  # reported (or failed): the right ends with the claim
    assert claims.may_establish("n1", OBJ_A, [0, 1]) == {1}
    now[0] = 50  # the lease lapsed, a slow read still reports within the grace
    assert claims.fetching(OBJ_A, {"n1"}, None) == {}
    assert claims.may_establish("n1", OBJ_A, [1, 2]) == {1, 2}
    # Another node may now claim it too; both hold a right until they report.
    assert claims.claim("n2", OBJ_A, [1], ttl=10, up={"n1", "n2"}) == ([1], {})
    assert claims.may_establish("n2", OBJ_A, [1]) == {1}
    assert claims.may_establish("n1", OBJ_A, [1]) == {1}
    now[0] = 111  # past lease + grace
    assert claims.may_establish("n1", OBJ_A, [1, 2]) == set()
    assert claims.rights() == 3  # lapsed ones linger until the next sweep...
    claims.claim("n3", OBJ_B, [0], ttl=10, up={"n3"})
    assert claims.rights() == 2  # ...n2's (until 160) and n3's new one


def test_a_new_leader_waits_for_reports_then_takes_unclaimed_ones_as_granted() -> None:
    """A replica's new term (`Claims.inherit`): the predecessor's grants are unknown."""
    now = [0.0]
    claims = Claims(clock=lambda: now[0], grace=100)
    assert not claims.settling() and claims.may_establish("n1", OBJ_A, [0]) == set()
    claims.inherit(settle=5)
    assert claims.settling()  # claims wait while the nodes report again
    assert claims.may_establish("n1", OBJ_A, [0, 1]) == {0, 1}  # read under the old leader
    now[0] = 5
    assert not claims.settling()
    assert claims.claim("n2", OBJ_A, [1], ttl=10, up={"n1", "n2"}) == ([1], {})
    assert claims.may_establish("n1", OBJ_A, [0, 1]) == {0}  # 1 is n2's here
    now[0] = 101  # past the grace: grants only, as ever
    assert claims.may_establish("n1", OBJ_A, [0]) == set()


def test_a_quarantined_node_is_granted_reads_but_not_the_right() -> None:
    claims = Claims()
    assert claims.claim("liar", OBJ_A, [0], ttl=10, up={"liar"}, establish=False) == ([0], {})
    assert claims.may_establish("liar", OBJ_A, [0]) == set()


# -- recording digests -------------------------------------------------------------------------


async def status_of(state: SchedulerState) -> dict[str, Any]:
    """What `GET /v1/status` answers, parsed."""
    doc: dict[str, Any] = json.loads(await state.status_json())
    return doc


async def test_digests_nobody_was_granted_are_refused(state: SchedulerState) -> None:
    await state.catalog.put_dataset(dataset())
    await nodes(state, "evil", "n1")
    report = await state.chunks.add_chunks(
        "evil", OBJ_A, 3 * CHUNK, CHUNK, [(0, FALSE), (1, FALSE)]
    )
    assert (report.conflicts, report.refused) == ([], [0, 1])
    assert state.chunk_map(OBJ_A) == {"digests": {}, "peers": {}, "disputed": []}
    # Only the granted chunk is recorded from the granted node.
    report = await state.chunks.add_chunks(
        "n1", OBJ_A, 3 * CHUNK, CHUNK, [(0, TRUE), (1, TRUE)], {0}
    )
    assert (report.conflicts, report.refused) == ([], [1])
    assert state.chunk_map(OBJ_A)["digests"] == {0: TRUE}
    assert peers(state, OBJ_A, 0) == ["n1"]
    # A recorded digest needs no grant to be held: a peer's bytes are checked against it.
    report = await state.chunks.add_chunks("evil", OBJ_A, 3 * CHUNK, CHUNK, [(0, TRUE)])
    assert (report.conflicts, report.refused) == ([], [])
    assert sorted(peers(state, OBJ_A, 0)) == ["evil", "n1"]


async def test_a_conflicting_report_is_disputed_not_outvoted(state: SchedulerState) -> None:
    await state.catalog.put_dataset(dataset())
    await nodes(state, "n1", "n2", "n3", "n4")
    await establish(state, "n1", OBJ_A, {0: TRUE, 1: TRUE})
    await establish(state, "n2", OBJ_A, {2: TRUE})
    await state.chunks.add_chunks("n4", OBJ_A, 3 * CHUNK, CHUNK, [(0, TRUE), (1, TRUE)])
    # Three liars agree with each other: no number of them outweighs the record.
    for liar in ("l1", "l2", "l3"):
        await state.heartbeat(liar, "127.0.0.1:9")
        report = await state.chunks.add_chunks(
            liar, OBJ_A, 3 * CHUNK, CHUNK, [(0, FALSE), (1, FALSE)]
        )
        assert (report.conflicts, report.refused) == ([0, 1], [])
    cmap = state.chunk_map(OBJ_A)
    assert cmap["digests"] == {0: TRUE, 1: TRUE, 2: TRUE}
    assert cmap["disputed"] == [0]  # one dispute per object at a time
    assert 0 not in cmap["peers"]  # nobody's copy is handed out while it is open
    assert sorted(p["node"] for p in cmap["peers"][1]) == ["n1", "n4"]
    (dispute,) = state.trust.disputes()
    assert (dispute["reporter"], dispute["establisher"], dispute["claim"]) == ("l1", "n1", FALSE)
    assert (dispute["dataset"], dispute["path"]) == ("ds", "a.bin")

    # The checker is chosen among the others: never the establisher nor the reporter.
    asked = {
        n: await state.trust.rechecks_for(n) for n in ("n1", "n2", "n3", "n4", "l1", "l2", "l3")
    }
    checkers = [n for n, asks in asked.items() if asks]
    assert len(checkers) == 1 and checkers[0] not in ("n1", "l1")
    checker = checkers[0]
    assert asked[checker] == [{"object": OBJ_A, "chunk": 0, "dataset": "ds", "path": "a.bin"}]
    # Someone who was not asked cannot settle it, however it answers.
    other = next(n for n in ("n2", "n3", "l2") if n != checker)
    assert await state.trust.check(other, OBJ_A, 0, FALSE) == "disputed"
    assert len(state.trust.disputes()) == 1

    assert await state.trust.check(checker, OBJ_A, 0, TRUE) == "reporter-lied"
    assert state.trust.disputes() == []
    assert set(state.facts.quarantine) == {"l1"}
    assert sorted(peers(state, OBJ_A, 0)) == ["n1", "n4"]


async def test_a_lying_establisher_is_quarantined_and_its_digests_forgotten(
    state: SchedulerState,
) -> None:
    await state.catalog.put_dataset(dataset())
    await nodes(state, "evil", "n2", "n3", "n4")
    await establish(state, "evil", OBJ_A, {0: FALSE, 1: OTHER})
    await establish(state, "evil", OBJ_B, {0: OTHER})
    await establish(state, "n4", OBJ_A, {2: TRUE})
    # n4 took chunk 0 from evil (checked against evil's digest) and holds it too.
    await state.chunks.add_chunks("n4", OBJ_A, 3 * CHUNK, CHUNK, [(0, FALSE)])
    generation = state.generation()
    # n2 read chunk 0 from the source: it disagrees, and nothing of n2's is recorded.
    assert await state.trust.check("n2", OBJ_A, 0, TRUE) == "disputed"
    assert await state.trust.check("n2", OBJ_A, 0, TRUE) == "disputed"  # asked again: same dispute
    (checker,) = [n for n in ("n3", "n4") if await state.trust.rechecks_for(n)]
    assert await state.trust.check(checker, OBJ_A, 0, TRUE) == "establisher-lied"

    assert set(state.facts.quarantine) == {"evil"}
    assert state.facts.quarantine["evil"]["reason"].startswith(
        "false digest for chunk 0 of ds/a.bin"
    )
    cmap = state.chunk_map(OBJ_A)
    assert cmap["digests"] == {0: TRUE, 2: TRUE}  # replaced, and evil's other one forgotten
    assert cmap["peers"] == {2: [{"node": "n4", "address": "127.0.0.1:4"}]}
    assert state.chunk_map(OBJ_B)["digests"] == {}
    assert state.generation() > generation  # plans leave evil out
    # n4 held bytes checked against a false digest: it is told to drop them, once.
    assert state.trust.take_notices("n4") == [OBJ_A]
    assert state.trust.take_notices("n4") == []
    # A late report of the revoked bytes is refused (not a new dispute).
    report = await state.chunks.add_chunks("n3", OBJ_A, 3 * CHUNK, CHUNK, [(0, FALSE)])
    assert (report.conflicts, report.refused) == ([], [0])
    assert state.trust.disputes() == []
    assert state.trust.take_notices("n3") == [OBJ_A]
    # evil's own word is dropped from now on.
    assert (
        await state.chunks.add_chunks("evil", OBJ_A, 3 * CHUNK, CHUNK, [(2, TRUE)], {2})
    ).refused == [2]
    assert await state.trust.check("evil", OBJ_A, 2, FALSE) == "dropped"
    state.chunks.report_bad_peer("evil", "n4", OBJ_A, 2, "lies")
    assert peers(state, OBJ_A, 2) == ["n4"]


async def test_a_source_that_changed_breaks_the_file_until_added_again(
    state: SchedulerState,
) -> None:
    first = dataset()
    await state.catalog.put_dataset(first)
    await nodes(state, "n1", "n2", "n3")
    await establish(state, "n1", OBJ_A, {0: TRUE})
    # n2's read found the head changed; n3, asked, finds the same: the source changed.
    assert await state.trust.check("n2", OBJ_A, 1, None, "head differs") == "disputed"
    assert await state.trust.rechecks_for("n2") == []
    asked = [n for n in ("n1", "n3") if await state.trust.rechecks_for(n)]  # n1 did not establish 1
    assert len(asked) == 1
    generation = state.generation()
    assert await state.trust.check(asked[0], OBJ_A, 1, None, "head differs too") == "source-changed"
    assert state.facts.quarantine == {}
    assert state.generation() > generation  # every node learns at once
    assert state.chunk_map(OBJ_A)["broken"].startswith("source changed: head differs too")
    (summary,) = state.catalog.datasets()
    assert [b["path"] for b in summary["broken"]] == ["a.bin"]
    assert [b["path"] for b in (await status_of(state))["datasets"][0]["broken"]] == ["a.bin"]
    assert (
        await state.trust.check("n3", OBJ_A, 2, TRUE) == "source-changed"
    )  # nothing more to settle

    # `dataset add` again with the same listing (an ETag that lies lists the same): the
    # broken file gets a new identity, the other file keeps its own.
    summary, changed = await state.catalog.put_dataset(dataset())
    assert changed and summary["revision"] != first.revision
    files = {f.path: f.object for f in state.catalog.get_dataset("ds").files}
    assert files["b.bin"] == OBJ_B and files["a.bin"] not in (OBJ_A, OBJ_B)
    assert state.chunk_map(files["a.bin"])["digests"] == {}
    assert "broken" not in state.catalog.datasets()[0]
    assert (await status_of(state))["datasets"][0]["broken"] == []


async def test_a_recheck_that_matches_nobody_breaks_the_file(state: SchedulerState) -> None:
    await state.catalog.put_dataset(dataset())
    await nodes(state, "n1", "n2", "n3")
    await establish(state, "n1", OBJ_A, {0: TRUE})
    assert (
        await state.chunks.add_chunks("n2", OBJ_A, 3 * CHUNK, CHUNK, [(0, FALSE)])
    ).conflicts == [0]
    assert await state.trust.rechecks_for("n3") != []
    assert await state.trust.check("n3", OBJ_A, 0, OTHER) == "source-changed"
    assert state.facts.quarantine == {} and OBJ_A in state.facts.broken


async def test_a_false_change_report_quarantines_its_reporter(state: SchedulerState) -> None:
    await state.catalog.put_dataset(dataset())
    await nodes(state, "n1", "n2", "n3")
    assert await state.trust.check("n1", OBJ_B, 0, None, "head differs") == "disputed"
    (checker,) = [n for n in ("n2", "n3") if await state.trust.rechecks_for(n)]
    assert await state.trust.check(checker, OBJ_B, 0, TRUE) == "reporter-lied"
    assert set(state.facts.quarantine) == {"n1"} and state.facts.broken == {}


async def test_checkers_are_replaced_when_silent_or_down(
    state: SchedulerState, clock: Clock
) -> None:
    await state.catalog.put_dataset(dataset())
    await nodes(state, "n1", "n2")
    await establish(state, "n1", OBJ_A, {0: TRUE})
    assert (
        await state.chunks.add_chunks("n2", OBJ_A, 3 * CHUNK, CHUNK, [(0, FALSE)])
    ).conflicts == [0]
    # Nobody but the two parties: the dispute waits (its chunk served by nobody).
    assert await state.trust.rechecks_for("n1") == await state.trust.rechecks_for("n2") == []
    assert state.trust.disputes()[0]["checker"] is None
    await state.heartbeat("n3", "127.0.0.1:3")
    assert len(await state.trust.rechecks_for("n3")) == 1
    await state.heartbeat("n4", "127.0.0.1:4")
    assert await state.trust.rechecks_for("n4") == []  # n3 is asked and has time to answer
    clock.now += RECHECK_TIMEOUT + 1  # n3 never answered (and is down now)
    for name in ("n1", "n2", "n4"):
        await state.heartbeat(name, "127.0.0.1:9")
    assert len(await state.trust.rechecks_for("n4")) == 1
    assert state.trust.disputes()[0]["checker"] == "n4"


async def test_open_disputes_are_bounded_and_pruned(state: SchedulerState) -> None:
    files = {f"f{i}": (CHUNK, f"{i:064x}") for i in range(MAX_DISPUTES + 2)}
    await state.catalog.put_dataset(dataset("many", files))
    await nodes(state, "n1", "n2")
    for i in range(MAX_DISPUTES + 2):
        establish_one = await state.chunks.add_chunks(
            "n1", f"{i:064x}", CHUNK, CHUNK, [(0, TRUE)], {0}
        )
        assert establish_one.refused == []
        await state.chunks.add_chunks("n2", f"{i:064x}", CHUNK, CHUNK, [(0, FALSE)])
    assert len(state.trust.disputes()) == MAX_DISPUTES
    await state.catalog.remove_dataset(
        "many"
    )  # nothing left to protect: nobody could re-check them
    assert state.trust.disputes() == []
    with pytest.raises(UserError, match="a digest or what changed"):
        await state.trust.check("n1", OBJ_A, 0, None, "")


async def test_quarantine_is_visible_keeps_nodes_out_and_is_lifted(
    state: SchedulerState, clock: Clock
) -> None:
    await state.catalog.put_dataset(dataset())
    await state.catalog.add_targets("ds", [{"selector": {}}])
    await nodes(state, "n1", "n2")
    await establish(state, "n1", OBJ_A, {0: TRUE})
    await establish(state, "n2", OBJ_A, {1: TRUE})
    await state.trust.quarantine("n2", "caught lying by hand")
    doc = await status_of(state)
    (n2,) = [n for n in doc["nodes"] if n["name"] == "n2"]
    assert n2["quarantined"]["reason"] == "caught lying by hand"
    assert doc["quarantined"] == [
        {"node": "n2", "since": clock.now, "reason": "caught lying by hand"}
    ]
    assert state.plans()["n1"][0]["members"] == ["n1"]
    assert state.plans()["n2"][0]["members"] == ["n1", "n2"]  # still fetches for itself
    assert state.chunk_map(OBJ_A)["digests"] == {0: TRUE}  # its digest was forgotten
    assert (await state.chunks.add_chunks("n2", OBJ_A, 3 * CHUNK, CHUNK, [(0, TRUE)])).refused == [
        0
    ]
    assert peers(state, OBJ_A, 0) == ["n1"]
    assert await state.trust.rechecks_for("n2") == []
    await state.trust.lift_quarantine("n2")
    with pytest.raises(NotFoundError, match="not quarantined"):
        await state.trust.lift_quarantine("n2")
    await state.chunks.add_chunks("n2", OBJ_A, 3 * CHUNK, CHUNK, [(0, TRUE)])
    assert sorted(peers(state, OBJ_A, 0)) == ["n1", "n2"]
    assert (await status_of(state))["quarantined"] == []


async def test_trust_facts_survive_a_reopen(tmp_path: Path, clock: Clock) -> None:
    async def trust_facts(st: SchedulerState) -> tuple[object, ...]:
        status = await status_of(st)
        broken = [d["broken"] for d in status["datasets"]]
        return st.trust.disputes(), dict(st.facts.quarantine), status["quarantined"], broken

    async with open_lmdb_state(tmp_path / "s", TIMEOUT, clock=clock) as st:
        await st.catalog.put_dataset(dataset())
        await nodes(st, "n1", "n2", "n3")
        await establish(st, "n1", OBJ_A, {0: TRUE})
        await st.chunks.add_chunks("n2", OBJ_A, 3 * CHUNK, CHUNK, [(0, FALSE)])
        await st.trust.quarantine("n3", "by hand")
        await st.trust.check("n1", OBJ_B, 0, None, "head differs")
        before = await trust_facts(st)
    async with open_lmdb_state(tmp_path / "s", TIMEOUT, clock=clock) as st:
        assert await trust_facts(st) == before
        disputes = before[0]
        assert isinstance(disputes, list) and len(disputes) == 2


# -- the routes ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _listed() -> Iterator[None]:
    with MemSource.serving({"mem://ds/": Listing(files=dataset().files)}):
        yield


async def test_routes_grant_record_dispute_and_lift(
    client: SchedulerClient, server: SchedulerServer
) -> None:
    await client.add_dataset("ds", "mem://ds/")
    for i, name in enumerate(("n1", "n2", "n3")):
        await client.heartbeat(name, address=f"127.0.0.1:{i + 1}")
    add = {"object": OBJ_A, "size": 3 * CHUNK, "chunk_size": CHUNK, "chunks": [[0, TRUE]]}
    # Not granted: refused, with or without a claim by someone else.
    answer = await client.report_chunks("n2", add=[add], remove=[])
    assert (answer.conflicts, answer.refused) == ([], [(OBJ_A, 0)])
    assert (await client.claim("n1", OBJ_A, [0], ttl=30)).granted == [0]
    assert (await client.report_chunks("n2", add=[add], remove=[])).refused == [(OBJ_A, 0)]
    assert (await client.report_chunks("n1", add=[add], remove=[])).refused == []
    assert (await client.chunk_map(OBJ_A)).digests == {0: TRUE}

    # n2 read it from the source and disagrees: the heartbeat asks n3 to re-check.
    assert await client.check("n2", OBJ_A, 0, FALSE) == "disputed"
    assert (await client.chunk_map(OBJ_A)).disputed == {0}
    record = await client.heartbeat("n3", address="127.0.0.1:3")
    assert record["rechecks"] == [{"object": OBJ_A, "chunk": 0, "dataset": "ds", "path": "a.bin"}]
    assert await client.check("n3", OBJ_A, 0, TRUE) == "reporter-lied"
    record = await client.heartbeat("n2", address="127.0.0.1:2")
    assert record["quarantined"]["reason"].startswith("false report on chunk 0 of ds/a.bin")
    # A quarantined node's claims give no right (and its reports are dropped anyway).
    assert (await client.claim("n2", OBJ_A, [1], ttl=30)).granted == [1]
    report = {**add, "chunks": [[1, TRUE]]}
    assert (await client.report_chunks("n2", add=[report], remove=[])).refused == [(OBJ_A, 1)]

    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as raw:
        metrics = (await raw.get("/metrics")).text
        resp = await raw.post(f"/v1/objects/{OBJ_A}/checks", json={"node": "n1", "chunk": 0})
        assert resp.status_code == 400 and "a digest or what changed" in resp.json()["error"]
        resp = await raw.post(
            f"/v1/objects/{OBJ_A}/checks", json={"node": "n1", "chunk": 0, "digest": "zz"}
        )
        assert resp.status_code == 400 and "'digest'" in resp.json()["error"]
    assert "syncbit_scheduler_quarantined_nodes 1.0" in metrics
    assert 'syncbit_scheduler_node_quarantined{node="n2"} 1.0' in metrics
    assert 'syncbit_scheduler_refused_digests_total{reason="refused"} 3.0' in metrics

    await client.lift_quarantine("n2")
    with pytest.raises(NotFoundError, match="not quarantined"):
        await client.lift_quarantine("n2")
    assert (await client.status())["quarantined"] == []


async def test_an_establisher_contradicting_itself_means_the_source_changed(
    state: SchedulerState,
) -> None:
    """n1 recorded chunk 0, its cache lost it, and its new source read differs: both reads
    were n1's, so the third node agreeing with the new one proves a change, not a lie."""
    await state.catalog.put_dataset(dataset())
    await nodes(state, "n1", "n2")
    await establish(state, "n1", OBJ_A, {0: TRUE})
    assert await state.trust.check("n1", OBJ_A, 0, OTHER) == "disputed"
    assert await state.trust.rechecks_for("n2") != []
    assert await state.trust.check("n2", OBJ_A, 0, OTHER) == "source-changed"
    assert state.facts.quarantine == {}
    assert "n1 and n2 now read other bytes" in state.facts.broken[OBJ_A]["reason"]


async def test_checks_are_bounded(state: SchedulerState) -> None:
    with pytest.raises(UserError, match="invalid chunk index"):
        await state.trust.check("n1", OBJ_A, 2**32, TRUE)
    await state.catalog.put_dataset(dataset())
    assert await state.trust.check("n1", OBJ_A, 3, None, "head differs") == "ok"  # past its end
    assert await state.trust.check("n1", OBJ_C, 0, None, "head differs") == "ok"  # in no dataset
    assert state.trust.disputes() == []


async def test_a_lie_about_a_source_that_cannot_prove_content_also_breaks_the_file(
    state: SchedulerState,
) -> None:
    """With only a head sample to go by (HTTP), a re-read that agrees with the reporter may
    as well mean the source changed outside the head since the establisher's read: the
    establisher is quarantined, and the file breaks so that no two versions ever mix."""
    entry = FileEntry(path="a.bin", size=3 * CHUNK, object=OBJ_A, locator="a.bin")
    unproven = entry.model_copy(update={"version": {"etag": '"x"', "head": OTHER}})
    await state.catalog.put_dataset(
        build_manifest("web", "mem://web/", [unproven], chunk_size=CHUNK)
    )
    await nodes(state, "n1", "n2", "n3")
    await establish(state, "n1", OBJ_A, {0: FALSE})
    assert await state.trust.check("n2", OBJ_A, 0, TRUE) == "disputed"
    assert await state.trust.rechecks_for("n3") != []  # the only one left to ask
    assert await state.trust.check("n3", OBJ_A, 0, TRUE) == "establisher-lied"
    assert set(state.facts.quarantine) == {"n1"}
    assert "the source may have changed" in state.facts.broken[OBJ_A]["reason"]
