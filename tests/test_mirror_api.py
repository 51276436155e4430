"""The registry mirror's HTTP API, served for real on loopback over an in-memory
`BlobSource`: the distribution API's read side, its headers, Range, containerd's ?ns=,
the JSON errors, what it refuses, and that it stops streaming when the client goes."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mirrorfixtures import MemoryBlobSource, ServedMirror, raw_get

from syncbit.mirror import MirrorConfig, Repository
from syncbit.mirror.api import UNSATISFIABLE, byte_range

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REGISTRY = "registry.example:5000"
NS = {"ns": REGISTRY}
REPO = Repository(REGISTRY, "team/app")
ACCEPT = {"Accept": OCI_MANIFEST}


@pytest.fixture
def source() -> MemoryBlobSource:
    return MemoryBlobSource()


@pytest.fixture
def layer(source: MemoryBlobSource) -> tuple[str, bytes]:
    data = random.Random(16).randbytes(3 * 1024 * 1024 + 17)
    return source.add(data), data


@pytest.fixture
def manifest(source: MemoryBlobSource, layer: tuple[str, bytes]) -> tuple[str, bytes]:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [layer[0]]})
    digest = source.add(body.encode(), OCI_MANIFEST)
    source.tag(REPO, "v1", digest)
    return digest, body.encode()


def _config(tmp_path: Path, **extra: Any) -> MirrorConfig:
    return MirrorConfig.model_validate({"cache_dir": str(tmp_path / "cache"), **extra})


@pytest.fixture
def client(tmp_path: Path, source: MemoryBlobSource) -> Iterator[httpx.Client]:
    with (
        ServedMirror(_config(tmp_path), source) as mirror,
        httpx.Client(base_url=mirror.url, trust_env=False, timeout=30) as http,
    ):
        yield http


def _error(resp: httpx.Response) -> str:
    """The code of a distribution API error answer (checking its format)."""
    assert resp.headers["content-type"].startswith("application/json")
    errors = resp.json()["errors"]
    assert len(errors) == 1 and set(errors[0]) == {"code", "message", "detail"}
    return str(errors[0]["code"])


# -- what a registry answers ---------------------------------------------------------------------


def test_v2_says_it_speaks_the_distribution_api(client: httpx.Client) -> None:
    resp = client.get("/v2/")
    assert resp.status_code == 200 and resp.json() == {}
    assert resp.headers["docker-distribution-api-version"] == "registry/2.0"
    head = client.head("/v2/")
    assert head.status_code == 200 and head.content == b""


def test_a_tag_is_resolved_by_the_source_and_served_with_its_digest(
    client: httpx.Client, source: MemoryBlobSource, manifest: tuple[str, bytes]
) -> None:
    digest, body = manifest
    resp = client.get("/v2/team/app/manifests/v1", params=NS, headers=ACCEPT)
    assert resp.status_code == 200 and resp.content == body
    assert resp.headers["docker-content-digest"] == digest
    assert resp.headers["content-type"] == OCI_MANIFEST
    assert resp.headers["content-length"] == str(len(body))
    # The source was asked for the tag of this registry's repository, with the client's
    # Accept (so that the upstream answers as it would answer the client).
    assert ("tag", REPO, "v1") in source.asked and OCI_MANIFEST in source.accepts
    head = client.head("/v2/team/app/manifests/v1", params=NS, headers=ACCEPT)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["docker-content-digest"] == digest
    assert head.headers["content-length"] == str(len(body))
    assert head.headers["content-type"] == OCI_MANIFEST


def test_several_accept_lines_reach_the_source_as_one_list(
    client: httpx.Client, source: MemoryBlobSource, manifest: tuple[str, bytes]
) -> None:
    headers = [("Accept", OCI_MANIFEST), ("Accept", "application/vnd.oci.image.index.v1+json")]
    resp = client.get("/v2/team/app/manifests/v1", params=NS, headers=headers)
    assert resp.status_code == 200
    assert source.accepts == [f"{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json"]


def test_a_manifest_by_digest_is_served_without_asking_for_a_tag(
    client: httpx.Client, source: MemoryBlobSource, manifest: tuple[str, bytes]
) -> None:
    digest, body = manifest
    resp = client.get(f"/v2/team/app/manifests/{digest}", params=NS)
    assert resp.status_code == 200 and resp.content == body
    assert resp.headers["docker-content-digest"] == digest
    assert not [a for a in source.asked if a[0] == "tag"]


def test_blobs_whole_and_by_range(client: httpx.Client, layer: tuple[str, bytes]) -> None:
    digest, data = layer
    path = f"/v2/team/app/blobs/{digest}"
    resp = client.get(path, params=NS)
    assert resp.status_code == 200 and resp.content == data
    assert resp.headers["docker-content-digest"] == digest
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.headers["content-length"] == str(len(data))
    assert resp.headers["accept-ranges"] == "bytes"
    head = client.head(path, params=NS)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
    size = len(data)
    for header, first, last in [
        ("bytes=10-19", 10, 19),
        ("bytes=1048570-2097160", 1048570, 2097160),  # across two body messages
        (f"bytes={size - 5}-", size - 5, size - 1),
        ("bytes=-7", size - 7, size - 1),
        (f"bytes=100-{size + 100}", 100, size - 1),
    ]:
        part = client.get(path, params=NS, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == data[first : last + 1], header
        assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert part.headers["content-length"] == str(last + 1 - first)
        assert part.headers["docker-content-digest"] == digest
    past = client.get(path, params=NS, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and _error(past) == "RANGE_INVALID"
    several = client.get(path, params=NS, headers={"Range": "bytes=0-1,5-6"})
    assert several.status_code == 200 and several.content == data  # ignored, as RFC 9110 allows


def test_byte_range_parsing() -> None:
    assert byte_range(None, 10) is None
    assert byte_range("bytes=0-0", 10) == (0, 0)
    assert byte_range("bytes=3-", 10) == (3, 9)
    assert byte_range("bytes=-3", 10) == (7, 9)
    assert byte_range("bytes=-30", 10) == (0, 9)
    assert byte_range("bytes=10-", 10) == UNSATISFIABLE
    assert byte_range("bytes=-0", 10) == UNSATISFIABLE
    for ignored in ("bytes=5-2", "items=0-1", "bytes=0-1,3-4", "bytes=x-1", "bytes=-", "junk"):
        assert byte_range(ignored, 10) is None, ignored
    assert byte_range("bytes=" + "9" * 20 + "-", 10) is None  # no such offset


def test_the_registry_a_request_is_for_comes_from_ns(
    tmp_path: Path, source: MemoryBlobSource
) -> None:
    other = Repository("other.example", "team/app")
    digest = source.add(b"{}", OCI_MANIFEST)
    source.tag(other, "v1", digest)
    config = _config(tmp_path, default_registry="other.example")
    with (
        ServedMirror(config, source) as mirror,
        httpx.Client(base_url=mirror.url, trust_env=False) as http,
    ):
        # No ?ns= (CRI-O, plain clients): the configured default registry.
        assert http.get("/v2/team/app/manifests/v1").status_code == 200
        # ?ns= names another registry: the tag is that registry's.
        resp = http.get("/v2/team/app/manifests/v1", params=NS)
        assert resp.status_code == 404 and _error(resp) == "MANIFEST_UNKNOWN"
    assert [r.registry for kind, r, _ in source.asked if kind == "tag"] == [
        "other.example",
        REGISTRY,
    ]


# -- what it refuses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/v2/team/app/manifests/nope", NS, 404, "MANIFEST_UNKNOWN"),
        (f"/v2/team/app/blobs/sha256:{'0' * 64}", NS, 404, "BLOB_UNKNOWN"),
        ("/v2/Team/App/manifests/v1", NS, 400, "NAME_INVALID"),
        ("/v2/team//app/manifests/v1", NS, 400, "NAME_INVALID"),
        ("/v2/team/%2E%2E/app/manifests/v1", NS, 400, "NAME_INVALID"),
        ("/v2/team/app/manifests/-v1", NS, 400, "TAG_INVALID"),
        ("/v2/team/app/blobs/v1", NS, 400, "TAG_INVALID"),
        ("/v2/team/app/blobs/sha256:abc", NS, 400, "DIGEST_INVALID"),
        (f"/v2/team/app/blobs/sha512:{'0' * 128}", NS, 400, "UNSUPPORTED"),
        ("/v2/team/app/tags/list", NS, 404, "UNSUPPORTED"),
        ("/v2/team/app/manifests/v1", {"ns": "not a host"}, 400, "NAME_INVALID"),
        ("/v2/team/app/manifests/v1", {}, 404, "NAME_UNKNOWN"),  # no ns, no default
        ("/v2/team/app/manifests/v1", {"ns": "169.254.169.254"}, 404, "NAME_UNKNOWN"),
    ],
)
def test_bad_requests_get_the_distribution_api_error(
    client: httpx.Client,
    manifest: tuple[str, bytes],
    path: str,
    params: dict[str, str],
    status: int,
    code: str,
) -> None:
    resp = client.get(path, params=params, headers=ACCEPT)
    assert resp.status_code == status, resp.text
    assert _error(resp) == code
    head = client.head(path, params=params, headers=ACCEPT)
    assert head.status_code == status and head.content == b""


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_writes_are_refused(
    client: httpx.Client, manifest: tuple[str, bytes], source: MemoryBlobSource, method: str
) -> None:
    for path in ("/v2/team/app/manifests/v1", "/v2/team/app/blobs/uploads/", "/v2/"):
        resp = client.request(method, path, params=NS, content=b"x")
        assert resp.status_code == 405 and _error(resp) == "UNSUPPORTED", path
        # Its body unread, the connection ends: said, so that no request follows on it.
        assert resp.headers["connection"] == "close", path
    assert source.asked == []


def test_registries_not_mirrored_are_refused(tmp_path: Path, source: MemoryBlobSource) -> None:
    config = _config(tmp_path, registries={REGISTRY: {}})  # this one only, no "*"
    with (
        ServedMirror(config, source) as mirror,
        httpx.Client(base_url=mirror.url, trust_env=False) as http,
    ):
        resp = http.get("/v2/team/app/manifests/v1", params={"ns": "elsewhere.example"})
        assert resp.status_code == 404 and _error(resp) == "NAME_UNKNOWN"
        assert "not mirrored" in resp.json()["errors"][0]["message"]
    assert source.asked == []


def test_more_requests_than_allowed_at_once_get_429(
    tmp_path: Path, source: MemoryBlobSource, layer: tuple[str, bytes]
) -> None:
    source.gate = threading.Event()
    path = f"/v2/team/app/blobs/{layer[0]}"
    with (
        ServedMirror(_config(tmp_path, max_requests=1), source) as mirror,
        httpx.Client(base_url=mirror.url, trust_env=False, timeout=30) as http,
    ):
        first: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: first.append(http.get(path, params=NS)))
        waiting.start()
        try:
            while not source.asked:  # the first request is inside the mirror, held
                threading.Event().wait(0.01)
            with httpx.Client(base_url=mirror.url, trust_env=False) as other:
                second = other.get(path, params=NS)
            assert second.status_code == 429 and _error(second) == "TOOMANYREQUESTS"
        finally:
            source.gate.set()
            waiting.join(30)
        assert first[0].status_code == 200 and first[0].content == layer[1]


def test_dot_segments_are_no_repository_name(
    tmp_path: Path, source: MemoryBlobSource, manifest: tuple[str, bytes]
) -> None:
    target = f"/v2/team/../app/manifests/v1?ns={REGISTRY}"  # as is: clients normalise it
    with ServedMirror(_config(tmp_path), source) as mirror, raw_get(mirror.url, target) as sock:
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"NAME_INVALID"' in answer
    assert source.asked == []


def test_a_client_that_goes_away_stops_its_stream(tmp_path: Path, source: MemoryBlobSource) -> None:
    digest = source.add(b"\x01" * (64 * 1024 * 1024))  # 64 body messages
    with ServedMirror(_config(tmp_path), source) as mirror:
        target = f"/v2/team/app/blobs/{digest}?ns={REGISTRY}"
        with raw_get(mirror.url, target, close=False) as sock:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        while source.held:  # the mirror gives the blob back once the stream stopped
            threading.Event().wait(0.01)
    assert source.reads < 64
