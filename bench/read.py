#!/usr/bin/env python3
"""Read-path benchmark: syncbit through the mount vs `curl` and `dd`, side by side, one run.

Measures on the same file (default 1 GiB), page cache dropped before each cold run:
  cold   read through node 1's mount, only the origin (nginx) has it   vs curl from nginx
  peer   read through node 2's mount, only node 1 has it               vs the same curl
  warm   node 1 again, in its cache, page cache dropped                vs dd of a local file
  hot    node 1 again, page cache warm                                 vs dd of a cached file
and the daemons' peak RSS. Needs root, /dev/fuse, nginx and curl. Not a test: it prints.

    python bench/read.py [--size-mib 1024] [--dir /var/tmp/syncbit-bench] [--no-passthrough]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))

from _common import free_port, process, wait_http


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def dd(path: Path) -> float:
    return timed(["dd", f"if={path}", "of=/dev/null", "bs=1M"])


def wait_file(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not appear")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/syncbit-bench"))
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds; medians are shown")
    ap.add_argument(
        "--no-passthrough",
        action="store_true",
        help="daemons serve every read themselves (FUSE passthrough off), for comparison",
    )
    args = ap.parse_args()
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        print("needs root and /dev/fuse", file=sys.stderr)
        return 2
    for tool in ("nginx", "curl", "dd"):
        if shutil.which(tool) is None:
            print(f"needs {tool} (apt-get install -y nginx curl)", file=sys.stderr)
            return 2

    work: Path = args.dir
    www = work / "www" / "bench"
    www.mkdir(parents=True, exist_ok=True)
    size = args.size_mib << 20
    big = www / "big.bin"
    if not big.exists() or big.stat().st_size != size:
        with big.open("wb") as f:
            for _ in range(args.size_mib // 16):
                f.write(os.urandom(16 << 20))
            f.write(os.urandom(size % (16 << 20)))
    # One name per round: each is a new object (the URL is part of its identity), so every
    # round reads cold through syncbit; hard links cost no disk.
    names = [f"big-{r}.bin" for r in range(args.rounds)]
    for name in names:
        (www / name).unlink(missing_ok=True)
        os.link(big, www / name)
    for sub in ("n1", "n2", "sched"):
        shutil.rmtree(work / sub, ignore_errors=True)

    port = free_port()
    conf = work / "nginx.conf"
    access = work / "access.log"
    access.unlink(missing_ok=True)
    conf.write_text(f"""
worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 1024; }}
http {{ log_format b '$body_bytes_sent'; access_log {access} b; sendfile on; tcp_nopush on;
  server {{ listen 127.0.0.1:{port}; root {work}/www; autoindex on; }} }}
""")
    origin = f"http://127.0.0.1:{port}"
    sched_port = free_port()
    sched = f"http://127.0.0.1:{sched_port}"
    rounds: list[dict[str, float]] = []

    def origin_bytes() -> int:
        return sum(int(x) for x in access.read_text().split() if x.isdigit())

    with contextlib.ExitStack() as stack:
        stack.enter_context(process(["nginx", "-c", str(conf)], work / "nginx.out"))
        wait_http(f"{origin}/bench/")
        stack.enter_context(
            process(
                [
                    "syncbit",
                    "scheduler",
                    "--listen",
                    f"127.0.0.1:{sched_port}",
                    "--state-dir",
                    str(work / "sched"),
                ],
                work / "sched.log",
            )
        )
        wait_http(f"{sched}/healthz")
        nodes = {}
        for name in ("n1", "n2"):
            mnt = work / name / "mnt"
            proc = stack.enter_context(
                process(
                    [
                        "syncbit",
                        "daemon",
                        "--scheduler",
                        sched,
                        "--node",
                        name,
                        "--listen",
                        f"127.0.0.1:{free_port()}",
                        "--cache-dir",
                        str(work / name / "cache"),
                        "--mount",
                        str(mnt),
                        *(["--no-passthrough"] if args.no_passthrough else []),
                    ],
                    work / f"{name}.log",
                )
            )
            stack.callback(
                subprocess.run, ["fusermount3", "-u", "-z", str(mnt)], capture_output=True
            )
            nodes[name] = (proc, mnt / "bench")
        subprocess.run(
            ["syncbit", "dataset", "add", "bench", f"{origin}/bench/", "--scheduler", sched],
            check=True,
        )
        for _, path in nodes.values():
            wait_file(path / names[-1])
        n1, n2 = nodes["n1"][1], nodes["n2"][1]
        for name in names:
            r: dict[str, float] = {}
            drop_caches()
            r["curl"] = size / timed(["curl", "-sf", "-o", "/dev/null", f"{origin}/bench/{name}"])
            access.write_text("")
            drop_caches()
            r["cold"] = size / dd(n1 / name)
            r["cold_origin"] = origin_bytes() / size
            time.sleep(1.5)  # chunk reports reach the scheduler
            drop_caches()
            r["peer"] = size / dd(n2 / name)
            r["peer_origin"] = origin_bytes() / size - r["cold_origin"]
            # The local-file reference both before and after the warm read, the faster one
            # counting: right after the peer read the disk may still be busy with its writes.
            drop_caches()
            dd_before = dd(www / name)
            drop_caches()
            r["warm"] = size / dd(n1 / name)
            drop_caches()
            r["dd_cold"] = size / min(dd_before, dd(www / name))
            r["dd_hot"] = size / min(dd(www / name) for _ in range(2))
            r["hot"] = size / min(dd(n1 / name) for _ in range(2))
            rounds.append(r)
        rss = {n: peak_rss_mib(p.pid) for n, (p, _) in nodes.items()}

    gb = 1e9
    print(
        f"\nfile {size / 2**20:.0f} MiB; origin nginx on loopback; 2 daemons + scheduler; "
        f"{len(rounds)} paired rounds, medians (per-round ratios in brackets)\n"
    )
    rows = [
        ("cold (origin only)", "cold", "curl"),
        ("peer (node 1 has it)", "peer", "curl"),
        ("warm (node cache, no page cache)", "warm", "dd_cold"),
        ("hot (page cache)", "hot", "dd_hot"),
    ]
    print(f"{'read':34} {'syncbit':>10} {'reference':>20} {'ratio':>6}  rounds")
    for label, key, ref in rows:
        ratios = [r[key] / r[ref] for r in rounds]
        print(
            f"{label:34} {median(r[key] for r in rounds) / gb:5.2f} GB/s {ref:>9} "
            f"{median(r[ref] for r in rounds) / gb:5.2f} GB/s {median(ratios):5.2f}x  "
            f"[{' '.join(f'{x:.2f}' for x in ratios)}]"
        )
    print(
        f"\norigin bytes per file: cold read {max(r['cold_origin'] for r in rounds):.3f}x, "
        f"peer read {max(r['peer_origin'] for r in rounds):.3f}x (worst round)"
    )
    print("daemon peak RSS: " + ", ".join(f"{n} {v:.0f} MiB" for n, v in rss.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
