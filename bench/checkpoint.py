#!/usr/bin/env python3
"""A model load through the mount: a safetensors checkpoint (default 2 GiB) loaded with
`safetensors.safe_open` (mmap; tensors read in header order) cold through syncbit's mount,
with and without `prefetch_on_open`, vs `syncbit pull` followed by the same load from the
node's local cache (the copy a pull leaves), one fresh node and page cache dropped per run.

The origin is nginx on loopback with a per-connection `limit_rate` (default 100m: what a
real S3 or CDN connection delivers; `--rate 0` for none). Needs root (drop_caches),
/dev/fuse, nginx, numpy and safetensors. Not a test: it prints seconds and ratios.

    python bench/checkpoint.py [--size-mib 2048] [--rate 100m] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import Rounds, drop_caches, free_port, nginx, syncbit_node, unmet, workdirs

SYNCBIT = [sys.executable, "-m", "syncbit.cli"]
TENSOR_MIB = 32  # a checkpoint of many mid-sized tensors, like a transformer's layers


def make_checkpoint(path: Path, size_mib: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(size_mib // TENSOR_MIB):
        raw = os.urandom(TENSOR_MIB << 20)
        tensors[f"model.layers.{i:03d}.weight"] = np.frombuffer(raw, dtype=np.float16).reshape(
            -1, 4096
        )
    save_file(tensors, str(path) + ".tmp", metadata={"format": "np"})
    os.chmod(str(path) + ".tmp", 0o644)  # nginx's workers read it
    os.rename(str(path) + ".tmp", path)


def load(path: Path) -> float:
    """Seconds to load every tensor of the checkpoint at `path` with safe_open."""
    from safetensors import safe_open

    start = time.perf_counter()
    total = 0
    with safe_open(str(path), framework="np") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
            total += f.get_tensor(key).nbytes
    seconds = time.perf_counter() - start
    assert total > 0
    return seconds


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("ab") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--rate", default="100m", help="nginx limit_rate per connection; 0: none")
    ap.add_argument("--rounds", type=int, default=1, help="rounds; medians are shown")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/syncbit-bench-st"))
    args = ap.parse_args()
    why = unmet("nginx")
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    work: Path = args.dir
    logs, www = workdirs(work)
    checkpoint = work / f"model-{args.size_mib}m.safetensors"
    print(f"writing a {args.size_mib} MiB checkpoint ...", flush=True)
    make_checkpoint(checkpoint, args.size_mib)
    size = checkpoint.stat().st_size
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; sendfile on; tcp_nopush on; limit_rate {args.rate};
  server {{ listen 127.0.0.1:{port}; root {www}; autoindex on; }} }}
""")
    counter = iter(range(1_000_000))

    def fresh_dataset() -> str:
        """A new directory holding the checkpoint (a hard link): a new object, cold."""
        name = f"m{next(counter)}"
        shutil.rmtree(www / name, ignore_errors=True)
        (www / name).mkdir(parents=True)
        os.link(checkpoint, www / name / "model.safetensors")
        return name

    def through_mount(prefetch_on_open: str) -> float:
        with syncbit_node(work / "node") as (mnt, sched, _):
            name = fresh_dataset()
            add = [*SYNCBIT, "dataset", "add", name, f"http://127.0.0.1:{port}/{name}/"]
            add += ["--prefetch-on-open", prefetch_on_open, "--scheduler", sched]
            run(add, logs / "dataset-add.log")
            path = mnt / name / "model.safetensors"
            wait_for(path)
            drop_caches()
            return load(path)

    def pull_then_load() -> tuple[float, float]:
        with syncbit_node(work / "node") as (mnt, sched, daemon):
            name = fresh_dataset()
            url = f"http://127.0.0.1:{port}/{name}/"
            drop_caches()
            pulled = run(
                [*SYNCBIT, "pull", url, "--name", name, "--scheduler", sched, "--daemon", daemon],
                logs / "pull.log",
            )
            path = mnt / name / "model.safetensors"
            wait_for(path)
            drop_caches()
            return pulled, load(path)  # every byte here: the kernel reads the cache file

    rounds = Rounds()
    note = rounds.note
    with nginx(conf, port):
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            drop_caches()
            note("load from local disk (reference)", load(checkpoint))
            pulled, loaded = pull_then_load()
            note("syncbit pull", pulled)
            note("load after pull (local cache)", loaded)
            note("pull + load", pulled + loaded)
            note("safe_open cold through the mount, prefetch_on_open on", through_mount("on"))
            note("safe_open cold through the mount, prefetch_on_open off", through_mount("off"))
    for name in list(www.iterdir()):
        shutil.rmtree(name, ignore_errors=True)

    base = rounds.median("pull + load")
    rate = "no cap" if args.rate in ("0", "") else f"limit_rate {args.rate} per connection"
    print(
        f"\ncheckpoint {size / 2**30:.2f} GiB, {size // (TENSOR_MIB << 20)} tensors; nginx "
        f"on loopback, {rate}; {args.rounds} round(s), medians; ratio = speed vs pull + load\n"
    )
    for label in rounds.rows:
        seconds = rounds.median(label)
        print(f"{label:58s} {seconds:7.2f}s  {base / seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
