#!/usr/bin/env python3
"""The control plane at scale: N simulated daemons against one real `syncbit scheduler`.

Starts `python -m syncbit.cli scheduler` (from --pythonpath: a checkout, so two trees can
be compared), then N simulated nodes in --workers processes (bench/_scale_sim.py: each
does what syncbit/daemon.py, fetcher.py and jobs.py do, over raw keep-alive sockets, one
loopback address per node; no bytes move). With auth (the default) the scheduler has a
cluster secret, the bench makes a bootstrap credential, and every node exchanges it for
its own node credential before its first heartbeat, as a daemon does.

  --mode mix       heartbeats at the interval the scheduler asks for (every 2 s at
                   least, as a daemon), the generation long poll held open, and every 2 s a
                   third of the nodes claim and report 8 new chunks of one shared object, a
                   chunk-map lookup at every third tick (the mix of issue 14; a
                   lookup follows the map's updates after the first, as a daemon does;
                   --whole-maps: the whole map every time, as the issue measured);
                   --fixed-interval: a heartbeat every 2 s whatever the answer says, the
                   reports and lookups after each (the mix as before the interval followed
                   the cluster's size, and as an older daemon does)
  --mode prefetch  one 100 GiB dataset (20 sparse files of 5 GiB, file://) added and
                   assigned to every node once they are up; what the daemons do then:
                   long poll wakes, listing, manifest, plan, claims, chunk reports, chunk
                   maps (origin 10 Gbit/s, node links 25 Gbit/s, simulated)

Printed per run, over the measurement window (--duration seconds of steady state after
--ramp and --warmup; in prefetch mode the window opens at the assignment): heartbeats
answered, their p50/p99 latency, nodes the scheduler ever showed down although they were
running (GET /v1/nodes every 5 s vs the nodes' own record), the scheduler's peak RSS
(VmHWM), threads, open fds, CPU and the time its runnable threads waited for a CPU (on
this 2-core machine the simulator competes with it: a scheduler that waits for a CPU
answers late for want of one, not of work done), its own view from /metrics (the
heartbeats' latency from head to answer, the worst loop lag), the heartbeats' p99 per 10 s
of the window (when the slow ones were sent), the largest answer per route, answered
requests/s per route, errors by kind; and the simulator's own CPU and event-loop lag (a lagging loop
delays its nodes: the run says so), and the machine's load average.

    PYTHONPATH=$PWD python bench/scale.py --nodes 200,500,1000 [--mode mix|prefetch]
    PYTHONPATH=$PWD python bench/scale.py --nodes 2000 --compare \\
        --old-pythonpath /work/main --new-pythonpath /work/wt/sched

--pin runs the scheduler alone on the first CPU and the simulator (and the bench) on the
others (`taskset`), as a scheduler on its own machine: sharing CPUs, every reply it sends
wakes a simulator worker at a better nice, which then takes its CPU in the middle of the
send (py-spy at 5,000 nodes: 23% of the loop's time inside `send`, a fifth of a core's
time each second waiting for a CPU). On a 2-CPU machine the simulator of 5,000 nodes does
not fit on one CPU (its own loop then lags seconds, which the latencies include), so it
is for machines with more.

Not a test: it prints (and --json PATH writes every figure). Needs nothing but loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _common import free_port, process, wait_http

REPO = Path(__file__).resolve().parent.parent
DATASET = "scale"
HB_ROUTE = "heartbeat"
NODES_SAMPLE_EVERY = 5.0
METRICS_SAMPLE_EVERY = 5.0  # the scheduler's /metrics (more often than Prometheus would)
FD_BUDGET = 19_000  # this container's RLIMIT_NOFILE is 20,000 per process (hard)
LIMITED_CPU = 0.9  # a worker busier than this (cores) paces its nodes, not the scheduler
LIMITED_LAG = 0.25  # seconds of p99 loop lag that delay what a node sends
_RATE = re.compile(r"\s*([0-9.]+)\s*([kmg]?)(bit|b)?\s*", re.I)
_SIZE = re.compile(r"\s*([0-9]+)\s*(B?|KiB|MiB|GiB)\s*")


def parse_rate(text: str) -> float:
    """'10gbit' -> bytes/s (k/m/g are powers of 1000; 'b' alone means bytes)."""
    match = _RATE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 10gbit)")
    value = float(match.group(1)) * 1000.0 ** " kmg".index(match.group(2).lower() or " ")
    return value / 8 if (match.group(3) or "bit").lower() == "bit" else value


def parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GiB)")
    units = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return int(match.group(1)) * units[match.group(2)]


def tree_label(path: Path) -> str:
    """'main a9df49e' style: the checkout's branch and commit (and '+dirty')."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit or git("rev-parse", "--show-toplevel") != str(path.resolve()):
        return path.name  # not a checkout of its own (an export): its directory's name
    branch = git("rev-parse", "--abbrev-ref", "HEAD") or path.name
    dirty = "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{branch} {commit}{dirty}"


# -- the scheduler's side: admin calls and samplers -------------------------------------------


class Admin:
    """An operator's calls (cluster secret as the bearer), one connection each."""

    def __init__(self, port: int, secret: str | None) -> None:
        self.port = port
        self.secret = secret

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers["Authorization"] = f"Bearer {self.secret}"
        try:
            payload = None if body is None else json.dumps(body).encode()
            conn.request(method, path, payload, headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status // 100 != 2:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {raw[:300]!r}")
        return raw if path == "/metrics" else json.loads(raw)


@dataclass
class ProcSample:
    t: float
    rss: int
    hwm: int
    threads: int
    cpu: float  # seconds of CPU (user + system) so far
    fds: int
    runq: float  # seconds its threads waited for a CPU while runnable, so far (schedstat)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 if it is gone)."""
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _runq_seconds(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (the second field
    of each /proc/PID/task/TID/schedstat; 0 where the kernel keeps no schedstats)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def machine_busy() -> float:
    """CPU seconds all processors spent busy since boot (/proc/stat; idle and iowait out)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return (total - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _proc(pid: int) -> ProcSample | None:
    """The scheduler's figures; CPU includes its children (nginx's worker, for the stub)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in status.splitlines())
    )
    cpu = _cpu_seconds(pid) + sum(_cpu_seconds(c) for c in _children(pid))
    return ProcSample(
        time.time(),
        int(fields["VmRSS"].split()[0]) * 1024,
        int(fields["VmHWM"].split()[0]) * 1024,
        int(fields["Threads"]),
        cpu,
        fds,
        _runq_seconds(pid),
    )


