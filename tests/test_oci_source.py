"""OciSource against real registries on loopback: Debian's docker-registry (distribution v2)
anonymous, with htpasswd basic auth, with token auth (our token server), and with TLS;
test images built here as OCI layouts and pushed with skopeo. What a listing is (an OCI
image layout) is checked with skopeo and umoci on the listed bytes written to a directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import subprocess
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from ocifixtures import no_ambient_credentials_fixture  # noqa: F401 - autouse here

from integration.registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME,
    BlobStorage,
    Descriptor,
    KiB,
    Layout,
    MiB,
    Registry,
    RegistryProxy,
    TokenServer,
    docker_config,
    make_tls,
    registry_unavailable,
)
from syncbit.chunks import identity_digest
from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
    UserError,
)
from syncbit.manifest import FileEntry, build_manifest
from syncbit.sources import Listing, Source, open_source
from syncbit.sources.oci import INLINE_LIMIT, OciSource
from syncbit.sources.oci.summary import image_summary
from syncbit.sources.oci.transport import check_target

_WHY = registry_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"no registry: {_WHY}")

PASSWORD = "pw-do-not-print-7f3a9c"
TOKEN_PASSWORD = "tok-pw-do-not-print-51be"
RNG = random.Random(1604)


@dataclass
class Images:
    layout: Layout
    base: Descriptor  # shared by every image, more than one read long
    v1: Descriptor  # linux/amd64
    v2: Descriptor  # linux/amd64, what the tag moves to
    arm: Descriptor  # linux/arm64/v8
    multi: Descriptor  # index of v1 and arm
    big: Descriptor  # a manifest too large to travel inline


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    layout = Layout(tmp_path_factory.mktemp("layout"))
    base = layout.random_layer(RNG, 3, 5 * MiB + 123)
    v1 = layout.image([base, layout.random_layer(RNG, 2, 64 * KiB)], label="v1")
    v2 = layout.image([base, layout.random_layer(RNG, 2, 80 * KiB)], label="v2")
    arm = layout.image(
        [base, layout.random_layer(RNG, 2, 70 * KiB)], platform=("linux", "arm64", "v8")
    )
    multi = layout.index([v1, arm])
    big = layout.image([base], annotations={"padding": "x" * (INLINE_LIMIT + 100)})
    for tag, desc in {"v1.4": v1, "v2": v2, "multi": multi, "big": big}.items():
        layout.tag(desc, tag)
    return Images(layout, base, v1, v2, arm, multi, big)


@pytest.fixture(scope="module")
def anon(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("anon"))
    with registry:
        for tag in ("v1.4", "multi", "big"):
            registry.push(images.layout, tag, f"team/app:{tag}")
        registry.push(images.layout, "v1.4", "team/docker:v1", docker_format=True)
        yield registry


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("basic"), "htpasswd", {"alice": PASSWORD})
    with registry:
        registry.push(images.layout, "v1.4", "team/app:v1.4", creds=("alice", PASSWORD))
        yield registry


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Iterator[Registry]:
    workdir = tmp_path_factory.mktemp("token")
    tokens = TokenServer(
        workdir / "tokens",
        users={"alice": TOKEN_PASSWORD, "bob": "bob-password-1234"},
        grants={
            "alice": {"*": ["pull", "push"]},
            "bob": {"other/*": ["pull"]},
            "": {"public/*": ["pull"]},
        },
    )
    registry = Registry(workdir / "registry", "token", tokens=tokens)
    with registry:
        creds = ("alice", TOKEN_PASSWORD)
        registry.push(images.layout, "v1.4", "team/app:v1.4", creds=creds)
        registry.push(images.layout, "v1.4", "public/app:v1.4", creds=creds)
        yield registry


def _alice(monkeypatch: pytest.MonkeyPatch, registry: str) -> None:
    """alice's token-registry credentials in the environment, for `registry` only."""
    monkeypatch.setenv("SYNCBIT_OCI_REGISTRY", registry)
    monkeypatch.setenv("SYNCBIT_OCI_USERNAME", "alice")
    monkeypatch.setenv("SYNCBIT_OCI_PASSWORD", TOKEN_PASSWORD)


