"""HfSource and the loopback Hub server, driven through huggingface_hub itself.

One Hub serves every test (repos are added once, below); HF_ENDPOINT points at it. The
first tests prove the server is Hub-compatible by running huggingface_hub's own clients
against it; the rest read through the source. No test reaches the internet.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import trio
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from integration.cluster import free_port
from syncbit.chunks import identity_digest
from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceThrottledError,
    SourceUnavailableError,
)
from syncbit.manifest import FileEntry, build_manifest
from syncbit.sources import open_source
from syncbit.sources.hf import HfSource, parse_hf_uri, split_globs
from syncbit.sources.hf import source as hf_source
from syncbit_testing import command, environ
from syncbit_testing.hub import Hub, git_blob_oid

RNG = random.Random(2718)
KIB = 1024
TOKEN = "hf_test_token_do_not_print_0123456789"
OTHER_TOKEN = "hf_other_token_without_grants_987654"

SHARD1 = RNG.randbytes(300 * KIB + 7)
SHARD2_V1 = RNG.randbytes(200 * KIB)
SHARD2_V2 = RNG.randbytes(210 * KIB + 3)
BIN = RNG.randbytes(64 * KIB)
V1: dict[str, bytes] = {
    "config.json": b'{"hidden_size": 8}',
    "model-00001-of-00002.safetensors": SHARD1,
    "model-00002-of-00002.safetensors": SHARD2_V1,
    "pytorch_model.bin": BIN,
    "tokenizer/vocab.txt": b"a\nb\nc\n",
    "tokenizer/merges.txt": b"#version: 0.2\n",
}
V2_CHANGES: dict[str, bytes] = {
    "config.json": b'{"hidden_size": 16}',
    "model-00002-of-00002.safetensors": SHARD2_V2,
}
DATA: dict[str, bytes] = {
    "README.md": b"# a dataset\n",
    "data/train-00000.parquet": RNG.randbytes(90 * KIB),
    "data/test-00000.parquet": RNG.randbytes(30 * KIB),
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Repos:
    """The commits the tests look for."""

    v1: str
    v2: str


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    # A tiny tree page makes every listing paginate through Link headers.
    with Hub(tmp_path_factory.mktemp("hub"), tree_page_size=3) as server:
        Repos.v1 = server.add_commit("org/model", V1, title="v1")
        server.add_tag("org/model", "v1")
        Repos.v2 = server.add_commit("org/model", V2_CHANGES, title="v2")
        server.add_commit("org/data", DATA, repo_type="dataset")
        server.add_commit("other/copy", {"weights.safetensors": SHARD1})
        server.add_commit("org/secret", {"w.bin": BIN, "a.txt": b"private"}, private=True)
        server.add_commit("org/gated", {"w.bin": SHARD2_V1, "a.txt": b"gated"}, gated=True)
        server.add_commit("solo", {"x.txt": b"legacy id without org"})
        server.add_token(TOKEN)
        server.add_token(OTHER_TOKEN, repos=["org/model"])
        yield server


@pytest.fixture(autouse=True)
def hf_env(hub: Hub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The environment a user would have: HF_ENDPOINT at the loopback Hub, no token."""
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    hub.fail_with = None
    hub.reset_stats()
    return home


async def _list(uri: str, **options: object) -> list[FileEntry]:
    source = HfSource(uri, dict(options))
    try:
        return (await source.list()).files
    finally:
        source.close()


def _by_path(files: list[FileEntry]) -> dict[str, FileEntry]:
    return {f.path: f for f in files}


# -- huggingface_hub against the Hub server -----------------------------------------------


