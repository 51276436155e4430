#!/usr/bin/env python3
"""etcd client benchmark: syncbit's gateway client vs the same requests sent bare, one run.

Against a real 1- or 3-member etcd on loopback (Debian's etcd-server, started and stopped
here), measures operations per second of get, put and compare-and-swap txn, one at a time
and 32 at once, through `syncbit.scheduler.etcd.EtcdClient` and through a bare
httpx.AsyncClient posting the same JSON (the reference: what the gateway itself costs),
and the time from a put to its watch event. Not a test: it prints.

    python bench/etcd_client.py [--members 3] [--ops 2000]
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from statistics import median

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.etcd_cluster import EtcdCluster
from syncbit.scheduler.etcd import Compare, EtcdClient, PutOp, RangeOp


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


async def rate(op: Callable[[int], Awaitable[object]], ops: int, concurrency: int) -> float:
    """Operations per second of `op(i)` for i in range(ops), `concurrency` at a time."""
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < ops:
            i = next_i
            next_i += 1
            await op(i)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return ops / (time.perf_counter() - start)


async def run(endpoints: list[str], ops: int) -> None:
    value = b"x" * 200
    async with EtcdClient(endpoints) as client, httpx.AsyncClient(trust_env=False) as bare:
        url = client.endpoints[0]
        for i in range(ops):  # keys the gets read
            await client.put(b"bench/%06d" % i, value)

        async def bare_get(i: int) -> object:
            return (
                await bare.post(url + "/v3/kv/range", json={"key": b64(b"bench/%06d" % i)})
            ).json()

        async def bare_put(i: int) -> object:
            body = {"key": b64(b"bench/%06d" % i), "value": b64(value)}
            return (await bare.post(url + "/v3/kv/put", json=body)).json()

        async def bare_txn(i: int) -> object:
            key = b64(b"cas/%06d" % i)
            body = {
                "compare": [
                    {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                ],
                "success": [{"request_put": {"key": key, "value": b64(value)}}],
                "failure": [{"request_range": {"key": key}}],
            }
            return (await bare.post(url + "/v3/kv/txn", json=body)).json()

        async def txn(i: int) -> object:
            key = b"cas2/%06d" % i
            return await client.txn([Compare.absent(key)], [PutOp(key, value)], [RangeOp(key)])

        cases: list[
            tuple[str, Callable[[int], Awaitable[object]], Callable[[int], Awaitable[object]]]
        ] = [
            ("get", lambda i: client.get(b"bench/%06d" % i), bare_get),
            ("put", lambda i: client.put(b"bench/%06d" % i, value), bare_put),
            ("txn", txn, bare_txn),
        ]
        print(f"{'op':<5} {'conc':>4} {'syncbit op/s':>13} {'bare op/s':>10} {'ratio':>6}")
        for name, ours, reference in cases:
            for concurrency in (1, 32):
                mine = await rate(ours, ops, concurrency)
                theirs = await rate(reference, ops, concurrency)
                ratio = mine / theirs
                print(f"{name:<5} {concurrency:>4} {mine:>13.0f} {theirs:>10.0f} {ratio:>6.2f}")
            if name == "txn":
                await client.delete(b"cas/", b"cas0")
                await client.delete(b"cas2/", b"cas20")

        delays: list[float] = []
        async with client.watch(b"w", start_revision=0) as watch:
            await trio.sleep(0.2)
            for i in range(200):
                sent = time.perf_counter()
                await client.put(b"w", b"%d" % i)
                await watch.__anext__()
                delays.append(time.perf_counter() - sent)
        print(
            f"put -> watch event: median {median(delays) * 1000:.1f} ms, "
            f"max {max(delays) * 1000:.1f} ms (200 puts)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="syncbit-bench-etcd-") as tmp,
        EtcdCluster(Path(tmp), size=args.members) as etcd,
    ):
        print(f"etcd 3.4 x{args.members} on loopback, {args.ops} ops per row")
        trio.run(run, etcd.endpoints, args.ops)


if __name__ == "__main__":
    main()
