"""A quick profile of one scheduler process under N simulated daemons (the request mix of
issue 14), for the scheduler's own work; `bench/scale.py` is the full benchmark.

    python bench/sched_profile.py --nodes 300 --seconds 40

Each simulated node: a heartbeat every 2 s on a keep-alive connection, a generation long
poll held open, every third heartbeat a chunk-map lookup of one shared object, and a third
of the nodes claim and report 8 chunks of that object per heartbeat (the chunks others
established too, so holders per chunk grow). The scheduler runs in a child process
(`serve`) that samples its threads' stacks every 10 ms and prints where they were.
Prints: heartbeats answered (200 within 10 s), latency p50/p99, nodes up at the end,
threads and RSS of the scheduler, the largest response, the stack sample summary.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import hashlib
import json
import os
import pstats
import random
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, process, wait_http

HEARTBEAT = 2.0
TIMEOUT = 10.0
SIZE = 100 * 2**30
CHUNK = 4 * 2**20


# -- the scheduler side (child process) ---------------------------------------------------------


_IDLE = {"socket.py:readinto", "selectors.py:select", "_run.py:get_events"}


def _sampler(stop: threading.Event, counts: collections.Counter[str]) -> None:
    """Every 10 ms, the innermost syncbit/lmdb frame of every other thread."""
    me = threading.get_ident()
    while not stop.wait(0.01):
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            inner = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
            if inner in _IDLE:
                counts["(idle: waiting for a client or a timer)"] += 1
                continue
            where = "other"
            f: Any = frame
            while f is not None:
                name = f.f_code.co_filename
                if "/syncbit/" in name:
                    where = f"{os.path.basename(name)}:{f.f_code.co_name}"
                    break
                f = f.f_back
            counts[f"{where} <- {inner}"] += 1


def serve(args: argparse.Namespace) -> None:
    from syncbit.config import SchedulerConfig
    from syncbit.scheduler import SchedulerServer

    config = SchedulerConfig(
        listen=f"127.0.0.1:{args.port}",
        state_dir=Path(args.state),
        file_roots=[Path(args.root)],
        node_timeout=TIMEOUT,
    )
    profiles: list[cProfile.Profile] = []
    if args.cprofile:

        def hook(*_: Any) -> None:
            profile = cProfile.Profile()  # enable() replaces this hook in the thread
            profiles.append(profile)
            profile.enable()

        threading.setprofile(hook)
    counts: collections.Counter[str] = collections.Counter()
    stop = threading.Event()
    sampler = threading.Thread(target=_sampler, args=(stop, counts), daemon=True)
    server = SchedulerServer(config)
    server.start()
    if not args.cprofile:  # the sampler's GIL turns would distort the profile
        sampler.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    stop.set()
    total = sum(counts.values()) or 1
    print("stack samples (thread x 10 ms), top 15:")
    for where, n in counts.most_common(15):
        print(f"  {100 * n / total:5.1f}%  {where}")
    if profiles:
        stats = pstats.Stats(*profiles)
        print("\ncProfile of every thread, by own time:")
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
    utime, stime = (int(x) for x in Path("/proc/self/stat").read_text().split()[13:15])
    print(f"scheduler CPU: {(utime + stime) / os.sysconf('SC_CLK_TCK'):.1f} s")
    sys.stdout.flush()
    os._exit(0)  # the old server's stop() waits for every long poll


# -- the simulated nodes -------------------------------------------------------------------------


class Conn:
    """One keep-alive HTTP/1.1 connection (just enough of the protocol)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.port = port
        self.source = source  # nodes come from many addresses, as in a cluster
        self.stream: trio.SocketStream | None = None
        self.buf = b""

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        raw = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(raw)}\r\n\r\n"
        for attempt in (0, 1):
            if self.stream is None:
                self.stream = await trio.open_tcp_stream(
                    "127.0.0.1", self.port, local_address=self.source
                )
                self.buf = b""
            try:
                await self.stream.send_all(head.encode() + raw)
                return await self._answer()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError

    async def _answer(self) -> tuple[int, bytes]:
        assert self.stream is not None
        while b"\r\n\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        close = False
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value)
            if key.strip().lower() == "connection" and value.strip().lower() == "close":
                close = True
        while len(self.buf) < length:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        body, self.buf = self.buf[:length], self.buf[length:]
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.stream is not None:
            with trio.move_on_after(1):
                await self.stream.aclose()
            self.stream = None


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.latencies: list[float] = []
        self.statuses: collections.Counter[str] = collections.Counter()
        self.largest: dict[str, int] = collections.defaultdict(int)
        self.measuring = False


def digest_of(index: int) -> str:
    return hashlib.sha256(f"chunk {index}".encode()).hexdigest()


