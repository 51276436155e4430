"""Leader election on a real 3-member etcd cluster on loopback, contenders in this process:
one leader at a time while leaders lose their etcd member (paused, stopped, killed), a
leader whose lease is revoked stops and is fenced, no quorum means no leader and failing
writes while stale reads work, and everything recovers with the quorum.

Waits are bounded generously (a machine under load is slow); no assertion is about speed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from etcdfixtures import requires_etcd, unique

from integration.etcd_cluster import EtcdCluster
from syncbit.errors import NotLeaderError, StateUnavailableError
from syncbit.scheduler.election import Election
from syncbit.scheduler.etcd import EtcdClient
from syncbit.scheduler.kv_etcd import EtcdStore

pytestmark = requires_etcd

TTL = 2
PATIENCE = 30.0  # seconds any awaited state may take on a loaded machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd3"), size=3) as etcd:
        yield etcd


@pytest.fixture
def etcd(cluster: EtcdCluster) -> EtcdCluster:
    """The cluster with every member an earlier test paused or stopped running again."""
    cluster.ensure_up()
    return cluster


@dataclass
class Tenure:
    """When a contender's `leading()` block ran (trio clock), for which term."""

    who: int
    term: int
    start: float
    end: float = math.inf


@dataclass
class Contenders:
    elections: list[Election]
    tenures: list[Tenure] = field(default_factory=list)

    def leaders(self) -> list[int]:
        return [i for i, e in enumerate(self.elections) if e.is_leader]

    async def wait_leader(self, other_than: int | None = None) -> int:
        """Until exactly one contender leads (another than `other_than`) and its
        `leading()` block runs; its index."""
        with trio.fail_after(PATIENCE):
            while True:
                leaders = self.leaders()
                if len(leaders) == 1 and leaders[0] != other_than and self.tenures:
                    last = self.tenures[-1]
                    if last.who == leaders[0] and last.end == math.inf:
                        return leaders[0]
                await trio.sleep(0.02)

    def assert_one_at_a_time(self) -> None:
        """No two `leading()` blocks ever overlapped, and terms only grow."""
        ordered = sorted(self.tenures, key=lambda t: t.start)
        for before, after in itertools.pairwise(ordered):
            assert before.end <= after.start, f"{before} overlaps {after}"
            assert before.term < after.term or before.who == after.who, (before, after)


async def serve_terms(election: Election, who: int, tenures: list[Tenure]) -> None:
    """What a scheduler does: run the leader's duties inside `leading()`, term after term."""
    while True:
        async with election.leading() as term:
            tenure = Tenure(who, term.revision, trio.current_time())
            tenures.append(tenure)
            try:
                await trio.sleep_forever()
            finally:
                tenure.end = trio.current_time()


async def watch_is_leader(contenders: Contenders) -> None:
    """`is_leader` is never true for two contenders at once."""
    while True:
        assert len(contenders.leaders()) <= 1, contenders.leaders()
        await trio.sleep(0.01)


@asynccontextmanager
async def contenders(
    endpoints: list[list[str]], key: str, ttl: int = TTL, exclusive: bool = True
) -> AsyncIterator[Contenders]:
    """One election per endpoint list, each with a client of its own, serving terms;
    `exclusive`: fail as soon as two contenders say they lead at once."""
    async with AsyncExitStack() as stack:
        elections: list[Election] = []
        for i, urls in enumerate(endpoints):
            client = await stack.enter_async_context(EtcdClient(urls, timeout=3.0))
            election = Election(client, key, f"sched-{i}", f"10.0.0.{i}:7070", ttl)
            elections.append(await stack.enter_async_context(election))
        group = Contenders(elections)
        nursery = await stack.enter_async_context(trio.open_nursery())
        for i, election in enumerate(elections):
            nursery.start_soon(serve_terms, election, i, group.tenures)
        if exclusive:
            nursery.start_soon(watch_is_leader, group)
        try:
            yield group
        finally:
            nursery.cancel_scope.cancel()


async def test_one_leader_at_a_time_while_leaders_lose_their_member(etcd: EtcdCluster) -> None:
    """Each contender talks to one member only. Cut the leader's member off (paused,
    stopped, killed): the leader stops when its lease may expire, and only then does
    another contender lead."""
    own = [[url] for url in etcd.endpoints]
    async with contenders(own, unique("one-at-a-time")) as group:
        for cut in ("pause", "stop", "kill"):
            leader = await group.wait_leader()
            member = etcd.members[leader]
            if cut == "pause":  # a paused raft leader would revoke live leases on resume
                await trio.to_thread.run_sync(etcd.move_leader_away, leader)
            await trio.to_thread.run_sync(
                {"pause": member.pause, "stop": member.stop, "kill": member.cleanup}[cut]
            )
            successor = await group.wait_leader(other_than=leader)
            assert group.tenures[-1].who == successor
            assert not group.elections[leader].is_leader
            await trio.to_thread.run_sync(etcd.ensure_up)
        group.assert_one_at_a_time()
        assert len({t.term for t in group.tenures}) >= 4


