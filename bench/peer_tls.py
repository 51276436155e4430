#!/usr/bin/env python3
"""Peer transfer benchmark: chunk data between two nodes' peer services, plain HTTP
(sendfile) vs TLS, on loopback in the same run. What `peer_data_tls` costs.

One process holds a store with one object (default 1 GiB in 4 MiB chunks) and serves it
twice: a plain peer service and a TLS one (certificates from `syncbit tls init`), both
requiring a node credential as a real cluster does. Clients pull every chunk with
PeerClient from several threads; wall time and CPU seconds (client and server together,
both in this process) per GiB are printed, best of a few alternating rounds. Not a test.

    python bench/peer_tls.py [--size-mib 1024] [--threads 4] [--rounds 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

import trio

from syncbit import certs
from syncbit.chunks import chunk_length, digest
from syncbit.credentials import PEER, Issuer, Role
from syncbit.peer import PeerClient, PeerServer
from syncbit.store import ObjectStore
from syncbit.tls import client_context, server_context

CHUNK = 4 << 20
OBJECT = "ab" * 32


async def fill(store: ObjectStore, size: int) -> None:
    obj = store.object(OBJECT, size, CHUNK)
    for i in range(obj.chunks):
        data = os.urandom(chunk_length(size, CHUNK, i))
        await store.store_chunk(obj, i, memoryview(data), digest(data))
    await store.flush()


def pull(client: PeerClient, address: str, size: int, threads: int) -> tuple[float, float]:
    """(seconds, CPU seconds) to fetch every chunk once."""
    chunks = (size + CHUNK - 1) // CHUNK
    buffers = [bytearray(CHUNK) for _ in range(threads)]

    def one(i: int) -> None:
        buf = memoryview(buffers[i % threads])[: chunk_length(size, CHUNK, i)]
        client.get_into(address, OBJECT, i * CHUNK, buf)

    cpu, start = time.process_time(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(chunks)))
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the store goes (a real disk)")
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="syncbit-peer-tls-", dir=args.dir) as tmp:
        where = Path(tmp)
        certs.init(where / "tls")
        store = ObjectStore.open(where / "cache", size + (64 << 20))
        trio.run(fill, store, size)
        issuer = Issuer("bench-secret")
        token, _ = issuer.issue(Role.NODE, "bench", audience=PEER)
        plain = PeerServer(store, "127.0.0.1:0", auth_required=True)
        tls_server = PeerServer(
            store,
            "127.0.0.1:0",
            auth_required=True,
            tls_context=server_context(where / "tls/daemon.crt", where / "tls/daemon.key"),
        )
        for server in (plain, tls_server):
            server.set_verifier(issuer)
            server.start()
        context: ssl.SSLContext = client_context(where / "tls/ca.crt")
        clients = {
            "plain": (PeerClient(timeout=30, token=token), plain.address),
            "tls": (
                PeerClient(timeout=30, token=token, tls_context=context, tls_name="syncbit-daemon"),
                tls_server.address,
            ),
        }
        best: dict[str, tuple[float, float]] = {}
        try:
            for client, address in clients.values():
                pull(client, address, min(size, 64 << 20), args.threads)  # warm up
            for _ in range(args.rounds):
                for kind, (client, address) in clients.items():
                    secs, cpu = pull(client, address, size, args.threads)
                    if kind not in best or secs < best[kind][0]:
                        best[kind] = (secs, cpu)
        finally:
            for client, _ in clients.values():
                client.close()
            for server in (plain, tls_server):
                server.stop()
            store.close()
    gib = size / 2**30
    print(
        f"peer transfer of {args.size_mib} MiB, {args.threads} threads, loopback, best of "
        f"{args.rounds}:"
    )
    for kind, (secs, cpu) in best.items():
        print(f"  {kind:5}  {size / secs / 1e9:5.2f} GB/s  {cpu / gib:5.2f} CPU-s/GiB")
    ratio = best["plain"][0] / best["tls"][0]
    cpu_ratio = best["tls"][1] / best["plain"][1]
    print(f"  tls/plain: {ratio:.2f}x the throughput, {cpu_ratio:.2f}x the CPU")


if __name__ == "__main__":
    main()
