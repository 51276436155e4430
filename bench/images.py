#!/usr/bin/env python3
"""Image benchmark: one container image to N nodes with containerd, pulled through each
node daemon's registry mirror vs straight from the registry.

Builds an image of --size bytes in --layers random (incompressible, gzip) layers and
pushes it to a real docker-registry. By default every party sits in a network namespace
of its own on a shaped LAN (bench/netns.py, as bench/swarm.py: --rate each way on every
link, the registry's included; the scheduler's link is unshaped, control traffic only),
and for each N of --counts (default 1 and 4) it measures, side by side in one run:

  straight  N containerds (one per node namespace) pulling the image at once from the
            registry
  mirror    a scheduler and N node daemons (fresh caches) with the `mirror` section, a
            containerd in each node's namespace pulling the same image at once through its
            node's mirror on that namespace's loopback

For each: the seconds until the last containerd has the image unpacked (from the start of
the pulls: the daemons are up and idle before), the registry's egress (blob bytes it
sent, from its access log) as a ratio to the image's size, and how busy the machine's
cores were meanwhile (every process of the run shares them). Targets: mirror egress
<= 1.1x at every N, mirror time not above straight at N=1 and far below it at N > 1.
--loopback: the old variant, everything on 127.0.0.1 and unshaped (time is then mostly
CPU). Needs root, /dev/fuse, iproute2, curl, containerd, docker-registry, skopeo. Not a
test: it prints (or --json).

    python3 bench/images.py [--counts 1,4] [--size 1GiB] [--layers 8] [--rate 400mbit]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import yaml
from _common import drop_caches, process
from netns import Host, NetnsError, Topology, parse_rate, reap_stale, unusable
from swarm import (
    CHILD_ENV,
    SYNCBIT,
    BenchError,
    CpuMeter,
    alive_or_fail,
    mounts_under,
    poll,
    run_all,
    strip_workdir,
    unmount_all,
)

from integration.containerd import Containerd, MirrorCluster, write_hosts_toml
from integration.registry import Layout, Registry

MiB = 2**20
TARGET_EGRESS = 1.1
REPO_NAME = "bench/app"
_ELAPSED = re.compile(r"elapsed: ([0-9.]+) ?s")
_UNPACK_DONE = re.compile(r"done: ((?:[0-9]+h)?(?:[0-9]+m(?!s))?[0-9.]+(?:ms|s))")
_DURATION = re.compile(r"(?:([0-9]+)h)?(?:([0-9]+)m(?!s))?([0-9.]+)(ms|s)")


def parse_size(text: str) -> int:
    units = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def ctr_timing(output: str) -> tuple[float, float] | None:
    """`ctr images pull`'s own split of a pull, from its output: (seconds until every blob
    was fetched, its last progress line; seconds unpacking, its `done: <Go duration>`).
    None when the output has neither (a failed pull)."""
    elapsed = _ELAPSED.findall(output)
    done = _UNPACK_DONE.findall(output)
    if not elapsed or not done:
        return None
    duration = _DURATION.fullmatch(done[-1])
    assert duration is not None  # the same pattern matched it
    hours, minutes, number, unit = duration.groups()
    unpack = float(number) / (1000 if unit == "ms" else 1)
    unpack += 60 * int(minutes or 0) + 3600 * int(hours or 0)
    return float(elapsed[-1]), unpack


def build_image(work: Path, size: int, layers: int) -> tuple[Layout, int]:
    """An image of `layers` random (incompressible) layers, `size` bytes in all."""
    rng = random.Random(2026)
    layout = Layout(work / "layout")
    each = max(1, size // layers)
    descs = [layout.random_layer(rng, 4, each, prefix=f"l{i}/") for i in range(layers)]
    image = layout.image(descs)
    layout.tag(image, "v1")
    total = sum(len(layout.data[d]) for d in layout.blobs_of(image))
    return layout, total


def pull_all(
    ctrds: list[Containerd], ref: str, hosts: list[Path], check: Callable[[Containerd], None]
) -> float:
    """Seconds until every containerd pulled (and unpacked) `ref`, all at once."""
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(ctrds)) as pool:
        futures = [pool.submit(c.pull, ref, h) for c, h in zip(ctrds, hosts, strict=True)]
        for future in futures:
            future.result()
    took = time.monotonic() - start
    for ctrd in ctrds:
        check(ctrd)
    return took


def loopback_run(args: argparse.Namespace, work: Path) -> dict[str, float | int]:
    """The unshaped variant: everything on 127.0.0.1, N = --nodes only."""
    layout, image_bytes = build_image(work, parse_size(args.size), args.layers)
    n = args.nodes
    result: dict[str, float | int] = {"image_bytes": image_bytes}
    with Registry(work / "registry") as registry:
        registry.push(layout, "v1", f"{REPO_NAME}:v1")
        ref = f"{registry.host}/{REPO_NAME}:v1"

        def unpacked(ctrd: Containerd) -> None:
            check = ctrd.check(ref)
            if not (check.complete and check.unpacked):
                raise RuntimeError(f"not unpacked: {check}")

        straight = write_hosts_toml(work / "straight", registry.host, registry.url, [registry.url])
        straight_hosts = [straight]
        drop_caches()  # each phase from the same disk state (see the shaped variant)
        before = registry_sent(registry)
        ctrds = [Containerd(work / f"straight-c{i}", args.snapshotter) for i in range(n)]
        try:
            for ctrd in ctrds:
                ctrd.start()
            result[f"straight_{n}_s"] = pull_all(ctrds, ref, straight_hosts * n, unpacked)
        finally:
            for ctrd in ctrds:
                ctrd.cleanup()
        result[f"straight_{n}_egress"] = registry_sent(registry) - before

        drop_caches()
        before = registry_sent(registry)
        with MirrorCluster(work / "cluster", [registry.host], n) as cluster:
            hosts = [
                write_hosts_toml(
                    work / f"hosts{i}", registry.host, registry.url, [cluster.mirror_url(i)]
                )
                for i in range(n)
            ]
            ctrds = [Containerd(work / f"mirror-c{i}", args.snapshotter) for i in range(n)]
            try:
                for ctrd in ctrds:
                    ctrd.start()
                result[f"mirror_{n}_s"] = pull_all(ctrds, ref, hosts, unpacked)
            finally:
                for ctrd in ctrds:
                    ctrd.cleanup()
        result[f"mirror_{n}_egress"] = registry_sent(registry) - before
    return result


def registry_sent(registry: Registry) -> int:
    """Blob body bytes the registry sent so far (its access log)."""
    return sum(registry.blob_bytes(REPO_NAME).values())


# -- the shaped variant ---------------------------------------------------------------------

SCHED_PORT, PEER_PORT, MIRROR_PORT = 7900, 7901, 5050


class Phase:
    """One way of bringing the image to n nodes: its figures, filled in as it runs."""

    def __init__(self, kind: str, n: int) -> None:
        self.kind = kind
        self.n = n
        self.seconds = 0.0
        self.egress = 0
        self.per_node: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.load = 0.0  # the 1-minute load average when the pulls ended
        self.ctr: dict[str, tuple[float, float]] = {}  # node -> ctr's (fetch, unpack) s

    def as_dict(self) -> dict[str, object]:
        return {
            "seconds": round(self.seconds, 2),
            "egress": self.egress,
            "per_node": {k: round(v, 2) for k, v in self.per_node.items()},
            "cpu_busy": round(sum(self.cpu.get(k, 0.0) for k in ("user", "system", "softirq")), 3),
            "cpu_seconds": {
                kind: round(
                    sum(v for k, v in self.cpu.items() if k.startswith(kind) and "/" not in k), 1
                )
                for kind in ("registry", "containerd", "node", "scheduler")
            },
            "load1": round(self.load, 2),
            "ctr_fetch_unpack": {k: [round(f, 2), round(u, 2)] for k, (f, u) in self.ctr.items()},
        }


class ShapedBench:
    """The registry, a scheduler host and node hosts on one shaped LAN, and the phases."""

    def __init__(self, args: argparse.Namespace, work: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.work = work
        self.stack = stack
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.topo = stack.enter_context(Topology(args.rate))
        self.reg_host = self.topo.add_host("registry")
        self.sched = self.topo.add_host("sched", shaped=False)  # control traffic only
        self.nodes = [self.topo.add_host(f"node{i}") for i in range(1, max(args.counts) + 1)]
        self.registry = stack.enter_context(
            Registry(work / "registry", address=self.reg_host.address, wrap=self.reg_host.argv)
        )
        self.ref = f"{self.registry.host}/{REPO_NAME}:v1"

    def link_goodput(self, digest: str, size: int) -> float:
        """Bits/s of one curl of a layer, registry -> node1 (the shaper's real rate)."""
        url = f"{self.registry.url}/v2/{REPO_NAME}/blobs/{digest}"
        argv = ["curl", "-sSf", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url]
        done = subprocess_run(self.nodes[0].argv(argv))
        got, seconds = done.split()
        if int(got) != size:
            raise BenchError(f"link check got {got} of {size} bytes")
        return int(got) * 8 / float(seconds)

    def _pulls(
        self,
        phase: Phase,
        ctrds: list[Containerd],
        hosts_dirs: list[Path],
        daemons: dict[str, int] | None = None,
    ) -> None:
        """All pulls at once; the figures into `phase`; every image checked unpacked.
        CPU seconds are counted for the registry, the containerds and `daemons` (name ->
        PID); the `ctr` clients' own (they fetch and write) are in the machine's total."""
        before = registry_sent(self.registry)
        pids = {"registry": self.registry.pid or 0, **(daemons or {})}
        pids |= {
            f"containerd-{h.name}": c.pid or 0 for c, h in zip(ctrds, self.nodes, strict=False)
        }
        meter = CpuMeter(pids)
        meter.start()
        commands = {
            f"{phase.kind}{phase.n}-pull-{host.name}": ctrd.pull_argv(self.ref, hosts_dir)
            for ctrd, hosts_dir, host in zip(ctrds, hosts_dirs, self.nodes, strict=False)
        }
        phase.seconds, per = run_all(commands, self.logs, self.args.timeout)
        phase.cpu = meter.report(phase.seconds)
        phase.load = os.getloadavg()[0]
        phase.per_node = {k.rsplit("-", 1)[1]: v for k, v in per.items()}
        for name in commands:
            output = (self.logs / f"{name}.log").read_text(errors="replace")
            timing = ctr_timing(output)
            if timing is not None:
                phase.ctr[name.rsplit("-", 1)[1]] = timing
        phase.egress = registry_sent(self.registry) - before
        for ctrd in ctrds:
            check = ctrd.check(self.ref)
            if not (check.complete and check.unpacked):
                raise BenchError(f"{ctrd.name}: not unpacked after its pull: {check}")

    def _containerds(self, prefix: str, n: int) -> list[Containerd]:
        ctrds = []
        for host in self.nodes[:n]:
            ctrd = Containerd(self.work / f"{prefix}-{host.name}", self.args.snapshotter, host.argv)
            self.stack.callback(ctrd.cleanup)  # also if a later one fails to start
            ctrds.append(ctrd)
        for ctrd in ctrds:
            ctrd.start()
        return ctrds

    def straight(self, n: int) -> Phase:
        phase = Phase("straight", n)
        # The registry as a host of its own: containerd 1.6 refuses a hosts.toml with a
        # `server` alone, and would then try HTTPS on an address that is not loopback.
        hosts_dir = write_hosts_toml(
            self.work / "hosts-straight",
            self.registry.host,
            self.registry.url,
            [self.registry.url],
        )
        with contextlib.ExitStack() as stack:
            ctrds = [stack.enter_context(_cleaned(c)) for c in self._containerds(f"s{n}", n)]
            self._pulls(phase, ctrds, [hosts_dir] * n)
        return phase

    def mirror(self, n: int) -> Phase:
        """A fresh scheduler and n daemons (empty caches), each node's containerd through
        its own daemon's mirror."""
        phase = Phase("mirror", n)
        work = self.work / f"mirror{n}"
        with contextlib.ExitStack() as stack:

            def launch(host: Host, name: str, argv: list[str]) -> object:
                log = self.logs / f"mirror{n}-{name}.log"
                proc = stack.enter_context(process(host.argv(argv), log, CHILD_ENV))
                return proc, log

            sched_url = f"http://{self.sched.address}:{SCHED_PORT}"
            # --insecure: open on purpose, on a LAN of namespaces nothing else reaches.
            schedule = [*SYNCBIT, "scheduler", "--listen", f"{self.sched.address}:{SCHED_PORT}"]
            schedule += ["--state-dir", str(work / "scheduler"), "--insecure"]
            procs = {"scheduler": launch(self.sched, "scheduler", schedule)}

            def scheduler_up() -> bool:
                alive_or_fail(*procs["scheduler"])  # type: ignore[misc]
                with contextlib.suppress(NetnsError):
                    return bool(self.sched.http_get(f"{sched_url}/healthz", timeout=2))
                return False

            poll("the scheduler", scheduler_up)
            config = work / "daemon.yaml"
            mirror = {
                "listen": f"127.0.0.1:{MIRROR_PORT}",
                "registries": {self.registry.host: {"insecure": True}},
            }
            config.write_text(yaml.safe_dump({"mirror": mirror}))
            for host in self.nodes[:n]:
                argv = [*SYNCBIT, "daemon", "--scheduler", sched_url, "--node", host.name]
                argv += ["--listen", f"0.0.0.0:{PEER_PORT}", "--insecure"]
                argv += ["--advertise", f"{host.address}:{PEER_PORT}"]
                argv += ["--cache-dir", str(work / host.name / "cache")]
                argv += ["--mount", str(work / host.name / "mnt"), "--config", str(config)]
                argv += ["--log-level", self.args.log_level]
                stack.callback(unmount_all, work / host.name)  # after the daemon stopped
                procs[host.name] = launch(host, host.name, argv)

            mirror_url = f"http://127.0.0.1:{MIRROR_PORT}"

            def all_up() -> bool:
                for proc_log in procs.values():
                    alive_or_fail(*proc_log)  # type: ignore[misc]
                status = json.loads(self.sched.http_get(f"{sched_url}/v1/status"))
                up = {node["name"] for node in status["nodes"] if node["up"]}
                if not up >= {h.name for h in self.nodes[:n]}:
                    return False
                for host in self.nodes[:n]:
                    if not mounts_under(work / host.name / "mnt"):
                        return False
                    try:
                        host.http_get(f"{mirror_url}/v2/", timeout=2)
                    except NetnsError:
                        return False
                return True

            poll(f"{n} daemons registered, mounted and mirroring", all_up, timeout=120)
            hosts_dirs = [
                write_hosts_toml(
                    work / f"hosts-{h.name}", self.registry.host, self.registry.url, [mirror_url]
                )
                for h in self.nodes[:n]
            ]
            ctrds = [stack.enter_context(_cleaned(c)) for c in self._containerds(f"m{n}", n)]
            pids = {name: proc_log[0].pid for name, proc_log in procs.items()}  # type: ignore[index]
            self._pulls(phase, ctrds, hosts_dirs, pids)
        return phase


@contextlib.contextmanager
def _cleaned(ctrd: Containerd) -> Iterator[Containerd]:
    try:
        yield ctrd
    finally:
        ctrd.cleanup()


def _keep_access_log(registry: Registry, logs: Path) -> None:
    """The registry's access log (who fetched which blob) kept with the logs."""
    with contextlib.suppress(OSError):
        shutil.copy(registry.access_path, logs / "registry-access.log")


def subprocess_run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def shaped_run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    print(f"building a {args.size} image in {args.layers} layers", file=sys.stderr)
    layout, image_bytes = build_image(work, parse_size(args.size), args.layers)
    result: dict[str, object] = {
        "image_bytes": image_bytes,
        "layers": args.layers,
        "rate_bits": parse_rate(args.rate),
        "cores": os.cpu_count() or 1,
        "load1_before": round(os.getloadavg()[0], 2),
    }
    with contextlib.ExitStack() as stack:
        bench = ShapedBench(args, work, stack)
        print("pushing it to the registry", file=sys.stderr)
        bench.registry.push(layout, "v1", f"{REPO_NAME}:v1")
        biggest = max(
            (d for d in layout.data if d != layout.tags["v1"].digest),
            key=lambda d: len(layout.data[d]),
        )
        result["link_goodput_bits"] = bench.link_goodput(biggest, len(layout.data[biggest]))
        stack.callback(_keep_access_log, bench.registry, bench.logs)
        for n in args.counts:
            for kind in args.kinds:
                print(f"{kind}, {n} node(s)", file=sys.stderr)
                # Every phase from the same disk state: the last phase's unpacked layers
                # (gigabytes) would otherwise be written back during this one's unpack
                # (measured: the second phase's unpack took 5.9-7.2 s instead of 3.7-3.9
                # s, whichever kind ran second), and the registry's blobs read cold.
                drop_caches()
                phase = bench.straight(n) if kind == "straight" else bench.mirror(n)
                result[f"{kind}_{n}"] = phase.as_dict()
    return result


def report(args: argparse.Namespace, r: dict[str, object]) -> bool:
    size = int(r["image_bytes"])  # type: ignore[call-overload]
    rate = int(r["rate_bits"])  # type: ignore[call-overload]
    goodput = float(r["link_goodput_bits"])  # type: ignore[arg-type]
    print(
        f"\nimage {size / MiB:.0f} MiB in {r['layers']} layers; every link {rate / 1e6:g} Mbit/s "
        f"each way (one TCP stream registry -> node: {goodput / 1e6:.0f} Mbit/s); "
        f"{r['cores']} cores, load {r['load1_before']} before the run"
    )
    print(
        f"{'':16} {'last node':>10} {'registry egress':>16} {'/image':>7} "
        f"{'cores busy':>11} {'load':>6}"
    )
    ok = True
    for n in args.counts:
        phases = {k: r[f"{k}_{n}"] for k in args.kinds}
        for kind, p in phases.items():
            assert isinstance(p, dict)
            print(
                f"{kind + f' N={n}':16} {p['seconds']:8.1f} s {p['egress'] / MiB:12.0f} MiB "
                f"{p['egress'] / size:6.2f}x {100 * p['cpu_busy']:10.0f}% {p['load1']:6.2f}"
            )
        m, s = phases.get("mirror"), phases.get("straight")
        if isinstance(m, dict):
            ok = ok and m["egress"] <= TARGET_EGRESS * size
        if isinstance(m, dict) and isinstance(s, dict):
            ratio = m["seconds"] / s["seconds"]
            print(f"{'':16} time mirror / straight at N={n}: {ratio:.2f}")
        for kind, p in phases.items():
            assert isinstance(p, dict)
            each = "  ".join(f"{k} {v:.1f}" for k, v in sorted(p["per_node"].items()))
            print(f"{'':16} {kind} per node (s): {each}")
            split = "  ".join(
                f"{k} {f:.1f} + {u:.1f}" for k, (f, u) in sorted(p["ctr_fetch_unpack"].items())
            )
            if split:
                print(f"{'':16} {kind} fetch + unpack per node (ctr's own timing, s): {split}")
            used = ", ".join(f"{k}s {v:.0f}" for k, v in p["cpu_seconds"].items() if v)
            print(f"{'':16} {kind} CPU-s: {used} (ctr clients and the kernel's not counted)")
    print(f"mirror egress target <= {TARGET_EGRESS}x at every N: {'met' if ok else 'MISSED'}")
    return ok


def report_loopback(args: argparse.Namespace, r: dict[str, float | int]) -> bool:
    size = r["image_bytes"]
    n = args.nodes
    print(f"image {size / MiB:.1f} MiB in {args.layers} layers, {n} nodes (loopback)")
    for kind in ("straight", "mirror"):
        print(
            f"  {kind:9s} last node unpacked after {r[f'{kind}_{n}_s']:.2f} s; registry egress "
            f"{r[f'{kind}_{n}_egress'] / size:.2f}x the image"
        )
    ok = r[f"mirror_{n}_egress"] <= TARGET_EGRESS * size
    print(f"  mirror egress target <= {TARGET_EGRESS}x: {'met' if ok else 'MISSED'}")
    print(f"  time mirror / straight: {r[f'mirror_{n}_s'] / r[f'straight_{n}_s']:.2f}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,4", help="node counts to measure (shaped)")
    parser.add_argument("--nodes", type=int, default=4, help="node count with --loopback")
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rate", default="400mbit", help="every link, each way (tc units)")
    parser.add_argument("--snapshotter", default="overlayfs", help="containerd's (native: copies)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per phase")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="parent of the workdir")
    parser.add_argument("--log-level", default="info", help="the daemons' (shaped)")
    parser.add_argument("--loopback", action="store_true", help="unshaped, on 127.0.0.1")
    parser.add_argument(
        "--kinds",
        default="straight,mirror",
        help="phases to run, in this order (tuning: --kinds mirror)",
    )
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        args.counts = sorted({int(c) for c in args.counts.split(",")})
        args.kinds = [
            k for k in dict.fromkeys(args.kinds.split(",")) if k in ("straight", "mirror")
        ]
        parse_rate(args.rate)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.loopback:
        why = unusable() or (None if Path("/dev/fuse").exists() else "/dev/fuse is missing")
        why = why or (None if shutil.which("curl") else "curl is not installed")
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
        reap_stale()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="syncbit-images-", dir=args.dir))
    ok = False
    try:
        if args.loopback:
            loop = loopback_run(args, work)
            if args.json:
                print(json.dumps(loop, indent=2))
            return 0 if report_loopback(args, loop) else 1
        shaped = shaped_run(args, work)
        ok = True
    except (BenchError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        strip_workdir(work)  # unmounts first; keeps the logs
        if ok and not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work / 'logs'}", file=sys.stderr)
    if args.json:
        print(json.dumps(shaped, indent=2))
        return 0
    return 0 if report(args, shaped) else 1


if __name__ == "__main__":
    sys.exit(main())
