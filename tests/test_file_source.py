"""FileSource on a temporary tree: listing, symlink rules, version pinning and range reads."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from sourcehelp import by_path, read, write_tree

from syncbit.chunks import HEAD_SAMPLE, digest
from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
    UnsafePathError,
)
from syncbit.manifest import build_manifest
from syncbit.sources import open_source
from syncbit.sources.fences import Fences
from syncbit.sources.file import FileSource, _map_oserror

RNG = random.Random(99)
FILES: dict[str, bytes] = {
    "top.bin": RNG.randbytes(2 * 1024 * 1024 + 3),
    "empty.txt": b"",
    ".hidden": b"dot",
    "a..b": b"dots",
    "sub/a b.txt": b"hello world",
    "sub/deeper/R&D #1 100%.bin": RNG.randbytes(70_000),
    "\u00fcn\u00ef/\u65e5\u672c.safetensors": RNG.randbytes(1000),
}
EMPTY_DIRS = ["empty-dir", "sub/empty-nested"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = write_tree(tmp_path / "data", FILES, EMPTY_DIRS)
    (root / "top.bin").chmod(0o755)
    return root


def uri_of(path: Path) -> str:
    return "file://" + quote(str(path))


@pytest.fixture
def make_source() -> Iterator[Callable[..., FileSource]]:
    opened: list[FileSource] = []

    def make(path: Path | str, **options: object) -> FileSource:
        source = FileSource(path if isinstance(path, str) else uri_of(path), options)
        opened.append(source)
        return source

    yield make
    for source in opened:
        source.close()


async def test_list_matches_tree(tree: Path, make_source: Callable[..., FileSource]) -> None:
    listing = await make_source(tree).list()
    assert {f.path: f.size for f in listing.files} == {k: len(v) for k, v in FILES.items()}
    assert set(EMPTY_DIRS) <= set(listing.dirs)
    assert set(listing.dirs) == {
        "empty-dir",
        "sub",
        "sub/deeper",
        "sub/empty-nested",
        "\u00fcn\u00ef",
    }
    files = by_path(listing.files)
    top = files["top.bin"]
    st = (tree / "top.bin").stat()
    assert top.locator == "top.bin"
    head = digest((tree / "top.bin").read_bytes()[:HEAD_SAMPLE])
    assert top.version == {"size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns), "head": head}
    assert top.mode == 0o755
    assert len({f.object for f in listing.files}) == len(listing.files)
    manifest = build_manifest("ds", uri_of(tree), listing.files, listing.dirs)
    assert by_path(manifest.files)["top.bin"].mode == 0o555


async def test_registered_for_file_scheme(tree: Path) -> None:
    source = open_source(uri_of(tree))
    try:
        assert isinstance(source, FileSource)
    finally:
        source.close()
    with pytest.raises(InvalidSourceError, match="local"):
        FileSource("file://remote-host/x")


async def test_identity_follows_content_facts(
    tree: Path, make_source: Callable[..., FileSource]
) -> None:
    before = by_path((await make_source(tree).list()).files)["sub/a b.txt"]
    again = by_path((await make_source(tree).list()).files)["sub/a b.txt"]
    assert before == again
    path = tree / "sub" / "a b.txt"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    after = by_path((await make_source(tree).list()).files)["sub/a b.txt"]
    assert after.object != before.object


async def test_single_file(tree: Path, make_source: Callable[..., FileSource]) -> None:
    path = tree / "sub" / "a b.txt"
    source = make_source(path)
    listing = await source.list()
    assert [(f.path, f.size, f.locator) for f in listing.files] == [("a b.txt", 11, str(path))]
    assert listing.dirs == []
    assert await read(source, listing.files[0], 6, 5) == b"world"


async def test_missing_root_is_invalid(
    tmp_path: Path, make_source: Callable[..., FileSource]
) -> None:
    with pytest.raises(InvalidSourceError, match="nothing at"):
        await make_source(tmp_path / "nope").list()
    with pytest.raises(InvalidSourceError, match="absolute"):
        FileSource("file:relative/path")


async def test_read_ranges(tree: Path, make_source: Callable[..., FileSource]) -> None:
    source = make_source(tree, max_open_files=2)
    files = by_path((await source.list()).files)
    data = FILES["top.bin"]
    top = files["top.bin"]
    for offset, length in [(0, 1), (0, len(data)), (len(data) - 1, 1), (4097, 100_000)]:
        assert await read(source, top, offset, length) == data[offset : offset + length]
    # More files than cached descriptors: eviction must not disturb reads.
    for _ in range(3):
        for rel, content in FILES.items():
            if content:
                assert await read(source, files[rel], 0, len(content)) == content
    with pytest.raises(ValueError, match="outside"):
        await read(source, top, len(data) - 1, 2)


async def test_concurrent_reads(tree: Path, make_source: Callable[..., FileSource]) -> None:
    source = make_source(tree, max_open_files=1)
    files = by_path((await source.list()).files)
    results: dict[tuple[str, int], bytes] = {}

    async def one(rel: str, offset: int) -> None:
        results[(rel, offset)] = await read(source, files[rel], offset, 1000)

    async with trio.open_nursery() as nursery:
        for rel in ("top.bin", "sub/deeper/R&D #1 100%.bin"):
            for offset in range(0, 60_000, 1000):
                nursery.start_soon(one, rel, offset)
    for (rel, offset), got in results.items():
        assert got == FILES[rel][offset : offset + 1000]


async def test_symlinks_inside_followed_outside_skipped(
    tree: Path, tmp_path: Path, make_source: Callable[..., FileSource]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    os.symlink(outside / "secret.txt", tree / "leak.txt")
    os.symlink(outside, tree / "leakdir")
    os.symlink(tree / "sub" / "a b.txt", tree / "alias.txt")
    os.symlink("..", tree / "sub" / "deeper" / "loop")  # a directory loop
    os.symlink("sub/deeper", tree / "shortcut")  # a directory inside the root
    os.symlink(tree / "nowhere", tree / "dangling")
    os.mkfifo(tree / "fifo")
    source = make_source(tree)
    listing = await source.list()
    paths = {f.path for f in listing.files}
    assert "leak.txt" not in paths and not any(p.startswith("leakdir") for p in paths)
    assert "dangling" not in paths and "fifo" not in paths
    assert "alias.txt" in paths
    # sub/deeper/loop leads back to its own ancestor: skipped. Through the shortcut it is
    # not an ancestor, so it is followed once, and the walk still ends.
    assert not any(p.startswith("sub/deeper/loop") for p in paths)
    assert "sub/deeper/loop" not in listing.dirs
    assert "shortcut/loop/a b.txt" in paths
    assert not any("loop/deeper" in p for p in paths)
    assert "shortcut/R&D #1 100%.bin" in paths and "shortcut" in listing.dirs
    files = by_path(listing.files)
    assert files["alias.txt"].object == files["sub/a b.txt"].object
    assert await read(source, files["alias.txt"], 0, 5) == b"hello"


async def test_symlink_swapped_out_of_root_after_listing(
    tree: Path, tmp_path: Path, make_source: Callable[..., FileSource]
) -> None:
    (tmp_path / "evil.txt").write_bytes(b"evil")
    os.symlink(tree / ".hidden", tree / "link.txt")
    source = make_source(tree)
    entry = by_path((await source.list()).files)["link.txt"]
    os.unlink(tree / "link.txt")
    os.symlink(tmp_path / "evil.txt", tree / "link.txt")
    with pytest.raises(SourceChangedError, match="outside the source root"):
        await read(source, entry, 0, 3)


async def test_manifest_locator_cannot_escape(
    tree: Path, make_source: Callable[..., FileSource]
) -> None:
    source = make_source(tree)
    entry = by_path((await source.list()).files)["top.bin"]
    for bad in ("../data/top.bin", "/etc/passwd"):
        forged = entry.model_copy(update={"locator": bad})
        with pytest.raises((UnsafePathError, SourceError)):
            await read(source, forged, 0, 1)


@pytest.mark.parametrize("change", ["same-size", "grown", "truncated", "deleted", "replaced"])
async def test_modified_file_raises_source_changed(
    tree: Path, make_source: Callable[..., FileSource], change: str
) -> None:
    source = make_source(tree)
    entry = by_path((await source.list()).files)["sub/a b.txt"]
    assert await read(source, entry, 0, 5) == b"hello"
    path = tree / "sub" / "a b.txt"
    st = path.stat()
    if change == "same-size":
        path.write_bytes(b"HELLO WORLD")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "grown":
        with path.open("ab") as f:
            f.write(b"!")
    elif change == "truncated":
        os.truncate(path, 3)
    elif change == "deleted":
        path.unlink()
    else:
        # Renamed over: the cached descriptor still reads the old inode, now unlinked.
        tmp = path.with_name("new")
        tmp.write_bytes(b"other bytes")
        os.replace(tmp, path)
    with pytest.raises(SourceChangedError, match=r"source changed: .*a b\.txt no longer has"):
        await read(source, entry, 0, 5)


async def test_nfs_errors_are_temporary() -> None:
    for code in (errno.EIO, errno.ESTALE):
        err = _map_oserror(OSError(code, os.strerror(code)), "/mnt/nfs/x")
        assert isinstance(err, SourceUnavailableError)
        assert FileSource.is_temp_failure(err)
    assert not isinstance(
        _map_oserror(OSError(errno.EACCES, "denied"), "/x"), SourceUnavailableError
    )


# Lists `argv[1]` with FileSource and prints the error class and message (or "ok").
_LIST_AS_USER = """
import sys, trio
from syncbit.sources.file import FileSource
try:
    trio.run(FileSource("file://" + sys.argv[1]).list)
    print("ok")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


