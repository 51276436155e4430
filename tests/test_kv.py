"""The durable store's contract, run against both implementations (LMDB, and etcd on a
real one-member etcd), then what only etcd needs: large values in parts, and fencing."""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from etcdfixtures import requires_etcd, single_etcd, unique

from integration.etcd_cluster import EtcdCluster
from syncbit.errors import NotLeaderError, StateLimitError, UserError
from syncbit.scheduler.etcd import Compare, EtcdClient, prefix_end
from syncbit.scheduler.kv import (
    MAX_VALUE_BYTES,
    Bumped,
    Change,
    Check,
    Delete,
    DurableStore,
    Put,
    Resync,
)
from syncbit.scheduler.kv_etcd import INLINE_MAX, PART_BYTES, EtcdStore
from syncbit.scheduler.kv_lmdb import LmdbStore


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with single_etcd(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
async def etcd_client(etcd: EtcdCluster) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(etcd.endpoints) as client:
        yield client


@pytest.fixture(params=["lmdb", pytest.param("etcd", marks=requires_etcd)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DurableStore]:
    """Each implementation, empty: etcd under a root of its own."""
    if request.param == "lmdb":
        async with await LmdbStore.open(tmp_path / "state", history=4) as lmdb_store:
            yield lmdb_store
    else:
        cluster: EtcdCluster = request.getfixturevalue("etcd")
        async with EtcdClient(cluster.endpoints) as client:
            yield EtcdStore(client, root=unique("kv"))


async def compact_history(store: DurableStore) -> None:
    """Make the store forget the history of its past commits."""
    if isinstance(store, EtcdStore):  # etcd keeps the compaction revision itself
        await store.put("filler", b"")
        await store.client.compact(await store.client.revision())
    else:  # the LMDB store keeps 4 commits (history=4)
        for i in range(5):
            await store.put(f"filler/{i}", b"")


async def test_put_get_delete(store: DurableStore) -> None:
    assert await store.get("datasets/a") is None
    first = await store.put("datasets/a", b"manifest-1")
    entry = await store.get("datasets/a")
    assert entry is not None and (entry.key, entry.value, entry.revision) == (
        "datasets/a",
        b"manifest-1",
        first,
    )
    second = await store.put("datasets/a", b"")
    assert second > first
    entry = await store.get("datasets/a")
    assert entry is not None and entry.value == b"" and entry.revision == second
    assert await store.delete("datasets/a")
    assert await store.get("datasets/a") is None
    assert not await store.delete("datasets/a")


async def test_list_prefix_pages(store: DurableStore) -> None:
    keys = [f"labels/node-{i:02d}" for i in range(11)]
    for key in keys:
        await store.put(key, key.encode())
    await store.put("labelsX", b"not under labels/")
    await store.put("assignments/x", b"elsewhere")
    seen: list[str] = []
    page = await store.list_prefix("labels/", limit=4)
    first_revision = page.revision
    while True:
        assert len(page.entries) <= 4
        assert all(e.value == e.key.encode() for e in page.entries)
        seen += [e.key for e in page.entries]
        if page.next is None:
            break
        page = await store.list_prefix("labels/", after=page.next, limit=4, revision=first_revision)
    assert seen == keys
    everything = await store.list_prefix("", limit=1000)
    assert [e.key for e in everything.entries] == sorted([*keys, "labelsX", "assignments/x"])
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            await store.list_prefix("labels/", limit=bad)


async def test_commit_checks_are_compare_and_swap(store: DurableStore) -> None:
    created = await store.commit([Put("a", b"1"), Put("b", b"1")], checks=[Check("a", 0)])
    assert created.ok
    again = await store.commit([Put("a", b"2")], checks=[Check("a", 0)])
    assert not again.ok
    stale = await store.commit(
        [Put("a", b"2"), Delete("b")], checks=[Check("a", created.revision), Check("b", 0)]
    )
    assert not stale.ok  # "b" exists: nothing of the commit happened
    a, b = await store.get("a"), await store.get("b")
    assert a is not None and a.value == b"1" and b is not None
    swapped = await store.commit(
        [Put("a", b"2"), Delete("b")],
        checks=[Check("a", created.revision), Check("b", created.revision)],
    )
    assert swapped.ok and swapped.deleted == 1 and swapped.revision > created.revision
    a = await store.get("a")
    assert a is not None and a.value == b"2" and await store.get("b") is None


async def test_generation_moves_with_bumping_commits_only(store: DurableStore) -> None:
    assert await store.generation() == 0
    bumped = await store.commit([Put("datasets/a", b"m")], bump=True)
    assert await store.generation() == bumped.revision
    await store.put("labels/n1", b"x")
    assert await store.generation() == bumped.revision
    failed = await store.commit(
        [Put("datasets/a", b"m2")], checks=[Check("datasets/a", 0)], bump=True
    )
    assert not failed.ok and await store.generation() == bumped.revision
    later = await store.delete("datasets/a", bump=True)
    assert later and await store.generation() > bumped.revision


async def test_watch_sees_changes_after_since_in_order(store: DurableStore) -> None:
    since = await store.put("other/x", b"before")
    await store.put("datasets/a", b"1")
    await store.put("other/y", b"not watched")
    await store.commit([Put("datasets/b", b"2"), Delete("datasets/a")])
    got: list[Change | Bumped | Resync] = []
    async with store.watch("datasets/", since) as changes:
        with trio.fail_after(30):
            async for change in changes:
                got.append(change)
                if len(got) == 3:
                    break
    assert all(isinstance(c, Change) for c in got)
    assert [(c.key, c.value) for c in got if isinstance(c, Change)] == [
        ("datasets/a", b"1"),
        ("datasets/b", b"2"),
        ("datasets/a", None),
    ]
    revisions = [c.revision for c in got]
    assert revisions[0] < revisions[1] == revisions[2]  # one commit, one revision


async def test_watch_waits_for_new_changes(store: DurableStore) -> None:
    since = await store.put("datasets/a", b"old")

    async def write_later() -> None:
        await trio.sleep(0.2)
        await store.put("datasets/a", b"new")

    async with store.watch("datasets/", since) as changes, trio.open_nursery() as nursery:
        nursery.start_soon(write_later)
        with trio.fail_after(30):
            change = await changes.__anext__()
    assert isinstance(change, Change) and change.value == b"new"


async def test_watch_whose_history_is_gone_resyncs(store: DurableStore) -> None:
    since = await store.put("datasets/a", b"1")
    await store.put("datasets/a", b"2")
    await compact_history(store)
    async with store.watch("datasets/", since) as changes:
        with trio.fail_after(30):
            resync = await changes.__anext__()
            assert isinstance(resync, Resync) and resync.revision > since
            page = await store.list_prefix("datasets/", revision=resync.revision)
            assert [(e.key, e.value) for e in page.entries] == [("datasets/a", b"2")]
            written = await store.put("datasets/a", b"3")
            change = await changes.__anext__()
    assert isinstance(change, Change) and (change.value, change.revision) == (b"3", written)


async def test_bad_keys_and_values_are_refused(store: DurableStore) -> None:
    for bad in ["", "a\nb", "x" * 401, "tab\there"]:
        with pytest.raises(UserError):
            await store.put(bad, b"v")
    with pytest.raises(ValueError, match="twice"):
        await store.commit([Put("a", b"1"), Delete("a")])
    with pytest.raises(StateLimitError, match="at most"):
        await store.put("huge", bytes(MAX_VALUE_BYTES + 1))
    assert await store.get("huge") is None


async def test_lmdb_store_survives_reopen(tmp_path: Path) -> None:
    async with await LmdbStore.open(tmp_path) as first:
        written = await first.commit([Put("datasets/a", b"m")], bump=True)
    async with await LmdbStore.open(tmp_path) as second:
        entry = await second.get("datasets/a")
        assert entry is not None and entry.revision == written.revision
        assert await second.generation() == written.revision
        assert await second.put("x", b"") == written.revision + 1
        async with second.watch("", 0) as changes:  # no history survives a restart
            assert await changes.__anext__() == Resync(written.revision + 1)


# -- etcd only -----------------------------------------------------------------------------


async def blob_keys(client: EtcdClient, root: str) -> list[bytes]:
    prefix = (root + "blob/").encode()
    page = await client.range(prefix, prefix_end(prefix), keys_only=True, limit=1000)
    return [kv.key for kv in page.kvs]


@requires_etcd
async def test_etcd_large_values_go_in_parts(etcd_client: EtcdClient) -> None:
    root = unique("big")
    store = EtcdStore(etcd_client, root=root)
    random = os.urandom(5 * PART_BYTES + 123)  # incompressible: six parts
    await store.put("datasets/big", random)
    entry = await store.get("datasets/big")
    assert entry is not None and entry.value == random
    assert len(await blob_keys(etcd_client, root)) == 6

    files = [
        {"path": f"shard-{i:05d}.bin", "size": i, "object": os.urandom(32).hex()}
        for i in range(40_000)
    ]
    manifest = json.dumps({"files": files}).encode()  # ~4.4 MB, like a big dataset's
    assert INLINE_MAX < len(zlib.compress(manifest)) < len(manifest) / 1.5
    await store.put("datasets/big", manifest)
    entry = await store.get("datasets/big")
    assert entry is not None and entry.value == manifest
    after = await blob_keys(etcd_client, root)
    assert 0 < len(after) < 6  # the random value's parts are gone
    page = await store.list_prefix("datasets/")
    assert page.entries[0].value == manifest

    await store.put("datasets/big", b"small now")
    assert await blob_keys(etcd_client, root) == []
    await store.put("datasets/big", random)
    assert await store.delete("datasets/big")
    assert await blob_keys(etcd_client, root) == []


@requires_etcd
async def test_etcd_watch_delivers_large_values_whole(etcd_client: EtcdClient) -> None:
    store = EtcdStore(etcd_client, root=unique("bigwatch"))
    since = await store.put("datasets/x", b"small")
    value = os.urandom(2 * PART_BYTES)
    await store.put("datasets/x", value)
    async with store.watch("datasets/", since) as changes:
        with trio.fail_after(30):
            change = await changes.__anext__()
    assert isinstance(change, Change) and change.value == value


@requires_etcd
async def test_etcd_leftover_parts_of_a_dead_writer_are_removed(etcd_client: EtcdClient) -> None:
    root = unique("leftover")
    store = EtcdStore(etcd_client, root=root)
    await store.put("datasets/x", os.urandom(PART_BYTES + 1))
    # A writer that stored parts of another value and died before its commit:
    leftover = store._part("datasets/x", "0" * 64, 0)
    await etcd_client.put(leftover, b"orphan")
    await store.put("datasets/x", os.urandom(PART_BYTES + 1))
    keys = await blob_keys(etcd_client, root)
    assert leftover not in keys and len(keys) == 2


@requires_etcd
async def test_etcd_concurrent_large_writes_of_one_key_never_mix(
    etcd_client: EtcdClient,
) -> None:
    store = EtcdStore(etcd_client, root=unique("race"))
    values = [os.urandom(3 * PART_BYTES) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for value in values:
            nursery.start_soon(store.put, "datasets/x", value)
    entry = await store.get("datasets/x")
    assert entry is not None and entry.value in values


@requires_etcd
async def test_etcd_writes_are_fenced_on_the_leaders_term(etcd_client: EtcdClient) -> None:
    root = unique("fence")
    leader_key = (root + "leader").encode()
    term = await etcd_client.put(leader_key, b"me")
    store = EtcdStore(etcd_client, root=root, fence=lambda: Compare.created_at(leader_key, term))
    assert (await store.put("datasets/a", b"1")) > term
    await etcd_client.delete(leader_key)
    await etcd_client.put(leader_key, b"someone else")  # a new term began
    with pytest.raises(NotLeaderError):
        await store.put("datasets/a", b"2")
    with pytest.raises(NotLeaderError):
        await store.put("datasets/b", os.urandom(PART_BYTES + 1))
    entry = await store.get("datasets/a")
    assert entry is not None and entry.value == b"1"
    assert await store.get("datasets/b") is None

    def not_leading() -> Compare:
        raise NotLeaderError("not the leader", leader="10.0.0.2:7070")

    with pytest.raises(NotLeaderError):
        await EtcdStore(etcd_client, root=root, fence=not_leading).put("datasets/a", b"3")


@requires_etcd
async def test_etcd_commit_too_big_for_one_transaction(etcd_client: EtcdClient) -> None:
    store = EtcdStore(etcd_client, root=unique("ops"))
    with pytest.raises(StateLimitError, match="max-txn-ops"):
        await store.commit([Put(f"k{i}", b"v") for i in range(100)])
    many = [Put(f"k{i:02d}", os.urandom(INLINE_MAX - 100)) for i in range(30)]  # ~2 MB
    assert (await store.commit(many)).ok  # over the inline budget: some go to parts
    page = await store.list_prefix("k", limit=100)
    assert [e.value for e in page.entries] == [p.value for p in many]
