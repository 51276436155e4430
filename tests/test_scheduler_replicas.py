"""Scheduler replicas on etcd (`state: etcd://...`): exactly one leads; the others answer
reads of the durable facts from their own copy and forward the rest to the leader; a
failover keeps every durable fact and starts the soft state anew (a new epoch, so nodes
report what they hold again). Real schedulers and a real one-member etcd on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio
from etcdfixtures import requires_etcd, single_etcd, unique
from fakes import MemSource
from schedulerfixtures import CHUNK

from integration.etcd_cluster import EtcdCluster
from syncbit.config import SchedulerConfig
from syncbit.errors import ConfigError, NotFoundError, NotLeaderError, SchedulerError
from syncbit.manifest import FileEntry
from syncbit.protocol import ClaimResult
from syncbit.scheduler import SchedulerClient, SchedulerServer
from syncbit.scheduler.etcd import EtcdClient
from syncbit.sources import Listing

pytestmark = requires_etcd

OBJ = "ab" * 32
PATIENCE = 30.0  # seconds a change may take on a loaded machine; not a speed check
TTL = 2
SETTLE = 3.0  # also the node timeout: nodes heartbeat again after waiting for it


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with single_etcd(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def _listed() -> Iterator[None]:
    entry = FileEntry(path="f", size=4 * CHUNK, object=OBJ, locator="f")
    with MemSource.serving({"mem://x/": Listing(files=[entry])}):
        yield


class Replicas:
    """Scheduler replicas in this process, one thread each, sharing an etcd prefix."""

    def __init__(self, etcd: EtcdCluster, tmp: Path, count: int) -> None:
        self.root = unique("replicas")
        self.etcd = etcd
        self.servers = [self._server(tmp / f"r{i}") for i in range(count)]

    def _server(self, state_dir: Path) -> SchedulerServer:
        config = SchedulerConfig.model_validate(
            {
                "listen": "127.0.0.1:0",
                "state_dir": state_dir,
                "state": self.etcd.url,
                "etcd_prefix": self.root,
                "election_ttl": TTL,
                "chunk_size": CHUNK,
                # A new leader grants claims once the nodes had this long to report.
                "node_timeout": SETTLE,
            }
        )
        server = SchedulerServer(config)
        server.start()
        return server

    @property
    def urls(self) -> str:
        return ",".join(s.url for s in self.servers)

    def leaders(self) -> list[int]:
        return [
            i
            for i, s in enumerate(self.servers)
            if s.replica is not None and s.call(lambda s=s: s.state is not None)
        ]

    async def leader(self) -> int:
        """The one replica that leads, once one does (never two at a time)."""
        with trio.fail_after(PATIENCE):
            while True:
                found = self.leaders()
                assert len(found) <= 1, f"two replicas lead at once: {found}"
                if found:
                    return found[0]
                await trio.sleep(0.05)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
async def replicas(etcd: EtcdCluster, tmp_path: Path) -> AsyncIterator[Replicas]:
    group = Replicas(etcd, tmp_path, 3)
    try:
        yield group
    finally:
        group.stop()


async def _eventually_listed(client: SchedulerClient, name: str) -> None:
    with trio.fail_after(PATIENCE):
        while name not in [d["name"] for d in (await client.datasets())["datasets"]]:
            await trio.sleep(0.05)


async def test_one_leads_followers_read_and_forward(replicas: Replicas) -> None:
    leader = await replicas.leader()
    follower = replicas.servers[(leader + 1) % 3]
    async with SchedulerClient(follower.url) as client:
        # A write through a follower is the leader's (forwarded), and the follower's own
        # copy of the facts follows it.
        added = await client.add_dataset("ds", "mem://x/")
        assert added["changed"] is True
        await _eventually_listed(client, "ds")
        assert [f.path for f in (await client.manifest("ds")).files] == ["f"]
        # Its generation follows the leader's too: a daemon compares the two.
        async with SchedulerClient(replicas.servers[leader].url) as at_leader:
            await at_leader.assign("ds", [{"node": "n1"}])
            moved = (await at_leader.datasets())["generation"]
        with trio.fail_after(PATIENCE):
            while (await client.datasets())["generation"] != moved:
                await trio.sleep(0.05)
        # Soft state lives with the leader: a heartbeat sent to a follower is the leader's.
        beat = await client.heartbeat("n1", address="127.0.0.1:1")
        assert beat["epoch"] == replicas.servers[leader].call(lambda: _epoch(replicas, leader))
        assert [(n["name"], n["up"]) for n in await client.nodes()] == [("n1", True)]
        metrics = httpx.get(f"{follower.url}/metrics", trust_env=False).text
        assert "syncbit_scheduler_leader 0.0" in metrics
    assert await replicas.leader() == leader


async def test_a_trailing_follower_asks_the_leader_for_what_it_lacks(replicas: Replicas) -> None:
    """A follower answers reads from its mirror of the facts, which trails the leader by
    a moment: what the mirror lacks (a dataset just added) is asked of the leader, so a
    client never sees a dataset's manifest missing because it asked the wrong replica."""
    leader = await replicas.leader()
    follower = replicas.servers[(leader + 1) % 3]
    assert follower.replica is not None

    def mirror_ready() -> bool:
        return follower.replica is not None and follower.replica._mirror_api is not None

    def deafen() -> None:  # the mirror hears nothing more: it trails for good
        api = follower.replica._mirror_api if follower.replica is not None else None
        assert api is not None
        api.state.facts.apply = lambda key, value: None  # type: ignore[method-assign]

    with trio.fail_after(PATIENCE):
        while not follower.call(mirror_ready):
            await trio.sleep(0.05)
    follower.call(deafen)
    async with SchedulerClient(replicas.servers[leader].url) as at_leader:
        await at_leader.add_dataset("late", "mem://x/")
    async with SchedulerClient(follower.url) as client:
        assert "late" not in [d["name"] for d in (await client.datasets())["datasets"]]
        assert [f.path for f in (await client.manifest("late")).files] == ["f"]
        with pytest.raises(NotFoundError):
            await client.manifest("never-added")  # the leader's 404, passed on


