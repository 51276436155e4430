#!/usr/bin/env python3
"""Image benchmark: one container image to N nodes with containerd, pulled through each
node daemon's registry mirror vs straight from the registry.

Builds an image of --size bytes in --layers random layers, pushes it to a real
docker-registry on loopback, then measures in one run:

  straight  N containerds (one per node) pulling the image at once from the registry
  mirror    N node daemons (separate processes, one scheduler) with the `mirror` section,
            a containerd on each pulling the same image at once through its node's mirror

For each: the seconds until the last containerd has the image unpacked, and the registry's
egress (blob bytes it sent, from its access log) as a ratio to the image's size. Target:
mirror egress <= 1.1x (once per cluster, whatever N), time not above straight pulls at
N=1. Loopback only: no link is shaped here, so time says little beyond CPU at N > 1 (the
issue's netns variant, shaped as in bench/swarm.py, is not built yet). Needs root,
/dev/fuse, containerd, docker-registry, skopeo. Not a test: it prints (or --json).

    python bench/images.py [--nodes 4] [--size 256MiB] [--layers 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.containerd import Containerd, MirrorCluster, write_hosts_toml
from integration.registry import Layout, Registry

MiB = 2**20
TARGET_EGRESS = 1.1
REPO_NAME = "bench/app"


def parse_size(text: str) -> int:
    units = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


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


def run(args: argparse.Namespace, work: Path) -> dict[str, float | int]:
    layout, image_bytes = build_image(work, parse_size(args.size), args.layers)
    result: dict[str, float | int] = {"nodes": args.nodes, "image_bytes": image_bytes}
    with Registry(work / "registry") as registry:
        registry.push(layout, "v1", f"{REPO_NAME}:v1")
        ref = f"{registry.host}/{REPO_NAME}:v1"

        def unpacked(ctrd: Containerd) -> None:
            check = ctrd.check(ref)
            if not (check.complete and check.unpacked):
                raise RuntimeError(f"not unpacked: {check}")

        straight_hosts = [write_hosts_toml(work / "straight", registry.host, registry.url, [])]
        before = sum(registry.blob_bytes(REPO_NAME).values())
        ctrds = [Containerd(work / f"straight-c{i}") for i in range(args.nodes)]
        try:
            for ctrd in ctrds:
                ctrd.start()
            result["straight_s"] = pull_all(ctrds, ref, straight_hosts * args.nodes, unpacked)
        finally:
            for ctrd in ctrds:
                ctrd.cleanup()
        result["straight_egress"] = sum(registry.blob_bytes(REPO_NAME).values()) - before

        before = sum(registry.blob_bytes(REPO_NAME).values())
        with MirrorCluster(work / "cluster", [registry.host], args.nodes) as cluster:
            hosts = [
                write_hosts_toml(
                    work / f"hosts{i}", registry.host, registry.url, [cluster.mirror_url(i)]
                )
                for i in range(args.nodes)
            ]
            ctrds = [Containerd(work / f"mirror-c{i}") for i in range(args.nodes)]
            try:
                for ctrd in ctrds:
                    ctrd.start()
                result["mirror_s"] = pull_all(ctrds, ref, hosts, unpacked)
            finally:
                for ctrd in ctrds:
                    ctrd.cleanup()
        result["mirror_egress"] = sum(registry.blob_bytes(REPO_NAME).values()) - before
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="syncbit-images-") as tmp:
        r = run(args, Path(tmp))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    size = r["image_bytes"]
    print(f"image {size / MiB:.1f} MiB in {args.layers} layers, {r['nodes']} nodes (loopback)")
    for kind in ("straight", "mirror"):
        print(
            f"  {kind:9s} last node unpacked after {r[f'{kind}_s']:.2f} s; registry egress "
            f"{r[f'{kind}_egress'] / size:.2f}x the image"
        )
    ok = r["mirror_egress"] <= TARGET_EGRESS * size
    print(f"  mirror egress target <= {TARGET_EGRESS}x: {'met' if ok else 'MISSED'}")
    print(f"  time mirror / straight: {r['mirror_s'] / r['straight_s']:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