def _listing(uri: str, **options: str) -> tuple[OciSource, Listing]:
    source = open_source(uri, {"insecure": "true", **options})
    assert isinstance(source, OciSource)
    try:
        return source, trio.run(source.list)
    except BaseException:
        source.close()
        raise


def _read(source: Source, entry: FileEntry, piece: int = 1 * MiB + 17) -> bytes:
    buf = bytearray(entry.size)
    view = memoryview(buf)
    for offset in range(0, entry.size, piece):
        source.read_into(entry, offset, view[offset : offset + piece])
    return bytes(buf)


def _files(listing: Listing) -> dict[str, FileEntry]:
    return {e.path: e for e in listing.files}


def _index(source: OciSource, listing: Listing) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_read(source, _files(listing)["index.json"]))
    return doc


def _materialize(source: OciSource, listing: Listing, dest: Path) -> None:
    for entry in listing.files:
        path = dest / entry.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_read(source, entry))


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def _registry_digest(registry: Registry, ref: str) -> str:
    """The digest the registry gives for a reference, asked with skopeo."""
    out = _run(
        "skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{ref}"
    )
    return "sha256:" + hashlib.sha256(out.encode()).hexdigest()


# -- listing: tag -> digest, the layout, identities -----------------------------------------------


def test_tag_resolves_to_its_digest_and_lists_an_oci_layout(anon: Registry, images: Images) -> None:
    source, listing = _listing(f"oci://{anon.host}/team/app:v1.4")
    with closing(source):
        files = _files(listing)
        pinned = _registry_digest(anon, "team/app:v1.4")
        assert pinned == images.v1.digest
        index = _index(source, listing)
        assert index["manifests"] == [
            {
                "mediaType": OCI_MANIFEST,
                "digest": pinned,
                "size": images.v1.size,
                "annotations": {REF_NAME: "v1.4"},
            }
        ]
        assert json.loads(_read(source, files["oci-layout"])) == {"imageLayoutVersion": "1.0.0"}
        blobs = {p.removeprefix("blobs/sha256/") for p in files if p.startswith("blobs/")}
        assert blobs == {d.partition(":")[2] for d in images.layout.blobs_of(images.v1)}
        for path, entry in files.items():
            data = _read(source, entry)
            sha = hashlib.sha256(data).hexdigest()
            # Every file is addressed by its sha256, which the version facts carry.
            assert entry.object == identity_digest("sha256", sha)
            assert entry.version["sha256"] == sha
            assert len(data) == entry.size
            if path.startswith("blobs/"):
                assert images.layout.data[f"sha256:{sha}"] == data
                assert path == f"blobs/sha256/{sha}"


def test_same_digest_is_the_same_revision(anon: Registry) -> None:
    uri = f"oci://{anon.host}/team/app:v1.4"
    revisions = []
    for _ in range(2):
        source, listing = _listing(uri)
        source.close()
        revisions.append(build_manifest("app", uri, listing.files, source_options={}).revision)
    assert revisions[0] == revisions[1]


def test_listing_reads_as_a_layout_for_skopeo_and_umoci(
    anon: Registry, images: Images, tmp_path: Path
) -> None:
    source, listing = _listing(f"oci://{anon.host}/team/app:multi")
    with closing(source):
        _materialize(source, listing, tmp_path / "layout")
    layout = f"oci:{tmp_path / 'layout'}:multi"
    assert _run("umoci", "ls", "--layout", str(tmp_path / "layout")).split() == ["multi"]
    raw = _run("skopeo", "inspect", "--raw", layout)
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == images.multi.digest
    _run(
        "skopeo", "--insecure-policy", "copy", "--all", "--quiet", layout, f"dir:{tmp_path / 'out'}"
    )
    copied = {p.name for p in (tmp_path / "out").iterdir() if len(p.name) == 64}
    registry_blobs = {d.partition(":")[2] for d in images.layout.blobs_of(images.multi)}
    manifests = {images.multi.hex, images.v1.hex, images.arm.hex}
    assert copied == registry_blobs - manifests  # skopeo's dir: names configs and layers
    for name in copied:
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == name


