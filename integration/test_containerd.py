"""containerd pulling through the registry mirror: real containerd processes (their own
root, state and sockets), the mirror as its own process (`python -m syncbit.mirror`), a
real docker-registry on loopback, and the hosts.toml the docs show (the mirror first, the
registry as the fallback). The image unpacks, `ctr images check` is clean, the registry
serves each blob once per mirror, a moved tag is followed, and a blob the registry
corrupts is never served by the mirror: containerd falls back to the registry.

Once per cluster (a second node's mirror taking blobs from the first node, with the
scheduler's claims) needs the mirror wired into the node core; here each mirror is a node
of its own, sharing nothing but the registry.
"""

from __future__ import annotations

import random
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.containerd import (
    MIRROR,
    Containerd,
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

_WHY = containerd_unavailable() or registry_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cannot run containerd: {_WHY}")


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


def test_two_nodes_each_fetch_each_blob_once(
    node_dir: Path, registry: Registry, images: Images
) -> None:
    ref = f"{registry.host}/team/app:v1"
    before = registry.blob_gets("team/app")
    for name in ("node1", "node2"):
        with (
            MirrorProcess(node_dir / name / "mirror", [registry.host]) as mirror,
            Containerd(node_dir / name / "containerd") as ctrd,
        ):
            hosts = node_dir / name / "hosts"
            write_hosts_toml(hosts, registry.host, registry.url, [mirror.url])
            ctrd.pull(ref, hosts)
            _unpacked(ctrd, ref, images.files, node_dir / name / "mnt")
    blobs = images.layout.blobs_of(images.v1) - {images.v1.digest}
    # Once per mirror. With the mirror in the node core, node2 takes them from node1.
    assert _pulled_blobs(registry, "team/app", before) == Counter({d: 2 for d in blobs})


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
