"""The registry mirror over a real registry: Debian's docker-registry on loopback
(anonymous, htpasswd, token auth), images built here and pushed with skopeo, the mirror
served for real with its upstream source, asked with plain HTTP clients and skopeo. A tag
resolves as the registry resolves it, a digest always serves the same bytes, the
registry's own error codes come through, and bytes that do not match their digest are
never served."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mirrorfixtures import ServedMirror
from ocifixtures import no_ambient_credentials_fixture  # noqa: F401 - autouse here

from integration.registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    BlobStorage,
    Descriptor,
    KiB,
    Layout,
    MiB,
    Registry,
    RegistryProxy,
    TokenServer,
    docker_config,
    registry_unavailable,
)
from syncbit.mirror import BlobCache, MirrorConfig, Repository, UpstreamSource

_WHY = registry_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"no registry: {_WHY}")

PASSWORD = "mirror-pw-do-not-print-5e2a"
# What containerd sends when it resolves a tag.
CONTAINERD_ACCEPT = (
    f"{DOCKER_MANIFEST}, application/vnd.docker.distribution.manifest.list.v2+json, "
    f"{OCI_MANIFEST}, {OCI_INDEX}, */*"
)


@dataclass
class Images:
    layout: Layout
    base: Descriptor  # shared by every image, several body messages long
    v1: Descriptor
    v2: Descriptor
    multi: Descriptor  # index of v1 and an arm64 image


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    rng = random.Random(1616)
    layout = Layout(tmp_path_factory.mktemp("layout"))
    base = layout.random_layer(rng, 3, 3 * MiB + 123)
    v1 = layout.image([base, layout.random_layer(rng, 2, 64 * KiB)], label="v1")
    v2 = layout.image([base, layout.random_layer(rng, 2, 80 * KiB)], label="v2")
    arm = layout.image(
        [base, layout.random_layer(rng, 2, 70 * KiB)], platform=("linux", "arm64", "v8")
    )
    multi = layout.index([v1, arm])
    for tag, desc in {"v1": v1, "v2": v2, "multi": multi}.items():
        layout.tag(desc, tag)
    return Images(layout, base, v1, v2, multi)


@pytest.fixture(scope="module")
def anon(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("anon"))
    with registry:
        for tag in ("v1", "multi"):
            registry.push(images.layout, tag, f"team/app:{tag}")
        registry.push(images.layout, "v1", "team/docker:v1", docker_format=True)
        yield registry


def _config(tmp_path: Path, *insecure: str, **extra: Any) -> MirrorConfig:
    registries = {host: {"insecure": True} for host in insecure}
    return MirrorConfig.model_validate(
        {"cache_dir": str(tmp_path / "mirror-cache"), "registries": registries, **extra}
    )


class Client:
    """An HTTP client of the mirror that asks for one upstream registry, as containerd does."""

    def __init__(self, mirror: ServedMirror, registry: str) -> None:
        self.http = httpx.Client(base_url=mirror.url, trust_env=False, timeout=60)
        self.ns = {"ns": registry}

    def get(self, path: str, **headers: str) -> httpx.Response:
        return self.http.get(path, params=self.ns, headers=headers)

    def head(self, path: str, **headers: str) -> httpx.Response:
        return self.http.head(path, params=self.ns, headers=headers)

    def tag(self, repo: str, tag: str, head: bool = False) -> httpx.Response:
        ask = self.head if head else self.get
        return ask(f"/v2/{repo}/manifests/{tag}", accept=CONTAINERD_ACCEPT)

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def mirror(tmp_path: Path, anon: Registry) -> Iterator[Client]:
    with ServedMirror(_config(tmp_path, anon.host)) as served:
        client = Client(served, anon.host)
        yield client
        client.close()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _direct(registry: Registry, path: str, method: str = "GET") -> httpx.Response:
    """The registry's own answer to a request (what the mirror must match)."""
    headers = {"Accept": CONTAINERD_ACCEPT}
    return httpx.request(method, f"{registry.url}{path}", headers=headers, trust_env=False)


def _code(resp: httpx.Response) -> str:
    return str(resp.json()["errors"][0]["code"])


# -- tags as upstream, digests verified --------------------------------------------------------


