"""What the scheduler keeps in memory and what it writes: heartbeats, loads and holders
never reach the durable store (a store that counts its commits proves it), registrations
arriving together share a commit, plans stay bounded and split each chunk's source read
to exactly one member whatever the cluster's size, and the durable facts load from etcd
as they do from LMDB."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from etcdfixtures import requires_etcd, single_etcd, unique
from fakes import Clock
from schedulerfixtures import CHUNK, TIMEOUT

from integration.etcd_cluster import EtcdCluster
from syncbit.manifest import FileEntry, build_manifest
from syncbit.protocol import MAX_PLAN_MEMBERS, PlanEntry
from syncbit.scheduler.etcd import EtcdClient
from syncbit.scheduler.kv import Check, Commit, Delete, DurableStore, Put
from syncbit.scheduler.kv_etcd import EtcdStore
from syncbit.scheduler.kv_lmdb import LmdbStore
from syncbit.scheduler.state import SchedulerState

OBJ = "ab" * 32
D = "1" * 64


class CountingStore(DurableStore):
    """An LMDB store that counts the commits made through it, and the keys they write."""

    def __init__(self, inner: LmdbStore) -> None:
        self.inner = inner
        self.commits = 0
        self.keys: list[str] = []

    async def commit(
        self, writes: Sequence[Put | Delete], *, checks: Sequence[Check] = (), bump: bool = False
    ) -> Commit:
        self.commits += 1
        self.keys += [w.key for w in writes]
        return await self.inner.commit(writes, checks=checks, bump=bump)

    async def get(self, key: str, *, stale_ok: bool = False) -> Any:
        return await self.inner.get(key, stale_ok=stale_ok)

    async def list_prefix(self, prefix: str, **kwargs: Any) -> Any:
        return await self.inner.list_prefix(prefix, **kwargs)

    async def generation(self, *, stale_ok: bool = False) -> int:
        return await self.inner.generation(stale_ok=stale_ok)

    def watch(self, prefix: str, since: int) -> Any:
        return self.inner.watch(prefix, since)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def counted(tmp_path: Path) -> AsyncIterator[CountingStore]:
    store = CountingStore(await LmdbStore.open(tmp_path / "s"))
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def state(counted: CountingStore, clock: Clock) -> AsyncIterator[SchedulerState]:
    async with SchedulerState.open(counted, TIMEOUT, clock=clock) as st:
        yield st


async def test_heartbeats_write_nothing_durable(
    state: SchedulerState, counted: CountingStore, clock: Clock
) -> None:
    entry = FileEntry(path="f", size=10 * CHUNK, object=OBJ, locator="f")
    await state.catalog.put_dataset(build_manifest("ds", "mem://x/", [entry], chunk_size=CHUNK))
    await state.catalog.add_targets("ds", [{"selector": {}}])
    for i in range(50):
        await state.heartbeat(f"n{i}", f"127.0.0.1:{i + 1}", {"zone": "a"})
    registered = counted.commits
    assert 0 < registered <= 50 + 2
    revision = state.generation()
    # Beats, loads, readiness, a node going down and coming back, a bad-peer report,
    # holders and their drops: all soft.
    for round_ in range(10):
        clock.now += 1.0
        for i in range(50):
            await state.heartbeat(
                f"n{i}",
                f"127.0.0.1:{i + 1}",
                {"zone": "a"},
                load=round_ + i,
                cache_bytes=i,
                ready={"ds": "r1"} if round_ % 2 else {},
                disk_free=round_,
            )
        state.plan(f"n{round_}")
    await state.chunks.add_chunks("n0", OBJ, 10 * CHUNK, CHUNK, [(0, D)], {0})
    established = counted.commits  # the digest: durable, once
    assert established == registered + 1
    await state.chunks.add_chunks("n1", OBJ, 10 * CHUNK, CHUNK, [(0, D)])
    state.chunks.remove_chunks("n1", OBJ, [0])
    state.chunks.report_bad_peer("n2", "n0", OBJ, 0, "slow")
    clock.now += TIMEOUT + 1
    state.tidy()
    await state.heartbeat("n3", "127.0.0.1:4", {"zone": "a"})
    assert counted.commits == established
    assert state.generation() == revision
    # What is durable changes only with what the node says of itself.
    await state.heartbeat("n3", "127.0.0.1:4", {"zone": "b"})
    await state.heartbeat("n4", "127.0.0.1:99", {"zone": "a"})
    assert counted.commits == established + 2
    assert counted.keys[-2:] == ["node/n3", "node/n4"]


async def test_registrations_arriving_together_share_commits(
    state: SchedulerState, counted: CountingStore
) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(300):
            nursery.start_soon(state.heartbeat, f"n{i}", f"127.0.0.1:{i + 1}")
    assert len(state.nodes()) == 300
    assert sorted(k for k in counted.keys if k.startswith("node/")) == sorted(
        f"node/n{i}" for i in range(300)
    )
    assert counted.commits <= 30  # group commits: many registrations per fsync


async def _assigned(state: SchedulerState, nodes: int) -> None:
    entry = FileEntry(path="f", size=1000 * CHUNK, object=OBJ, locator="f")
    await state.catalog.put_dataset(build_manifest("ds", "mem://x/", [entry], chunk_size=CHUNK))
    await state.catalog.add_targets("ds", [{"selector": {"gpu": "yes"}}])
    for i in range(nodes):
        await state.heartbeat(f"n{i:04d}", f"127.0.0.1:{i + 1}", {"gpu": "yes"})
    await state.heartbeat("cpu", "127.0.0.1:9", {"gpu": "no"})


@pytest.mark.parametrize("nodes", [5, MAX_PLAN_MEMBERS + 44])
async def test_plans_share_the_source_reads_and_stay_bounded(
    state: SchedulerState, nodes: int
) -> None:
    await _assigned(state, nodes)
    assert state.plan("cpu") == []
    entries: list[PlanEntry] = [e for i in range(nodes) for e in state.plan(f"n{i:04d}")]
    assert len(entries) == nodes
    assert sorted(e.index for e in entries) == list(range(nodes))
    assert {e.count for e in entries} == {nodes}
    for position in range(3 * nodes):  # each position read from the source by one member
        assert sum(e.may_source(position) for e in entries) == 1
    # The names only while they are few: an answer's size never grows with the cluster.
    named = [len(e.to_json()["members"]) for e in entries]
    assert set(named) == ({nodes} if nodes <= MAX_PLAN_MEMBERS else {0})


async def test_plan_members_follow_liveness_without_a_rebuild(
    state: SchedulerState, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node going down or coming up moves the members of its datasets in O(log n); the
    assignments are computed anew only when the generation moves."""
    await _assigned(state, 20)
    state.plan("n0000")
    rebuilds: list[int] = []
    rebuild = state.planner._rebuild

    def counted() -> None:
        rebuilds.append(state.generation())
        rebuild()

    monkeypatch.setattr(state.planner, "_rebuild", counted)
    clock.now += TIMEOUT / 2
    for i in range(10):
        await state.heartbeat(f"n{i:04d}", f"127.0.0.1:{i + 1}", {"gpu": "yes"})
    clock.now += TIMEOUT / 2 + 1  # n0010..n0019 go down
    (entry,) = state.plan("n0003")
    assert (entry.index, entry.count) == (3, 10)
    await state.heartbeat("n0015", "127.0.0.1:16", {"gpu": "yes"})  # back
    (entry,) = state.plan("n0015")
    assert (entry.index, entry.count) == (10, 11)
    await state.heartbeat("n9999", "127.0.0.1:77", {"gpu": "yes"})  # registers: assigned
    (entry,) = state.plan("n9999")
    assert (entry.index, entry.count) == (11, 12)
    assert rebuilds == []
    await state.catalog.add_targets("ds", [{"node": "cpu"}])
    assert [e.dataset for e in state.plan("cpu")] == ["ds"]
    assert len(rebuilds) == 1


