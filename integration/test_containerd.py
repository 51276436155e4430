"""containerd pulling through the registry mirror: real containerd processes (their own
root, state and sockets), the mirror as its own process (`python -m syncbit.mirror`), a
real docker-registry on loopback, and the hosts.toml the docs show (the mirror first, the
registry as the fallback). The image unpacks, `ctr images check` is clean, the registry
serves each blob once per mirror, a moved tag is followed, and a blob the registry
corrupts is never served by the mirror: containerd falls back to the registry.

The standalone mirror (`python -m syncbit.mirror`) shares nothing but the registry; the
mirror in the node core (`MirrorCluster`: node daemons with a `mirror` section and a
scheduler) reads each blob from the registry once per cluster, under the same claims as
chunks, and the next node takes it from a peer.
"""

from __future__ import annotations

import concurrent.futures
import functools
import random
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from integration.cluster import SYNCBIT, Node, fuse_unavailable, run_cli, wait_until
from integration.containerd import (
    MIRROR,
    Containerd,
    MirrorCluster,
    MirrorProcess,
    containerd_unavailable,
    write_hosts_toml,
)
from integration.registry import (
    Descriptor,
    Layout,
    MiB,
    Registry,
    RegistryProxy,
    registry_unavailable,
)
from syncbit.chunks import identity_digest

_WHY = containerd_unavailable() or registry_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cannot run containerd: {_WHY}")
_NO_FUSE = fuse_unavailable()
needs_fuse = pytest.mark.skipif(_NO_FUSE is not None, reason=f"node daemons mount: {_NO_FUSE}")


@dataclass
class Images:
    layout: Layout
    files: dict[str, bytes]  # what the v1 image's root filesystem holds
    v1: Descriptor
    v2: Descriptor


@pytest.fixture(scope="module")
def images(workdir: Path) -> Images:
    rng = random.Random(1666)
    layout = Layout(workdir / "ctrd-layout")
    base_files = {f"opt/base/part{i}.bin": rng.randbytes(2 * MiB + i) for i in range(3)}
    top_files = {"etc/app.conf": b"name = app\n", "opt/app/version": b"v1\n"}
    base = layout.layer(base_files)
    v1 = layout.image([base, layout.layer(top_files)])
    v2 = layout.image([base, layout.layer({"opt/app/version": b"v2\n"})])
    layout.tag(v1, "v1")
    layout.tag(v2, "v2")
    return Images(layout, {**base_files, **top_files}, v1, v2)


@pytest.fixture(scope="module")
def registry(workdir: Path, images: Images) -> Iterator[Registry]:
    with Registry(workdir / "ctrd-registry") as reg:
        reg.push(images.layout, "v1", "team/app:v1")
        yield reg


@pytest.fixture
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ctrd-node")


def _push_image(
    where: Path, registry: Registry, repo: str, seed: int, layer_size: int, layers: int
) -> tuple[Layout, Descriptor]:
    """An image of `layers` random layers of about `layer_size` bytes, pushed as
    `repo:v1`."""
    layout = Layout(where)
    rng = random.Random(seed)
    descs = [layout.random_layer(rng, 2, layer_size + i, prefix=f"l{i}/") for i in range(layers)]
    image = layout.image(descs)
    layout.tag(image, "v1")
    registry.push(layout, "v1", f"{repo}:v1")
    return layout, image


def _holds_all(cluster: MirrorCluster, node: Node, objects: set[str]) -> bool:
    return cluster.store_objects(node) >= objects


def _pulled_blobs(registry: Registry, repo: str, since: Counter[str]) -> Counter[str]:
    return registry.blob_gets(repo) - since


def _unpacked(ctrd: Containerd, ref: str, files: dict[str, bytes], target: Path) -> None:
    check = ctrd.check(ref)
    assert check.complete and check.unpacked, check
    with ctrd.mounted(ref, target) as root:
        for name, data in files.items():
            assert (root / name).read_bytes() == data, name


def test_containerd_pulls_through_the_mirror_and_the_image_unpacks(
    node_dir: Path, registry: Registry, images: Images
) -> None:
    ref = f"{registry.host}/team/app:v1"
    before = registry.blob_gets("team/app")
    with MirrorProcess(node_dir / "mirror", [registry.host]) as mirror:
        hosts = write_hosts_toml(node_dir / "hosts", registry.host, registry.url, [mirror.url])
        with Containerd(node_dir / "c1") as one, Containerd(node_dir / "c2") as two:
            one.pull(ref, hosts)
            _unpacked(one, ref, images.files, node_dir / "mnt1")
            assert one.check(ref).digest == images.v1.digest
            # A second containerd on the same node, and the first again from scratch.
            two.pull(ref, hosts)
            one.remove(ref)
            one.pull(ref, hosts)
            _unpacked(one, ref, images.files, node_dir / "mnt1")
            _unpacked(two, ref, images.files, node_dir / "mnt2")
        everything = images.layout.blobs_of(images.v1)
        assert mirror.cached() == everything  # containerd's pulls went through the mirror
    fetched = _pulled_blobs(registry, "team/app", before)
    # The registry served each blob once (the manifest is fetched as a manifest).
    assert fetched == Counter({d: 1 for d in everything - {images.v1.digest}})