async def node(i: int, port: int, oid: str, stats: Stats, stop: trio.Event) -> None:
    name = f"node-{i:05d}"
    source = f"127.{1 + i // 200}.{1 + i % 200}.1"
    conn = Conn(port, source)
    reporter = i % 3 == 0
    next_chunk = 0
    beats = 0
    await trio.sleep(random.random() * HEARTBEAT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_poll, port, source, stats, stop)
        while not stop.is_set():
            start = trio.current_time()
            body = {"address": f"127.0.0.1:{10000 + i}", "labels": {"zone": f"z{i % 4}"}}
            status = "timeout"
            try:
                with trio.fail_after(TIMEOUT):
                    code, _ = await conn.request("PUT", f"/v1/nodes/{name}", body)
                status = str(code)
            except trio.TooSlowError:
                await conn.close()
            except OSError as exc:
                status = type(exc).__name__
            if stats.measuring:
                stats.sent += 1
                stats.statuses[status] += 1
                if status == "200":
                    stats.ok += 1
                    stats.latencies.append(trio.current_time() - start)
            beats += 1
            try:
                with trio.fail_after(TIMEOUT):
                    if reporter:
                        wanted = list(range(next_chunk, next_chunk + 8))
                        next_chunk += 8
                        claim = {"node": name, "chunks": wanted, "ttl": 60}
                        await conn.request("POST", f"/v1/objects/{oid}/claims", claim)
                        add = [{"object": oid, "size": SIZE, "chunk_size": CHUNK,
                                "chunks": [[c, digest_of(c)] for c in wanted]}]  # fmt: skip
                        await conn.request("POST", f"/v1/nodes/{name}/chunks", {"add": add})
                    if beats % 3 == 0:
                        code, answer = await conn.request(
                            "GET", f"/v1/objects/{oid}/chunks?node={name}"
                        )
                        if stats.measuring:
                            stats.largest["chunk map"] = max(
                                stats.largest["chunk map"], len(answer)
                            )
            except (trio.TooSlowError, OSError):
                await conn.close()
            left = HEARTBEAT - (trio.current_time() - start)
            with trio.move_on_at(trio.current_time() + max(0.0, left)):
                await stop.wait()
        nursery.cancel_scope.cancel()
    await conn.close()


async def long_poll(port: int, source: str, stats: Stats, stop: trio.Event) -> None:
    conn = Conn(port, source)
    generation = -1
    try:
        while not stop.is_set():
            try:
                with trio.fail_after(45):
                    code, body = await conn.request(
                        "GET", f"/v1/generation?after={generation}&timeout=30"
                    )
                if code == 200:
                    generation = json.loads(body)["generation"]
                else:
                    await trio.sleep(1)
            except (trio.TooSlowError, OSError, ValueError):
                await conn.close()
                await trio.sleep(1)
    finally:
        await conn.close()


def proc_figures(pid: int) -> tuple[int, int]:
    threads = rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return threads, rss


async def drive(args: argparse.Namespace, port: int, pid: int) -> None:
    setup = Conn(port)
    code, body = await setup.request(
        "POST", "/v1/datasets", {"name": "model", "source": f"file://{args.root}/model.bin"}
    )
    assert code == 200, body
    code, body = await setup.request("GET", "/v1/datasets/model")
    oid = json.loads(body)["files"][0]["object"]
    code, _ = await setup.request("POST", "/v1/datasets/model/targets", {"targets": None})
    stats = Stats()
    stop = trio.Event()
    peak_threads = peak_rss = 0
    async with trio.open_nursery() as nursery:
        for i in range(args.nodes):
            nursery.start_soon(node, i, port, oid, stats, stop)
        await trio.sleep(args.warmup)
        stats.measuring = True
        t_end = trio.current_time() + args.seconds
        while trio.current_time() < t_end:
            await trio.sleep(1)
            threads, rss = proc_figures(pid)
            peak_threads, peak_rss = max(peak_threads, threads), max(peak_rss, rss)
        stats.measuring = False
        up = -1
        with trio.move_on_after(30):
            code, body = await setup.request("GET", "/v1/nodes")
            if code == 200:
                up = sum(n["up"] for n in json.loads(body)["nodes"])
                stats.largest["GET /v1/nodes"] = len(body)
        stop.set()
        nursery.cancel_scope.cancel()
    lat = sorted(stats.latencies) or [float("nan")]
    print(f"nodes {args.nodes}: heartbeats answered {100 * stats.ok / max(1, stats.sent):.1f}% "
          f"of {stats.sent}; latency p50 {lat[len(lat) // 2]:.3f}s "
          f"p99 {lat[int(len(lat) * 0.99)]:.3f}s; nodes up {up}; "
          f"threads peak {peak_threads}, RSS peak {peak_rss / 2**20:.0f} MiB")  # fmt: skip
    print(f"  statuses {dict(stats.statuses)}; largest answers {dict(stats.largest)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    srv = sub.add_parser("serve")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--state", required=True)
    srv.add_argument("--root", required=True)
    srv.add_argument("--cprofile", action="store_true")
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--cprofile", action="store_true", help="profile every thread")
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        with (root / "model.bin").open("wb") as f:
            f.truncate(SIZE)  # sparse
        args.root = str(root)
        port = free_port()
        cmd = [sys.executable, __file__, "serve", "--port", str(port), "--state",
               f"{tmp}/state", "--root", str(root)] + ["--cprofile"] * args.cprofile  # fmt: skip
        log = Path(tmp) / "scheduler.log"
        with process(cmd, log) as proc:  # stopped by its PID at the end, failed or not
            wait_http(f"http://127.0.0.1:{port}/healthz")
            trio.run(drive, args, port, proc.pid)
        text = log.read_text()
        print(text[text.find("stack samples") :] if "stack samples" in text else text[-3000:])


if __name__ == "__main__":
    main()
