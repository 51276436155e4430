"""One election contender as a process of its own, for tests that kill one by PID.

    python -m integration.election_contender ENDPOINTS KEY ID ADDRESS TTL

Campaigns like a scheduler replica would and prints `LEADING <term>` when its `leading()`
block starts and `STOPPED <term>` when it ends (flushed at once). SIGTERM resigns and
exits 0; SIGKILL leaves the office to expire with the lease.
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from syncbit.scheduler.election import Election
from syncbit.scheduler.etcd import EtcdClient


async def _until_terminated(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _serve(election: Election) -> None:
    while True:
        async with election.leading() as term:
            print(f"LEADING {term.revision}", flush=True)
            try:
                await trio.sleep_forever()
            finally:
                print(f"STOPPED {term.revision}", flush=True)


async def main(endpoints: str, key: str, my_id: str, address: str, ttl: int) -> None:
    async with (
        EtcdClient(endpoints) as client,
        Election(client, key, my_id, address, ttl) as election,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_until_terminated, nursery.cancel_scope)
        nursery.start_soon(_serve, election)
        print("READY", flush=True)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    endpoints, key, my_id, address, ttl = sys.argv[1:6]
    trio.run(main, endpoints, key, my_id, address, int(ttl))
