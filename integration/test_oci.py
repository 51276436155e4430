"""Container images through a real mount: a real docker-registry on loopback, one daemon
with the embedded scheduler, the real CLI, and skopeo/umoci reading `/syncbit/<dataset>/`
as the OCI image layout it is. The digests they see are the registry's; a moved tag is a
new revision that fetches only the new blobs; bad input is one clear error."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.cluster import HOST, SYNCBIT, Node, free_port, run_cli, wait_until
from integration.registry import (
    Descriptor,
    KiB,
    Layout,
    MiB,
    Registry,
    RegistryProxy,
    docker_config,
    registry_unavailable,
)

_WHY = registry_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"no registry: {_WHY}")

PASSWORD = "it-pw-do-not-print-3c1d"
WRONG = "it-wrong-pw-do-not-print-88e0"


class EmbeddedNode(Node):
    """A daemon that runs the scheduler itself (no --scheduler), on a free port, with an
    environment of its own (the registry credentials it reads)."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str]) -> None:
        self.scheduler_port = free_port()
        super().__init__(name, workdir, f"http://{HOST}:{self.scheduler_port}")
        self.env = env

    def command(self) -> list[str]:
        argv = super().command()
        at = argv.index("--scheduler")
        del argv[at : at + 2]
        return [*argv, "--scheduler-listen", f"{HOST}:{self.scheduler_port}"]

    def start(self, wait: bool = True, timeout: float = 30.0) -> EmbeddedNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spawn(self.command(), env=self.env)
        if wait:
            self.wait_mounted(timeout)
        return self

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run_cli([*SYNCBIT, *args, "--scheduler", self.scheduler_url], timeout=timeout)


class Images:
    def __init__(self, root: Path) -> None:
        rng = random.Random(16)
        self.layout = Layout(root)
        self.base = self.layout.random_layer(rng, 4, 9 * MiB + 5)  # three chunks
        self.v1 = self.layout.image([self.base, self.layout.random_layer(rng, 2, 300 * KiB)])
        self.v2 = self.layout.image([self.base, self.layout.random_layer(rng, 2, 200 * KiB)])
        arm = self.layout.image(
            [self.base, self.layout.random_layer(rng, 2, 100 * KiB)], platform=("linux", "arm64")
        )
        self.multi = self.layout.index([self.v1, arm])
        for tag, desc in {"v1.4": self.v1, "v2": self.v2, "multi": self.multi}.items():
            self.layout.tag(desc, tag)

    def blobs(self, desc: Descriptor) -> set[str]:
        return {d.partition(":")[2] for d in self.layout.blobs_of(desc)}


@pytest.fixture(scope="module")
def images(workdir: Path) -> Images:
    return Images(workdir / "oci-layout")


@pytest.fixture(scope="module")
def registry(workdir: Path, images: Images) -> Iterator[Registry]:
    reg = Registry(workdir / "oci-registry", "htpasswd", {"alice": PASSWORD})
    with reg:
        for tag in ("v1.4", "multi"):
            reg.push(images.layout, tag, f"team/app:{tag}", creds=("alice", PASSWORD))
        yield reg


@pytest.fixture(scope="module")
def node(workdir: Path, registry: Registry) -> Iterator[EmbeddedNode]:
    """One daemon whose Docker config holds alice's password for the registry."""
    config = workdir / "oci-docker-config"
    docker_config(config, registry.host, "alice", PASSWORD)
    daemon = EmbeddedNode("oci1", workdir, {"DOCKER_CONFIG": str(config)})
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}: {done.stdout}{done.stderr}"
    return done.stdout


def _run(*argv: str) -> str:
    return _ok(subprocess.run(argv, capture_output=True, text=True, timeout=300))


def _add(node: EmbeddedNode, name: str, uri: str, *options: str) -> str:
    args = [f"--option={o}" for o in ("insecure=true", *options)]
    out = _ok(node.cli("dataset", "add", name, uri, *args))
    wait_until(lambda: node.path(name, "index.json").exists(), 30, f"{name} on the mount")
    return out


def _registry_digest(registry: Registry, ref: str) -> str:
    raw = _run(
        "skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", f"alice:{PASSWORD}",
        f"docker://{registry.host}/{ref}",
    )  # fmt: skip
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


def _copied_blobs(out: Path) -> set[str]:
    """The blobs `skopeo copy ... dir:out` wrote, each checked against its name."""
    names = {p.name for p in out.iterdir() if len(p.name) == 64}
    for name in names:
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == name
    return names


@pytest.mark.timeout(300)
def test_skopeo_reads_the_mount_as_an_oci_layout(
    node: EmbeddedNode, registry: Registry, images: Images, workdir: Path
) -> None:
    _add(node, "app", f"oci://{registry.host}/team/app:v1.4")
    layout = node.path("app")
    ref = f"oci:{layout}:v1.4"
    raw = _run("skopeo", "inspect", "--raw", ref)
    digest = "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
    assert digest == _registry_digest(registry, "team/app:v1.4") == images.v1.digest
    inspected = json.loads(_run("skopeo", "inspect", ref))
    assert inspected["Digest"] == images.v1.digest
    assert _run("umoci", "ls", "--layout", str(layout)).split() == ["v1.4"]
    out = workdir / "oci-copy-app"
    _run("skopeo", "--insecure-policy", "copy", "--quiet", ref, f"dir:{out}")
    copied = _copied_blobs(out)
    assert copied == images.blobs(images.v1) - {images.v1.hex}  # configs and layers
    assert json.loads((out / "manifest.json").read_bytes()) == json.loads(
        images.layout.data[images.v1.digest]
    )