@dataclass
class NodesSample:
    sent: float
    took: float
    up: set[str] = field(default_factory=set)
    down: set[str] = field(default_factory=set)
    error: str = ""


_HB_BUCKET = re.compile(
    r'^syncbit_scheduler_request_seconds_bucket\{le="([^"]+)",route="heartbeat"\} (\S+)$', re.M
)
_LOOP_LAG = re.compile(r"^syncbit_scheduler_loop_lag_seconds (\S+)$", re.M)
_GC = re.compile(
    r"^syncbit_gc_(collections_total|pause_seconds_total|longest_pause_seconds)"
    r'\{generation="2"\} (\S+)$',
    re.M,
)


@dataclass
class MetricsSample:
    t: float
    buckets: dict[float, float]  # heartbeats answered within le seconds, cumulative
    lag: float | None
    gc: dict[str, float] = field(default_factory=dict)  # full collections: count, seconds, longest

    @classmethod
    def parse(cls, t: float, text: str) -> MetricsSample:
        buckets = {float(le): float(n) for le, n in _HB_BUCKET.findall(text)}
        lag = _LOOP_LAG.search(text)
        gc = {name: float(value) for name, value in _GC.findall(text)}
        return cls(t, buckets, float(lag.group(1)) if lag else None, gc)


def histogram_pct(first: dict[float, float], last: dict[float, float], q: float) -> float | None:
    """The bucket bound below which a share `q` of the observations between two cumulative
    histograms fell (None without observations)."""
    bounds = sorted(last)
    counts = [last[b] - first.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * counts[-1]:
            return bound
    return bounds[-1]


class Samplers:
    """Background threads: the scheduler's /proc figures, its view of who is up, the load
    average. Stopped by `stop`."""

    def __init__(self, pid: int, admin: Admin) -> None:
        self.pid = pid
        self.admin = admin
        self.proc: list[ProcSample] = []
        self.nodes: list[NodesSample] = []
        self.load: list[tuple[float, float]] = []
        self.busy: list[tuple[float, float, float]] = []  # (t, machine busy s, this process)
        self.metrics: list[MetricsSample] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._proc_loop, daemon=True),
            threading.Thread(target=self._nodes_loop, daemon=True),
            threading.Thread(target=self._metrics_loop, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _proc_loop(self) -> None:
        while not self._stop.wait(0.5):
            sample = _proc(self.pid)
            if sample is not None:
                self.proc.append(sample)
            load = float(Path("/proc/loadavg").read_text().split()[0])
            self.load.append((time.time(), load))
            self.busy.append((time.time(), machine_busy(), time.process_time()))

    def _nodes_loop(self) -> None:
        while not self._stop.wait(NODES_SAMPLE_EVERY):
            sent = time.time()
            sample = NodesSample(sent, 0.0)
            try:
                doc = self.admin.call("GET", "/v1/nodes", timeout=30)
                for node in doc["nodes"]:
                    (sample.up if node.get("up") else sample.down).add(str(node["name"]))
            except Exception as exc:  # a sampler that cannot ask says so in the report
                sample.error = f"{type(exc).__name__}: {exc}"[:200]
            sample.took = time.time() - sent
            self.nodes.append(sample)

    def _metrics_loop(self) -> None:
        """The scheduler's own view, as Prometheus would scrape it: its heartbeat latency
        histogram and loop lag (absent from a scheduler older than them)."""
        while not self._stop.wait(METRICS_SAMPLE_EVERY):
            try:
                text = self.admin.call("GET", "/metrics", timeout=30).decode()
            except Exception:
                continue
            self.metrics.append(MetricsSample.parse(time.time(), text))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=40)


# -- the calibration stub ---------------------------------------------------------------------


