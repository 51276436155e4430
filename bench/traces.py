#!/usr/bin/env python3
"""Access traces: a second node's model load while its prefetch of the dataset runs, with
the prefetch following the first reader's trace vs following the listing's order.

The dataset is a model repository with two formats, as many on the Hub are: a
`flax_model.msgpack` (listed first) and a `model.safetensors` of the same size; the loader
reads only the safetensors file (safe_open, tensors in header order). The origin is nginx
on loopback with a per-connection `limit_rate` and `limit_conn`, so its total is capped
(default 4 x 50 MB/s) and what the prefetch fetches first costs the reader.

For each variant (`--trace on`, then a copy of the data added with `--trace off`): a
scheduler and two daemons (separate processes); node 1 loads the model through its mount
(the first reader: with tracing on it records the order and offers it) and is stopped, so
node 2 has no peer and reads the origin; node 2 is then given the dataset (`syncbit
prefetch --nodes n2`) and a load on node 2 starts `--start-after` seconds later (a pod
scheduled while the data is being warmed). Printed: seconds from the prefetch's start
until node 2's model is loaded, and until its prefetch completed. Needs root
(drop_caches), /dev/fuse, nginx, numpy and safetensors. Not a test: it prints seconds and
ratios.

    PYTHONPATH=$PWD python bench/traces.py [--size-mib 1024] [--rate 50m] [--conns 4]
        [--start-after 5] [--prefetch-on-open on|off] [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import Rounds, drop_caches, free_port, nginx, process, unmet, wait_http, workdirs
from checkpoint import load, make_checkpoint, wait_for

SYNCBIT = [sys.executable, "-m", "syncbit.cli"]
NODE_TIMEOUT = 3.0  # the scheduler's: node 1, stopped, is marked down after this


def cli(*args: str, log: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*SYNCBIT, *args], capture_output=True, text=True)
    with log.open("a") as out:
        out.write(f"$ syncbit {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise RuntimeError(f"syncbit {' '.join(args)}: {done.stderr.strip()}")
    return done


@contextlib.contextmanager
def daemon(work: Path, name: str, sched: str) -> Iterator[tuple[Path, str, Path]]:
    """A node daemon for the block: (mount, host:port, log)."""
    import yaml

    home = work / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    mnt = home / "mnt"
    listen = f"127.0.0.1:{free_port()}"
    (home / "daemon.yaml").write_text(yaml.safe_dump({"trace_quiet": 2.0}))
    argv = [*SYNCBIT, "daemon", "--node", name, "--scheduler", sched, "--listen", listen]
    argv += ["--mount", str(mnt), "--cache-dir", str(home / "cache")]
    argv += ["--config", str(home / "daemon.yaml")]
    log = home / "daemon.log"
    with contextlib.ExitStack() as stack:
        stack.enter_context(process(argv, log))
        stack.callback(subprocess.run, ["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        wait_http(f"http://{listen}/healthz")
        yield mnt, listen, log


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="each of the two files")
    ap.add_argument("--rate", default="50m", help="nginx limit_rate per connection")
    ap.add_argument("--conns", type=int, default=4, help="nginx limit_conn: connections")
    ap.add_argument("--rounds", type=int, default=1, help="rounds; medians are shown")
    ap.add_argument(
        "--start-after",
        type=float,
        default=5.0,
        help="seconds between node 2's prefetch starting and its load starting (the pod)",
    )
    ap.add_argument(
        "--prefetch-on-open",
        default="on",
        choices=["on", "off"],
        help="the datasets' prefetch_on_open (on: an open fetches the file whole anyway)",
    )
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/syncbit-bench-traces"))
    args = ap.parse_args()
    why = unmet("nginx")
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    work: Path = args.dir
    logs, www = workdirs(work)
    model = work / f"model-{args.size_mib}m.safetensors"
    other = work / f"flax-{args.size_mib}m.msgpack"
    print(f"writing two {args.size_mib} MiB files ...", flush=True)
    make_checkpoint(model, args.size_mib)
    if not other.exists():
        with open(f"{other}.tmp", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        os.chmod(f"{other}.tmp", 0o644)
        os.rename(f"{other}.tmp", other)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; sendfile on; tcp_nopush on; limit_rate {args.rate};
  limit_conn_zone $server_port zone=origin:1m; limit_conn_status 503;
  server {{ listen 127.0.0.1:{port}; root {www}; autoindex on;
            limit_conn origin {args.conns}; }} }}
""")
    counter = iter(range(1_000_000))

    def fresh_dataset() -> str:
        """A new directory holding both files (hard links): new objects, cold."""
        name = f"t{next(counter)}"
        shutil.rmtree(www / name, ignore_errors=True)
        (www / name).mkdir(parents=True)
        os.link(other, www / name / "flax_model.msgpack")
        os.link(model, www / name / "model.safetensors")
        return name

    def variant(trace: str) -> tuple[float, float]:
        sched_port = free_port()
        sched = f"http://127.0.0.1:{sched_port}"
        state = work / "sched"
        shutil.rmtree(state, ignore_errors=True)
        argv = [*SYNCBIT, "scheduler", "--listen", f"127.0.0.1:{sched_port}"]
        argv += ["--state-dir", str(state), "--node-timeout", str(NODE_TIMEOUT)]
        log = logs / f"run-trace-{trace}.log"
        with contextlib.ExitStack() as stack:
            stack.enter_context(process(argv, logs / f"scheduler-trace-{trace}.log"))
            wait_http(f"{sched}/healthz")
            name = fresh_dataset()
            url = f"http://127.0.0.1:{port}/{name}/"
            with daemon(work / trace, "n1", sched) as (mnt1, _, _):
                add = ("dataset", "add", name, url, "--trace", trace, "--scheduler", sched)
                cli(*add, "--prefetch-on-open", args.prefetch_on_open, log=log)
                path = mnt1 / name / "model.safetensors"
                wait_for(path)
                load(path)  # the first reader
                if trace == "on":
                    deadline = time.monotonic() + 60
                    while True:
                        ask = ("dataset", "trace", name, "--json", "--scheduler", sched)
                        shown = cli(*ask, log=log)
                        if json.loads(shown.stdout).get("trace"):
                            break
                        if time.monotonic() > deadline:
                            raise RuntimeError("node 1's access trace never reached the scheduler")
                        time.sleep(0.5)
            # Node 1 is gone (and marked down: its chunks are offered no more), so node 2
            # reads the origin, not a peer.
            time.sleep(NODE_TIMEOUT + 2)
            with daemon(work / trace, "n2", sched) as (mnt2, listen2, _):
                path = mnt2 / name / "model.safetensors"
                wait_for(path)
                drop_caches()
                start = time.perf_counter()
                cli("prefetch", name, "--nodes", "n2", "--scheduler", sched, log=log)
                waiter = subprocess.Popen(
                    [*SYNCBIT, "wait", name, "--timeout", "600s", "--daemon", listen2],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    time.sleep(args.start_after)
                    load(path)
                    loaded = time.perf_counter() - start
                    waiter.wait(600)
                    complete = time.perf_counter() - start
                finally:
                    if waiter.poll() is None:
                        waiter.kill()
                        waiter.wait()
            shutil.rmtree(www / name, ignore_errors=True)
        return loaded, complete

    rounds = Rounds()
    with nginx(conf, port):
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            for trace in ("on", "off"):
                loaded, complete = variant(trace)
                rounds.note(f"trace {trace}: node 2 model loaded", loaded)
                rounds.note(f"trace {trace}: node 2 prefetch complete", complete)

    cap = f"{args.conns} x {args.rate}"
    print(
        f"\n2 x {args.size_mib} MiB (flax_model.msgpack listed first, model.safetensors "
        f"loaded {args.start_after:g}s after the prefetch began, prefetch_on_open "
        f"{args.prefetch_on_open}); nginx on loopback, {cap}; "
        f"{args.rounds} round(s), medians; "
        "ratio = trace off / trace on\n"
    )
    for what in ("model loaded", "prefetch complete"):
        on = rounds.median(f"trace on: node 2 {what}")
        off = rounds.median(f"trace off: node 2 {what}")
        print(f"node 2 {what:18s} trace on {on:7.2f}s  off {off:7.2f}s  {off / on:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
