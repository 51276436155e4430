"""The mirror's cache of verified content: nothing unverified is ever kept or handed out,
one fill per digest, a byte budget with least-recently-used eviction that never cuts a
reader short, and what a restart finds."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from mirrorfixtures import sha256

from syncbit.errors import RegistryError
from syncbit.mirror.backend import BLOB_TYPE
from syncbit.mirror.cache import BlobCache, Sink

KiB = 1024


def _writer(
    data: bytes, media_type: str | None = None, calls: list[int] | None = None
) -> Callable[[Sink], str | None]:
    def fetch(sink: Sink) -> str | None:
        if calls is not None:
            calls.append(1)
        for at in range(0, len(data), 1000):
            sink.write(data[at : at + 1000])
        return media_type

    return fetch


def _files(root: Path) -> dict[str, list[str]]:
    return {
        kind: sorted(os.listdir(root / kind / "sha256" if kind != "tmp" else root / kind))
        for kind in ("blobs", "types", "tmp")
    }


async def test_verified_content_is_stored_and_read_back(tmp_path: Path) -> None:
    cache = await BlobCache.open(tmp_path, 10 * KiB)
    data = os.urandom(3000)
    digest = sha256(data)
    content = await cache.ensure(digest, _writer(data), None, "a blob")
    assert content.digest == digest and content.size == 3000
    assert content.media_type == BLOB_TYPE
    async with cache.held(content) as blob:
        assert blob is not None
        assert await blob.read(0, 3000) == data
        assert await blob.read(2990, 100) == data[2990:]
    assert cache.lookup(digest) == content
    assert cache.lookup(digest, manifest=True) is None  # no media type known for it


async def test_wrong_bytes_are_rejected_and_nothing_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = await BlobCache.open(tmp_path, 10 * KiB)
    data = os.urandom(3000)
    digest = sha256(data)
    flipped = bytes([data[0] ^ 0xFF]) + data[1:]
    with caplog.at_level(logging.WARNING, "syncbit.mirror"), pytest.raises(RegistryError) as err:
        await cache.ensure(digest, _writer(flipped), None, "blob X of team/app")
    assert err.value.code == "DIGEST_INVALID" and err.value.status == 502
    assert digest in str(err.value) and sha256(flipped) in str(err.value)
    assert any(digest.partition(":")[2] in r.getMessage() for r in caplog.records)
    assert cache.lookup(digest) is None
    assert _files(tmp_path) == {"blobs": [], "types": [], "tmp": []}
    # The next fill that brings the right bytes is kept.
    assert (await cache.ensure(digest, _writer(data), None, "blob X")).size == 3000


async def test_more_than_the_size_expected_is_refused_as_it_arrives(tmp_path: Path) -> None:
    cache = await BlobCache.open(tmp_path, 10 * KiB)
    data = os.urandom(3000)
    with pytest.raises(RegistryError) as err:
        await cache.ensure(sha256(data), _writer(data), 2500, "blob")
    assert err.value.code == "SIZE_INVALID"
    assert _files(tmp_path)["tmp"] == [] and cache.lookup(sha256(data)) is None


async def test_a_failing_fill_leaves_nothing(tmp_path: Path) -> None:
    cache = await BlobCache.open(tmp_path, 10 * KiB)

    def broken(sink: Sink) -> str | None:
        sink.write(b"x" * 100)
        raise RegistryError("the registry went away", "UNAVAILABLE", 503)

    with pytest.raises(RegistryError):
        await cache.ensure(sha256(b"y"), broken, None, "blob")
    assert _files(tmp_path) == {"blobs": [], "types": [], "tmp": []}


async def test_one_fill_per_digest_at_a_time(tmp_path: Path) -> None:
    cache = await BlobCache.open(tmp_path, 10 * KiB)
    data = os.urandom(2000)
    calls: list[int] = []
    results = []

    async def ask() -> None:
        results.append(await cache.ensure(sha256(data), _writer(data, None, calls), None, "b"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
    assert len(calls) == 1 and len(results) == 5 and len(set(results)) == 1


async def test_manifests_keep_their_media_type(tmp_path: Path) -> None:
    cache = await BlobCache.open(tmp_path, 10 * KiB)
    body = b'{"schemaVersion":2}'
    media_type = "application/vnd.oci.image.index.v1+json"
    content = await cache.ensure(sha256(body), _writer(body, media_type), None, "m", True)
    assert content.media_type == media_type
    assert cache.lookup(sha256(body), manifest=True) == content
    reopened = await BlobCache.open(tmp_path, 10 * KiB)
    assert reopened.lookup(sha256(body), manifest=True) == content


async def test_least_recently_used_go_first_and_readers_are_not_cut_short(
    tmp_path: Path,
) -> None:
    cache = await BlobCache.open(tmp_path, 10 * KiB)
    blobs = [os.urandom(3 * KiB) for _ in range(4)]
    a, b, c, d = (sha256(x) for x in blobs)
    for data in blobs[:3]:
        await cache.ensure(sha256(data), _writer(data), None, "blob")
    first = cache.lookup(a)
    assert first is not None
    async with cache.held(first) as held:  # a: in use, and now the most recently used
        assert held is not None
        await cache.ensure(d, _writer(blobs[3]), None, "blob")  # over budget: b goes
        assert cache.lookup(b) is None
        assert {cache.lookup(x) is not None for x in (a, c, d)} == {True}
        assert cache.total <= cache.max_bytes
        await cache.ensure(b, _writer(blobs[1]), None, "blob")  # c goes
        assert cache.lookup(c) is None
        await cache.ensure(c, _writer(blobs[2]), None, "blob")  # a goes, in use
        assert cache.lookup(a) is None
        assert await held.read(0, 3 * KiB) == blobs[0]  # its reader still reads it whole
    assert sorted(_files(tmp_path)["blobs"]) == sorted(x.partition(":")[2] for x in (b, c, d))


async def test_one_entry_larger_than_the_budget_is_kept_alone(tmp_path: Path) -> None:
    cache = await BlobCache.open(tmp_path, 4 * KiB)
    small, big = os.urandom(KiB), os.urandom(6 * KiB)
    await cache.ensure(sha256(small), _writer(small), None, "blob")
    content = await cache.ensure(sha256(big), _writer(big), len(big), "blob")
    assert cache.lookup(sha256(small)) is None and cache.lookup(sha256(big)) == content


async def test_a_restart_finds_what_was_verified_and_drops_what_was_not(
    tmp_path: Path,
) -> None:
    cache = await BlobCache.open(tmp_path, 10 * KiB)
    data = os.urandom(2 * KiB)
    await cache.ensure(sha256(data), _writer(data), None, "blob")
    (tmp_path / "tmp" / "half-written").write_bytes(b"x" * 10)
    (tmp_path / "types" / "sha256" / ("0" * 64)).write_text("application/json")
    reopened = await BlobCache.open(tmp_path, 10 * KiB)
    assert reopened.lookup(sha256(data)) is not None and reopened.total == 2 * KiB
    assert _files(tmp_path) == {
        "blobs": [sha256(data).partition(":")[2]],
        "types": [],
        "tmp": [],
    }
    smaller = await BlobCache.open(tmp_path, KiB)  # a smaller budget evicts at start
    assert smaller.lookup(sha256(data)) is not None  # alone: kept