def stub_config(run_dir: Path, port: int) -> Path:
    """nginx answering every route the nodes use with a canned answer of the real shape
    and size, at once: the simulator against it shows what the simulator alone can drive
    (its CPU and loop lag at this N), with no scheduler in the way."""
    www = run_dir / "www"
    www.mkdir()
    files = [
        {
            "path": f"f{i}",
            "size": 5 << 30,
            "mode": 292,
            "object": f"{i:02x}" * 32,
            "locator": f"f{i}",
            "version": {"size": str(5 << 30), "mtime_ns": "1"},
        }
        for i in range(20)
    ]
    manifest = {
        "dataset": DATASET,
        "source": "file:///stub",
        "source_options": {},
        "revision": "r1",
        "chunk_size": 4 << 20,
        "created": 0.0,
        "files": files,
    }
    (www / "manifest.json").write_text(json.dumps(manifest))
    peers = [{"node": f"sim{n:05d}", "address": f"127.10.0.{n}:7901"} for n in range(8)]
    chunk_map = {
        "digests": {str(i): "cd" * 32 for i in range(360)},
        "peers": {str(i): peers for i in range(360)},
        "disputed": [],
        "fetching": {},
        "cursor": "stub.1",
    }
    (www / "chunkmap.json").write_text(json.dumps(chunk_map, separators=(",", ":")))
    labels = {f"label.example/{i}": "value" for i in range(12)}
    record = {
        "name": "sim00000",
        "address": "127.10.0.1:7901",
        "labels": labels,
        "last_seen": 1.0,
        "load": 0,
        "cache_bytes": 0,
        "cache_size": 1,
        "reports": 0,
        "label_overrides": {},
        "ready": {},
        "pinned_bytes": 0,
        "pinned_over_budget": False,
        "disk_full": False,
        "disk_free": 1,
        "up": True,
        "quarantined": None,
        "plan": [],
        "rechecks": [],
        "discard": [],
    }
    canned = {
        r"^/v1/nodes/[^/]+$": record,
        r"^/v1/nodes/[^/]+/credential$": {
            "node": "x",
            "token": "sb1." + "x" * 200 + ".y",
            "peer_token": "sb1.p.q",
            "expires": 0,
            "public_key": "k" * 43,
            "key_id": "0" * 16,
        },
        r"^/v1/nodes/[^/]+/chunks$": {"conflicts": [], "refused": [], "unknown": []},
        r"^/v1/nodes/[^/]+/plan$": {"generation": 1, "plan": []},
        r"^/v1/objects/[^/]+/claims$": {"granted": list(range(8)), "busy": {}, "held": []},
        r"^/v1/objects/[^/]+/release$": {},
        r"^/v1/objects/[^/]+/updates$": {
            "cursor": "stub.1",
            "reset": False,
            "more": False,
            "broken": None,
            "changed": [],
            "digests": {},
            "peers": {},
            "fetching": {},
            "disputed": [],
            "addresses": {},
        },
        r"^/v1/datasets$": {
            "generation": 1,
            "datasets": [{"name": DATASET, "revision": "r1"}],
            "dataset": {"name": DATASET},
        },
        r"^/v1/datasets/[^/]+/targets$": {"targets": []},
        r"^/v1/generation$": {"generation": 1},
        r"^/v1/nodes$": {"nodes": []},
        r"^/v1/tokens$": {"token": "sb1.b.c", "role": "bootstrap"},
        r"^/healthz$": {"ok": True},
    }
    locations = [
        f"location ~ {pattern} {{ default_type application/json; "
        f"return 200 '{json.dumps(doc, separators=(',', ':'))}'; }}"
        for pattern, doc in canned.items()
    ]
    for pattern, name in (
        (r"^/v1/datasets/[^/]+$", "manifest"),
        (r"^/v1/objects/[^/]+/chunks$", "chunkmap"),
    ):
        locations.append(
            f"location ~ {pattern} {{ default_type application/json; "
            f"rewrite ^ /{name}.json break; root {www}; }}"
        )
    conf = run_dir / "nginx.conf"
    conf.write_text(
        f"worker_processes 1; daemon off; pid {run_dir}/nginx.pid; "
        f"error_log {run_dir}/nginx.err; worker_rlimit_nofile {FD_BUDGET};\n"
        f"events {{ worker_connections {FD_BUDGET}; }}\n"
        f"http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 120s;\n"
        f"  server {{ listen 127.0.0.1:{port} backlog=4096;\n    "
        + "\n    ".join(locations)
        + "\n  }\n}\n"
    )
    return conf


# -- one run ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one run does: N nodes of `mode` against the scheduler from `tree`."""

    nodes: int
    mode: str
    tree: Path
    label: str
    stub: bool = False  # nginx with canned answers instead of a scheduler (--calibrate)
    fixed: bool = False  # nodes beat every --hb-interval whatever the scheduler asks


def make_dataset(root: Path, files: int, size: int) -> Path:
    """`files` sparse files of `size` bytes (nothing is read: nodes move no bytes)."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        path = data / f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        if not path.exists() or path.stat().st_size != size:
            with path.open("wb") as f:
                f.truncate(size)
    return data


def conns_per_node(args: argparse.Namespace, nodes: int) -> int:
    """Connections a node may open beside its heartbeat and long poll: httpx would open
    as many as it has requests in flight; here bounded so that every node's connections
    fit the scheduler's file descriptor limit."""
    fit = FD_BUDGET // max(1, nodes) - 2
    return max(1, min(int(args.conns), fit))