@pytest.mark.parametrize(
    ("repo", "tag", "media_type"),
    [
        ("team/app", "v1", OCI_MANIFEST),
        ("team/app", "multi", OCI_INDEX),
        ("team/docker", "v1", DOCKER_MANIFEST),
    ],
)
def test_a_tag_resolves_as_the_registry_resolves_it(
    mirror: Client, anon: Registry, repo: str, tag: str, media_type: str
) -> None:
    upstream = _direct(anon, f"/v2/{repo}/manifests/{tag}")
    assert upstream.status_code == 200
    head = mirror.tag(repo, tag, head=True)
    assert head.status_code == 200 and head.content == b""
    got = mirror.tag(repo, tag)
    assert got.status_code == 200 and got.content == upstream.content
    for resp in (head, got):
        assert resp.headers["docker-content-digest"] == upstream.headers["docker-content-digest"]
        assert resp.headers["docker-content-digest"] == _sha256(upstream.content)
        assert resp.headers["content-type"] == media_type
        assert resp.headers["content-length"] == str(len(upstream.content))


def test_every_blob_of_an_index_comes_through_verified_and_once(
    mirror: Client, anon: Registry, images: Images
) -> None:
    index = mirror.tag("team/app", "multi")
    assert index.headers["docker-content-digest"] == images.multi.digest
    before = anon.blob_gets("team/app")
    for _ in range(2):  # the second round is served from the mirror's cache
        for digest in sorted(images.layout.blobs_of(images.multi)):
            data = images.layout.data[digest]
            doc = json.loads(data) if data.startswith(b"{") else {}
            kind = "manifests" if "layers" in doc or "manifests" in doc else "blobs"
            resp = mirror.get(f"/v2/team/app/{kind}/{digest}")
            assert resp.status_code == 200, (digest, resp.text)
            assert resp.content == data and resp.headers["docker-content-digest"] == digest
    fetched = anon.blob_gets("team/app") - before
    assert fetched and set(fetched.values()) == {1}, fetched
    base = images.base.digest
    part = mirror.get(f"/v2/team/app/blobs/{base}", range="bytes=1000-1048999")
    assert part.status_code == 206
    assert part.content == images.layout.data[base][1000:1049000]
    assert anon.blob_gets("team/app")[base] == 1  # ranges too come from the cache


def test_a_moved_tag_is_followed_and_a_digest_keeps_its_bytes(
    tmp_path: Path, images: Images
) -> None:
    with Registry(tmp_path / "registry") as registry:
        registry.push(images.layout, "v1", "team/app:live")
        with ServedMirror(_config(tmp_path, registry.host)) as served:
            client = Client(served, registry.host)
            first = client.tag("team/app", "live")
            assert first.headers["docker-content-digest"] == images.v1.digest
            registry.push(images.layout, "v2", "team/app:live")  # the tag moves upstream
            moved = client.tag("team/app", "live", head=True)
            assert moved.headers["docker-content-digest"] == images.v2.digest
            assert client.tag("team/app", "live").content == images.layout.data[images.v2.digest]
            # The first image, by digest, is what it always was.
            again = client.get(f"/v2/team/app/manifests/{images.v1.digest}")
            assert again.content == images.layout.data[images.v1.digest]
            client.close()


def test_unknown_repository_tag_and_blob_get_the_registrys_codes(
    mirror: Client, anon: Registry
) -> None:
    missing = f"sha256:{'0' * 64}"
    for path in (
        "/v2/team/nothing/manifests/v1",
        "/v2/team/app/manifests/v404",
        f"/v2/team/app/manifests/{missing}",
        f"/v2/team/app/blobs/{missing}",
        f"/v2/team/nothing/blobs/{missing}",
    ):
        upstream = _direct(anon, path)
        assert upstream.status_code == 404
        resp = mirror.get(path, accept=CONTAINERD_ACCEPT)
        assert resp.status_code == 404, path
        assert _code(resp) == _code(upstream), path
        assert mirror.head(path, accept=CONTAINERD_ACCEPT).status_code == 404


def test_a_tag_asked_with_an_accept_the_registry_refuses_is_refused_the_same(
    mirror: Client, anon: Registry
) -> None:
    # docker-registry will not give an OCI manifest to a client that does not accept one.
    accept = DOCKER_MANIFEST
    upstream = httpx.get(
        f"{anon.url}/v2/team/app/manifests/v1", headers={"Accept": accept}, trust_env=False
    )
    resp = mirror.get("/v2/team/app/manifests/v1", accept=accept)
    assert resp.status_code == upstream.status_code == 404
    assert _code(resp) == _code(upstream)


