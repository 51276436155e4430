"""Property-based tests of the listing parsers: whatever an origin, an S3 store or a Hub
sends, the parser raises only its documented errors and never yields an unsafe path."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncbit.errors import InvalidSourceError, SourceError, UnsafePathError
from syncbit.manifest import FileEntry, build_manifest, safe_relpath
from syncbit.sources.hf import tree_entries
from syncbit.sources.http import parse_index
from syncbit.sources.s3 import page_entries

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Path-ish text with everything that makes names dangerous: separators, dots, escapes,
# NUL, backslashes, odd Unicode, and fragments of URLs.
_PIECES = st.sampled_from(
    [
        "/", "..", ".", "%2e", "%2f", "%2F", "%00", "\x00", "\\", "a", "b.bin", " ", "%",
        "?", "#", "&amp;", "http://", "https://other/", "//", "ü", "\udcff", ":", "~", "%ff",
        "C=N;O=D", "./", "../", "%252e",
    ]
)  # fmt: skip
NAMES = st.one_of(st.text(max_size=40), st.lists(_PIECES, max_size=8).map("".join))
BASE = "http://origin.example:8080/data/dir/"


def assert_safe(path: str) -> None:
    """A relative path that stays below the root however it is read."""
    assert path and not path.startswith("/") and "\x00" not in path
    assert safe_relpath(path) == path
    assert posixpath.normpath(path).split("/")[0] != ".."
    assert all(p not in ("", ".", "..") for p in path.split("/"))
    # nor with a backslash read as a separator (a legal byte in a POSIX name otherwise)
    assert ".." not in path.replace("\\", "/").split("/")
    path.encode("utf-8")  # and a name every reader can decode


def _href_page(hrefs: list[str], junk: str) -> str:
    links = "".join(f'<a href="{h}">{h}</a>\n' for h in hrefs)
    return f"<html><body>{junk}<pre>{links}</pre>{junk}</body></html>"


@SETTINGS
@given(hrefs=st.lists(NAMES, max_size=12), junk=st.text(max_size=60))
def test_autoindex_parsing_yields_safe_names_below_the_directory(
    hrefs: list[str], junk: str
) -> None:
    try:
        links = parse_index(_href_page(hrefs, junk), BASE)
    except UnsafePathError:
        return  # the documented refusal of a hostile entry
    for link in links:
        assert_safe(link.name)
        assert link.url.startswith(BASE), link.url
        assert "?" not in link.url and "#" not in link.url


@SETTINGS
@given(page=st.text(max_size=400))
def test_autoindex_parsing_of_arbitrary_text(page: str) -> None:
    try:
        links = parse_index(page, BASE)
    except UnsafePathError:
        return
    for link in links:
        assert_safe(link.name)
        assert link.url.startswith(BASE)


# -- S3 ---------------------------------------------------------------------------------------

_ANY = st.one_of(st.none(), st.integers(-5, 10**12), st.text(max_size=8), st.booleans())
_S3_OBJECT = st.fixed_dictionaries(
    {"Key": st.one_of(NAMES.map(lambda n: "pre/" + n), NAMES, _ANY)},
    optional={
        "ETag": st.one_of(st.just('"abc"'), st.just(""), _ANY),
        "Size": st.one_of(st.integers(0, 10**12), _ANY),
        "VersionId": _ANY,
        "IsLatest": st.booleans(),
    },
)
_S3_PAGE = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "Contents": st.one_of(st.lists(_S3_OBJECT, max_size=8), _ANY),
            "Versions": st.one_of(st.lists(_S3_OBJECT, max_size=8), _ANY),
        },
    ),
    _ANY,
)


@SETTINGS
@given(page=_S3_PAGE, versioned=st.booleans())
def test_s3_pages_yield_safe_names_under_the_prefix(page: Any, versioned: bool) -> None:
    try:
        files, dirs = page_entries(page, "bucket", "pre/", versioned)
    except (UnsafePathError, InvalidSourceError, SourceError):
        return
    for entry in files:
        assert_safe(entry.path)
        assert entry.locator == "pre/" + entry.path and entry.size >= 0
    for directory in dirs:
        assert_safe(directory)
    _manifest(files, sorted(dirs))


# -- the Hub ----------------------------------------------------------------------------------


@dataclass
class _Lfs:
    sha256: Any


@dataclass
class _RepoFile:
    path: Any
    size: Any
    blob_id: Any
    lfs: _Lfs | None


_HF_ITEM = st.builds(
    _RepoFile,
    path=st.one_of(NAMES, _ANY),
    size=st.one_of(st.integers(0, 10**12), _ANY),
    blob_id=st.one_of(st.text(max_size=40), _ANY),
    lfs=st.one_of(
        st.none(),
        st.builds(_Lfs, st.one_of(st.just("ab" * 32), st.text(max_size=70), _ANY)),
    ),
)


@SETTINGS
@given(
    items=st.lists(_HF_ITEM, max_size=8),
    include=st.lists(NAMES, max_size=2),
    exclude=st.lists(NAMES, max_size=2),
)
def test_hub_trees_yield_safe_names(
    items: list[_RepoFile], include: list[str], exclude: list[str]
) -> None:
    try:
        files = tree_entries(items, "c" * 40, include, exclude)
    except (UnsafePathError, SourceError):
        return
    for entry in files:
        assert_safe(entry.path)
        assert entry.locator == entry.path and entry.version["commit"] == "c" * 40
    _manifest(files, [])


def _manifest(files: list[FileEntry], dirs: list[str]) -> None:
    """What survives a parser also freezes into a manifest, or fails as documented."""
    try:
        manifest = build_manifest("ds", "x://y", files, dirs)
    except UnsafePathError:
        return
    for entry in manifest.files:
        assert_safe(entry.path)
    for directory in manifest.dirs:
        assert_safe(directory)