def _epoch(replicas: Replicas, index: int) -> str:
    state = replicas.servers[index].state
    assert state is not None
    return state.epoch


async def test_failover_keeps_the_facts_and_asks_nodes_again(replicas: Replicas) -> None:
    leader = await replicas.leader()
    async with SchedulerClient(replicas.urls) as client:
        await client.add_dataset("ds", "mem://x/")
        await client.assign("ds", [{"node": "n1"}])
        first = await client.heartbeat("n1", address="127.0.0.1:1", labels={"gpu": "a100"})
        report = {"object": OBJ, "size": 4 * CHUNK, "chunk_size": CHUNK}
        assert (await _claim_when_settled(client, "n1", [0, 1])).granted == [0, 1]
        await client.report_chunks("n1", add=[{**report, "chunks": [[0, "cd" * 32]]}], remove=[])

        replicas.servers[leader].stop()  # resigns; a kill -9 is integration/'s
        after = await replicas.leader()
        assert after != leader
        # Durable facts: all there. Soft state: anew, so the node is asked to report.
        assert [d["name"] for d in (await client.datasets())["datasets"]] == ["ds"]
        assert (await client.assignments())["ds"] == [{"node": "n1"}]
        again = await client.heartbeat("n1", address="127.0.0.1:1", labels={"gpu": "a100"})
        assert again["epoch"] != first["epoch"]
        assert [e["dataset"] for e in again["plan"]] == ["ds"]
        known = await client.chunk_map(OBJ, "n2")
        assert known.digests == {0: "cd" * 32} and known.peers == {}
        # Chunk 1, granted by the old leader, read meanwhile: the new one takes n1's word
        # (n1 could have claimed it here first), so nobody reads it from the source again.
        # Chunk 2, claimed by n2 here, stays n2's to establish.
        await client.heartbeat("n2", address="127.0.0.1:2")
        assert (await _claim_when_settled(client, "n2", [2])).granted == [2]
        await client.heartbeat("n1", address="127.0.0.1:1", labels={"gpu": "a100"})
        chunks = [[0, "cd" * 32], [1, "ef" * 32], [2, "12" * 32]]
        answer = await client.report_chunks("n1", add=[{**report, "chunks": chunks}], remove=[])
        assert answer.refused == [(OBJ, 2)] and answer.conflicts == []
        relearned = await client.chunk_map(OBJ, "n2")
        assert relearned.digests == {0: "cd" * 32, 1: "ef" * 32}
        assert [p.node for p in relearned.peers[0]] == ["n1"]
        assert [p.node for p in relearned.peers[1]] == ["n1"]


async def _claim_when_settled(
    client: SchedulerClient, node: str, indexes: list[int]
) -> ClaimResult:
    """A claim at a new leader, once it grants claims again (SETTLE after its start). A
    follower that still forwards to the old leader answers NotLeaderError until it has
    seen the new one: asked again too."""
    with trio.fail_after(PATIENCE):
        while True:
            try:
                return await client.claim(node, OBJ, indexes, ttl=30)
            except NotLeaderError:
                await trio.sleep(0.05)
            except SchedulerError as exc:
                assert "claims resume" in str(exc)
                await trio.sleep(0.05)


async def test_a_leader_whose_lease_is_revoked_stops_and_state_starts_anew(
    replicas: Replicas, etcd: EtcdCluster
) -> None:
    await replicas.leader()
    async with SchedulerClient(replicas.urls) as client, EtcdClient(etcd.endpoints) as admin:
        before = (await client.heartbeat("n1", address="127.0.0.1:1"))["epoch"]
        key = await admin.get((replicas.root + "leader").encode())
        assert key is not None
        await admin.lease_revoke(key.lease)  # behind the leader's back
        with trio.fail_after(PATIENCE):
            while True:
                try:
                    now = (await client.heartbeat("n1", address="127.0.0.1:1"))["epoch"]
                except SchedulerError:  # between terms: no leader answers yet
                    now = before
                if now != before:
                    break
                await trio.sleep(0.05)
        await replicas.leader()  # and still one at a time


def test_replica_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    everywhere = SchedulerConfig.model_validate(
        {"listen": "0.0.0.0:0", "state": "etcd://127.0.0.1:1", "insecure": True}
    )
    with pytest.raises(ConfigError, match="needs advertise"):
        SchedulerServer(everywhere).start()
    bad = SchedulerConfig.model_validate({"listen": "127.0.0.1:0", "state": "redis://x:1"})
    with pytest.raises(ConfigError, match="etcd://"):
        SchedulerServer(bad).start()
