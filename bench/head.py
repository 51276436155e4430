#!/usr/bin/env python3
"""What the head sample costs: source reads and listings of an HTTP origin with the check
of a file's first 64 KiB (`version["head"]`) vs without, side by side in one run.

  reads    every chunk of one file from nginx on loopback, in source batches of 16 MiB
           (prefetch, sequential reads) and of one 4 MiB chunk (scattered reads): each
           batch not starting at 0 costs one more ranged request of 64 KiB
  listing  `dataset add` of a directory of small files: one more ranged GET per file

Ratios are (time with the head sample) / (time without): 1.00 means free. Needs nginx.
Not a test: it prints.

    python bench/head.py [--size-mib 256] [--files 500] [--rounds 5] [--dir /var/tmp/...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _common import free_port, process, wait_http

from syncbit.chunks import DEFAULT_CHUNK_SIZE, chunk_count
from syncbit.fetcher import read_checked
from syncbit.manifest import FileEntry
from syncbit.sources.http import HttpSource
from syncbit.sources.http.walk import Walk

MiB = 1 << 20


def read_all(source: HttpSource, entry: FileEntry, batch_chunks: int) -> float:
    """Seconds to read every chunk of `entry` from the source as the fetcher does."""
    cs = DEFAULT_CHUNK_SIZE
    buf = memoryview(bytearray(batch_chunks * cs))
    count = chunk_count(entry.size, cs)

    async def run() -> None:
        for first in range(0, count, batch_chunks):
            n = min(batch_chunks, count - first)
            span = min(entry.size, (first + n) * cs) - first * cs
            _, ok = await read_checked(source, entry, first, cs, buf[:span], n)
            assert ok

    start = time.perf_counter()
    trio.run(run)
    return time.perf_counter() - start


def list_once(url: str, head: bool) -> float:
    """Seconds to list `url`; as before the head sample (a HEAD per file) unless `head`."""
    walk = Walk
    saved = walk._first_bytes, walk._head_sample
    if not head:

        async def head_request(self: Any, url: str) -> tuple[Any, None]:
            async with self.limiter:
                return await self._head(url), None

        async def none(self: Any, url: str, size: int, etag: str | None) -> str:
            return ""

        walk._first_bytes, walk._head_sample = head_request, none  # type: ignore[method-assign]
    source = HttpSource(url)
    try:
        start = time.perf_counter()
        listing = trio.run(source.list)
        took = time.perf_counter() - start
    finally:
        walk._first_bytes, walk._head_sample = saved  # type: ignore[method-assign]
        source.close()
    assert all(("head" in f.version) == head for f in listing.files)
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/syncbit-bench-head"))
    args = ap.parse_args()
    if shutil.which("nginx") is None:
        print("needs nginx (apt-get install -y nginx)", file=sys.stderr)
        return 2
    work: Path = args.dir
    shutil.rmtree(work, ignore_errors=True)
    (work / "www" / "many").mkdir(parents=True)
    big = work / "www" / "big.bin"
    with big.open("wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(MiB))
    for i in range(args.files):
        (work / "www" / "many" / f"f{i:05d}.txt").write_bytes(os.urandom(4096))
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; tcp_nopush on;
  server {{ listen 127.0.0.1:{port}; root {work}/www; autoindex on; }} }}
""")
    origin = f"http://127.0.0.1:{port}/"
    results: dict[str, list[tuple[float, float]]] = {"16 MiB": [], "4 MiB": [], "listing": []}
    with contextlib.ExitStack() as stack:
        stack.enter_context(process(["nginx", "-c", str(conf)], work / "nginx.out"))
        wait_http(origin)
        source = HttpSource(origin + "big.bin")
        stack.callback(source.close)
        (entry,) = trio.run(source.list).files
        bare = entry.model_copy(
            update={"version": {k: v for k, v in entry.version.items() if k != "head"}}
        )
        read_all(source, bare, 4)  # warm the page cache and the connection pool
        for _ in range(args.rounds):
            for name, chunks in (("16 MiB", 4), ("4 MiB", 1)):
                results[name].append(
                    (read_all(source, entry, chunks), read_all(source, bare, chunks))
                )
            results["listing"].append(
                (list_once(origin + "many/", True), list_once(origin + "many/", False))
            )
    print(
        f"\nnginx on loopback; {args.size_mib} MiB file, {args.files} files of 4 KiB; "
        f"{args.rounds} rounds, medians (ratio = with head / without)\n"
    )
    print(f"{'':14}{'with head':>12}{'without':>12}{'ratio':>8}")
    for name, pairs in results.items():
        label = f"reads {name}" if name != "listing" else "listing"
        with_head, without = median(p[0] for p in pairs), median(p[1] for p in pairs)
        ratio = median(p[0] / p[1] for p in pairs)
        print(f"{label:14}{with_head:11.3f}s{without:11.3f}s{ratio:8.3f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
