"""The etcd client against a real one-member etcd on loopback: key-value, paging,
compare-and-swap, leases, watches (also across compaction), failover, limits, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio
from etcdfixtures import requires_etcd, single_etcd, unique

from integration.cluster import free_port
from integration.etcd_cluster import EtcdCluster, FaultyTransport
from syncbit.errors import (
    ConfigError,
    LeaseExpiredError,
    RevisionCompactedError,
    StateLimitError,
    StateUnavailableError,
)
from syncbit.scheduler.etcd import (
    MAX_PAGE,
    Compare,
    DeleteOp,
    EtcdClient,
    EventType,
    Order,
    PutOp,
    RangeOp,
    RangeResult,
    Target,
    WatchBatch,
    parse_endpoints,
    prefix_end,
)

pytestmark = requires_etcd

DEAD = f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with single_etcd(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
async def client(etcd: EtcdCluster) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(etcd.endpoints) as c:
        yield c


@pytest.fixture
def prefix() -> bytes:
    return unique().encode()


def test_parse_endpoints() -> None:
    assert parse_endpoints("etcd://h1:2379,h2:2380") == ["http://h1:2379", "http://h2:2380"]
    assert parse_endpoints("etcds://h1:2379") == ["https://h1:2379"]
    assert parse_endpoints("http://a:1, https://b:2/") == ["http://a:1", "https://b:2"]
    assert parse_endpoints("etcd://[::1]:2379") == ["http://[::1]:2379"]
    for bad in ["h1:2379", "etcd://", "etcd://h1", "etcd://h1:x", "ftp://h:1", "etcd://h:1/p"]:
        with pytest.raises(ConfigError):
            parse_endpoints(bad)
    with pytest.raises(ConfigError, match="credentials"):
        parse_endpoints("etcd://root:secret@h1:2379")


def test_prefix_end() -> None:
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"") == b"\x00"


async def test_put_get_delete(client: EtcdClient, prefix: bytes) -> None:
    key = prefix + b"k"
    assert await client.get(key) is None
    value = bytes(range(256))  # every byte value survives the base64 wire format
    revision = await client.put(key, value)
    kv = await client.get(key)
    assert kv is not None
    assert (kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version) == (
        key,
        value,
        revision,
        revision,
        1,
    )
    await client.put(key, b"")
    kv = await client.get(key)
    assert kv is not None and kv.value == b"" and kv.version == 2
    assert await client.delete(key) == 1
    assert await client.get(key) is None
    assert await client.delete(key) == 0


async def test_range_pages_are_bounded_and_consistent(client: EtcdClient, prefix: bytes) -> None:
    keys = [prefix + b"%03d" % i for i in range(25)]
    for key in keys:
        await client.put(key, key)
    await client.put(prefix[:-1] + b"0", b"outside the prefix")
    seen: list[bytes] = []
    after = None
    first = await client.range_prefix(prefix, limit=7)
    page = first
    while True:
        assert len(page.kvs) <= 7
        assert page.count == 25 - len(seen)
        seen += [kv.key for kv in page.kvs]
        if not page.more:
            break
        if after is None:  # between pages: not part of the view read at first.revision
            await client.put(prefix + b"000-late", b"x")
        after = page.kvs[-1].key
        page = await client.range_prefix(prefix, after=after, limit=7, revision=first.revision)
    assert seen == keys
    assert (await client.range_prefix(prefix, limit=MAX_PAGE)).count == 26
    for bad in (0, MAX_PAGE + 1):
        with pytest.raises(ValueError):
            await client.range(prefix, prefix_end(prefix), limit=bad)


async def test_txn_compare_and_swap(client: EtcdClient, prefix: bytes) -> None:
    key = prefix + b"cas"
    create = ([Compare.absent(key)], [PutOp(key, b"first")], [RangeOp(key)])
    won = await client.txn(*create)
    assert won.succeeded
    lost = await client.txn(*create)
    assert not lost.succeeded
    current = lost.results[0]
    assert isinstance(current, RangeResult)
    assert current.kvs[0].value == b"first" and current.kvs[0].create_revision == won.revision

    stale = await client.txn([Compare.modified_at(key, won.revision - 1)], [PutOp(key, b"x")])
    assert not stale.succeeded
    swap = await client.txn([Compare.modified_at(key, won.revision)], [PutOp(key, b"second")])
    assert swap.succeeded
    by_version = await client.txn([Compare(key, Target.VERSION, 2)], [DeleteOp(key)])
    assert by_version.succeeded and by_version.results[0].deleted == 1  # type: ignore[union-attr]
    newer = await client.txn(
        [Compare(key, Target.CREATE, 0, Order.GREATER)], [PutOp(key, b"never")]
    )
    assert not newer.succeeded and await client.get(key) is None
    assert Compare.absent(key).holds(None) and not Compare.absent(key).holds(current.kvs[0])


async def test_lease_keeps_key_while_renewed_then_expires(
    client: EtcdClient, prefix: bytes
) -> None:
    key = prefix + b"leased"
    lease = await client.lease_grant(1)
    assert lease.ttl >= 1
    await client.put(key, b"alive", lease=lease.id)
    for _ in range(6):  # three TTLs of keep-alives: the key stays
        await trio.sleep(lease.ttl / 2)
        assert await client.lease_keepalive(lease.id) > 0
    kv = await client.get(key)
    assert kv is not None and kv.lease == lease.id
    with trio.fail_after(30):  # no more keep-alives: etcd deletes the key (generous bound)
        while await client.get(key) is not None:
            await trio.sleep(0.1)
    assert await client.lease_keepalive(lease.id) == 0
    assert await client.lease_ttl(lease.id) == -1
    with pytest.raises(LeaseExpiredError):
        await client.put(key, b"x", lease=lease.id)
    await client.lease_revoke(lease.id)  # already gone: fine


async def test_lease_revoke_deletes_its_keys(client: EtcdClient, prefix: bytes) -> None:
    lease = await client.lease_grant(60)
    await client.put(prefix + b"a", b"1", lease=lease.id)
    await client.lease_revoke(lease.id)
    assert await client.get(prefix + b"a") is None
    assert await client.lease_keepalive(lease.id) == 0


async def test_watch_delivers_every_change_in_order(client: EtcdClient, prefix: bytes) -> None:
    start = await client.put(prefix + b"a", b"1")
    await client.put(prefix + b"b", b"2")
    await client.delete(prefix + b"a")
    await client.put(prefix[:-1] + b"-other", b"not watched")
    last = await client.put(prefix + b"b", b"3")
    seen: list[tuple[EventType, bytes, bytes, int]] = []
    async with client.watch(prefix, prefix_end(prefix), start_revision=start) as watch:
        with trio.fail_after(30):
            async for batch in watch:
                assert not batch.compacted
                seen += [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in batch.events]
                if batch.revision >= last:
                    break
        assert watch.next_revision == last + 1
    assert [(t, k[len(prefix) :], v) for t, k, v, _ in seen] == [
        (EventType.PUT, b"a", b"1"),
        (EventType.PUT, b"b", b"2"),
        (EventType.DELETE, b"a", b""),
        (EventType.PUT, b"b", b"3"),
    ]
    assert [r for *_, r in seen] == sorted(r for *_, r in seen)


async def test_watch_from_now_sees_changes_after_it_was_entered(
    client: EtcdClient, prefix: bytes
) -> None:
    await client.put(prefix + b"old", b"before")
    async with client.watch(prefix, prefix_end(prefix)) as watch:
        await client.put(prefix + b"new", b"after")  # before the stream is first read
        with trio.fail_after(30):
            batch = await watch.__anext__()
    assert [e.kv.key for e in batch.events] == [prefix + b"new"]


async def test_watch_resumes_after_compaction(client: EtcdClient, prefix: bytes) -> None:
    start = await client.put(prefix + b"k", b"v1")
    await client.put(prefix + b"k", b"v2")
    compacted_at = await client.put(prefix + b"k", b"v3")
    await client.compact(compacted_at)
    with pytest.raises(RevisionCompactedError):
        await client.range(prefix + b"k", revision=start)
    async with client.watch(prefix, prefix_end(prefix), start_revision=start) as watch:
        with trio.fail_after(30):
            resync: WatchBatch = await watch.__anext__()
            assert resync.compacted and not resync.events and resync.revision >= compacted_at
            reread = await client.range(prefix + b"k", revision=resync.revision)
            assert reread.kvs[0].value == b"v3"
            after = await client.put(prefix + b"k", b"v4")
            batch = await watch.__anext__()
    assert [(e.kv.value, e.kv.mod_revision) for e in batch.events] == [(b"v4", after)]


async def test_failover_to_the_next_endpoint(etcd: EtcdCluster, prefix: bytes) -> None:
    async with EtcdClient([DEAD, *etcd.endpoints]) as client:
        await client.put(prefix + b"k", b"v")
        kv = await client.get(prefix + b"k")
        assert kv is not None and kv.value == b"v"
        async with client.watch(prefix + b"k", start_revision=kv.mod_revision) as watch:
            with trio.fail_after(30):
                batch = await watch.__anext__()
        assert batch.events[0].kv.value == b"v"


async def test_no_endpoint_answers_is_one_clear_error() -> None:
    async with EtcdClient([DEAD, f"http://127.0.0.1:{free_port()}"], timeout=1.0) as client:
        with pytest.raises(StateUnavailableError, match="etcd is unavailable") as info:
            await client.put(b"k", b"v")
        assert DEAD in str(info.value)
        with pytest.raises(StateUnavailableError):
            await client.get(b"k")


async def test_write_with_unknown_outcome_is_never_resent(etcd: EtcdCluster, prefix: bytes) -> None:
    """The request reached etcd but its answer was lost: a second endpoint (here the same
    server under another name) must not get the write again; a read is retried."""
    transport = FaultyTransport()
    endpoints = [etcd.endpoints[0], etcd.endpoints[0].replace("127.0.0.1", "localhost")]
    async with EtcdClient(endpoints, transport=transport, timeout=2) as client:
        transport.drop_answers = {"/v3/kv/txn"}
        with pytest.raises(StateUnavailableError, match="may or may not have happened"):
            await client.txn([Compare.absent(prefix + b"k")], [PutOp(prefix + b"k", b"v")])
        assert transport.requests.count("/v3/kv/txn") == 1
        kv = await client.get(prefix + b"k")
        assert kv is not None and kv.version == 1  # it did happen, exactly once

        transport.drop_answers = {"/v3/kv/range"}
        transport.requests.clear()
        with pytest.raises(StateUnavailableError, match="etcd is unavailable"):
            await client.get(prefix + b"k")
        assert transport.requests.count("/v3/kv/range") >= 2  # both endpoints were asked


async def test_silent_endpoint_is_left_for_the_next(etcd: EtcdCluster, prefix: bytes) -> None:
    """An endpoint that takes requests and never answers costs a read one attempt timeout;
    a write sent there has an unknown outcome and is not sent on."""
    transport = FaultyTransport()
    silent = etcd.endpoints[0].replace("127.0.0.1", "localhost")
    async with EtcdClient(
        [silent, etcd.endpoints[0]], transport=transport, attempt_timeout=0.5, timeout=2
    ) as client:
        await client.put(prefix + b"k", b"v")
        transport.hang = {"localhost"}
        client._current = 0  # the silent endpoint first again
        kv = await client.get(prefix + b"k")
        assert kv is not None and kv.value == b"v"
        client._current = 0
        with pytest.raises(StateUnavailableError, match="may or may not have happened"):
            await client.put(prefix + b"k", b"w")
        transport.hang = {"*"}
        with pytest.raises(StateUnavailableError, match="etcd is unavailable"):
            await client.get(prefix + b"k", stale_ok=True)


async def test_request_too_large_is_a_clear_error(client: EtcdClient, prefix: bytes) -> None:
    with pytest.raises(StateLimitError, match="max-request-bytes"):
        await client.put(prefix + b"big", b"x" * (2 * 1024 * 1024))
    assert await client.get(prefix + b"big") is None


def enable_auth(endpoint: str, user: str, password: str) -> None:
    """Turn on etcd's authentication with `user` as root (plain gateway calls)."""
    for path, body in [
        ("/v3/auth/user/add", {"name": user, "password": password}),
        ("/v3/auth/user/grant", {"user": user, "role": "root"}),
        ("/v3/auth/enable", {}),
    ]:
        httpx.post(endpoint + path, json=body, timeout=10, trust_env=False).raise_for_status()


async def test_basic_auth_logs_in_and_again_when_the_token_expires(tmp_path: Path) -> None:
    with single_etcd(tmp_path, extra_args=["--auth-token-ttl=1"]) as etcd:
        enable_auth(etcd.endpoints[0], "root", "pw")
        async with EtcdClient(etcd.endpoints) as anonymous:
            with pytest.raises(ConfigError, match="etcd login"):
                await anonymous.put(b"k", b"v")
        async with EtcdClient(etcd.endpoints, username="root", password="pw") as client:
            await client.put(b"k", b"v1")
            await trio.sleep(3)  # the simple token expires after a second unused
            await client.put(b"k", b"v2")
            kv = await client.get(b"k")
            assert kv is not None and kv.value == b"v2"
            await trio.sleep(3)
            async with client.watch(b"k", start_revision=kv.mod_revision) as watch:
                with trio.fail_after(30):
                    assert (await watch.__anext__()).events[0].kv.value == b"v2"
        async with EtcdClient(etcd.endpoints, username="root", password="wrong") as bad:
            with pytest.raises(ConfigError, match="etcd login as root failed"):
                await bad.get(b"k")
    with pytest.raises(ConfigError, match="both"):
        EtcdClient(["http://127.0.0.1:1"], username="root")