async def test_leader_sees_itself_and_followers_see_the_leader(etcd: EtcdCluster) -> None:
    async with contenders([etcd.endpoints] * 3, unique("observe")) as group:
        leader = await group.wait_leader()
        elected = group.elections[leader]
        with trio.fail_after(PATIENCE):
            while not all(e.leader == elected.leader for e in group.elections):
                await trio.sleep(0.02)
        assert elected.leader is not None
        assert (elected.leader.id, elected.leader.address) == (
            f"sched-{leader}",
            f"10.0.0.{leader}:7070",
        )
        follower = group.elections[(leader + 1) % 3]
        assert follower.term is None
        with pytest.raises(NotLeaderError) as info:
            follower.fence()
        assert info.value.leader == f"10.0.0.{leader}:7070"


async def test_revoked_lease_ends_the_term_and_fences_its_writes(etcd: EtcdCluster) -> None:
    root = unique("revoked")
    async with (
        contenders([etcd.endpoints] * 3, root + "leader", exclusive=False) as group,
        EtcdClient(etcd.endpoints) as admin,
    ):
        leader = await group.wait_leader()
        election = group.elections[leader]
        term = election.term
        assert term is not None
        store = EtcdStore(election.client, root=root, fence=term.fence)
        await store.put("datasets/a", b"by the leader")

        lease = election._lease
        assert lease is not None
        await admin.lease_revoke(lease.id)  # behind the leader's back
        with trio.fail_after(PATIENCE):
            await term.lost.wait()
            while group.tenures[0].end == math.inf:  # its leading() block is cancelled
                await trio.sleep(0.01)
        assert not election.is_leader or election.term is not term
        with pytest.raises(NotLeaderError):
            await store.put("datasets/a", b"from a term that ended")
        entry = await store.get("datasets/a")
        assert entry is not None and entry.value == b"by the leader"

        # Someone (maybe the same replica) leads a new term. For a moment both may have
        # believed they lead (a revocation reaches each through its own watch): the fence
        # above is what keeps the old term out.
        await group.wait_leader()
        assert group.tenures[-1].term > term.revision


async def test_resigning_on_exit_frees_the_office(etcd: EtcdCluster) -> None:
    key = unique("resign")
    async with EtcdClient(etcd.endpoints) as client:
        async with Election(client, key, "only", "10.0.0.9:7070", TTL) as election:
            term = await election.wait_leading()
            lease = election._lease
            assert lease is not None
        assert term.lost.is_set() and not election.is_leader
        assert await client.get(key.encode()) is None
        assert await client.lease_ttl(lease.id) == -1


async def test_no_quorum_no_leader_writes_fail_stale_reads_work_then_recover(
    etcd: EtcdCluster,
) -> None:
    root = unique("quorum")
    async with (
        contenders([etcd.endpoints] * 3, root + "leader") as group,
        EtcdClient(etcd.endpoints, timeout=3.0) as client,
    ):
        store = EtcdStore(client, root=root)
        await store.put("datasets/a", b"kept")
        await group.wait_leader()

        await trio.to_thread.run_sync(etcd.stop, 1, 2)
        with trio.fail_after(PATIENCE):  # the leader cannot renew its lease: it stops
            while group.leaders():
                await trio.sleep(0.05)
        with pytest.raises(StateUnavailableError, match="unavailable") as info:
            await store.put("datasets/b", b"lost?")
        assert "\n" not in str(info.value)
        with pytest.raises(StateUnavailableError):
            await store.get("datasets/a")  # a linearizable read needs the quorum too
        entry = await store.get("datasets/a", stale_ok=True)  # the member's own copy
        assert entry is not None and entry.value == b"kept"
        assert not group.leaders()

        await trio.to_thread.run_sync(etcd.ensure_up)
        await group.wait_leader()
        await store.put("datasets/b", b"after the quorum came back")
        entry = await store.get("datasets/b")
        assert entry is not None and entry.value == b"after the quorum came back"
        group.assert_one_at_a_time()


async def test_one_member_down_changes_nothing(etcd: EtcdCluster) -> None:
    root = unique("one-down")
    async with (
        contenders([etcd.endpoints] * 3, root + "leader") as group,
        EtcdClient(etcd.endpoints) as client,
    ):
        store = EtcdStore(client, root=root)
        leader = await group.wait_leader()
        await trio.to_thread.run_sync(etcd.stop, 0)  # every client's first endpoint
        await store.put("datasets/a", b"still written")
        entry = await store.get("datasets/a")
        assert entry is not None and entry.value == b"still written"
        await trio.sleep(3 * TTL)  # several lease renewals through the other members
        assert group.leaders() == [leader]
        group.assert_one_at_a_time()


def test_cluster_harness_cleans_up(tmp_path: Path) -> None:
    """A cluster block that fails leaves no etcd process behind."""
    with pytest.raises(RuntimeError), EtcdCluster(tmp_path, size=1) as etcd:
        members = list(etcd.members)
        raise RuntimeError("the test failed")
    assert not any(m.alive for m in members)
    assert not any(m.data_dir.exists() for m in members)