def test_huggingface_hub_clients_work_against_the_hub(hub: Hub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    info = api.model_info("org/model", revision="v1", files_metadata=True)
    assert info.sha == Repos.v1
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == set(V1)
    lfs = siblings["model-00001-of-00002.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == _sha256(SHARD1)
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == git_blob_oid(V1["config.json"])
    assert api.model_info("org/model").sha == Repos.v2
    assert api.dataset_info("org/data").sha == hub.resolve("org/data", repo_type="dataset")

    tree = list(api.list_repo_tree("org/model", recursive=True, revision="v1"))
    files = {t.path: t for t in tree if isinstance(t, huggingface_hub.hf_api.RepoFile)}
    assert set(files) == set(V1)  # more than one page of 3: pagination followed
    assert {t.path for t in tree if isinstance(t, huggingface_hub.hf_api.RepoFolder)} == {
        "tokenizer"
    }
    assert files["pytorch_model.bin"].size == len(BIN)
    refs = api.list_repo_refs("org/model")
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", Repos.v1)]

    snap = Path(
        snapshot_download(
            "org/model", revision="v1", endpoint=hub.url, token=False, cache_dir=tmp_path / "cache"
        )
    )
    assert snap.name == Repos.v1
    for path, data in V1.items():
        assert (snap / path).read_bytes() == data
    local = tmp_path / "local"
    snapshot_download(
        "org/model",
        endpoint=hub.url,
        token=False,
        local_dir=local,
        allow_patterns=["*.safetensors", "config.json"],
    )
    got = sorted(str(p.relative_to(local)) for p in local.rglob("*") if ".cache" not in p.parts)
    assert got == sorted(["config.json", *(p for p in V1 if p.endswith(".safetensors"))])
    assert (local / "model-00002-of-00002.safetensors").read_bytes() == SHARD2_V2
    readme = hf_hub_download(
        "org/data",
        "README.md",
        repo_type="dataset",
        endpoint=hub.url,
        token=False,
        cache_dir=tmp_path / "cache",
    )
    assert Path(readme).read_bytes() == DATA["README.md"]
    # LFS bodies came from the storage origin, regular files from resolve itself.
    assert hub.bytes_by_path[f"__lfs/{_sha256(SHARD1)}"] == 2 * len(SHARD1)
    assert hub.bytes_by_path["datasets/org/data/README.md"] == len(DATA["README.md"])
    assert hub.storage_auth_rejected == 0


def test_huggingface_hub_sees_the_hubs_errors(hub: Hub, tmp_path: Path) -> None:
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("org/nothing")
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("org/secret")
    with pytest.raises(RevisionNotFoundError):
        anonymous.model_info("org/model", revision="no-such-branch")
    assert HfApi(endpoint=hub.url, token=TOKEN).model_info("org/secret").private is True
    # Gated: the info is public, the files are not.
    assert anonymous.model_info("org/gated").gated == "auto"
    with pytest.raises(GatedRepoError):
        hf_hub_download(
            "org/gated", "a.txt", endpoint=hub.url, token=False, cache_dir=tmp_path / "c"
        )
    path = hf_hub_download(
        "org/secret", "w.bin", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c"
    )
    assert Path(path).read_bytes() == BIN
    assert hub.storage_auth_rejected == 0  # the token never followed the redirect


# -- listing ------------------------------------------------------------------------------


async def test_list_model_at_branch_tag_and_sha(hub: Hub) -> None:
    main = _by_path(await _list("hf://org/model"))
    assert set(main) == set(V1)
    assert {f.version["commit"] for f in main.values()} == {Repos.v2}
    assert main["model-00002-of-00002.safetensors"].size == len(SHARD2_V2)
    for uri, options in [
        ("hf://org/model@v1", {}),
        (f"hf://org/model@{Repos.v1}", {}),
        ("hf://models/org/model@refs/tags/v1", {}),
        ("hf://org/model@main", {"revision": "v1"}),  # the option wins over '@'
    ]:
        files = _by_path(await _list(uri, **options))
        assert {f.version["commit"] for f in files.values()} == {Repos.v1}, uri
        assert files["config.json"].size == len(V1["config.json"])
    entry = main["tokenizer/vocab.txt"]
    assert entry.locator == "tokenizer/vocab.txt" and entry.mode == 0o444
    assert (await _list("hf://solo"))[0].path == "x.txt"


async def test_list_dataset_repo(hub: Hub) -> None:
    files = _by_path(await _list("hf://datasets/org/data"))
    assert set(files) == set(DATA)
    commit = hub.resolve("org/data", repo_type="dataset")
    parquet = files["data/train-00000.parquet"]
    assert parquet.version == {
        "commit": commit,
        "size": str(len(DATA["data/train-00000.parquet"])),
        "sha256": _sha256(DATA["data/train-00000.parquet"]),
    }
    # A model repo of that name does not exist.
    with pytest.raises(InvalidSourceError, match="no such repo org/data"):
        await _list("hf://org/data")


async def test_include_and_exclude_globs(hub: Hub) -> None:
    shards = {p for p in V1 if p.endswith(".safetensors")}
    got = await _list("hf://org/model", include="*.safetensors,config.json")
    assert {f.path for f in got} == shards | {"config.json"}
    got = await _list("hf://org/model", include=["*.safetensors"], exclude=["model-00002-*"])
    assert {f.path for f in got} == {"model-00001-of-00002.safetensors"}
    got = await _list("hf://org/model", exclude="*.bin,tokenizer/*")
    assert {f.path for f in got} == shards | {"config.json"}
    assert await _list("hf://org/model", include="nothing-matches") == []
    assert split_globs(["a,b", " c "], "include") == ["a", "b", "c"]
    with pytest.raises(InvalidSourceError, match="include"):
        HfSource("hf://org/model", {"include": 3})


async def test_identities_dedup_lfs_across_revisions_and_repos(hub: Hub) -> None:
    v1 = _by_path(await _list("hf://org/model@v1"))
    v2 = _by_path(await _list("hf://org/model"))
    copy = _by_path(await _list("hf://other/copy"))
    shard1 = "model-00001-of-00002.safetensors"
    shard2 = "model-00002-of-00002.safetensors"
    assert v1[shard1].object == identity_digest("sha256", _sha256(SHARD1))
    assert v1[shard1].object == v2[shard1].object == copy["weights.safetensors"].object
    assert v1[shard2].object != v2[shard2].object
    assert HfSource.expected_sha256(v2[shard2]) == _sha256(SHARD2_V2)
    config = v1["config.json"]
    assert config.object == identity_digest("hf-git", git_blob_oid(V1["config.json"]))
    assert config.version["oid"] == git_blob_oid(V1["config.json"])
    assert "sha256" not in config.version and HfSource.expected_sha256(config) is None
    assert v1["tokenizer/vocab.txt"].object == v2["tokenizer/vocab.txt"].object
    assert v1["config.json"].object != v2["config.json"].object


async def test_manifest_carries_no_token(hub: Hub) -> None:
    source = HfSource("hf://org/secret", {"token": TOKEN, "include": "*.bin"})
    try:
        listing = await source.list()
    finally:
        source.close()
    assert "token" not in source.options
    manifest = build_manifest("secret", source.uri, listing.files, source_options=source.options)
    assert TOKEN not in manifest.model_dump_json()
    assert manifest.source_options == {"include": ["*.bin"]}


# -- reads --------------------------------------------------------------------------------


def _read(source: HfSource, entry: FileEntry, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    source.read_into(entry, offset, memoryview(buf))
    return bytes(buf)


async def test_read_into_ranges_of_lfs_and_regular_files(hub: Hub) -> None:
    source = HfSource("hf://org/model@v1")
    try:
        files = _by_path((await source.list()).files)
        hub.reset_stats()
        shard = files["model-00001-of-00002.safetensors"]
        cases = [(0, 1), (0, 4096), (123_457, 65_536), (len(SHARD1) - 10, 10), (0, len(SHARD1))]
        for offset, length in cases:
            got = await trio.to_thread.run_sync(_read, source, shard, offset, length)
            assert got == SHARD1[offset : offset + length]
        config = files["config.json"]
        data = V1["config.json"]
        assert await trio.to_thread.run_sync(_read, source, config, 3, 5) == data[3:8]
        assert await trio.to_thread.run_sync(_read, source, config, 0, len(data)) == data
        source.read_into(config, 0, memoryview(bytearray()))  # nothing to read: no request
        lfs_key = f"__lfs/{_sha256(SHARD1)}"
        assert hub.bytes_by_path == {
            lfs_key: sum(length for _, length in cases),
            "org/model/config.json": 5 + len(data),
        }
        with pytest.raises(ValueError, match="outside"):
            source.read_into(config, len(data), memoryview(bytearray(1)))
    finally:
        source.close()


async def test_reads_go_straight_to_storage_until_its_url_expires(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An LFS file's range reads ask `resolve` once, then read the storage URL it
    redirected to (the token never goes there); once that URL is refused (expired), the
    read asks `resolve` again and goes on; after HOP_TTL it asks again anyway."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # sent to the Hub, never to its storage
    source = HfSource("hf://org/model@v1")
    try:
        shard = _by_path((await source.list()).files)["model-00001-of-00002.safetensors"]
        hub.reset_stats()
        step = 16 * KIB
        for offset in range(0, 10 * step, step):
            got = await trio.to_thread.run_sync(_read, source, shard, offset, step)
            assert got == SHARD1[offset : offset + step]
        assert hub.redirects == 1
        monkeypatch.setattr(hf_source, "HOP_TTL", 0.0)  # what is remembered from now on
        hub.expire_signed_urls()
        assert await trio.to_thread.run_sync(_read, source, shard, 7, 100) == SHARD1[7:107]
        assert hub.redirects == 2  # the refused URL was not read from again
        for _ in range(2):
            assert await trio.to_thread.run_sync(_read, source, shard, 0, 10) == SHARD1[:10]
        assert hub.redirects == 4
        assert hub.storage_auth_rejected == 0
        assert hub.bytes_by_path == {f"__lfs/{_sha256(SHARD1)}": 10 * step + 100 + 2 * 10}
    finally:
        source.close()


async def test_read_pins_the_listed_version(hub: Hub) -> None:
    source = HfSource("hf://org/model@v1")
    try:
        files = _by_path((await source.list()).files)
        shard = files["model-00002-of-00002.safetensors"]
        # The listing said another size: the file at that commit is not what was listed.
        bigger = shard.model_copy(
            update={
                "size": len(SHARD2_V1) + 1,
                "version": {**shard.version, "size": str(len(SHARD2_V1) + 1)},
            }
        )
        with pytest.raises(SourceChangedError, match="bytes"):
            await trio.to_thread.run_sync(_read, source, bigger, 0, 10)
        gone_commit = shard.model_copy(update={"version": {**shard.version, "commit": "f" * 40}})
        with pytest.raises(SourceChangedError, match="RevisionNotFound 404"):
            await trio.to_thread.run_sync(_read, source, gone_commit, 0, 10)
        gone_path = shard.model_copy(update={"locator": "deleted.safetensors"})
        with pytest.raises(SourceChangedError, match="EntryNotFound 404"):
            await trio.to_thread.run_sync(_read, source, gone_path, 0, 10)
    finally:
        source.close()


async def test_unavailable_hub_is_a_temporary_failure(hub: Hub) -> None:
    source = HfSource("hf://org/model@v1")
    try:
        entry = (await source.list()).files[0]
        hub.fail_with = 503  # the Hub asking to slow down: the fetcher runs fewer streams
        with pytest.raises(SourceThrottledError, match="503"):
            await trio.to_thread.run_sync(_read, source, entry, 0, 1)
        hub.fail_with = 500
        with pytest.raises(SourceUnavailableError, match="500") as info:
            await trio.to_thread.run_sync(_read, source, entry, 0, 1)
        assert not isinstance(info.value, SourceThrottledError)
        hub.fail_with = 503
        with pytest.raises(SourceUnavailableError, match="503"):
            await source.list()
        hub.fail_with = None
        assert len(await trio.to_thread.run_sync(_read, source, entry, 0, 1)) == 1
    finally:
        source.close()
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SourceUnavailableError, match="cannot reach"):
        await _list("hf://org/model", endpoint=dead)
    source = HfSource("hf://org/model", {"endpoint": dead})
    try:
        with pytest.raises(SourceUnavailableError):
            source.read_into(entry, 0, memoryview(bytearray(1)))
    finally:
        source.close()


# -- access -------------------------------------------------------------------------------


async def test_private_repo_needs_a_token(
    hub: Hub, hf_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidSourceError, match="set HF_TOKEN") as info:
        await _list("hf://org/secret")
    assert "no such repo org/secret" in str(info.value)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = HfSource("hf://org/secret")
    try:
        files = _by_path((await source.list()).files)
        assert await trio.to_thread.run_sync(_read, source, files["w.bin"], 5, 100) == BIN[5:105]
        assert await trio.to_thread.run_sync(_read, source, files["a.txt"], 0, 7) == b"private"
    finally:
        source.close()
    assert hub.storage_auth_rejected == 0

    # Reads of the listed files on a node without the token, or with one that cannot see
    # the repo: a clear error naming HF_TOKEN, or the version counts as gone.
    monkeypatch.delenv("HF_TOKEN")
    for token, error in [(None, InvalidSourceError), (OTHER_TOKEN, SourceChangedError)]:
        reader = HfSource("hf://org/secret", {"token": token} if token else {})
        try:
            with pytest.raises(error, match="HF_TOKEN") as failed:
                reader.read_into(files["w.bin"], 0, memoryview(bytearray(4)))
            assert OTHER_TOKEN not in str(failed.value)
        finally:
            reader.close()

    # A token the Hub does not know, then one that cannot see the repo.
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(InvalidSourceError, match="refused the token"):
        await _list("hf://org/secret")
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    with pytest.raises(InvalidSourceError, match="cannot read it") as info:
        await _list("hf://org/secret")
    assert OTHER_TOKEN not in str(info.value)

    # The token file in HF_HOME, as `hf auth login` leaves it.
    monkeypatch.delenv("HF_TOKEN")
    (hf_env / "token").write_text(TOKEN + "\n")
    assert len(await _list("hf://org/secret")) == 2


async def test_gated_repo_needs_a_granted_token(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidSourceError, match=r"gated.*set HF_TOKEN"):
        await _list("hf://org/gated")
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    with pytest.raises(InvalidSourceError, match="not been granted"):
        await _list("hf://org/gated")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = HfSource("hf://org/gated")
    try:
        files = _by_path((await source.list()).files)
        assert await trio.to_thread.run_sync(_read, source, files["a.txt"], 0, 5) == b"gated"
    finally:
        source.close()
    # A node without the token reading a gated file listed elsewhere: an error naming it.
    monkeypatch.delenv("HF_TOKEN")
    anonymous = HfSource("hf://org/gated", {"endpoint": hub.url})
    try:
        with pytest.raises(InvalidSourceError, match="gated"):
            anonymous.read_into(files["w.bin"], 0, memoryview(bytearray(4)))
    finally:
        anonymous.close()


async def test_unknown_repo_and_revision(hub: Hub) -> None:
    with pytest.raises(InvalidSourceError, match="no such repo org/nothing on"):
        await _list("hf://org/nothing")
    with pytest.raises(InvalidSourceError, match="no such repo datasets/org/model"):
        await _list("hf://datasets/org/model")
    with pytest.raises(InvalidSourceError, match="no revision 'v9' in repo org/model"):
        await _list("hf://org/model@v9")
    with pytest.raises(InvalidSourceError, match="no revision 'nope'"):
        await _list("hf://org/model", revision="nope")


# -- URIs and the registry ----------------------------------------------------------------


def test_open_source_finds_the_hf_source() -> None:
    source = open_source("hf://org/name@v1", {"include": "*.json"})
    try:
        assert isinstance(source, HfSource)
        assert (source.repo_type, source.repo_id, source.revision) == ("model", "org/name", "v1")
        assert source.include == ["*.json"]
        assert source.endpoint == os.environ["HF_ENDPOINT"]
    finally:
        source.close()


def test_parse_hf_uri() -> None:
    assert parse_hf_uri("hf://org/name") == ("model", "org/name", None)
    assert parse_hf_uri("hf://gpt2@main") == ("model", "gpt2", "main")
    assert parse_hf_uri("hf://models/org/name@refs/pr/1") == ("model", "org/name", "refs/pr/1")
    assert parse_hf_uri("hf://datasets/org/set@v1.0") == ("dataset", "org/set", "v1.0")
    assert parse_hf_uri("HF://datasets/squad") == ("dataset", "squad", None)
    for bad in [
        "hf://",
        "hf://a/b/c",
        "hf://org/na..me",
        "hf://org/name@",
        "hf://org/name?rev=1",
        "hf://spaces/org/app",
        "http://org/name",
    ]:
        with pytest.raises(InvalidSourceError):
            parse_hf_uri(bad)
    with pytest.raises(InvalidSourceError, match="endpoint"):
        HfSource("hf://org/name", {"endpoint": "ftp://mirror"})


# -- the Hub as a process -----------------------------------------------------------------


def test_hub_process_serves_a_directory_layout(tmp_path: Path) -> None:
    # A repo committed through the API is kept in ROOT/.hub and served by a later process.
    Hub(tmp_path / "root").add_commit("acme/data", {"a.csv": b"1,2\n"}, repo_type="dataset")
    repo = tmp_path / "root" / "models" / "acme" / "tiny" / "main"
    (repo / "sub").mkdir(parents=True)
    big = RNG.randbytes(5 * KIB)
    (repo / "model.safetensors").write_bytes(big)
    (repo / "sub" / "config.json").write_text("{}")
    proc = subprocess.Popen(
        command("hub", "--root", str(tmp_path / "root")),
        stdout=subprocess.PIPE,
        text=True,
        env=environ(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "READY", line
        url = f"http://127.0.0.1:{line[1]}"
        info = HfApi(endpoint=url, token=False).model_info("acme/tiny", files_metadata=True)
        sizes = {
            s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []
        }
        assert sizes == {
            "model.safetensors": (len(big), _sha256(big)),
            "sub/config.json": (2, None),
        }
        assert HfApi(endpoint=url, token=False).dataset_info("acme/data").sha
        local = tmp_path / "dl"
        snapshot_download("acme/tiny", endpoint=url, token=False, local_dir=local)
        assert (local / "model.safetensors").read_bytes() == big
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        if proc.stdout is not None:
            proc.stdout.close()