@needs_fuse
def test_two_nodes_fetch_each_blob_from_the_registry_once_across_both(
    node_dir: Path, registry: Registry, images: Images
) -> None:
    """Two node daemons (the mirror in the node core), a containerd on each: the first
    pull reads every blob from the registry under the scheduler's claims and reports it;
    the second takes them from the first node, not from the registry."""
    ref = f"{registry.host}/team/app:v1"
    before = registry.blob_bytes("team/app")
    blobs = images.layout.blobs_of(images.v1) - {images.v1.digest}
    with MirrorCluster(node_dir / "cluster", [registry.host]) as cluster:
        for index, node in enumerate(cluster.nodes):
            hosts = node_dir / node.name / "hosts"
            write_hosts_toml(hosts, registry.host, registry.url, [cluster.mirror_url(index)])
            with Containerd(node_dir / node.name / "containerd") as ctrd:
                ctrd.pull(ref, hosts)
                _unpacked(ctrd, ref, images.files, node_dir / node.name / "mnt")
            # Reported: the next node finds each blob at this one.
            for digest in blobs:
                wait_until(
                    functools.partial(_holds, cluster, node.name, digest),
                    30,
                    f"{node.name} reported as holding {digest}",
                    evidence=node.log_tail,
                )
        second = cluster.nodes[1].log_text(whole=True)
    # Every blob went through the mirrors (containerd never fell back to the registry)...
    assert "cannot fetch" not in second and "rejected" not in second
    # ...and the registry served each blob's bytes once across both nodes (a blob larger
    # than a chunk in several ranged reads).
    sizes = {d: len(images.layout.data[d]) for d in blobs}
    assert registry.blob_bytes("team/app") - before == Counter(sizes)


@needs_fuse
def test_two_nodes_pulling_at_once_still_read_each_blob_once(
    node_dir: Path, registry: Registry
) -> None:
    """Both containerds at the same moment, layers of several chunks: one node reads each
    blob from the registry whole (a claim on all its chunks) while the other waits and
    takes it from that node once verified; no blob is split between them (each would
    hold its part back until the blob verified, and neither could)."""
    layout, image = _push_image(node_dir / "big-layout", registry, "team/big", 2612, 8 * MiB, 4)
    ref = f"{registry.host}/team/big:v1"
    before = registry.blob_bytes("team/big")
    with MirrorCluster(node_dir / "cluster", [registry.host]) as cluster:
        ctrds = [Containerd(node_dir / f"c{i}") for i in range(2)]
        try:
            hosts = []
            for index, ctrd in enumerate(ctrds):
                ctrd.start()
                mirror = [cluster.mirror_url(index)]
                hosts.append(
                    write_hosts_toml(node_dir / f"h{index}", registry.host, registry.url, mirror)
                )
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                pulls = [pool.submit(c.pull, ref, h) for c, h in zip(ctrds, hosts, strict=True)]
                for pull in pulls:
                    pull.result()
            for ctrd in ctrds:
                check = ctrd.check(ref)
                assert check.complete and check.unpacked, check
        finally:
            for ctrd in ctrds:
                ctrd.cleanup()
        logs = "".join(node.log_text(whole=True) for node in cluster.nodes)
    assert "503 UNAVAILABLE" not in logs  # no mirror gave up waiting for the other
    blobs = layout.blobs_of(image) - {image.digest}
    sizes = {d: len(layout.data[d]) for d in blobs}
    assert registry.blob_bytes("team/big") - before == Counter(sizes)