def test_index_lists_every_platform_and_a_shared_layer_once(anon: Registry, images: Images) -> None:
    source, listing = _listing(f"oci://{anon.host}/team/app:multi")
    with closing(source):
        files = _files(listing)
        assert _index(source, listing)["manifests"] == [
            {
                "mediaType": OCI_INDEX,
                "digest": images.multi.digest,
                "size": images.multi.size,
                "annotations": {REF_NAME: "multi"},
            }
        ]
    expected = images.layout.blobs_of(images.multi)
    assert {p for p in files if p.startswith("blobs/")} == {
        f"blobs/sha256/{d.partition(':')[2]}" for d in expected
    }
    # The base layer is in both images and is one file, one object.
    shared = files[f"blobs/sha256/{images.base.hex}"]
    assert shared.object == identity_digest("sha256", images.base.hex)
    assert len(listing.files) == len(expected) + 2


def test_platform_option_chooses_one_image(anon: Registry, images: Images) -> None:
    source, listing = _listing(f"oci://{anon.host}/team/app:multi", platform="linux/arm64")
    with closing(source):
        files = _files(listing)
        (entry,) = _index(source, listing)["manifests"]
    assert entry == {
        "mediaType": OCI_MANIFEST,
        "digest": images.arm.digest,
        "size": images.arm.size,
        "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
        "annotations": {REF_NAME: "multi"},
    }
    blobs = {p.removeprefix("blobs/sha256/") for p in files if p.startswith("blobs/")}
    # The chosen image's blobs, and the pinned index itself; nothing of linux/amd64.
    wanted = images.layout.blobs_of(images.arm) | {images.multi.digest}
    assert blobs == {d.partition(":")[2] for d in wanted}


def test_status_names_an_image_by_its_pinned_digest_and_platforms(
    anon: Registry, images: Images
) -> None:
    """What `status` and `dataset ls` show of an image dataset, from its listing alone."""
    summaries = {}
    for tag, options in (("multi", {}), ("multi", {"platform": "linux/arm64"}), ("v1.4", {})):
        source, listing = _listing(f"oci://{anon.host}/team/app:{tag}", **options)
        with closing(source):
            summaries[tag, bool(options)] = image_summary(listing.files)
    assert summaries["multi", False] == {
        "digest": images.multi.digest,
        "platforms": ["linux/amd64", "linux/arm64/v8"],
    }
    assert summaries["multi", True] == {
        "digest": images.arm.digest,
        "platforms": ["linux/arm64/v8"],
    }
    # A single-platform image names its platform only in its config (not in the listing).
    assert summaries["v1.4", False] == {"digest": images.v1.digest, "platforms": []}
    assert image_summary([]) is None


def test_platform_not_in_the_index_is_a_user_error(anon: Registry) -> None:
    with pytest.raises(InvalidSourceError) as info:
        _listing(f"oci://{anon.host}/team/app:multi", platform="linux/s390x")
    assert "linux/s390x" in str(info.value)
    assert "linux/amd64, linux/arm64/v8" in str(info.value)
    with pytest.raises(InvalidSourceError, match="single-platform image for linux/amd64"):
        _listing(f"oci://{anon.host}/team/app:v1.4", platform="linux/arm64")
    source, listing = _listing(f"oci://{anon.host}/team/app:v1.4", platform="linux/amd64")
    source.close()
    assert len(listing.files) == 2 + 4  # oci-layout, index.json, manifest, config, 2 layers


def test_digest_reference_pins_without_a_tag(anon: Registry, images: Images) -> None:
    source, listing = _listing(f"oci://{anon.host}/team/app@{images.v1.digest}")
    with closing(source):
        (entry,) = _index(source, listing)["manifests"]
    assert entry == {"mediaType": OCI_MANIFEST, "digest": images.v1.digest, "size": images.v1.size}
    wrong = "sha256:" + "0" * 64
    with pytest.raises(InvalidSourceError, match="no such image"):
        _listing(f"oci://{anon.host}/team/app@{wrong}")