# -- wrong bytes are never served ---------------------------------------------------------------


def test_a_blob_that_does_not_match_its_digest_is_never_served(
    tmp_path: Path, anon: Registry, images: Images, caplog: pytest.LogCaptureFixture
) -> None:
    digest = images.base.digest
    with RegistryProxy(anon) as proxy, ServedMirror(_config(tmp_path, proxy.hostport)) as served:
        proxy.flip.add(digest)
        client = Client(served, proxy.hostport)
        with caplog.at_level(logging.WARNING, "syncbit.mirror"):
            for headers in ({}, {"range": "bytes=0-99"}):
                resp = client.get(f"/v2/team/app/blobs/{digest}", **headers)
                assert resp.status_code == 502 and _code(resp) == "DIGEST_INVALID"
                assert resp.headers["content-type"].startswith("application/json")
                assert digest in resp.json()["errors"][0]["message"]
            assert client.head(f"/v2/team/app/blobs/{digest}").status_code == 502
        assert any(digest.partition(":")[2] in r.getMessage() for r in caplog.records)
        cache = tmp_path / "mirror-cache"
        assert list((cache / "blobs" / "sha256").iterdir()) == []
        assert list((cache / "tmp").iterdir()) == []
        proxy.flip.clear()  # the registry mends: the same request now serves the blob
        resp = client.get(f"/v2/team/app/blobs/{digest}")
        assert resp.status_code == 200 and resp.content == images.layout.data[digest]
        client.close()


def test_a_manifest_that_does_not_match_its_digest_is_never_served(
    tmp_path: Path, anon: Registry, images: Images
) -> None:
    digest = images.v1.digest
    with RegistryProxy(anon) as proxy, ServedMirror(_config(tmp_path, proxy.hostport)) as served:
        proxy.manifests[("team/app", digest)] = (images.layout.data[images.v2.digest], OCI_MANIFEST)
        client = Client(served, proxy.hostport)
        resp = client.get(f"/v2/team/app/manifests/{digest}")
        assert resp.status_code == 502 and _code(resp) == "DIGEST_INVALID"
        client.close()


# -- auth: the node's credentials, never anyone else's ---------------------------------------------


def test_a_registry_with_basic_auth_is_mirrored_with_the_nodes_credentials(
    tmp_path: Path, images: Images, no_ambient_credentials: Path
) -> None:
    with Registry(tmp_path / "basic", "htpasswd", {"alice": PASSWORD}) as registry:
        registry.push(images.layout, "v1", "team/app:v1", creds=("alice", PASSWORD))
        with ServedMirror(_config(tmp_path, registry.host)) as served:
            client = Client(served, registry.host)
            refused = client.tag("team/app", "v1")
            assert refused.status_code == 403 and _code(refused) == "DENIED"
            assert registry.host in refused.text and PASSWORD not in refused.text
            docker_config(no_ambient_credentials, registry.host, "alice", PASSWORD)
            resp = client.tag("team/app", "v1")
            assert resp.status_code == 200
            assert resp.headers["docker-content-digest"] == images.v1.digest
            blob = client.get(f"/v2/team/app/blobs/{images.base.digest}")
            assert blob.content == images.layout.data[images.base.digest]
            client.close()