def run_one(plan: Plan, args: argparse.Namespace, work: Path, data: Path) -> dict[str, Any]:
    run_dir = work / f"{plan.mode}-{plan.nodes}-{re.sub(r'[^A-Za-z0-9]+', '_', plan.label)}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    port = free_port()
    secret = None if args.no_auth else secrets.token_hex(32)
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(run_dir / "state"),
        "file_roots": [str(data)],
        "node_timeout": args.node_timeout,
        "log_level": "info",
    }
    if args.heartbeat_rate is not None:
        config["heartbeat_rate"] = args.heartbeat_rate  # the scheduler's default otherwise
    if secret:
        (run_dir / "secret").write_text(secret + "\n")
        (run_dir / "secret").chmod(0o600)
        config["token_file"] = str(run_dir / "secret")
    (run_dir / "scheduler.json").write_text(json.dumps(config))  # YAML is a superset of JSON
    cmd = [sys.executable, "-m", "syncbit.cli", "scheduler", "--config"]
    cmd += [str(run_dir / "scheduler.json"), *args.scheduler_arg]
    if plan.stub:
        cmd = ["nginx", "-c", str(stub_config(run_dir, port))]
    cmd = pinned(cmd, args.sched_cpus)
    env = {"PYTHONPATH": str(plan.tree), "PYTHONUNBUFFERED": "1"}
    conns = conns_per_node(args, plan.nodes)
    ramp = args.ramp if args.ramp is not None else max(10.0, plan.nodes / 100)
    print(
        f"\n== {plan.mode}, {plan.nodes} nodes, scheduler from {plan.tree} ({plan.label}), "
        f"auth {'off' if args.no_auth else 'on'}, ramp {ramp:g}s, window {args.duration:g}s, "
        f"simulator: {args.workers} workers at autogroup nice {args.sim_nice}, scheduler at "
        f"{args.sched_nice}; "
        + (
            f"scheduler on CPU {_cpus(args.sched_cpus)}, the rest on {_cpus(args.other_cpus)}"
            if args.sched_cpus
            else "no CPU pinned"
        ),
        flush=True,
    )
    result: dict[str, Any] = {
        "nodes": plan.nodes,
        "mode": plan.mode,
        "tree": str(plan.tree),
        "label": plan.label,
        "auth": not args.no_auth,
        "conns": conns,
        "workers": args.workers,
    }
    log_path = run_dir / "scheduler.log"
    if not plan.stub:
        # `python -m` puts its working directory first on the import path: run_dir, so
        # the scheduler's code is --pythonpath's and nothing else (said in the header).
        where = subprocess.run(
            [sys.executable, "-c", "import syncbit; print(syncbit.__file__)"],
            cwd=run_dir,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=False,
        )
        result["code"] = where.stdout.strip() or where.stderr.strip()[-200:]
        print(f"   scheduler code: {result['code']}", flush=True)
    with process(cmd, log_path, env, cwd=run_dir) as sched:
        if args.sched_nice:
            _boost(sched.pid, args.sched_nice)
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        admin = Admin(port, secret)
        bootstrap = None
        if secret:
            doc = admin.call("POST", "/v1/tokens", {"role": "bootstrap", "ttl": 86400})
            bootstrap = str(doc["token"])
        source = f"file://{data}"
        if plan.mode == "mix":
            began = time.time()
            admin.call("POST", "/v1/datasets", {"name": DATASET, "source": source}, 600)
            result["dataset_add_s"] = time.time() - began
        start_at = time.time() + 3.0  # workers import and connect meanwhile
        t_assign = start_at + ramp + args.warmup
        w0 = t_assign if plan.mode == "prefetch" else start_at + ramp + args.warmup
        w1 = w0 + args.duration
        spec = {
            "mode": plan.mode,
            "host": "127.0.0.1",
            "port": port,
            "total": plan.nodes,
            "start_at": start_at,
            "ramp": ramp,
            "w0": w0,
            "w1": w1,
            "end_at": w1 + 0.5,
            "bootstrap": bootstrap,
            "dataset": DATASET,
            "hb_interval": args.hb_interval,
            "obey_interval": not plan.fixed,
            "whole_maps": args.whole_maps,
            "timeout": args.timeout,
            "conns": conns,
            "origin_rate": args.origin_rate / args.workers,
            "link_rate": args.link_rate,
            "stub": plan.stub,
        }
        samplers = Samplers(sched.pid, admin)
        workers = start_workers(spec, args.workers, run_dir, args.sim_nice, args.other_cpus)
        try:
            if plan.mode == "prefetch":
                time.sleep(max(0.0, t_assign - time.time()))
                body = {"name": DATASET, "source": source}
                if operator(admin, "POST", "/v1/datasets", body, w1, result, "dataset_add"):
                    path = f"/v1/datasets/{DATASET}/targets"
                    operator(admin, "POST", path, {"targets": []}, w1, result, "assign")
            outputs = finish_workers(workers, w1 + 120)
        finally:
            samplers.stop()
            for proc, _ in workers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        last = _proc(sched.pid)
        if last is not None:
            samplers.proc.append(last)
        if sched.poll() is not None:
            result["scheduler_exited"] = sched.returncode
    result.update(analyse(plan, outputs, samplers, w0, w1))
    result["scheduler_log"] = log_summary(log_path)
    result["nodes_down_logged"] = log_down(log_path, w0, w1)
    report(result)
    return result


def operator(
    admin: Admin,
    method: str,
    path: str,
    body: Any,
    until: float,
    result: dict[str, Any],
    key: str,
) -> bool:
    """An operator's command, tried again every 2 s while the scheduler refuses it (as a
    person re-runs `syncbit prefetch`), until the window closes. Records the seconds to
    success (`<key>_s`), the refusals (`<key>_refused`) and the last one."""
    began = time.time()
    refused = 0
    while True:
        try:
            admin.call(method, path, body, timeout=600)
        except (RuntimeError, OSError) as exc:
            refused += 1
            result[f"{key}_refused"] = refused
            result[f"{key}_error"] = str(exc)[:200]
            if time.time() > until:
                return False
            time.sleep(2.0)
            continue
        result[f"{key}_s"] = time.time() - began
        return True


def pinned(cmd: list[str], cpus: set[int]) -> list[str]:
    """`cmd` to run on `cpus` only (all its threads; `taskset`), or as it is (none)."""
    return ["taskset", "-c", _cpus(cpus), *cmd] if cpus else cmd