def test_docker_schema2_image(anon: Registry, tmp_path: Path) -> None:
    source, listing = _listing(f"oci://{anon.host}/team/docker:v1")
    with closing(source):
        (entry,) = _index(source, listing)["manifests"]
        assert entry["mediaType"] == DOCKER_MANIFEST
        assert entry["digest"] == _registry_digest(anon, "team/docker:v1")
        _materialize(source, listing, tmp_path / "layout")
    # skopeo 1.9 finds only OCI media types by ref name; the layout's only image it reads.
    raw = _run("skopeo", "inspect", "--raw", f"oci:{tmp_path / 'layout'}")
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST


def test_large_manifest_is_read_from_the_registry_by_digest(anon: Registry, images: Images) -> None:
    source, listing = _listing(f"oci://{anon.host}/team/app:big")
    with closing(source):
        entry = _files(listing)[f"blobs/sha256/{images.big.hex}"]
        assert entry.locator == f"manifest:{images.big.digest}"
        assert _read(source, entry, piece=5000) == images.layout.data[images.big.digest]
    small = _files(listing)["index.json"]
    assert small.locator.startswith("data:")  # small files travel inside the manifest


# -- blob reads ---------------------------------------------------------------------------------


def test_blob_read_by_ranges_equals_the_registrys_bytes(anon: Registry, images: Images) -> None:
    source, listing = _listing(f"oci://{anon.host}/team/app:v1.4")
    entry = _files(listing)[f"blobs/sha256/{images.base.hex}"]
    want = images.layout.data[images.base.digest]
    before = anon.blob_gets("team/app")[images.base.digest]
    with closing(source):
        got = bytearray(entry.size)
        view = memoryview(got)
        pieces = [(0, 1), (1, 4 * MiB - 1), (4 * MiB, entry.size - 4 * MiB)]
        for offset, length in pieces:
            source.read_into(entry, offset, view[offset : offset + length])
        assert bytes(got) == want
        # Ranges of the middle, read back where they belong.
        part = bytearray(999)
        source.read_into(entry, 3 * MiB + 5, memoryview(part))
        assert bytes(part) == want[3 * MiB + 5 : 3 * MiB + 5 + 999]
    # One ranged GET per read, each answered by the registry itself.
    assert anon.blob_gets("team/app")[images.base.digest] - before == len(pieces) + 1