async def test_unreadable_subdirectory_is_reported(
    tree: Path, make_source: Callable[..., FileSource]
) -> None:
    locked = tree / "sub" / "deeper"
    locked.chmod(0)
    try:
        if os.geteuid() != 0:
            with pytest.raises(InvalidSourceError, match="cannot list"):
                await make_source(tree).list()
            return
        # Root reads every directory: list in a child that keeps uid 0 (so it can run
        # this interpreter) but loses the capabilities that override permissions.
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to list without root's capabilities")
        done = await trio.run_process(
            [
                "setpriv",
                "--bounding-set=-dac_override,-dac_read_search",
                sys.executable,
                "-c",
                _LIST_AS_USER,
                str(tree),
            ],
            capture_stdout=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        out = done.stdout.decode()
        assert out.startswith("InvalidSourceError cannot list"), out
        assert "Permission denied" in out and "deeper" in out
    finally:
        locked.chmod(stat.S_IRWXU)


# -- fences and owners ------------------------------------------------------------------------


def test_file_roots_are_a_fence(tmp_path: Path) -> None:
    root, outside = tmp_path / "export", tmp_path / "private"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("s")
    (root / "escape").symlink_to(outside)
    fences = Fences.for_roots([root])
    FileSource(uri_of(root / "data"), fences=fences).close()
    for uri in (
        uri_of(outside),
        "file://" + str(root) + "/../private",  # `..` is resolved before the check
        uri_of(root / "escape"),  # so is a symlink
        uri_of(root / "escape" / "secret"),
        "file:///etc",
    ):
        with pytest.raises(InvalidSourceError, match="file_roots"):
            FileSource(uri, fences=fences)
    with pytest.raises(InvalidSourceError, match="file_roots: none"):
        FileSource(uri_of(root), fences=Fences(()))


async def test_a_source_path_swapped_for_a_link_out_of_the_roots_is_refused(
    tmp_path: Path,
) -> None:
    root = tmp_path / "export"
    (root / "ds").mkdir(parents=True)
    (root / "ds" / "f").write_text("inside")
    source = FileSource(uri_of(root / "ds"), fences=Fences.for_roots([root]))
    try:
        (entry,) = (await source.list()).files
        (root / "ds").rename(root / "old")
        (root / "ds").symlink_to(tmp_path)  # now leads out of every root
        with pytest.raises(InvalidSourceError, match="file_roots"):
            await source.list()
        with pytest.raises(InvalidSourceError, match="file_roots"):
            await read(source, entry, 0, 1)
    finally:
        source.close()


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory everyone may pass, below directories everyone may pass (pytest's own
    tmp_path is below a 0700 directory, which narrows every mode listed under it)."""
    path = Path(tempfile.mkdtemp(prefix="syncbit-owners-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="setting another owner needs root")
async def test_owners_and_modes_are_those_of_the_source(open_tmp: Path) -> None:
    tmp_path = open_tmp
    root = tmp_path / "ds"
    (root / "private").mkdir(parents=True)
    (root / "open.txt").write_text("o")
    (root / "root-only.txt").write_text("r")
    (root / "private" / "inner.txt").write_text("i")
    (root / "link").symlink_to(root / "private" / "inner.txt")
    os.chown(root / "open.txt", 1234, 5678)
    os.chmod(root / "open.txt", 0o644)
    os.chmod(root / "root-only.txt", 0o600)
    os.chown(root / "private", 1234, 1234)
    os.chmod(root / "private", 0o700)
    os.chmod(root / "private" / "inner.txt", 0o644)
    os.chmod(root, 0o755)
    listing = await FileSource(uri_of(root)).list()
    manifest = build_manifest("ds", uri_of(root), listing.files, listing.dirs, **_perms(listing))
    files = {f.path: f for f in manifest.files}
    assert (files["open.txt"].uid, files["open.txt"].gid, files["open.txt"].mode) == (
        1234,
        5678,
        0o444,  # write bits never reach the read-only mount
    )
    assert (files["root-only.txt"].uid, files["root-only.txt"].mode) == (0, 0o400)
    # The link shows inner.txt where the link is; at the source it is behind a directory
    # only uid 1234 may pass, so on the mount nobody but root may read it.
    assert files["link"].mode == 0 and files["private/inner.txt"].mode == 0o444
    assert manifest.dir_perms["private"].mode == 0o500
    assert manifest.dir_perms["private"].uid == 1234
    assert manifest.dir_perms[""].mode == 0o555


@pytest.mark.skipif(os.geteuid() != 0, reason="setting another owner needs root")
async def test_a_directory_above_the_source_narrows_what_the_mount_shows(open_tmp: Path) -> None:
    tmp_path = open_tmp
    for owner, expected in ((1234, 0o700 & 0o755), (4321, 0)):
        gate = tmp_path / f"gate{owner}"
        (gate / "ds").mkdir(parents=True)
        (gate / "ds" / "f").write_text("x")
        os.chmod(gate, 0o700)
        os.chown(gate, owner, owner)
        os.chown(gate / "ds", 1234, 1234)
        os.chown(gate / "ds" / "f", 1234, 1234)
        listing = await FileSource(uri_of(gate / "ds")).list()
        # Only uid `owner` may pass `gate`: the dataset keeps its owner's bits when that is
        # its own owner, and none otherwise.
        assert listing.dir_perms[""].mode == expected
        one = await FileSource(uri_of(gate / "ds" / "f")).list()
        assert one.files[0].mode == 0o644 & expected


def _perms(listing: Any) -> dict[str, Any]:
    return {"dir_perms": listing.dir_perms}