def _cpus(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def start_workers(
    spec: dict[str, Any],
    count: int,
    run_dir: Path,
    nice: int = 0,
    other_cpus: set[int] | None = None,
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    total = spec["total"]
    workers = []
    for w in range(count):
        first, last = total * w // count, total * (w + 1) // count
        part = {**spec, "first": first, "count": last - first}
        err = run_dir / f"worker{w}.log"
        spec_path = run_dir / f"worker{w}.json"
        spec_path.write_text(json.dumps(part))
        with err.open("wb") as stderr, spec_path.open("rb") as stdin:
            proc = subprocess.Popen(
                pinned([sys.executable, "-c", "import _scale_sim; _scale_sim.main()"], other_cpus),
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=Path(__file__).parent,
                # The bench's own tree too: the simulated nodes bound the heartbeat interval
                # with the daemon's own function.
                env={**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{REPO}"},
                start_new_session=True,
            )
        workers.append((proc, err))
        if nice:
            _boost(proc.pid, nice)
    return workers


def _boost(pid: int, nice: int) -> None:
    """Give a process's session (its autogroup: Linux shares CPU between sessions first)
    another nice. Simulator workers get a better one than the rest by default: the nodes
    they stand for are other machines, and must not wait for a CPU behind the
    scheduler's threads or other processes to send their heartbeats (their own CPU use
    is measured and printed). --sched-nice does the same for the scheduler."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
    except OSError as exc:
        print(f"   note: cannot renice process {pid}: {exc.strerror}", flush=True)


def finish_workers(
    workers: list[tuple[subprocess.Popen[bytes], Path]], deadline: float
) -> list[dict[str, Any]]:
    outputs = []
    for proc, err in workers:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"a simulator worker did not finish; see {err}") from None
        if proc.returncode != 0:
            tail = err.read_text()[-2000:]
            raise RuntimeError(f"a simulator worker failed ({proc.returncode}):\n{tail}")
        outputs.append(json.loads(out))
    return outputs


# -- figures ----------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def analyse(
    plan: Plan, outputs: list[dict[str, Any]], samplers: Samplers, w0: float, w1: float
) -> dict[str, Any]:
    window = w1 - w0
    routes: dict[str, dict[str, Any]] = {}
    nodes: dict[str, dict[str, Any]] = {}
    counts: Counter[str] = Counter()
    lag: list[float] = []
    samples: dict[str, str] = {}
    for out in outputs:
        for name, r in out["routes"].items():
            agg = routes.setdefault(
                name,
                {
                    "sent": 0,
                    "ok": 0,
                    "errors": Counter(),
                    "errors_all": Counter(),
                    "latencies": [],
                    "starts": [],
                    "max_bytes": 0,
                },
            )
            agg["errors_all"].update(r["errors_all"])
            agg["sent"] += r["sent"]
            agg["ok"] += r["ok"]
            agg["errors"].update(r["errors"])
            agg["latencies"] += r["latencies"]
            agg["starts"] += r.get("starts", [])
            agg["max_bytes"] = max(agg["max_bytes"], r["max_bytes"])
        nodes.update(out["nodes"])
        counts.update(out["counts"])
        lag += out["lag"]
        for k, v in out["samples"].items():
            samples.setdefault(k, v)
    hb = routes.get(HB_ROUTE, {"sent": 0, "ok": 0, "latencies": [], "errors": Counter()})
    # Liveness: every simulated node runs (and keeps trying to heartbeat) for the whole
    # run, so each one the scheduler lists as down after it first registered was marked
    # down falsely.
    in_window = [s for s in samplers.nodes if w0 <= s.sent < w1]
    false_down: set[str] = set()
    up_counts = []
    for s in in_window:
        if s.error:
            continue
        up_counts.append(len(s.up))
        for name in s.down:
            first = (nodes.get(name) or {}).get("first_ok")
            if first is not None and first < s.sent:
                false_down.add(name)
    never = sum(1 for n in nodes.values() if n["first_ok"] is None)
    # The interval each registered node kept to at the end (what the last answer asked,
    # within the daemon's bounds), and the heartbeats that makes due in the window.
    in_force = sorted(float(n.get("in_force") or 0.0) for n in nodes.values() if n["first_ok"])
    due_in_force = sum(window / i for i in in_force if i > 0)
    proc = [p for p in samplers.proc if w0 <= p.t <= w1]
    cpu = (proc[-1].cpu - proc[0].cpu) / (proc[-1].t - proc[0].t) if len(proc) > 1 else 0.0
    runq = (proc[-1].runq - proc[0].runq) / (proc[-1].t - proc[0].t) if len(proc) > 1 else 0.0
    load = [v for t, v in samplers.load if w0 <= t <= w1]
    sim_cpu = [out["cpu"] / out["window"] for out in outputs]
    busy = [b for b in samplers.busy if w0 <= b[0] <= w1]
    machine = others = float("nan")
    if len(busy) > 1:
        span = busy[-1][0] - busy[0][0]
        machine = (busy[-1][1] - busy[0][1]) / span
        bench_main = (busy[-1][2] - busy[0][2]) / span
        others = machine - cpu - sum(sim_cpu) - bench_main
    # The scheduler's side of the heartbeats: its histogram over the window, and the
    # worst loop lag it noted (what a request waited before the loop read it).
    scraped = [m for m in samplers.metrics if w0 <= m.t <= w1 + METRICS_SAMPLE_EVERY]
    served = [m for m in scraped if m.buckets]
    served_p50 = served_p99 = None
    if len(served) > 1:
        served_p50 = histogram_pct(served[0].buckets, served[-1].buckets, 0.50)
        served_p99 = histogram_pct(served[0].buckets, served[-1].buckets, 0.99)
    lags = [m.lag for m in scraped if m.lag is not None]
    # Its full garbage collections in the window: a pause of the whole loop each.
    collected = [m.gc for m in scraped if m.gc]
    full_gc = None
    if len(collected) > 1:
        first, last = collected[0], collected[-1]
        full_gc = {
            "count": last.get("collections_total", 0.0) - first.get("collections_total", 0.0),
            "seconds": last.get("pause_seconds_total", 0.0) - first.get("pause_seconds_total", 0.0),
            "longest_ever": last.get("longest_pause_seconds", 0.0),
        }
    held = sum(o["chunks_held"] for o in outputs)
    needed = sum(o["chunks_needed"] for o in outputs)
    return {
        "window_s": window,
        "hb_sent": hb["sent"],
        "hb_ok": hb["ok"],
        "hb_due": plan.nodes * window / 2.0,
        "hb_due_in_force": due_in_force,
        "interval_min_s": in_force[0] if in_force else None,
        "interval_p50_s": _pct(in_force, 0.5),
        "interval_max_s": in_force[-1] if in_force else None,
        "hb_answered_pct": 100.0 * hb["ok"] / hb["sent"] if hb["sent"] else 0.0,
        "hb_p50_s": _pct(hb["latencies"], 0.50),
        "hb_p99_s": _pct(hb["latencies"], 0.99),
        "hb_slices": hb_slices(hb.get("starts", []), hb["latencies"], w0, w1),
        "hb_errors": dict(hb["errors"]),
        "nodes_never_registered": never,
        "nodes_false_down": len(false_down),
        "nodes_up_min": min(up_counts) if up_counts else None,
        "nodes_up_last": up_counts[-1] if up_counts else None,
        "nodes_samples": len(in_window),
        "nodes_samples_failed": sum(1 for s in in_window if s.error),
        "nodes_sample_s_max": max((s.took for s in in_window), default=0.0),
        "sched_rss_peak": max((p.hwm for p in samplers.proc), default=0),
        "sched_threads_max": max((p.threads for p in samplers.proc), default=0),
        "sched_fds_max": max((p.fds for p in samplers.proc), default=0),
        "sched_cpu_cores": cpu,
        "sched_runq_cores": runq,
        "sched_hb_p50_le_s": served_p50,
        "sched_hb_p99_le_s": served_p99,
        "sched_loop_lag_max_s": max(lags) if lags else None,
        "sched_full_gc": full_gc,
        "routes": {
            name: {
                "sent": r["sent"],
                "ok": r["ok"],
                "ok_per_s": r["ok"] / window,
                "p50_s": _pct(r["latencies"], 0.5),
                "p99_s": _pct(r["latencies"], 0.99),
                "errors": dict(r["errors"]),
                "errors_all": dict(r["errors_all"]),
                "max_bytes": r["max_bytes"],
            }
            for name, r in sorted(routes.items())
        },
        "counts": dict(counts),
        "sim_cpu_cores": sim_cpu,
        "sim_lag_p50_s": _pct(lag, 0.5),
        "sim_lag_p99_s": _pct(lag, 0.99),
        "sim_verdict": _verdict(sim_cpu, _pct(lag, 0.99)),
        "machine_cores": machine,
        "others_cores": others,
        "load_mean": statistics.fmean(load) if load else None,
        "load_max": max(load) if load else None,
        "prefetch_pct": 100.0 * held / needed if needed else None,
        "ready_nodes": sum(o["ready_nodes"] for o in outputs),
        "error_samples": dict(sorted(samples.items())[:12]),
    }


def hb_slices(
    starts: list[float], latencies: list[float], w0: float, w1: float, width: float = 10.0
) -> list[dict[str, Any]]:
    """The window's heartbeats in slices of `width` s by when they were sent: each slice's
    count, p99 and answers over 1 s, so a slow tail shows when it happened (one burst,
    such as every node waking at the assignment, or spread over the run)."""
    slices: list[list[float]] = [[] for _ in range(max(1, int((w1 - w0 + width - 1) // width)))]
    for began, elapsed in zip(starts, latencies, strict=False):
        at = int((began - w0) // width)
        if 0 <= at < len(slices):
            slices[at].append(elapsed)
    return [
        {"from_s": k * width, "n": len(v), "p99_s": _pct(v, 0.99), "over_1s": sum(x > 1 for x in v)}
        for k, v in enumerate(slices)
    ]


def _verdict(cpu: list[float], lag_p99: float) -> str:
    """Whether the simulator, not the scheduler, set the pace: a worker near a whole core
    sends late by itself; a loop that wakes late with CPU to spare waited for the
    machine (other processes on the 2 cores), which delays its requests just the same."""
    if any(c > LIMITED_CPU for c in cpu):
        return "LIMITED by its own CPU"
    if lag_p99 > LIMITED_LAG:
        return "delayed by the machine's load (loop lag with CPU to spare)"
    return "not the bottleneck"


_DOWN = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+) .*node (\S+) is down")


def log_down(path: Path, w0: float, w1: float) -> int:
    """Distinct nodes the scheduler logged as down inside the window (today's scheduler
    logs each transition; another may not, and GET /v1/nodes is the measure then)."""
    names = set()
    try:
        with path.open(errors="replace") as f:
            for line in f:
                match = _DOWN.match(line)
                if match:
                    at = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
                    if w0 <= at + int(match.group(2)) / 1000 < w1:
                        names.add(match.group(3))
    except OSError:
        pass
    return len(names)


def log_summary(path: Path) -> dict[str, int]:
    """Scheduler log lines worth a look, counted by their gist."""
    gists: Counter[str] = Counter()
    patterns = {
        "marked down": re.compile(r"is down: no heartbeat"),
        "MDB_READERS_FULL": re.compile(r"READERS_FULL|readers full", re.I),
        "traceback": re.compile(r"^Traceback"),
        "too many connections": re.compile(r"too many connections", re.I),
        "error lines": re.compile(r"\bERROR\b"),
    }
    try:
        with path.open(errors="replace") as f:
            for line in f:
                for gist, pattern in patterns.items():
                    if pattern.search(line):
                        gists[gist] += 1
    except OSError:
        pass
    return dict(gists)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt_s(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s"


def report(r: dict[str, Any]) -> None:
    """One run's figures, as lines a person reads."""
    print(f"-- {r['mode']} {r['nodes']} nodes, {r['label']}: window {r['window_s']:.0f}s")
    if "scheduler_exited" in r:
        print(f"   scheduler EXITED during the run (code {r['scheduler_exited']})")
    print(
        f"   heartbeats: {r['hb_ok']}/{r['hb_sent']} answered ({r['hb_answered_pct']:.1f}%; "
        f"{r['hb_ok'] / r['hb_due'] * 100:.0f}% of one per node per 2 s), "
        f"p50 {_fmt_s(r['hb_p50_s'])}, p99 {_fmt_s(r['hb_p99_s'])}, errors {r['hb_errors']}"
    )
    if r.get("hb_slices"):
        parts = [
            f"{s['from_s']:.0f}s {_fmt_s(s['p99_s'])}"
            + (f" ({s['over_1s']} >1s)" if s["over_1s"] else "")
            for s in r["hb_slices"]
        ]
        print(f"   heartbeat p99 by 10 s of the window: {', '.join(parts)}")
    if r.get("interval_p50_s") is not None:
        due = r.get("hb_due_in_force") or 0.0
        print(
            f"   heartbeat interval in force at the end: median {r['interval_p50_s']:.2f} s "
            f"(min {r['interval_min_s']:.2f}, max {r['interval_max_s']:.2f}); answered "
            f"{100 * r['hb_ok'] / due if due else 0:.0f}% of one per node per interval"
        )
    print(
        f"   liveness: falsely marked down {r['nodes_false_down']} (scheduler log: "
        f"{r['nodes_down_logged']} nodes), up (min/last of "
        f"{r['nodes_samples']} samples, {r['nodes_samples_failed']} failed) "
        f"{r['nodes_up_min']}/{r['nodes_up_last']}, never registered "
        f"{r['nodes_never_registered']}"
    )
    print(
        f"   scheduler: RSS peak {_fmt_bytes(r['sched_rss_peak'])}, threads max "
        f"{r['sched_threads_max']}, fds max {r['sched_fds_max']}, CPU "
        f"{r['sched_cpu_cores']:.2f} cores, waiting for a CPU {r.get('sched_runq_cores', 0.0):.2f}"
        f" (runnable threads' run-queue time per second); log {r['scheduler_log']}"
    )
    if r.get("sched_hb_p99_le_s") is not None:
        lag = r["sched_loop_lag_max_s"]
        print(
            f"   scheduler's own view (/metrics): heartbeats answered within "
            f"{_fmt_s(r['sched_hb_p50_le_s'])} (p50), {_fmt_s(r['sched_hb_p99_le_s'])} (p99) "
            f"of their head; loop lag max {_fmt_s(lag) if lag is not None else '-'}"
        )
    if r.get("sched_full_gc"):
        gc = r["sched_full_gc"]
        print(
            f"   scheduler's full garbage collections in the window: {gc['count']:.0f}, "
            f"{_fmt_s(gc['seconds'])} in all; the longest since its start "
            f"{_fmt_s(gc['longest_ever'])}"
        )
    for name, rt in r["routes"].items():
        print(
            f"   {name:<22} {rt['ok_per_s']:8.1f}/s ok of {rt['sent']:>7} sent  "
            f"p50 {_fmt_s(rt['p50_s']):>7} p99 {_fmt_s(rt['p99_s']):>7}  largest "
            f"{_fmt_bytes(rt['max_bytes']):>10}  errors {rt['errors'] or '-'}"
        )
    ramp = {k: dict(v["errors_all"]) for k, v in r["routes"].items() if v["errors_all"]}
    if ramp:
        print(f"   errors over the whole run (ramp included): {ramp}")
    sim = ", ".join(f"{c:.2f}" for c in r["sim_cpu_cores"])
    print(
        f"   simulator: CPU {sim} cores per worker, loop lag p50 {_fmt_s(r['sim_lag_p50_s'])} "
        f"p99 {_fmt_s(r['sim_lag_p99_s'])}: "
        f"{r['sim_verdict']}; "
        f"load average {r['load_mean'] or 0:.2f} mean, {r['load_max'] or 0:.2f} max; "
        f"machine busy {r['machine_cores']:.2f} of {os.cpu_count()} cores, "
        f"{r['others_cores']:.2f} of them other processes"
    )
    if r["mode"] == "prefetch":
        refusals = {k: v for k, v in r.items() if k.endswith(("_refused", "_error"))}
        print(
            f"   prefetch: dataset add {_fmt_s(r.get('dataset_add_s'))}, assign "
            f"{_fmt_s(r.get('assign_s'))} {refusals or ''}, {r['prefetch_pct'] or 0:.1f}% of "
            f"all chunks held at the end, {r['ready_nodes']} nodes ready; {r['counts']}"
        )
    elif r["counts"].get("digests_refused"):
        print(f"   counts: {r['counts']}")
    for key, value in r["error_samples"].items():
        print(f"   e.g. {key}: {value[:160]!r}")


SUMMARY: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("hb answered", lambda r: f"{r['hb_answered_pct']:.1f}%"),
    ("hb per node per 2 s", lambda r: f"{100 * r['hb_ok'] / r['hb_due']:.0f}%"),
    ("interval", lambda r: _fmt_s(r.get("interval_p50_s"))),
    ("hb p50", lambda r: _fmt_s(r["hb_p50_s"])),
    ("hb p99", lambda r: _fmt_s(r["hb_p99_s"])),
    ("false down", lambda r: str(max(r["nodes_false_down"], r["nodes_down_logged"]))),
    ("up min", lambda r: str(r["nodes_up_min"])),
    ("never registered", lambda r: str(r["nodes_never_registered"])),
    ("RSS peak", lambda r: _fmt_bytes(r["sched_rss_peak"])),
    ("threads", lambda r: str(r["sched_threads_max"])),
    ("sched CPU", lambda r: f"{r['sched_cpu_cores']:.2f}"),
    ("sched waiting for CPU", lambda r: f"{r.get('sched_runq_cores', 0.0):.2f}"),
    (
        "largest answer",
        lambda r: (
            max(((v["max_bytes"], k) for k, v in r["routes"].items()), default=(0, "-"))[1]
            + " "
            + _fmt_bytes(max((v["max_bytes"] for v in r["routes"].values()), default=0))
        ),
    ),
    ("req/s ok", lambda r: f"{sum(v['ok_per_s'] for v in r['routes'].values()):.0f}"),
    ("sim CPU", lambda r: "/".join(f"{c:.2f}" for c in r["sim_cpu_cores"])),
    ("sim lag p99", lambda r: _fmt_s(r["sim_lag_p99_s"])),
    ("load", lambda r: f"{r['load_mean'] or 0:.1f}"),
    ("others' CPU", lambda r: f"{r['others_cores']:.2f}"),
]


def summary(results: list[dict[str, Any]]) -> None:
    """Every run in one table (markdown)."""
    print("\n| scheduler | mode | nodes | " + " | ".join(name for name, _ in SUMMARY) + " |")
    print("| --- " * (3 + len(SUMMARY)) + "|")
    for r in results:
        cells = [r["label"], r["mode"], f"{r['nodes']:,}", *(f(r) for _, f in SUMMARY)]
        print("| " + " | ".join(cells) + " |")


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="200", help="comma-separated node counts, one run each")
    p.add_argument("--mode", choices=("mix", "prefetch"), default="mix")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds per run")
    p.add_argument("--ramp", type=float, default=None, help="seconds to start all nodes")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds after the ramp")
    p.add_argument("--workers", type=int, default=2, help="simulator processes")
    p.add_argument(
        "--sim-nice",
        type=int,
        default=-5,
        help="autogroup nice of the simulator workers (0: as everything else)",
    )
    p.add_argument(
        "--sched-nice",
        type=int,
        default=0,
        help="autogroup nice of the scheduler (e.g. -5: less at the mercy of other load)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="the scheduler alone on the first CPU, the simulator and the bench on the "
        "others, as a scheduler on its own machine (needs 2 CPUs; see the docstring)",
    )
    p.add_argument("--no-auth", action="store_true", help="no cluster secret, no credentials")
    p.add_argument("--pythonpath", type=Path, default=REPO, help="tree the scheduler runs")
    p.add_argument("--compare", action="store_true", help="old and new tree, same N")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="first run the simulator against nginx with canned answers (what it alone drives)",
    )
    p.add_argument("--calibrate-only", action="store_true", help="only the nginx stub runs")
    p.add_argument("--old-pythonpath", type=Path, default=None)
    p.add_argument("--new-pythonpath", type=Path, default=None)
    p.add_argument("--scheduler-arg", action="append", default=[], help="extra CLI argument")
    p.add_argument("--conns", type=int, default=4, help="a node's connections besides hb/poll")
    p.add_argument("--timeout", type=float, default=10.0, help="client timeout (daemon: 10)")
    p.add_argument(
        "--hb-interval",
        type=float,
        default=2.0,
        help="the nodes' own heartbeat interval, and the pace of the mix's reports and lookups",
    )
    p.add_argument(
        "--fixed-interval",
        action="store_true",
        help="nodes beat every --hb-interval whatever the scheduler asks (the old mix)",
    )
    p.add_argument(
        "--whole-maps",
        action="store_true",
        help="the mix's lookups ask for the whole chunk map every time (the issue's mix, "
        "and daemons before they followed updates)",
    )
    p.add_argument(
        "--compare-fixed",
        action="store_true",
        help="each N twice, one after the other: --fixed-interval, then as the scheduler asks",
    )
    p.add_argument("--node-timeout", type=float, default=10.0)
    p.add_argument(
        "--heartbeat-rate",
        type=float,
        default=None,
        help="the scheduler's heartbeat_rate (heartbeats/s in all); default: its own",
    )
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--file-size", type=parse_size, default=parse_size("5GiB"))
    p.add_argument("--origin-rate", type=parse_rate, default=parse_rate("10gbit"))
    p.add_argument("--link-rate", type=parse_rate, default=parse_rate("25gbit"))
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a tmp)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = p.parse_args(argv)
    try:
        args.counts = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--nodes: not a list of counts: {args.nodes!r}")
    if not args.counts or min(args.counts) < 1:
        p.error("--nodes: at least one count, each >= 1")
    if args.compare and not (args.old_pythonpath and args.new_pythonpath):
        p.error("--compare needs --old-pythonpath and --new-pythonpath")
    if (args.calibrate or args.calibrate_only) and args.mode != "mix":
        p.error("--calibrate is for --mode mix (a stub cannot make a prefetch progress)")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and (len(cpus) < 2 or shutil.which("taskset") is None):
        p.error("--pin needs 2 CPUs or more and taskset")
    args.sched_cpus = {cpus[0]} if args.pin else set()
    args.other_cpus = set(cpus[1:]) if args.pin else set()
    return args


