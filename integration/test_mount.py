"""The mount itself: options for shared read-only use, raised kernel readahead, page cache
kept across opens (a second read of the same file never reaches the daemon), passthrough
for cached files."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import re
import threading
import time
from pathlib import Path

import httpx

from integration.cluster import Cluster, Origin, fresh_dataset, sha256_file, wait_until

CLUSTER_NODES = 1
MiB = 1 << 20


def _mountinfo(mount: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    return next(r for r in rows if r[4] == str(mount))


def _wchar(pid: int | None) -> int:
    """Bytes the process wrote through syscalls: FUSE replies to /dev/fuse among them."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_mount_is_read_only_shared_with_raised_readahead(cluster: Cluster) -> None:
    node = cluster.node("n1")
    row = _mountinfo(node.mount)
    fstype = row[row.index("-") + 1]
    super_opts = row[row.index("-") + 3].split(",")
    assert fstype == "fuse.syncbit"
    assert "ro" in row[5].split(",") and "allow_other" in super_opts
    knob = Path(f"/sys/class/bdi/{row[2]}/read_ahead_kb")
    wait_until(lambda: knob.read_text().strip() == "1024", 10, "readahead raised to 1 MiB")


def test_page_cache_is_kept_across_opens(
    cluster: Cluster, origin: Origin, origin_root: Path
) -> None:
    ds = fresh_dataset(origin_root, "pagecache", {"w.bin": 12 * MiB})
    cluster.add_dataset("pagecache", f"{origin.url}/pagecache/")
    node = cluster.node("n1")
    path = node.path("pagecache", "w.bin")
    assert sha256_file(path) == ds.files["w.bin"].sha256
    time.sleep(1.0)  # the first pass's chunk writes to the cache settle
    replied = _wchar(node.pid)
    assert sha256_file(path) == ds.files["w.bin"].sha256  # a new open, same bytes
    # keep_cache: the kernel serves the second pass; the daemon answers no read.
    assert _wchar(node.pid) - replied < 1 * MiB


def test_a_cached_file_is_read_by_the_kernel_from_the_cache_file(
    cluster: Cluster, origin: Origin, origin_root: Path
) -> None:
    """Passthrough: once every chunk is here, opens hand the kernel the object file, so
    reads (and mmap faults) after the page cache was dropped still never reach the daemon."""
    ds = fresh_dataset(origin_root, "passthrough", {"p.bin": 12 * MiB + 5})
    cluster.add_dataset("passthrough", f"{origin.url}/passthrough/")
    node = cluster.node("n1")
    path = node.path("passthrough", "p.bin")
    assert sha256_file(path) == ds.files["p.bin"].sha256
    st = os.statvfs(node.mount)  # the size of what the mount shows, nothing free to write
    assert st.f_blocks * st.f_frsize >= 12 * MiB and st.f_files > 2 and st.f_bfree == 0
    time.sleep(1.0)  # the chunks reach the object file
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    replied = _wchar(node.pid)
    assert sha256_file(path) == ds.files["p.bin"].sha256
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert hashlib.sha256(m).hexdigest() == ds.files["p.bin"].sha256
    assert _wchar(node.pid) - replied < 1 * MiB
    metrics = httpx.get(f"http://{node.address}/metrics", timeout=10, trust_env=False).text
    opens = re.search(r"^syncbit_fuse_passthrough_opens_total (\S+)$", metrics, re.M)
    assert opens is not None and float(opens.group(1)) >= 2  # the sha256 pass and the mmap


def test_concurrent_opens_and_reads_stay_right_while_files_complete(
    cluster: Cluster, origin: Origin, origin_root: Path
) -> None:
    """Threads open, pread at random offsets, mmap and close the files of a cold dataset
    for a few seconds: opens that find a file incomplete read through the daemon, later
    ones (once every chunk is in) through passthrough, and the two kinds overlap on the
    same inodes. Every byte must match the origin and no open may fail."""
    sizes: dict[str, Path | int] = {
        "a.bin": 9 * MiB + 1,
        "b.bin": 5 * MiB + 77,
        "c/d.bin": 13 * MiB,
    }
    ds = fresh_dataset(origin_root, "mixed", sizes)
    cluster.add_dataset("mixed", f"{origin.url}/mixed/")
    node = cluster.node("n1")
    truth = {rel: (ds.root / rel).read_bytes() for rel in sizes}
    errors: list[str] = []
    stop = time.monotonic() + 6.0

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < stop and not errors:
            rel = rnd.choice(sorted(sizes))
            want = truth[rel]
            try:
                with open(node.path("mixed", rel), "rb", buffering=0) as f:
                    for _ in range(rnd.randint(1, 6)):
                        off = rnd.randrange(len(want))
                        n = rnd.choice((1, 4096, 100_000, 1 << 20))
                        if os.pread(f.fileno(), n, off) != want[off : off + n]:
                            errors.append(f"{rel} @{off}+{n}: wrong bytes")
                    if rnd.random() < 0.3:
                        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                            off = rnd.randrange(len(want))
                            if m[off : off + 65536] != want[off : off + 65536]:
                                errors.append(f"{rel} mmap @{off}: wrong bytes")
            except OSError as exc:
                errors.append(f"{rel}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    for rel in sizes:  # whole files, now all passthrough
        assert sha256_file(node.path("mixed", rel)) == ds.files[rel].sha256
    metrics = httpx.get(f"http://{node.address}/metrics", timeout=10, trust_env=False).text
    counts = {
        name: float(m.group(1))
        for name in (
            "syncbit_fuse_passthrough_opens_total",
            'syncbit_fuse_requests_total{op="read"}',
        )
        if (m := re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M))
    }
    assert len(counts) == 2 and all(n > 0 for n in counts.values()), counts  # both kinds ran