def test_token_auth_and_a_redirect_to_storage_that_never_gets_the_token(
    tmp_path: Path, images: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = TokenServer(
        tmp_path / "tokens", users={"alice": PASSWORD}, grants={"alice": {"*": ["pull", "push"]}}
    )
    with Registry(tmp_path / "registry", "token", tokens=tokens) as registry:
        registry.push(images.layout, "v1", "team/app:v1", creds=("alice", PASSWORD))
        with (
            RegistryProxy(registry) as proxy,
            BlobStorage([images.layout]) as storage,
            ServedMirror(_config(tmp_path, proxy.hostport)) as served,
        ):
            proxy.redirect_to = storage
            monkeypatch.setenv("SYNCBIT_OCI_REGISTRY", proxy.hostport)
            monkeypatch.setenv("SYNCBIT_OCI_USERNAME", "alice")
            monkeypatch.setenv("SYNCBIT_OCI_PASSWORD", PASSWORD)
            client = Client(served, proxy.hostport)
            assert client.tag("team/app", "v1").status_code == 200
            blob = client.get(f"/v2/team/app/blobs/{images.base.digest}")
            assert blob.content == images.layout.data[images.base.digest]
            client.close()
        assert tokens.requests["alice"] >= 1
        assert storage.seen and all("authorization" not in h for h in storage.seen)


# -- a real client: skopeo ------------------------------------------------------------------------


def test_skopeo_copies_an_image_through_the_mirror(
    tmp_path: Path, anon: Registry, images: Images
) -> None:
    config = _config(tmp_path, anon.host, default_registry=anon.host)  # skopeo sends no ns
    with ServedMirror(config) as served:
        mirror_host = served.url.removeprefix("http://")
        dest = tmp_path / "copy"
        done = subprocess.run(
            [
                "skopeo", "--insecure-policy", "copy", "--all", "--preserve-digests",
                "--src-tls-verify=false", f"docker://{mirror_host}/team/app:multi",
                f"oci:{dest}:multi",
            ],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    index = json.loads((dest / "index.json").read_bytes())
    assert index["manifests"][0]["digest"] == images.multi.digest
    for digest in images.layout.blobs_of(images.multi):
        path = dest / "blobs" / "sha256" / digest.partition(":")[2]
        assert path.read_bytes() == images.layout.data[digest]


async def test_clients_beyond_the_limit_are_closed_least_recently_used_first(
    tmp_path: Path, images: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each repository's client keeps its own token: a client made again asks for one."""
    tokens = TokenServer(
        tmp_path / "tokens", users={"alice": PASSWORD}, grants={"alice": {"*": ["pull", "push"]}}
    )
    with Registry(tmp_path / "registry", "token", tokens=tokens) as registry:
        for repo in ("team/a", "team/b"):
            registry.push(images.layout, "v1", f"{repo}:v1", creds=("alice", PASSWORD))
        monkeypatch.setenv("SYNCBIT_OCI_REGISTRY", registry.host)
        monkeypatch.setenv("SYNCBIT_OCI_USERNAME", "alice")
        monkeypatch.setenv("SYNCBIT_OCI_PASSWORD", PASSWORD)
        config = _config(tmp_path, registry.host)
        cache = await BlobCache.open(tmp_path / "cache", 64 * MiB)
        for limit, asked in ((2, 2), (1, 3)):
            source = UpstreamSource(config, cache, max_clients=limit)
            before = tokens.requests["alice"]
            for repo in ("team/a", "team/b", "team/a"):
                content = await source.resolve_tag(Repository(registry.host, repo), "v1", None)
                assert content.digest == images.v1.digest
            await source.close()
            assert tokens.requests["alice"] - before == asked


def test_registries_conf_sends_a_containers_image_client_through_the_mirror(
    tmp_path: Path, images: Images
) -> None:
    """CRI-O, podman and skopeo read the same registries.conf (containers/image): with the
    mirror as the registry's mirror they pull through it. They send no ?ns=, so this
    mirror's default registry is that registry."""
    with Registry(tmp_path / "registry") as registry:
        registry.push(images.layout, "v1", "team/app:v1")
        config = _config(tmp_path, registry.host, default_registry=registry.host)
        with ServedMirror(config) as served:
            conf = tmp_path / "registries.conf"
            conf.write_text(
                "[[registry]]\n"
                f'prefix = "{registry.host}"\n'
                f'location = "{registry.host}"\n'
                "insecure = true\n"
                "[[registry.mirror]]\n"
                f'location = "{served.url.removeprefix("http://")}"\n'
                "insecure = true\n"
            )
            dest = tmp_path / "copy"
            done = subprocess.run(
                [
                    "skopeo", "--insecure-policy", "--registries-conf", str(conf), "copy",
                    f"docker://{registry.host}/team/app:v1", f"oci:{dest}:v1",
                ],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        blobs = images.layout.blobs_of(images.v1)
        cached = {f"sha256:{p.name}" for p in (tmp_path / "mirror-cache/blobs/sha256").iterdir()}
        assert cached == blobs  # everything came through the mirror
        assert set(registry.blob_gets("team/app").values()) == {1}
        index = json.loads((dest / "index.json").read_bytes())
        assert index["manifests"][0]["digest"] == images.v1.digest
