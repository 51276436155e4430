"""Where HTTP sources may go: redirects (scheme, host, headers), link-local addresses, and
the rules behind them (`sources.fences`), against real loopback servers."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from sourcehelp import read
from test_http_source import Reply, Scripted, _self_signed, html
from test_http_source import make_source as make_source  # the shared fixture

from syncbit.errors import InvalidSourceError
from syncbit.manifest import FileEntry
from syncbit.sources.fences import (
    LOOPBACK_FILE_ROOTS,
    Fences,
    RedirectPolicy,
    default_file_roots,
    is_link_local,
    is_loopback_host,
)
from syncbit.sources.http import HttpSource
from syncbit.sources.options import validate_options

BODY = b"0123456789" * 100
SECRET_HEADERS = {"X-Api-Key": "key-for-origin-only", "Authorization": "Bearer origin-token"}


def file_server() -> Scripted:
    """Serves BODY at every path (HEAD and ranged GET), ETag pinned."""

    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        span = headers.get("Range", "")
        if span.startswith("bytes="):
            first, _, last = span[6:].partition("-")
            part = BODY[int(first) : int(last) + 1]
            return (
                206,
                {
                    "Content-Length": str(len(part)),
                    "Content-Range": f"bytes {first}-{last}/{len(BODY)}",
                    "ETag": '"v1"',
                },
                part,
            )
        return 200, {"Content-Length": str(len(BODY)), "ETag": '"v1"'}, BODY

    return Scripted(respond)


def redirector(location: Callable[[str], str]) -> Scripted:
    """Answers every request with a 302 to `location(path)`."""

    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        return 302, {"Location": location(path), "Content-Length": "0"}, b""

    return Scripted(respond)


def other_host(url: str) -> str:
    """The same server under another host name: 127.0.0.1 <-> localhost."""
    return url.replace("127.0.0.1", "localhost")


def entry_for(url: str) -> FileEntry:
    return FileEntry(
        path="f.bin",
        size=len(BODY),
        object="0" * 64,
        locator=url,
        version={"size": str(len(BODY)), "etag": '"v1"'},
    )


# -- another host ---------------------------------------------------------------------------


async def test_redirect_to_another_host_is_refused_by_default(
    make_source: Callable[..., HttpSource],
) -> None:
    with file_server() as target, redirector(lambda p: other_host(target.url) + p[1:]) as hop:
        with pytest.raises(InvalidSourceError, match="follow_redirects=any") as info:
            await make_source(hop.url + "f.bin", headers=SECRET_HEADERS).list()
        assert "another host" in str(info.value)
        with pytest.raises(InvalidSourceError, match="another host"):
            await read(make_source(hop.url, headers=SECRET_HEADERS), entry_for(hop.url), 0, 10)
        assert target.requests == []  # nothing, not even a connection's request, went there


async def test_redirect_to_another_host_when_allowed_carries_no_headers(
    make_source: Callable[..., HttpSource],
) -> None:
    with file_server() as target, redirector(lambda p: other_host(target.url) + p[1:]) as hop:
        source = make_source(hop.url + "f.bin", headers=SECRET_HEADERS, follow_redirects="any")
        (entry,) = (await source.list()).files
        assert entry.locator == hop.url + "f.bin" and entry.size == len(BODY)
        assert await read(source, entry, 5, 20) == BODY[5:25]
    # The listing's ranged GET (size, validators, head sample), then the read.
    assert [m for m, _, _ in target.requests] == ["GET", "GET"]
    for _, _, headers in target.requests:
        assert "X-Api-Key" not in headers and "Authorization" not in headers, headers
    for _, _, headers in hop.requests:  # the dataset's own origin gets them
        assert headers["X-Api-Key"] == "key-for-origin-only"


async def test_redirect_on_the_same_origin_keeps_the_headers(
    make_source: Callable[..., HttpSource],
) -> None:
    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        if path == "/old.bin":
            return 301, {"Location": "/new.bin", "Content-Length": "0"}, b""
        return 200, {"Content-Length": str(len(BODY)), "ETag": '"v1"'}, BODY

    with Scripted(respond) as server:
        source = make_source(server.url + "old.bin", headers=SECRET_HEADERS)
        (entry,) = (await source.list()).files
        assert entry.size == len(BODY)
    (old, new) = server.requests
    assert old[1] == "/old.bin" and new[1] == "/new.bin"
    assert new[2]["X-Api-Key"] == "key-for-origin-only"
    assert new[2]["Authorization"] == "Bearer origin-token"


async def test_follow_redirects_none_refuses_even_the_same_host(
    make_source: Callable[..., HttpSource],
) -> None:
    with (
        redirector(lambda p: "/elsewhere") as hop,
        pytest.raises(InvalidSourceError, match="follow_redirects=none"),
    ):
        await make_source(hop.url + "f.bin", follow_redirects="none").list()


# -- another scheme ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location", ["ftp://127.0.0.1/f.bin", "file:///etc/passwd", "gopher://127.0.0.1:70/x"]
)
async def test_redirect_to_another_scheme_is_refused(
    location: str, make_source: Callable[..., HttpSource]
) -> None:
    with redirector(lambda p: location) as hop:
        source = make_source(hop.url + "f.bin", follow_redirects="any")
        with pytest.raises(InvalidSourceError, match="must keep the scheme"):
            await source.list()
        with pytest.raises(InvalidSourceError, match="must keep the scheme"):
            await read(source, entry_for(hop.url + "f.bin"), 0, 10)


@pytest.mark.parametrize("location", ["http://[abc/f.bin", "http://127.0.0.1:99999/f.bin"])
async def test_redirect_to_a_malformed_url_is_refused(
    location: str, make_source: Callable[..., HttpSource]
) -> None:
    # Locations the URL parser itself rejects: a clear refusal, never an unexpected error.
    with redirector(lambda p: location) as hop:
        source = make_source(hop.url + "f.bin", follow_redirects="any")
        with pytest.raises(InvalidSourceError, match="redirects to an invalid URL"):
            await source.list()
        with pytest.raises(InvalidSourceError, match="redirects to an invalid URL"):
            await read(source, entry_for(hop.url + "f.bin"), 0, 10)


def tls(server: Scripted, tmp: Path) -> Scripted:
    """`server` speaking TLS (self-signed for 127.0.0.1), before it starts."""
    context: ssl.SSLContext = _self_signed(tmp)
    server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
    server.url = server.url.replace("http://", "https://")
    return server


async def test_https_never_goes_down_to_http(
    tmp_path: Path, make_source: Callable[..., HttpSource]
) -> None:
    with (
        file_server() as plain,
        tls(redirector(lambda p: plain.url + p[1:]), tmp_path) as hop,
    ):
        source = make_source(hop.url + "f.bin", verify=False, headers=SECRET_HEADERS)
        with pytest.raises(InvalidSourceError, match=r"keep the scheme \(https\)"):
            await source.list()
        with pytest.raises(InvalidSourceError, match=r"keep the scheme \(https\)"):
            await read(source, entry_for(hop.url + "f.bin"), 0, 10)
    assert plain.requests == []


async def test_http_may_move_up_to_https(
    tmp_path: Path, make_source: Callable[..., HttpSource]
) -> None:
    # Same host name, so the default same-host policy follows it; another port, so the
    # dataset's headers stay behind (they go to exactly the origin they were meant for).
    with tls(file_server(), tmp_path) as secure, redirector(lambda p: secure.url + p[1:]) as hop:
        source = make_source(hop.url + "f.bin", verify="false", headers=SECRET_HEADERS)
        (entry,) = (await source.list()).files
        assert await read(source, entry, 100, 50) == BODY[100:150]
    assert secure.requests and all("X-Api-Key" not in h for _, _, h in secure.requests)


# -- link-local addresses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[fe80::1]/x",
        "http://[::ffff:169.254.169.254]/x",
        # A name (not an address literal) that resolves there: the decimal form of
        # 169.254.169.254, which getaddrinfo accepts.
        "http://2852039166/latest/meta-data/",
    ],
)
async def test_redirect_to_a_link_local_address_is_refused(
    location: str, make_source: Callable[..., HttpSource]
) -> None:
    with redirector(lambda p: location) as hop:
        source = make_source(hop.url + "f.bin", follow_redirects="any")
        with pytest.raises(InvalidSourceError, match="link-local") as info:
            await source.list()
        assert "allow_link_local" in str(info.value)
        with pytest.raises(InvalidSourceError, match="link-local"):
            await read(source, entry_for(hop.url + "f.bin"), 0, 10)


def test_a_link_local_source_is_refused_unless_the_operator_allows_it() -> None:
    with pytest.raises(InvalidSourceError, match="link-local"):
        HttpSource("http://169.254.169.254/latest/meta-data/")
    HttpSource("http://169.254.169.254/latest/", {"allow_link_local": True}).close()
    # A dataset may not allow it for itself: only source_options of the config may.
    with pytest.raises(InvalidSourceError, match="only be set in source_options"):
        validate_options("http://x/", {"allow_link_local": "true"}, from_dataset=True)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("169.254.169.254", True),
        ("169.254.0.1", True),
        ("fe80::1", True),
        ("fe80::1%eth0", True),
        ("::ffff:169.254.1.2", True),
        ("fd00:ec2::254", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("::1", False),
        ("example.com", False),
    ],
)
def test_is_link_local(address: str, expected: bool) -> None:
    assert is_link_local(address) is expected


# -- the rules themselves ---------------------------------------------------------------------


def test_next_hop_drops_private_and_credential_headers_across_origins() -> None:
    policy = RedirectPolicy(follow="any", private_headers=frozenset({"x-api-key"}))
    sent = {"X-Api-Key": "k", "Authorization": "a", "Cookie": "c", "If-Match": '"v"'}
    url, headers = policy.next_hop("http://a.example/x", "http://b.example/y", sent)
    assert url == "http://b.example/y" and headers == {"If-Match": '"v"'}
    url, headers = policy.next_hop("http://a.example/x", "/z?q=1", sent)
    assert url == "http://a.example/z?q=1" and headers == sent
    # http:80 -> https:443 of the same host is the same origin, only safer.
    _, headers = policy.next_hop("http://a.example/x", "https://a.example/x", sent)
    assert headers == sent
    _, headers = policy.next_hop("http://a.example:8080/x", "http://a.example:9090/x", sent)
    assert headers == {"If-Match": '"v"'}


def test_file_roots_default_by_where_the_scheduler_listens(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback_host(host)
        assert default_file_roots(host) == LOOPBACK_FILE_ROOTS
    for host in ("0.0.0.0", "::", "10.1.2.3", "scheduler.example"):
        assert default_file_roots(host) == ()
    fences = Fences.for_roots([tmp_path / "data"])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "out").symlink_to("/etc")
    assert fences.check_file(str(tmp_path / "data" / "x"), "file://x").endswith("/data/x")
    for escape in ("data/../x", "data/out/passwd", "data2"):
        with pytest.raises(InvalidSourceError, match="file_roots"):
            fences.check_file(str(tmp_path / escape), "file://" + escape)
    with pytest.raises(InvalidSourceError, match="file_roots: none"):
        Fences(()).check_file("/srv", "file:///srv")


async def test_a_listing_page_from_a_directory_redirect_stays_a_directory(
    make_source: Callable[..., HttpSource],
) -> None:
    # `http://host/dir` -> `/dir/` (what nginx does): followed, listed as a directory.
    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        if path == "/dir":
            return 301, {"Location": "/dir/", "Content-Length": "0"}, b""
        if path == "/dir/":
            return html('<a href="f.bin">f.bin</a>')
        return 200, {"Content-Length": str(len(BODY)), "ETag": '"v1"'}, BODY

    with Scripted(respond) as server:
        files = (await make_source(server.url + "dir").list()).files
    assert [f.path for f in files] == ["f.bin"]
