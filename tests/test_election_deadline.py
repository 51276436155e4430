"""The election's safety rule on a virtual clock (trio's autojump clock): a leader whose
keep-alives stop being answered stops leading no later than TTL after etcd last renewed
its lease, measured from when etcd received that keep-alive, however late its answers
arrive. The "etcd" here is a stub of the few gateway calls one contender makes, so that
time is exact; the real thing is in test_election.py."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from syncbit.scheduler.election import Election
from syncbit.scheduler.etcd import EtcdClient

TTL = 6


class Silent(httpx.AsyncByteStream):
    """A watch stream on which nothing ever happens."""

    def __aiter__(self) -> Silent:
        return self

    async def __anext__(self) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


class OneLeaseGateway:
    """One lease, granted with TTL seconds and renewed to TTL by each keep-alive it
    receives; the campaign always wins. `renewed` holds when (trio clock) each renewal
    reached it; answers leave `delay` seconds later; `cut` makes it silent."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.cut = False
        self.renewed: list[float] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.cut:
            await trio.sleep_forever()
        path = request.url.path
        body: dict[str, Any] = {"header": {"revision": "5"}}
        if path in ("/v3/lease/grant", "/v3/lease/keepalive"):
            self.renewed.append(trio.current_time())
            lease = {"ID": "7", "TTL": str(TTL)}
            body = {"result": lease} if path.endswith("keepalive") else {**body, **lease}
        elif path == "/v3/kv/txn":
            body["succeeded"] = True
        elif path == "/v3/watch":
            return httpx.Response(200, stream=Silent())
        await trio.sleep(self.delay)
        return httpx.Response(200, content=json.dumps(body).encode())


@pytest.mark.parametrize("delay", [0.0, 1.5])
async def test_leader_stops_within_ttl_of_its_last_renewal(
    autojump_clock: trio.testing.MockClock, delay: float
) -> None:
    gateway = OneLeaseGateway(delay)
    transport = httpx.MockTransport(gateway.handle)
    ended = math.inf
    async with (
        EtcdClient(["http://etcd.invalid:2379"], transport=transport, timeout=3.0) as client,
        Election(client, "/leader", "sched-0", "10.0.0.1:7070", TTL) as election,
    ):
        async with election.leading():
            await trio.sleep(5 * TTL)  # several renewals go through
            gateway.cut = True
            try:
                await trio.sleep_forever()
            finally:
                ended = trio.current_time()
                assert not election.is_leader
        last_renewal = gateway.renewed[-1]
        assert len(gateway.renewed) >= 10
        # Never after etcd could expire the lease; not long before it (margin: 0.6 s).
        assert last_renewal + TTL - 1.0 <= ended <= last_renewal + TTL
        gateway.cut = False  # let the resignation through