@needs_fuse
def test_a_manifest_handed_out_brings_its_blobs_before_they_are_asked_for(
    node_dir: Path, registry: Registry
) -> None:
    """Warming: two nodes' mirrors hand out an image manifest at the same moment and are
    never asked for a blob, yet both come to hold the config and every layer (read ahead
    of containerd, which asks for three blobs at a time), and the registry still served
    each blob's bytes once across both nodes (claims split the reads between them)."""
    layout, image = _push_image(node_dir / "warm", registry, "team/warm", 1616, 6 * MiB, 3)
    before = registry.blob_bytes("team/warm")
    blobs = layout.blobs_of(image) - {image.digest}
    with MirrorCluster(node_dir / "cluster", [registry.host]) as cluster:

        def manifest(index: int) -> bytes:
            url = f"{cluster.mirror_url(index)}/v2/team/warm/manifests/v1?ns={registry.host}"
            accept = {"accept": image.media_type}
            resp = httpx.get(url, headers=accept, timeout=30, trust_env=False)
            resp.raise_for_status()
            return resp.content

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            bodies = list(pool.map(manifest, range(2)))
        assert bodies == [layout.data[image.digest]] * 2
        objects = {_object(d) for d in blobs}
        for node in cluster.nodes:
            wait_until(
                functools.partial(_holds_all, cluster, node, objects),
                120,
                f"{node.name} to hold every blob of the image without being asked",
                evidence=node.log_tail,
            )
    sizes = {d: len(layout.data[d]) for d in blobs}
    assert registry.blob_bytes("team/warm") - before == Counter(sizes)


@needs_fuse
def test_a_corrupted_blob_is_rejected_by_the_node_and_never_reaches_a_peer(
    node_dir: Path, registry: Registry, images: Images
) -> None:
    """The node mirrors reach the registry through a proxy that flips a byte of the base
    layer: each node rejects it (its log names the digest), containerd falls back to the
    registry itself, and no node ever holds the blob, so none offers it to a peer."""
    base = next(d for d in images.layout.blobs_of(images.v1) if len(images.layout.data[d]) > MiB)
    good = images.layout.blobs_of(images.v1) - {base, images.v1.digest}
    with (
        RegistryProxy(registry) as proxy,
        MirrorCluster(node_dir / "cluster", [proxy.hostport]) as cluster,
    ):
        proxy.flip.add(base)
        ref = f"{proxy.hostport}/team/app:v1"
        for index, node in enumerate(cluster.nodes):
            hosts = node_dir / node.name / "hosts"
            mirror = [cluster.mirror_url(index)]
            write_hosts_toml(hosts, proxy.hostport, registry.url, mirror)
            with Containerd(node_dir / node.name / "containerd") as ctrd:
                ctrd.pull(ref, hosts)
                _unpacked(ctrd, ref, images.files, node_dir / node.name / "mnt")
            log = node.log_text(whole=True)
            assert re.search(rf"(rejected|cannot fetch) {base}\b", log), log[-3000:]
            assert "502" in log
            # No digest of it was ever recorded: no node reported a chunk of it, so none
            # could be offered to a peer.
            assert cluster.chunk_digests(base) == {}
            assert cluster.store_objects(node) >= {_object(d) for d in good}
            assert _object(base) not in cluster.store_objects(node)


