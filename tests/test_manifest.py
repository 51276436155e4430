"""Manifest validation: safe names, derived directories, clashes, modes and revisions."""

from __future__ import annotations

import pytest

from syncbit.chunks import identity_digest
from syncbit.errors import UnsafePathError
from syncbit.manifest import FileEntry, build_manifest, safe_relpath
from syncbit.names import validate_dataset_name


def entry(path: str, size: int = 1, mode: int = 0o644, ident: str = "") -> FileEntry:
    return FileEntry(
        path=path,
        size=size,
        mode=mode,
        object=ident or identity_digest("test", path, str(size)),
        locator=path,
    )


@pytest.mark.parametrize(
    "name",
    [
        "plain.txt",
        "with space.bin",
        "ünïcödé/日本語.safetensors",
        "100%.txt",
        "a#b",
        "-leading-dash",
        "a..b",
        "..hidden",
        "dir/.dotfile",
        "deep/er/still/file",
        "back\\slash",
    ],
)
def test_safe_relpath_accepts_odd_but_safe_names(name: str) -> None:
    assert safe_relpath(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", "../x", "a/../b", "a/..", "./a", "a/./b", "/abs", "a//b", "a/", "a\x00b", "..\\x"],
)
def test_safe_relpath_rejects_escapes(name: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(name)


def test_dataset_name_is_one_component() -> None:
    assert validate_dataset_name("llama-3") == "llama-3"
    for bad in ("", "a/b", "..", ".hidden", "x\x00"):
        with pytest.raises(UnsafePathError):
            validate_dataset_name(bad)
    # Not a string at all (a JSON number from an API client): the same one clear error.
    with pytest.raises(UnsafePathError, match="invalid dataset name of type int"):
        validate_dataset_name(5)  # type: ignore[arg-type]


def test_directories_derived_from_nested_paths_and_empty_dirs_kept() -> None:
    m = build_manifest("ds", "file:///src", [entry("a/b/c.bin"), entry("top")], dirs=["empty"])
    assert m.dirs == ["a", "a/b", "empty"]
    assert [f.path for f in m.files] == ["a/b/c.bin", "top"]
    assert m.total_size == 2


def test_duplicate_paths_rejected() -> None:
    with pytest.raises(UnsafePathError, match="duplicate"):
        build_manifest("ds", "s", [entry("x/y"), entry("x/y", size=2)])


def test_file_and_directory_clash_rejected() -> None:
    with pytest.raises(UnsafePathError, match="both file and directory"):
        build_manifest("ds", "s", [entry("x"), entry("x/y")])
    with pytest.raises(UnsafePathError, match="both file and directory"):
        build_manifest("ds", "s", [entry("x")], dirs=["x"])


def test_unsafe_names_in_listing_rejected() -> None:
    with pytest.raises(UnsafePathError):
        build_manifest("ds", "s", [entry("../etc/passwd")])
    with pytest.raises(UnsafePathError):
        build_manifest("ds", "s", [entry("ok")], dirs=["/abs"])


def test_write_bits_stripped_and_read_bits_added() -> None:
    m = build_manifest(
        "ds",
        "s",
        [entry("rw", mode=0o666), entry("exec", mode=0o775), entry("none", mode=0o000)],
    )
    modes = {f.path: f.mode for f in m.files}
    assert modes == {"rw": 0o444, "exec": 0o555, "none": 0o444}


def test_revision_stable_for_same_listing() -> None:
    files = [entry("b"), entry("a/x", size=5)]
    first = build_manifest("ds", "s", files, dirs=["e"])
    again = build_manifest("ds", "s", list(reversed(files)), dirs=["e"])
    assert first.revision == again.revision
    assert len(first.revision) == 16


@pytest.mark.parametrize(
    "changed",
    [
        [entry("b", size=2), entry("a/x", size=5)],  # a size
        [entry("b", ident="other"), entry("a/x", size=5)],  # an identity
        [entry("b"), entry("a/y", size=5)],  # a name
        [entry("b", mode=0o755), entry("a/x", size=5)],  # executable bit
    ],
)
def test_revision_changes_with_content(changed: list[FileEntry]) -> None:
    base = build_manifest("ds", "s", [entry("b"), entry("a/x", size=5)])
    assert build_manifest("ds", "s", changed).revision != base.revision


def test_revision_changes_with_empty_dir_and_source() -> None:
    base = build_manifest("ds", "s", [entry("b")])
    assert build_manifest("ds", "s", [entry("b")], dirs=["new"]).revision != base.revision
    assert build_manifest("ds", "other", [entry("b")]).revision != base.revision


def test_manifest_keeps_public_source_options_only() -> None:
    from syncbit.manifest import FileEntry, build_manifest

    files = [FileEntry(path="a", size=1, object="0" * 64, locator="a")]
    opts = {"endpoint_url": "http://s3.local", "aws_secret_access_key": "x", "token": "t"}
    m = build_manifest("ds", "s3://b/p/", files, source_options=opts)
    assert m.source_options == {"endpoint_url": "http://s3.local"}
    assert build_manifest("ds", "s3://b/p/", files).revision != m.revision


def test_source_options_from_config_longest_prefix_then_dataset() -> None:
    from syncbit.sources.base import options_for

    configured = {
        "s3://": {"region": "us-east-1"},
        "s3://models/": {"endpoint_url": "http://minio:9000", "region": "eu-1"},
    }
    assert options_for("s3://models/llama/", configured) == {
        "endpoint_url": "http://minio:9000",
        "region": "eu-1",
    }
    assert options_for("s3://other/x/", configured, {"profile": "p"}) == {
        "region": "us-east-1",
        "profile": "p",
    }
    assert options_for("s3://models/a/", configured, {"region": "ap-2"})["region"] == "ap-2"
    assert options_for("hf://org/m", configured) == {}


def test_names_that_are_not_utf8_are_refused() -> None:
    """A lone surrogate (what a listing's undecodable bytes become) is no name a reader can
    decode: refused for every source, not only where a parser happens to check (found by
    the Hub listing property test)."""
    with pytest.raises(UnsafePathError, match="not valid UTF-8"):
        safe_relpath("dir/\udcff.bin")
