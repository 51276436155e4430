#!/usr/bin/env python3
"""`syncbit pull` vs the plain clients, side by side in one run, on the same bytes:

  s3   pull s3://bench/data/ from a loopback moto S3 server   vs boto3 `download_file`
  hf   pull hf://bench/model from the loopback Hub server      vs `snapshot_download`

Each ratio is (plain client time) / (syncbit pull time): >= 1.0 means syncbit is not
slower than not using it. The daemon's cache starts empty for every pull. Needs root and
/dev/fuse (the daemon mounts). Not a test: it prints.

    python bench/pull.py [--size-mib 1024] [--dir /var/tmp/syncbit-bench-pull] [--only s3|hf]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import free_port, process, wait_http

PY = sys.executable
AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def syncbit_pull(work: Path, uri: str, options: list[str], env: dict[str, str]) -> float:
    """Time `syncbit pull URI` on a fresh single node with the embedded scheduler."""
    node = work / "node"
    shutil.rmtree(node, ignore_errors=True)
    sched, listen = free_port(), free_port()
    mnt = node / "mnt"
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            process(
                [
                    PY,
                    "-m",
                    "syncbit.cli",
                    "daemon",
                    "--mount",
                    str(mnt),
                    "--cache-dir",
                    str(node / "cache"),
                    "--listen",
                    f"127.0.0.1:{listen}",
                    "--scheduler-listen",
                    f"127.0.0.1:{sched}",
                    "--node",
                    "bench",
                ],
                work / "daemon.log",
                env,
            )
        )
        stack.callback(subprocess.run, ["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        wait_http(f"http://127.0.0.1:{sched}/healthz")
        argv = [
            PY,
            "-m",
            "syncbit.cli",
            "pull",
            uri,
            *options,
            "--scheduler",
            f"http://127.0.0.1:{sched}",
            "--daemon",
            f"127.0.0.1:{listen}",
        ]
        return timed(
            lambda: subprocess.run(
                argv, check=True, env={**os.environ, **env}, stderr=subprocess.DEVNULL
            )
        )


def bench_s3(work: Path, size: int) -> tuple[float, float]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS)
    with process([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], work / "moto.log"):
        wait_http(f"{endpoint}/moto-api/data.json")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        src = work / "s3-src.bin"
        with src.open("wb") as f:
            for _ in range(size // (16 << 20)):
                f.write(os.urandom(16 << 20))
        client.upload_file(
            str(src),
            "bench",
            "data/weights.bin",
            Config=TransferConfig(multipart_chunksize=64 << 20),
        )
        with tempfile.TemporaryDirectory(dir=work) as out:
            plain = timed(
                lambda: client.download_file("bench", "data/weights.bin", f"{out}/weights.bin")
            )
        client.close()
        ours = syncbit_pull(work, "s3://bench/data/", ["--option", f"endpoint_url={endpoint}"], AWS)
    return plain, ours


def bench_hf(work: Path, size: int) -> tuple[float, float]:
    from huggingface_hub import snapshot_download

    from syncbit_testing.hub import Hub  # the loopback Hub-compatible server

    root = work / "hub"
    shutil.rmtree(root, ignore_errors=True)
    port = free_port()
    hub = Hub(root, port=port)
    shard = work / "hf-shard.safetensors"
    with shard.open("wb") as f:
        for _ in range(size // (16 << 20)):
            f.write(os.urandom(16 << 20))
    hub.add_commit("bench/model", {"model.safetensors": shard, "config.json": b"{}"})
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(work / "hf-home"),
    }
    os.environ.update(env)
    with hub:
        with tempfile.TemporaryDirectory(dir=work) as out:
            plain = timed(
                lambda: snapshot_download("bench/model", local_dir=out, endpoint=endpoint)
            )
        ours = syncbit_pull(work, "hf://bench/model", [], env)
    return plain, ours


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/syncbit-bench-pull"))
    ap.add_argument("--only", choices=["s3", "hf"])
    args = ap.parse_args()
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        print("needs root and /dev/fuse", file=sys.stderr)
        return 2
    args.dir.mkdir(parents=True, exist_ok=True)
    size = args.size_mib << 20
    rows = []
    for kind, fn, ref in (
        ("s3", bench_s3, "boto3 download_file"),
        ("hf", bench_hf, "snapshot_download"),
    ):
        if args.only and args.only != kind:
            continue
        plain, ours = fn(args.dir, size)
        rows.append((kind, ref, plain, ours))
    print(f"\ndataset {args.size_mib} MiB, loopback servers, fresh node cache per pull\n")
    print(f"{'source':6} {'plain client':22} {'plain':>9} {'syncbit pull':>13} {'ratio':>7}")
    for kind, ref, plain, ours in rows:
        print(
            f"{kind:6} {ref:22} {size / plain / 1e9:6.2f} GB/s {size / ours / 1e9:9.2f} GB/s"
            f" {plain / ours:6.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