@pytest.mark.timeout(300)
def test_every_platform_of_an_index_on_the_mount(
    node: EmbeddedNode, registry: Registry, images: Images, workdir: Path
) -> None:
    _add(node, "multi", f"oci://{registry.host}/team/app:multi")
    ref = f"oci:{node.path('multi')}:multi"
    out = workdir / "oci-copy-multi"
    _run("skopeo", "--insecure-policy", "copy", "--quiet", "--all", ref, f"dir:{out}")
    index = json.loads(_run("skopeo", "inspect", "--raw", ref))
    children = {m["digest"].partition(":")[2] for m in index["manifests"]}
    assert _copied_blobs(out) == images.blobs(images.multi) - children - {images.multi.hex}
    _add(node, "arm", f"oci://{registry.host}/team/app:multi", "platform=linux/arm64")
    inspected = json.loads(_run("skopeo", "inspect", f"oci:{node.path('arm')}:multi"))
    assert inspected["Architecture"] == "arm64"


@pytest.mark.timeout(300)
def test_a_moved_tag_is_a_new_revision_that_fetches_only_new_blobs(
    node: EmbeddedNode, registry: Registry, images: Images, workdir: Path
) -> None:
    creds = ("alice", PASSWORD)
    registry.push(images.layout, "v1.4", "team/app:live", creds=creds)
    uri = f"oci://{registry.host}/team/app:live"
    first = _add(node, "live", uri)
    assert first.startswith("added live revision ")
    assert _add(node, "live", uri).startswith("unchanged live revision ")  # same digest
    _run("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{node.path('live')}:live",
         f"dir:{workdir / 'oci-live-1'}")  # fmt: skip
    gets = registry.blob_gets("team/app")
    registry.push(images.layout, "v2", "team/app:live", creds=creds)  # the tag moves
    second = _add(node, "live", uri)
    assert second.startswith("added live revision ") and second.split()[3] != first.split()[3]
    wait_until(
        lambda: (
            json.loads(node.path("live", "index.json").read_bytes())["manifests"][0]["digest"]
            == images.v2.digest
        ),
        30,
        "the new revision on the mount",
    )
    out = workdir / "oci-live-2"
    _run(
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        f"oci:{node.path('live')}:live",
        f"dir:{out}",
    )
    assert _copied_blobs(out) == images.blobs(images.v2) - {images.v2.hex}
    fetched = registry.blob_gets("team/app") - gets
    new = images.blobs(images.v2) - images.blobs(images.v1)
    # Only the new revision's own blobs came from the registry; the shared base layer and
    # anything else of v1 came from the cache.
    assert {d.partition(":")[2] for d in fetched} <= new
    assert images.base.digest not in fetched


@pytest.mark.timeout(300)
def test_bad_input_is_one_clear_error(
    node: EmbeddedNode, registry: Registry, workdir: Path
) -> None:
    done = node.cli(
        "dataset", "add", "nope", f"oci://{registry.host}/team/app:nope", "-o", "insecure=true"
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: no such image") and "Traceback" not in done.stderr
    done = node.cli(
        "dataset", "add", "x", f"oci://{registry.host}/team/app:v1.4", "-o", "platfrom=linux/amd64"
    )
    assert done.returncode == 2 and "unknown option 'platfrom'" in done.stderr
    done = node.cli("dataset", "add", "x", f"oci://alice:{WRONG}@{registry.host}/team/app:v1.4")
    assert done.returncode == 2 and WRONG not in done.stderr
    with RegistryProxy(registry) as proxy:
        proxy.manifests[("team/app", "old")] = (
            b'{"schemaVersion":1,"name":"team/app","tag":"old","fsLayers":[]}',
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        )
        done = node.cli(
            "dataset", "add", "old", f"oci://{proxy.hostport}/team/app:old", "-o", "insecure=true"
        )
    assert done.returncode == 2 and "Docker schema 1" in done.stderr
    assert "Traceback" not in node.log_text()


@pytest.mark.timeout(300)
def test_auth_failure_names_the_registry_and_echoes_no_credential(
    workdir: Path, registry: Registry
) -> None:
    config = workdir / "oci-wrong-config"
    auth = docker_config(config, registry.host, "alice", WRONG)
    daemon = EmbeddedNode("oci2", workdir, {"DOCKER_CONFIG": str(config)})
    try:
        daemon.start()
        done = daemon.cli(
            "dataset", "add", "app", f"oci://{registry.host}/team/app:v1.4", "-o", "insecure=true"
        )
        assert done.returncode == 1, done.stderr
        assert registry.host in done.stderr and "refused the credentials" in done.stderr
        status = daemon.cli("status", "--json")
        for text in (done.stdout + done.stderr, status.stdout, daemon.log_text()):
            assert WRONG not in text and auth not in text
    finally:
        daemon.cleanup()