def test_reads_from_many_threads_share_one_token(
    token: Registry, images: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    _alice(monkeypatch, token.host)
    assert token.tokens is not None
    source, listing = _listing(f"oci://{token.host}/team/app:v1.4")
    entry = _files(listing)[f"blobs/sha256/{images.base.hex}"]
    want = images.layout.data[images.base.digest]
    piece = 256 * KiB
    got = bytearray(entry.size)
    errors: list[BaseException] = []

    def worker(start: int) -> None:
        try:
            for offset in range(start * piece, entry.size, 8 * piece):
                n = min(piece, entry.size - offset)
                source.read_into(entry, offset, memoryview(got)[offset : offset + n])
        except BaseException as exc:
            errors.append(exc)

    asked = token.tokens.requests["alice"]
    with closing(source):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert bytes(got) == want
    assert token.tokens.requests["alice"] == asked  # the listing's token served every read


def test_a_refused_token_is_renewed_once(
    token: Registry, images: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert token.tokens is not None
    with RegistryProxy(token) as proxy:
        _alice(monkeypatch, proxy.hostport)
        source, listing = _listing(f"oci://{proxy.hostport}/team/app:v1.4")
        entry = _files(listing)[f"blobs/sha256/{images.base.hex}"]
        asked = token.tokens.requests["alice"]
        proxy.drop_auth = 1  # the registry refuses the kept token once
        with closing(source):
            assert _read(source, entry) == images.layout.data[images.base.digest]
        assert token.tokens.requests["alice"] == asked + 1


def test_wrong_bytes_from_the_registry_are_refused(anon: Registry, images: Images) -> None:
    source, listing = _listing(f"oci://{anon.host}/team/app:v1.4")
    source.close()
    small = next(e for e in listing.files if e.locator.startswith("blob:") and e.size < 1 * MiB)
    with RegistryProxy(anon) as proxy:
        digest = f"sha256:{small.version['sha256']}"
        proxy.flip.add(digest)
        reader = open_source(f"oci://{proxy.hostport}/team/app:v1.4", {"insecure": "true"})
        with closing(reader), pytest.raises(SourceError) as info:
            reader.read_into(small, 0, memoryview(bytearray(small.size)))
    assert not isinstance(info.value, SourceUnavailableError | SourceChangedError)
    assert digest in str(info.value)


def test_redirect_to_blob_storage_never_carries_the_registry_credentials(
    token: Registry, images: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RegistryProxy(token) as proxy, BlobStorage([images.layout]) as storage:
        proxy.redirect_to = storage
        _alice(monkeypatch, proxy.hostport)
        source, listing = _listing(f"oci://{proxy.hostport}/team/app:v1.4")
        with closing(source):
            for entry in listing.files:
                if entry.locator.startswith("blob:"):
                    want = images.layout.data[f"sha256:{entry.version['sha256']}"]
                    assert _read(source, entry) == want
        assert storage.seen, "the proxy did not redirect"
        assert all("authorization" not in headers for headers in storage.seen)


def test_redirect_rules() -> None:
    source = open_source("oci://registry.example/team/app:v1")
    assert isinstance(source, OciSource)
    client = source.client
    auth = {"Authorization": "Bearer abc", "Accept-Encoding": "identity"}
    here = "https://registry.example/v2/team/app/blobs/x"
    same, kept = client._next_hop(here, "/v2/team/app/blobs/y", auth)
    assert same == "https://registry.example/v2/team/app/blobs/y" and kept == auth
    other, dropped = client._next_hop(here, "https://storage.example/b?sig=1", auth)
    assert other == "https://storage.example/b?sig=1"
    assert dropped == {"Accept-Encoding": "identity"}
    for bad in (
        "http://storage.example/b",
        "ftp://storage.example/b",
        "https://169.254.169.254/x",
        "https://[fe80::1]/x",
        "https://user:pw@storage.example/b",
    ):
        with pytest.raises(SourceError, match="refused"):
            client._next_hop(here, bad, auth)
    # The token realm the registry names is held to the same rules.
    for realm in ("http://auth.example/token", "https://169.254.169.254/token"):
        with pytest.raises(SourceError, match="refused"):
            client._check_target(realm, "realm")
    client._check_target("https://auth.example/token", "realm")
    source.close()


@pytest.mark.parametrize("bad", ["https://[abc/token", "https://[::1/x", "https://h:99999/t"])
def test_a_malformed_realm_or_redirect_is_refused(bad: str) -> None:
    # URLs the parser itself rejects: refused as invalid, never a crash of the listing.
    with pytest.raises(SourceError, match="invalid URL"):
        check_target(bad, "the token realm", insecure=False)


# -- auth ---------------------------------------------------------------------------------------


def test_basic_auth_from_adocker_config(
    basic: Registry, images: Images, no_ambient_credentials: Path
) -> None:
    docker_config(no_ambient_credentials, basic.host, "alice", PASSWORD)
    source, listing = _listing(f"oci://{basic.host}/team/app:v1.4")
    with closing(source):
        entry = _files(listing)[f"blobs/sha256/{images.base.hex}"]
        assert _read(source, entry) == images.layout.data[images.base.digest]


def test_token_auth_from_the_environment(
    token: Registry, images: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    _alice(monkeypatch, token.host)
    source, listing = _listing(f"oci://{token.host}/team/app:v1.4")
    with closing(source):
        assert _index(source, listing)["manifests"][0]["digest"] == images.v1.digest
        entry = _files(listing)[f"blobs/sha256/{images.base.hex}"]
        assert _read(source, entry) == images.layout.data[images.base.digest]


def test_anonymous_token_for_a_public_repository(token: Registry, images: Images) -> None:
    assert token.tokens is not None
    anonymous = token.tokens.requests[""]
    source, listing = _listing(f"oci://{token.host}/public/app:v1.4")
    with closing(source):
        entry = _files(listing)[f"blobs/sha256/{images.base.hex}"]
        assert _read(source, entry) == images.layout.data[images.base.digest]
    assert token.tokens.requests[""] == anonymous + 1


def _assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text
        assert base64.b64encode(f"alice:{secret}".encode()).decode() not in text


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_auth_failure_names_the_registry_and_echoes_no_credential(
    kind: str,
    basic: Registry,
    token: Registry,
    no_ambient_credentials: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = basic if kind == "basic" else token
    wrong = "wrong-password-do-not-print-99"
    docker_config(no_ambient_credentials, registry.host, "alice", wrong)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceError) as info:
        _listing(f"oci://{registry.host}/team/app:v1.4")
    message = str(info.value)
    assert not isinstance(info.value, SourceUnavailableError | UserError)  # exit 1, no retry
    assert registry.host in message
    assert str(no_ambient_credentials / "config.json") in message  # where they came from
    _assert_no_secret(message + caplog.text, wrong, PASSWORD, TOKEN_PASSWORD)


def test_fixed_credentials_count_without_a_new_source(
    basic: Registry, images: Images, no_ambient_credentials: Path
) -> None:
    docker_config(no_ambient_credentials, basic.host, "alice", "not-the-password")
    source = open_source(f"oci://{basic.host}/team/app:v1.4", {"insecure": "true"})
    with closing(source):
        with pytest.raises(SourceError, match="refused the credentials"):
            trio.run(source.list)
        # As on a node whose config.json is fixed while its daemon runs.
        docker_config(no_ambient_credentials, basic.host, "alice", PASSWORD)
        listing = trio.run(source.list)
        entry = _files(listing)[f"blobs/sha256/{images.base.hex}"]
        assert _read(source, entry) == images.layout.data[images.base.digest]


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_no_credentials_says_how_to_give_them(kind: str, basic: Registry, token: Registry) -> None:
    registry = basic if kind == "basic" else token
    with pytest.raises(SourceError, match="requires authentication") as info:
        _listing(f"oci://{registry.host}/team/app:v1.4")
    assert registry.host in str(info.value)
    assert "SYNCBIT_OCI_USERNAME" in str(info.value)


def test_credentials_for_another_registry_are_not_sent(
    token: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _alice(monkeypatch, "elsewhere.example")
    assert token.tokens is not None
    asked = token.tokens.requests["alice"]
    with pytest.raises(SourceError, match="SYNCBIT_OCI_REGISTRY does not name"):
        _listing(f"oci://{token.host}/team/app:v1.4")
    assert token.tokens.requests["alice"] == asked


def test_token_without_access_to_the_repository(
    token: Registry, no_ambient_credentials: Path
) -> None:
    docker_config(no_ambient_credentials, token.host, "bob", "bob-password-1234")
    with pytest.raises(SourceError, match="refused the credentials") as info:
        _listing(f"oci://{token.host}/team/app:v1.4")
    assert "insufficient scope" in str(info.value)


# -- bad input -----------------------------------------------------------------------------------


def test_unknown_repository_or_tag_is_a_user_error(anon: Registry) -> None:
    with pytest.raises(InvalidSourceError, match=r"no such image.*team/app:nope.*MANIFEST_UNKNOWN"):
        _listing(f"oci://{anon.host}/team/app:nope")
    with pytest.raises(InvalidSourceError, match=r"no such image.*nothing-here:v1"):
        _listing(f"oci://{anon.host}/team/nothing-here:v1")


SCHEMA1 = json.dumps(
    {"schemaVersion": 1, "name": "team/app", "tag": "old", "architecture": "amd64", "fsLayers": []}
).encode()


@pytest.mark.parametrize(
    ("body", "ctype", "what"),
    [
        (SCHEMA1, "application/vnd.docker.distribution.manifest.v1+prettyjws", "Docker schema 1"),
        (SCHEMA1, "application/json", "Docker schema 1"),
        (
            json.dumps({"mediaType": "application/vnd.oci.artifact.manifest.v1+json"}).encode(),
            "application/vnd.oci.artifact.manifest.v1+json",
            "OCI artifact manifest",
        ),
        (
            b'{"schemaVersion": 2}',
            "application/vnd.example.thing+json",
            "application/vnd.example.thing+json",
        ),
    ],
)
def test_unsupported_manifest_media_type_is_a_clear_error(
    anon: Registry, body: bytes, ctype: str, what: str
) -> None:
    with RegistryProxy(anon) as proxy:
        proxy.manifests[("team/app", "old")] = (body, ctype)
        with pytest.raises(InvalidSourceError) as info:
            _listing(f"oci://{proxy.hostport}/team/app:old")
    assert what in str(info.value)
    assert "does not support" in str(info.value)


def test_index_entry_of_an_unsupported_type(anon: Registry, images: Images) -> None:
    doc = json.loads(images.layout.data[images.multi.digest])
    doc["manifests"][1]["mediaType"] = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    with RegistryProxy(anon) as proxy:
        proxy.manifests[("team/app", "odd")] = (json.dumps(doc).encode(), OCI_INDEX)
        with pytest.raises(InvalidSourceError, match="Docker schema 1"):
            _listing(f"oci://{proxy.hostport}/team/app:odd")


def test_http_registry_needs_insecure(anon: Registry) -> None:
    source = open_source(f"oci://{anon.host}/team/app:v1.4")
    with closing(source), pytest.raises(SourceError) as info:
        trio.run(source.list)
    assert "insecure=true" in str(info.value)


def test_https_registry_with_a_ca_option(tmp_path: Path, images: Images) -> None:
    tls = make_tls(tmp_path / "tls")
    with Registry(tmp_path / "registry", tls=tls) as registry:
        registry.push(images.layout, "v1.4", "team/app:v1.4")
        uri = f"oci://{registry.host}/team/app:v1.4"
        source = open_source(uri, {"ca": str(tls.ca)})
        with closing(source):
            listing = trio.run(source.list)
            entry = _files(listing)[f"blobs/sha256/{images.base.hex}"]
            assert _read(source, entry) == images.layout.data[images.base.digest]
        unverified = open_source(uri)
        with closing(unverified), pytest.raises(SourceError, match="TLS verification failed"):
            trio.run(unverified.list)
        with pytest.raises(InvalidSourceError, match="cannot load the CA file"):
            trio.run(open_source(uri, {"ca": str(tmp_path / "missing.pem")}).list)


def test_tag_moved_upstream_keeps_the_pinned_listing(tmp_path: Path, images: Images) -> None:
    with Registry(tmp_path / "registry") as registry:
        registry.push(images.layout, "v1.4", "team/app:live")
        uri = f"oci://{registry.host}/team/app:live"
        old_source, old = _listing(uri)
        registry.push(images.layout, "v2", "team/app:live")  # the tag moves
        new_source, new = _listing(uri)
        with closing(old_source), closing(new_source):
            assert _index(old_source, old)["manifests"][0]["digest"] == images.v1.digest
            assert _index(new_source, new)["manifests"][0]["digest"] == images.v2.digest
            # The pinned listing still reads its own image, blob by blob.
            for entry in old.files:
                if entry.path.startswith("blobs/"):
                    want = images.layout.data[f"sha256:{entry.version['sha256']}"]
                    assert _read(old_source, entry) == want
        old_rev = build_manifest("app", uri, old.files).revision
        new_rev = build_manifest("app", uri, new.files).revision
        assert old_rev != new_rev
        # What the new revision adds: its manifest, config and new layer, and index.json.
        added = {e.object for e in new.files} - {e.object for e in old.files}
        v2_only = images.layout.blobs_of(images.v2) - images.layout.blobs_of(images.v1)
        assert len(v2_only) == 3
        assert added == {identity_digest("sha256", d.partition(":")[2]) for d in v2_only} | {
            _files(new)["index.json"].object
        }