@needs_fuse
def test_an_image_dataset_is_served_from_the_cache_and_its_tag_without_the_registry(
    node_dir: Path, registry: Registry, images: Images
) -> None:
    """`syncbit pull oci://...` brings an image to a node: containerd's pull through that
    node's mirror then takes no blob from the registry (the dataset's objects are the
    mirror's), and with the registry gone the tag resolves to the dataset's pinned digest
    and the whole image comes from the node."""
    blobs = images.layout.blobs_of(images.v1) - {images.v1.digest}
    with (
        RegistryProxy(registry) as proxy,  # the registry as the node sees it, until stopped
        MirrorCluster(node_dir / "cluster", [proxy.hostport], count=1) as cluster,
    ):
        node = cluster.nodes[0]
        uri = f"oci://{proxy.hostport}/team/app:v1"
        argv = [*SYNCBIT, "pull", uri, "--name", "app", "-o", "insecure=true"]
        argv += ["--scheduler", cluster.scheduler.url, "--daemon", node.address]
        done = run_cli(argv, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        for command in (["dataset", "ls"], ["status"]):  # the image, by its pinned digest
            shown = run_cli([*SYNCBIT, *command, "--scheduler", cluster.scheduler.url])
            assert shown.returncode == 0, shown.stderr
            assert re.search(rf"^app\s+{images.v1.digest}\s+-$", shown.stdout, re.M), shown.stdout
        assert cluster.store_objects(node) >= {
            _object(d) for d in images.layout.blobs_of(images.v1)
        }
        ref = f"{proxy.hostport}/team/app:v1"
        server = f"http://{proxy.hostport}"
        hosts = write_hosts_toml(
            node_dir / "hosts", proxy.hostport, server, [cluster.mirror_url(0)]
        )
        proxy.stop()  # the registry is gone (and containerd's fallback with it)
        with Containerd(node_dir / "c1") as ctrd:
            ctrd.pull(ref, hosts)
            assert ctrd.check(ref).digest == images.v1.digest
            _unpacked(ctrd, ref, images.files, node_dir / "mnt1")
        log = node.log_text(whole=True)
        assert "answering the dataset's pinned" in log
        proxy.start()  # back, on the same port: tags go to it again, blobs stay local
        before = registry.blob_bytes("team/app")
        with Containerd(node_dir / "c2") as ctrd:
            ctrd.pull(ref, hosts)
            _unpacked(ctrd, ref, images.files, node_dir / "mnt2")
        assert registry.blob_bytes("team/app") - before == Counter()
        assert node.log_text(whole=True).count("answering the dataset's pinned") == 1
    assert blobs  # the image has blobs at all


def _holds(cluster: MirrorCluster, node: str, digest: str) -> bool:
    return node in cluster.holders(digest)


def _object(digest: str) -> str:
    return identity_digest("sha256", digest.partition(":")[2])


def test_a_moved_tag_is_followed_and_only_new_blobs_are_fetched(
    node_dir: Path, images: Images
) -> None:
    with Registry(node_dir / "registry") as registry:
        registry.push(images.layout, "v1", "team/app:live")
        ref = f"{registry.host}/team/app:live"
        with (
            MirrorProcess(node_dir / "mirror", [registry.host]) as mirror,
            Containerd(node_dir / "containerd") as ctrd,
        ):
            hosts = write_hosts_toml(node_dir / "hosts", registry.host, registry.url, [mirror.url])
            ctrd.pull(ref, hosts)
            assert ctrd.check(ref).digest == images.v1.digest
            registry.push(images.layout, "v2", "team/app:live")  # the tag moves upstream
            ctrd.pull(ref, hosts)
            assert ctrd.check(ref).digest == images.v2.digest
            files = {**images.files, "opt/app/version": b"v2\n"}
            del files["etc/app.conf"]
            _unpacked(ctrd, ref, files, node_dir / "mnt")
        fetched = registry.blob_gets("team/app")
        v1_blobs = images.layout.blobs_of(images.v1) - {images.v1.digest}
        v2_blobs = images.layout.blobs_of(images.v2) - {images.v2.digest}
        assert fetched == Counter({d: 1 for d in v1_blobs | v2_blobs})


def test_a_corrupted_blob_is_never_served_and_containerd_falls_back(
    node_dir: Path, registry: Registry, images: Images
) -> None:
    """The mirror reaches the registry through a proxy that flips a byte of the base
    layer; containerd's fallback (the hosts.toml `server`) is the registry itself."""
    base = next(d for d in images.layout.blobs_of(images.v1) if len(images.layout.data[d]) > MiB)
    with RegistryProxy(registry) as proxy:
        proxy.flip.add(base)
        ref = f"{proxy.hostport}/team/app:v1"  # the mirror is asked with ns=<proxy>
        with (
            MirrorProcess(node_dir / "mirror", [proxy.hostport]) as mirror,
            Containerd(node_dir / "containerd") as ctrd,
        ):
            hosts = write_hosts_toml(node_dir / "hosts", proxy.hostport, registry.url, [mirror.url])
            ctrd.pull(ref, hosts)
            _unpacked(ctrd, ref, images.files, node_dir / "mnt")
            assert base not in mirror.cached()
            assert mirror.cached() == images.layout.blobs_of(images.v1) - {base}
            log = mirror.log_text()
            assert f"rejected {base}" in log or f"rejected sha256:{base[7:]}" in log
            assert "502 DIGEST_INVALID" in log


def test_the_hosts_files_syncbit_writes_are_what_containerd_reads(
    node_dir: Path, registry: Registry, images: Images
) -> None:
    """`python -m syncbit.mirror hosts` (what the DaemonSet's init container runs): a
    file for the registry named in the config, and `_default` for every other one."""
    config = node_dir / "mirror.yaml"
    config.write_text('registries:\n  "*": {}\n')
    with (
        RegistryProxy(registry) as elsewhere,  # another registry: no file of its own
        MirrorProcess(node_dir / "mirror", [registry.host, elsewhere.hostport]) as mirror,
        Containerd(node_dir / "containerd") as ctrd,
    ):
        certs_d = node_dir / "certs.d"
        argv = [*MIRROR, "hosts", "--certs-d", str(certs_d), "--config", str(config)]
        argv += ["--insecure-registry", registry.host, "--mirror", mirror.url]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert sorted(p.parent.name for p in certs_d.glob("*/hosts.toml")) == sorted(
            ["_default", registry.host]
        )
        named = f"{registry.host}/team/app:v1"
        ctrd.pull(named, certs_d)
        _unpacked(ctrd, named, images.files, node_dir / "mnt1")
        # `_default` names no server: --plain-http makes the fallback plain HTTP.
        other = f"{elsewhere.hostport}/team/app:v1"
        ctrd.pull(other, certs_d, "--plain-http")
        _unpacked(ctrd, other, images.files, node_dir / "mnt2")
        assert mirror.cached() == images.layout.blobs_of(images.v1)
