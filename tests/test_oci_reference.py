"""The parts of the OCI source that need no registry: references, options, platforms,
credentials, manifest parsing and reads of what a listing carries inline. Property tests
(hypothesis) feed the parsers arbitrary input: one clear error, never a crash."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncbit.errors import InvalidSourceError, SourceError, SyncbitError
from syncbit.manifest import FileEntry
from syncbit.sources import open_source
from syncbit.sources.oci import (
    DOCKER_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    OciReference,
    OciSource,
    Platform,
    find_credentials,
    parse_manifest,
    parse_oci_uri,
)

HEX = "ab" * 32


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("oci://r.example:5000/team/app:v1.4", ("r.example:5000", "team/app", "v1.4", None)),
        ("oci://r.example/a/b/c", ("r.example", "a/b/c", None, None)),
        (f"oci://r.example/app@sha256:{HEX}", ("r.example", "app", None, f"sha256:{HEX}")),
        (
            f"oci://R.Example:443/app:v1@sha256:{HEX}",
            ("r.example:443", "app", "v1", f"sha256:{HEX}"),
        ),
        (
            "oci://127.0.0.1:5000/x-y_z.w/app__1:latest",
            ("127.0.0.1:5000", "x-y_z.w/app__1", "latest", None),
        ),
        ("oci://[::1]:5000/app:1", ("[::1]:5000", "app", "1", None)),
        ("oci://docker.io/alpine:3", ("docker.io", "library/alpine", "3", None)),
    ],
)
def test_references(uri: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = parse_oci_uri(uri)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


def test_reference_defaults_and_hub() -> None:
    ref = parse_oci_uri("oci://r.example/app")
    assert ref.reference == "latest"
    assert parse_oci_uri("oci://docker.io/library/alpine:3").api_host == "registry-1.docker.io"
    assert (
        str(parse_oci_uri(f"oci://r.example/app:v1@sha256:{HEX}"))
        == f"r.example/app:v1@sha256:{HEX}"
    )


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("http://r.example/app", "expected oci://"),
        ("oci://r.example", "expected a registry"),
        ("oci://r.example/app?x=1", "no query"),
        ("oci://r.example/App:v1", "invalid repository"),
        ("oci://r.example/team//app", "invalid repository"),
        ("oci://r.example/app:-bad", "invalid tag"),
        ("oci://r.example:99999/app", "out of range"),
        ("oci://bad_host!/app", "expected a registry"),
        ("oci://r.example/app@sha256:abc", "invalid digest"),
        (f"oci://r.example/app@sha512:{HEX}{HEX}", "only sha256"),
        ("oci://r.example/../etc:v1", "invalid repository"),
    ],
)
def test_bad_references_are_user_errors(uri: str, why: str) -> None:
    with pytest.raises(InvalidSourceError, match=why):
        parse_oci_uri(uri)


def test_credentials_in_the_uri_are_refused_and_not_echoed() -> None:
    with pytest.raises(InvalidSourceError) as info:
        parse_oci_uri("oci://alice:hunter2-secret@r.example/app:v1")
    assert "hunter2-secret" not in str(info.value)
    assert "SYNCBIT_OCI_USERNAME" in str(info.value)


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (
            {"insecur": "true"},
            "unknown option 'insecur'.*valid options: ca, insecure, platform, "
            "prefetch_on_open, timeout, trace",
        ),
        ({"insecure": "maybe"}, "insecure='maybe'"),
        ({"platform": "amd64"}, "expected os/arch"),
        ({"timeout": "0"}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
        ({"ca": "/x.pem", "insecure": "yes"}, "exclude each other"),
    ],
)
def test_bad_options_are_user_errors(options: dict[str, str], why: str) -> None:
    with pytest.raises(InvalidSourceError, match=why):
        open_source("oci://r.example/app:v1", options)


def test_boolean_options_are_parsed_as_booleans() -> None:
    for value, expected in [
        ("false", False),
        ("0", False),
        ("true", True),
        (True, True),
        ("YES", True),
    ]:
        source = open_source("oci://r.example/app:v1", {"insecure": value})
        assert isinstance(source, OciSource)
        assert source.insecure is expected
        assert source.client.base == ("http" if expected else "https") + "://r.example"
        source.close()


def test_platforms() -> None:
    arm = Platform.parse("linux/arm64")
    assert arm.matches(Platform("linux", "arm64", "v8"))
    assert arm.matches(Platform("linux", "arm64"))
    assert Platform.parse("linux/arm64/v8").matches(Platform("linux", "arm64"))
    assert not Platform.parse("linux/arm/v7").matches(Platform("linux", "arm", "v6"))
    assert Platform.parse("linux/arm").matches(Platform("linux", "arm", "v6"))
    assert not Platform.parse("linux/amd64").matches(Platform("windows", "amd64"))
    assert str(Platform.parse("Linux/ARM/v7")) == "linux/arm/v7"
    # Names from a registry end up in messages and index.json: plain words only.
    assert Platform.of({"os": "linux\nERROR forged", "architecture": "amd64"}) is None
    assert Platform.of({"os": "linux", "architecture": "amd64", "variant": 7}) == Platform(
        "linux", "amd64"
    )


# -- credentials -----------------------------------------------------------------------------


def _config(tmp_path: Path, auths: object) -> dict[str, str]:
    (tmp_path / "config.json").write_text(json.dumps({"auths": auths}))
    return {"DOCKER_CONFIG": str(tmp_path)}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_environment_credentials_only_for_the_named_registry(tmp_path: Path) -> None:
    env = {
        "SYNCBIT_OCI_USERNAME": "u",
        "SYNCBIT_OCI_PASSWORD": "p",
        "SYNCBIT_OCI_REGISTRY": "r.example:5000",
        "DOCKER_CONFIG": str(tmp_path),
    }
    creds = find_credentials("r.example:5000", env)
    assert creds is not None and (creds.username, creds.password) == ("u", "p")
    assert find_credentials("other.example", env) is None
    assert "p" not in repr(creds).replace("SYNCBIT_OCI_PASSWORD", "")
    assert creds.basic() == "Basic " + _b64("u:p")


def test_docker_config_credentials(tmp_path: Path) -> None:
    env = _config(
        tmp_path,
        {
            "https://r.example:5000/v1/": {"auth": _b64("alice:pa:ss")},
            "plain.example": {"username": "bob", "password": "pw"},
            "https://index.docker.io/v1/": {"auth": _b64("hub:hubpw")},
        },
    )
    alice = find_credentials("r.example:5000", env)
    assert alice is not None and (alice.username, alice.password) == ("alice", "pa:ss")
    assert alice.origin == str(tmp_path / "config.json")
    bob = find_credentials("plain.example", env)
    assert bob is not None and (bob.username, bob.password) == ("bob", "pw")
    hub = find_credentials("docker.io", env)
    assert hub is not None and hub.username == "hub"
    assert find_credentials("r.example", env) is None  # another port is another registry
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(
        json.dumps({"auths": {"h.example": {"auth": _b64("a:b")}}})
    )
    assert find_credentials("h.example", {"HOME": str(home)}) is not None


@pytest.mark.parametrize(
    "content",
    ['{"auths": {"r.example": {"auth": "not base64!!"}}}', '{"auths": "r.example"}', "not json"],
)
def test_broken_docker_config_is_a_clear_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(InvalidSourceError, match=str(tmp_path / "config.json")) as info:
        find_credentials("r.example", {"DOCKER_CONFIG": str(tmp_path)})
    assert "not base64!!" not in str(info.value)


# -- manifests -------------------------------------------------------------------------------


def _desc(
    media_type: str = OCI_MANIFEST, size: object = 10, digest: str = f"sha256:{HEX}"
) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def test_manifest_parsing() -> None:
    index = {
        "schemaVersion": 2,
        "manifests": [_desc() | {"platform": {"os": "linux", "architecture": "amd64"}}],
    }
    parsed = parse_manifest(json.dumps(index).encode(), None, "x")
    assert parsed.media_type == OCI_INDEX  # no mediaType anywhere: told by its fields
    assert parsed.children[0].platform == Platform("linux", "amd64")
    image = {"schemaVersion": 2, "config": _desc("c"), "layers": [_desc("l")]}
    assert parse_manifest(json.dumps(image).encode(), OCI_MANIFEST, "x").media_type == OCI_MANIFEST
    listed = index | {"mediaType": DOCKER_LIST}
    assert parse_manifest(json.dumps(listed).encode(), DOCKER_LIST, "x").media_type == DOCKER_LIST


@pytest.mark.parametrize(
    ("doc", "ctype", "error", "why"),
    [
        (
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []},
            OCI_MANIFEST,
            SourceError,
            "ambiguous",
        ),
        (
            {"schemaVersion": 2, "config": _desc(), "layers": [_desc(size=-1)]},
            None,
            SourceError,
            "invalid size",
        ),
        (
            {"schemaVersion": 2, "config": _desc(), "layers": [_desc(size=True)]},
            None,
            SourceError,
            "invalid size",
        ),
        (
            {"schemaVersion": 2, "config": _desc(digest="sha256:zz"), "layers": []},
            None,
            SourceError,
            "valid digest",
        ),
        (
            {"schemaVersion": 2, "config": _desc(digest="sha512:ab"), "layers": []},
            None,
            InvalidSourceError,
            "sha256",
        ),
        ({"schemaVersion": 3, "config": _desc(), "layers": []}, None, SourceError, "schemaVersion"),
        ({"schemaVersion": 2, "config": _desc()}, None, SourceError, "no layers"),
        ([], None, SourceError, "not a JSON object"),
    ],
)
def test_bad_manifests(doc: object, ctype: str | None, error: type[Exception], why: str) -> None:
    with pytest.raises(error, match=why):
        parse_manifest(json.dumps(doc).encode(), ctype, "x")


# -- reads of what the listing carries --------------------------------------------------------


def _entry(data: bytes, locator: str, sha: str | None = None) -> FileEntry:
    sha = sha or hashlib.sha256(data).hexdigest()
    return FileEntry(
        path="index.json",
        size=len(data),
        object="o",
        locator=locator,
        version={"sha256": sha, "size": str(len(data))},
    )


def test_inline_bytes_are_served_and_checked() -> None:
    source = open_source("oci://r.example/app:v1")
    data = b'{"schemaVersion":2}'
    buf = bytearray(5)
    source.read_into(_entry(data, "data:" + _b64(data.decode())), 3, memoryview(buf))
    assert bytes(buf) == data[3:8]
    tampered = _entry(data, "data:" + _b64('{"schemaVersion":3}'))
    with pytest.raises(SourceError, match="do not match digest"):
        source.read_into(tampered, 0, memoryview(bytearray(len(data))))
    other = _entry(data, f"blob:sha256:{HEX}")  # the locator names another blob
    with pytest.raises(SourceError, match="locator and digest disagree"):
        source.read_into(other, 0, memoryview(bytearray(len(data))))
    source.close()


# -- property tests --------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
_keys = st.sampled_from(
    ["schemaVersion", "mediaType", "manifests", "config", "layers", "digest", "size", "platform"]
)
_manifestish = st.dictionaries(_keys, _json, max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    doc=_manifestish | _json,
    ctype=st.sampled_from([None, OCI_MANIFEST, OCI_INDEX, "application/json", "x/y"]),
)
def test_manifest_parser_gives_a_result_or_a_syncbit_error(doc: object, ctype: str | None) -> None:
    try:
        parsed = parse_manifest(json.dumps(doc).encode(), ctype, "x")
    except SyncbitError:
        return
    assert parsed.media_type in (
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_LIST,
        "application/vnd.docker.distribution.manifest.v2+json",
    )


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(max_size=80)
    | st.from_regex(r"oci://[a-z0-9.:\[\]@]{0,20}/[a-zA-Z0-9._/:@-]{0,50}", fullmatch=True)
)
def test_reference_parser_gives_a_reference_or_a_user_error(text: str) -> None:
    try:
        ref = parse_oci_uri(text)
    except InvalidSourceError:
        return
    assert isinstance(ref, OciReference)
    # What parsed goes into request paths: no character that could leave them.
    for part in (ref.registry, ref.repository, ref.tag or "", ref.digest or ""):
        assert not set(part) & set("?#@ \r\n\\%")