def main() -> int:
    args = parse_args()
    if args.other_cpus:
        os.sched_setaffinity(0, args.other_cpus)  # the bench and its samplers too
    trees = [args.old_pythonpath, args.new_pythonpath] if args.compare else [args.pythonpath]
    for tree in trees:
        if not (tree / "syncbit" / "scheduler").is_dir():
            print(f"error: {tree} is not a syncbit checkout", file=sys.stderr)
            return 2
    labels = [tree_label(t) for t in trees]
    owned = args.dir is None
    work = Path(tempfile.mkdtemp(prefix="syncbit-scale-")) if owned else args.dir
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # cleanup runs on SIGTERM too
    results: list[dict[str, Any]] = []
    try:
        data = make_dataset(work, args.files, args.file_size)
        runs = [
            (t.resolve(), label, False, fixed)
            for t, label in zip(trees, labels, strict=True)
            for fixed in ([True, False] if args.compare_fixed else [args.fixed_interval])
        ]
        if args.calibrate or args.calibrate_only:
            runs.insert(0, (Path("/nonexistent"), "nginx stub", True, args.fixed_interval))
        if args.calibrate_only:
            runs = runs[:1]
        for n in args.counts:
            for tree, label, stub, fixed in runs:
                if fixed:
                    label = f"{label} (fixed {args.hb_interval:g} s)"
                plan = Plan(n, args.mode, tree, label, stub, fixed)
                try:
                    results.append(run_one(plan, args, work, data))
                except RuntimeError as exc:
                    print(f"   run failed: {exc}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1, default=str))
        summary(results)
    finally:
        if owned:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