# -- the same state on etcd -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with single_etcd(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@requires_etcd
async def test_the_durable_facts_plug_into_etcd(etcd: EtcdCluster, clock: Clock) -> None:
    """SchedulerState over `kv_etcd.EtcdStore` (what replicated schedulers will use): the
    durable facts written by one instance are what the next one loads."""
    root = unique("sched")
    entry = FileEntry(path="f", size=10 * CHUNK, object=OBJ, locator="f")
    manifest = build_manifest("ds", "mem://x/", [entry], chunk_size=CHUNK)
    async with EtcdClient(etcd.endpoints) as client:
        async with SchedulerState.open(EtcdStore(client, root), TIMEOUT, clock=clock) as st:
            await st.catalog.put_dataset(manifest)
            await st.catalog.add_targets("ds", [{"selector": {"gpu": "yes"}}])
            await st.heartbeat("n1", "127.0.0.1:1", {"gpu": "yes"})
            await st.edit_labels("n1", {"rack": "r7"}, [])
            report = await st.chunks.add_chunks("n1", OBJ, 10 * CHUNK, CHUNK, [(0, D)], {0})
            assert report.refused == report.conflicts == []
            await st.trust.quarantine("n2", "by hand")
            generation = st.generation()
        async with SchedulerState.open(EtcdStore(client, root), TIMEOUT, clock=clock) as again:
            assert again.generation() == generation
            assert again.catalog.get_dataset("ds") == manifest
            assert again.catalog.targets() == {"ds": [{"selector": {"gpu": "yes"}}]}
            (node,) = again.nodes()
            assert node.labels == {"gpu": "yes", "rack": "r7"} and not node.up
            assert again.chunk_map(OBJ)["digests"] == {0: D}
            assert set(again.facts.quarantine) == {"n2"}
            await again.heartbeat("n1", "127.0.0.1:1", {"gpu": "yes"})
            assert [e.dataset for e in again.plan("n1")] == ["ds"]
