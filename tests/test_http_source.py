"""HttpSource against a real origin on loopback (nginx and Apache autoindex), and the origin."""

from __future__ import annotations

import json
import os
import random
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import trio
from sourcehelp import by_path, read, write_tree

from syncbit.chunks import HEAD_SAMPLE, digest
from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceThrottledError,
    SourceUnavailableError,
    UnsafePathError,
)
from syncbit.manifest import build_manifest
from syncbit.sources import open_source
from syncbit.sources.http import HttpSource
from syncbit_testing import Origin, command, environ
from syncbit_testing.capped import CappedOrigin

RNG = random.Random(1234)
FILES: dict[str, bytes] = {
    "top.bin": RNG.randbytes(3 * 1024 * 1024 + 17),
    "empty.txt": b"",
    ".hidden": b"dot",
    "-dash": b"dash",
    "a..b": b"dots",
    "a:colon.txt": b"colon",
    "sub/a b.txt": b"hello world",
    "sub/deeper/R&D #1 100%.bin": RNG.randbytes(70_000),
    "\u00fcn\u00ef/\u65e5\u672c.safetensors": RNG.randbytes(1000),
    "sub/" + "long-" * 20 + ".bin": b"long name",
}
EMPTY_DIRS = ["empty-dir", "sub/empty-nested"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "data", FILES, EMPTY_DIRS)


@pytest.fixture(params=["nginx", "apache"])
def origin(request: pytest.FixtureRequest, tree: Path) -> Iterator[Origin]:
    with Origin(tree, style=request.param) as server:
        yield server


@pytest.fixture
def make_source() -> Iterator[Callable[..., HttpSource]]:
    opened: list[HttpSource] = []

    def make(uri: str, **options: object) -> HttpSource:
        source = HttpSource(uri, options)
        opened.append(source)
        return source

    yield make
    for source in opened:
        source.close()


def disk_tree(root: Path) -> tuple[dict[str, int], set[str]]:
    files: dict[str, int] = {}
    dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            dirs.add(os.path.normpath(os.path.join(rel, d)))
        for f in filenames:
            files[os.path.normpath(os.path.join(rel, f))] = os.path.getsize(
                os.path.join(dirpath, f)
            )
    return files, dirs


# -- listing ------------------------------------------------------------------------------


async def test_list_matches_tree_on_disk(
    origin: Origin, tree: Path, make_source: Callable[..., HttpSource]
) -> None:
    source = make_source(origin.url)
    listing = await source.list()
    want_files, want_dirs = disk_tree(tree)
    assert {f.path: f.size for f in listing.files} == want_files
    assert set(listing.dirs) == want_dirs
    assert set(EMPTY_DIRS) <= set(listing.dirs)
    for entry in listing.files:
        assert entry.mode == 0o444
        assert entry.locator.startswith(origin.url)
        # The head sample: an ETag proves nothing about content (see the fetcher).
        assert set(entry.version) == {"etag", "last_modified", "size"} | (
            {"head"} if entry.size else set()
        )
        assert entry.version["size"] == str(entry.size)
    assert len({f.object for f in listing.files}) == len(listing.files)
    manifest = build_manifest("ds", origin.url, listing.files, listing.dirs)
    assert len(manifest.files) == len(FILES)


async def test_listing_is_stable(origin: Origin, make_source: Callable[..., HttpSource]) -> None:
    first = await make_source(origin.url).list()
    second = await make_source(origin.url).list()
    assert first == second


async def test_registered_for_http_schemes(origin: Origin) -> None:
    source = open_source(origin.url)
    try:
        assert isinstance(source, HttpSource)
    finally:
        source.close()
    with pytest.raises(InvalidSourceError):
        HttpSource("http:///no-host/")


async def test_single_file_url(origin: Origin, make_source: Callable[..., HttpSource]) -> None:
    source = make_source(origin.url + "sub/a%20b.txt")
    listing = await source.list()
    assert [(f.path, f.size) for f in listing.files] == [("a b.txt", 11)]
    assert listing.dirs == []
    assert await read(source, listing.files[0], 0, 11) == b"hello world"


async def test_directory_url_without_slash_is_followed(
    origin: Origin, make_source: Callable[..., HttpSource]
) -> None:
    listing = await make_source(origin.url + "sub").list()
    assert "a b.txt" in {f.path for f in listing.files}
    assert "deeper/R&D #1 100%.bin" in {f.path for f in listing.files}


async def test_nothing_at_root(origin: Origin, make_source: Callable[..., HttpSource]) -> None:
    with pytest.raises(InvalidSourceError, match=r"nothing at .*/missing/: HTTP 404"):
        await make_source(origin.url + "missing/").list()
    with pytest.raises(InvalidSourceError, match="HTTP 404"):
        await make_source(origin.url + "missing.bin").list()


async def test_file_url_with_trailing_slash_is_not_a_listing(
    origin: Origin, make_source: Callable[..., HttpSource]
) -> None:
    with pytest.raises(InvalidSourceError, match="not an HTML directory listing"):
        await make_source(origin.url + "top.bin/").list()


# -- reads --------------------------------------------------------------------------------


async def test_read_ranges_equal_file_bytes(
    origin: Origin, make_source: Callable[..., HttpSource]
) -> None:
    source = make_source(origin.url)
    files = by_path((await source.list()).files)
    data = FILES["top.bin"]
    top = files["top.bin"]
    for offset, length in [
        (0, 1),
        (0, 4 << 20 if len(data) > 4 << 20 else len(data)),
        (1, 1000),
        (len(data) - 1, 1),
        (1 << 20, 1 << 20),
        (12345, 54321),
    ]:
        assert await read(source, top, offset, length) == data[offset : offset + length]
    odd = files["sub/deeper/R&D #1 100%.bin"]
    assert await read(source, odd, 0, odd.size) == FILES["sub/deeper/R&D #1 100%.bin"]
    uni = files["\u00fcn\u00ef/\u65e5\u672c.safetensors"]
    assert await read(source, uni, 10, 20) == FILES[uni.path][10:30]
    # An empty read asks nothing of the server.
    await trio.to_thread.run_sync(source.read_into, files["empty.txt"], 0, memoryview(b""))


async def test_concurrent_reads_share_the_pool(
    origin: Origin, make_source: Callable[..., HttpSource]
) -> None:
    source = make_source(origin.url)
    top = by_path((await source.list()).files)["top.bin"]
    data = FILES["top.bin"]
    chunk = 256 * 1024
    results: dict[int, bytes] = {}

    async def one(offset: int) -> None:
        results[offset] = await read(source, top, offset, min(chunk, len(data) - offset))

    async with trio.open_nursery() as nursery:
        for offset in range(0, len(data), chunk):
            nursery.start_soon(one, offset)
    assert b"".join(results[k] for k in sorted(results)) == data


async def test_bytes_served_counts_body_bytes(
    origin: Origin, make_source: Callable[..., HttpSource]
) -> None:
    source = make_source(origin.url)
    top = by_path((await source.list()).files)["top.bin"]
    origin.reset_stats()
    await read(source, top, 0, 1000)
    await read(source, top, 5000, 24)
    assert origin.bytes_served == 1024
    assert origin.bytes_by_path == {"top.bin": 1024}
    origin.reset_stats()
    assert origin.bytes_served == 0 and origin.bytes_by_path == {}


@pytest.mark.parametrize("change", ["same-size", "grown", "deleted", "touched"])
async def test_changed_file_raises_source_changed(
    origin: Origin, tree: Path, make_source: Callable[..., HttpSource], change: str
) -> None:
    source = make_source(origin.url)
    entry = by_path((await source.list()).files)["sub/a b.txt"]
    assert await read(source, entry, 0, 5) == b"hello"
    path = tree / "sub" / "a b.txt"
    st = path.stat()
    if change == "same-size":
        path.write_bytes(b"HELLO WORLD")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "grown":
        path.write_bytes(b"hello world, longer")
    elif change == "deleted":
        path.unlink()
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(SourceChangedError, match=r"source changed: .*a%20b\.txt no longer has"):
        await read(source, entry, 0, 5)


async def test_origin_stopped_then_back(
    origin: Origin, make_source: Callable[..., HttpSource]
) -> None:
    source = make_source(origin.url)
    entry = by_path((await source.list()).files)["top.bin"]
    assert await read(source, entry, 0, 10) == FILES["top.bin"][:10]
    origin.stop()
    with pytest.raises(SourceUnavailableError, match=r"cannot read http://127\.0\.0\.1"):
        await read(source, entry, 0, 10)
    with pytest.raises(SourceUnavailableError, match="cannot reach"):
        await make_source(origin.url).list()
    assert source.is_temp_failure(SourceUnavailableError("x"))
    origin.start()  # same port: a source that comes back makes the same read succeed
    assert await read(source, entry, 0, 10) == FILES["top.bin"][:10]


async def test_failing_origin_is_unavailable(
    origin: Origin, make_source: Callable[..., HttpSource]
) -> None:
    source = make_source(origin.url)
    entry = by_path((await source.list()).files)["top.bin"]
    origin.fail_with = 503
    with pytest.raises(SourceUnavailableError, match="HTTP 503"):
        await make_source(origin.url).list()
    with pytest.raises(SourceUnavailableError, match="HTTP 503"):
        await read(source, entry, 0, 10)
    origin.fail_with = 429
    with pytest.raises(SourceUnavailableError, match="HTTP 429"):
        await read(source, entry, 0, 10)
    origin.fail_with = None
    assert await read(source, entry, 0, 10) == FILES["top.bin"][:10]


async def test_secrets_never_in_messages(
    origin: Origin, make_source: Callable[..., HttpSource]
) -> None:
    uri = origin.url + "top.bin?X-Amz-Signature=SECRET123"
    source = make_source(uri, headers={"Authorization": "Bearer TOKEN456"})
    listing = await source.list()
    entry = listing.files[0]
    assert entry.path == "top.bin"
    assert await read(source, entry, 0, 4) == FILES["top.bin"][:4]
    messages = []
    origin.fail_with = 503
    for attempt in (source.list(), read(source, entry, 0, 4)):
        with pytest.raises(SourceUnavailableError) as info:
            await attempt
        messages.append(str(info.value))
    origin.fail_with = None
    origin.stop()
    for attempt in (make_source(uri).list(), read(source, entry, 0, 4)):
        with pytest.raises(SourceUnavailableError) as info:
            await attempt
        messages.append(str(info.value))
    for message in messages:
        assert "SECRET123" not in message and "TOKEN456" not in message, message
        assert "top.bin" in message or "127.0.0.1" in message


# -- scripted servers: hostile or broken ones ----------------------------------------------

Reply = tuple[int, dict[str, str], bytes]


class Scripted:
    """A tiny HTTP/1.1 server whose answers come from `respond(method, path, headers)`."""

    def __init__(self, respond: Callable[[str, str, dict[str, str]], Reply]) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.answer()

            def do_HEAD(self) -> None:
                self.answer()

            def answer(self) -> None:
                headers = dict(self.headers)
                outer.requests.append((self.command, self.path, headers))
                status, reply_headers, body = respond(self.command, self.path, headers)
                self.send_response(status)
                for name, value in reply_headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in reply_headers:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def html(body: str) -> Reply:
    data = body.encode()
    return 200, {"Content-Type": "text/html", "Content-Length": str(len(data))}, data


@pytest.mark.parametrize(
    "href", ["../../etc/passwd", "%2e%2e/x", "..%2f..%2fetc/", "%2Fetc%2Fpasswd", "a%00b"]
)
async def test_hostile_listing_raises_unsafe_path(
    href: str, make_source: Callable[..., HttpSource]
) -> None:
    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        if path == "/":
            return html('<a href="../">../</a><a href="sub/">sub/</a><a href="ok">ok</a>')
        if path == "/sub/":
            return html(f'<a href="../">../</a><a href="{href}">evil</a>')
        return 200, {"Content-Length": "2"}, b"ok"

    with Scripted(respond) as server, pytest.raises(UnsafePathError, match="unsafe entry") as info:
        await make_source(server.url).list()
    assert repr(href) in str(info.value)


async def test_missing_content_length_is_invalid(make_source: Callable[..., HttpSource]) -> None:
    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        if path == "/":
            return html('<a href="f.bin">f.bin</a>')
        return 200, {}, b"body without length"

    with Scripted(respond) as server, pytest.raises(InvalidSourceError, match="no Content-Length"):
        await make_source(server.url).list()


async def test_non_html_directory_is_invalid(make_source: Callable[..., HttpSource]) -> None:
    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        return 200, {"Content-Type": "application/json", "Content-Length": "2"}, b"{}"

    with (
        Scripted(respond) as server,
        pytest.raises(InvalidSourceError, match="not an HTML directory listing"),
    ):
        await make_source(server.url).list()


async def test_server_ignoring_range(make_source: Callable[..., HttpSource]) -> None:
    body = b"0123456789"

    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        return 200, {"Content-Length": str(len(body)), "ETag": '"v1"'}, body

    with Scripted(respond) as server:
        source = make_source(server.url + "f.bin")
        entry = (await source.list()).files[0]
        with pytest.raises(SourceError, match="ignores Range"):
            await read(source, entry, 2, 3)
        assert await read(source, entry, 0, len(body)) == body


async def test_server_without_head_is_probed_with_a_range(
    make_source: Callable[..., HttpSource],
) -> None:
    body = b"no head here"

    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        if method == "HEAD":
            return 405, {"Content-Length": "0"}, b""
        first, last = (int(x) for x in headers["Range"].removeprefix("bytes=").split("-"))
        assert first == 0  # the listing's ranged GET of the head
        last = min(last, len(body) - 1)
        part = body[: last + 1]
        return (
            206,
            {
                "Content-Length": str(len(part)),
                "Content-Range": f"bytes 0-{last}/{len(body)}",
                "ETag": '"p"',
            },
            part,
        )

    with Scripted(respond) as server:
        entry = (await make_source(server.url + "f.bin").list()).files[0]
    assert (entry.size, entry.version["etag"]) == (len(body), '"p"')


async def test_weak_etag_pins_with_last_modified(make_source: Callable[..., HttpSource]) -> None:
    body = b"weak etag body"
    modified = "Mon, 01 Jan 2024 00:00:00 GMT"
    state = {"etag": 'W/"w1"'}

    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        common = {"ETag": state["etag"], "Last-Modified": modified}
        if method == "HEAD":
            return 200, {**common, "Content-Length": str(len(body))}, b""
        first, last = (int(x) for x in headers["Range"].removeprefix("bytes=").split("-"))
        part = body[first : last + 1]
        return (
            206,
            {
                **common,
                "Content-Length": str(len(part)),
                "Content-Range": f"bytes {first}-{last}/{len(body)}",
            },
            part,
        )

    with Scripted(respond) as server:
        source = make_source(server.url + "w.bin")
        entry = (await source.list()).files[0]
        assert entry.version["etag"] == 'W/"w1"'
        assert await read(source, entry, 5, 4) == b"etag"
        sent = server.requests[-1][2]
        assert "If-Match" not in sent
        assert sent["If-Unmodified-Since"] == modified
        state["etag"] = 'W/"w2"'  # a server that ignores the precondition but says so
        with pytest.raises(SourceChangedError, match="etag"):
            await read(source, entry, 5, 4)


async def test_unpinned_size_change_is_detected(make_source: Callable[..., HttpSource]) -> None:
    """No validators at all: the Content-Range total still pins the size."""
    state = {"body": b"abcdefgh"}

    def respond(method: str, path: str, headers: dict[str, str]) -> Reply:
        body = state["body"]
        if method == "HEAD":
            return 200, {"Content-Length": str(len(body))}, b""
        first, last = (int(x) for x in headers["Range"].removeprefix("bytes=").split("-"))
        part = body[first : last + 1]
        return (
            206,
            {
                "Content-Length": str(len(part)),
                "Content-Range": f"bytes {first}-{last}/{len(body)}",
            },
            part,
        )

    with Scripted(respond) as server:
        source = make_source(server.url + "plain.bin")
        entry = (await source.list()).files[0]
        assert entry.version == {"size": "8", "head": digest(b"abcdefgh")}
        assert await read(source, entry, 2, 2) == b"cd"
        state["body"] = b"abcdefghij"
        with pytest.raises(SourceChangedError, match="now 10 bytes"):
            await read(source, entry, 2, 2)


# -- the origin itself --------------------------------------------------------------------


async def test_origin_ranges_and_validators(origin: Origin) -> None:
    data = FILES["top.bin"]
    async with httpx.AsyncClient(base_url=origin.url) as client:
        head = await client.head("top.bin")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(data))
        assert head.headers["accept-ranges"] == "bytes"
        etag = head.headers["etag"]
        assert etag.startswith('"') and not etag.startswith("W/")
        r = await client.get("top.bin", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
        r = await client.get("top.bin", headers={"Range": f"bytes={len(data) - 5}-"})
        assert r.status_code == 206 and r.content == data[-5:]
        r = await client.get("top.bin", headers={"Range": "bytes=-7"})
        assert r.status_code == 206 and r.content == data[-7:]
        r = await client.get("top.bin", headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
        r = await client.get("empty.txt", headers={"Range": "bytes=0-"})
        assert r.status_code == 416
        r = await client.get("top.bin", headers={"Range": "bytes=0-1", "If-Match": '"nope"'})
        assert r.status_code == 412
        r = await client.get("top.bin", headers={"Range": "bytes=0-1", "If-Match": etag})
        assert r.status_code == 206
        old = "Mon, 01 Jan 2001 00:00:00 GMT"
        r = await client.get("top.bin", headers={"Range": "bytes=0-1", "If-Unmodified-Since": old})
        assert r.status_code == 412
        r = await client.get("sub/a%20b.txt", headers={"Range": "bytes=0-1", "If-Range": '"x"'})
        assert r.status_code == 200 and r.content == b"hello world"
        r = await client.get(
            "sub/a%20b.txt", headers={"Range": "bytes=0-1", "If-Range": head.headers["etag"]}
        )
        assert r.status_code == 200  # that ETag is top.bin's, not this file's
        r = await client.get("sub")
        assert r.status_code == 301 and r.headers["location"] == "/sub/"
        r = await client.get("sub/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert (await client.get("nope")).status_code == 404


async def test_origin_never_serves_outside_root(tree: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    os.symlink(secret, tree / "leak.txt")
    os.symlink(tmp_path, tree / "leakdir")
    os.symlink(tree / "top.bin", tree / "inside-link.bin")
    with Origin(tree) as origin:
        async with httpx.AsyncClient(base_url=origin.url) as client:
            for path in (
                "leak.txt",
                "leakdir/secret.txt",
                "%2e%2e/secret.txt",
                "sub/%2e%2e/%2e%2e/secret.txt",
                "..%2fsecret.txt",
            ):
                r = await client.get(path)
                assert r.status_code in (400, 404), path
                assert b"secret" not in r.content
            index = (await client.get("")).text
            assert "leak" not in index and "inside-link.bin" in index
            assert (await client.get("inside-link.bin")).content == FILES["top.bin"]


async def test_origin_process_mode(tree: Path) -> None:
    proc = subprocess.Popen(
        command("origin", "--root", str(tree), "--port", "0", "--style", "apache"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ(),
    )
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert line.startswith("READY ")
        url = f"http://127.0.0.1:{int(line.split()[1])}/"
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.get("sub/a%20b.txt", headers={"Range": "bytes=0-4"})
            assert r.content == b"hello"
            assert "Parent Directory" in (await client.get("sub/")).text
            stats = (await client.get("__stats")).json()
            expected = {"sub/a b.txt": 5}
            assert stats == {
                "bytes_served": 5,
                "by_path": expected,
                "gets": {"sub/a b.txt": 1},
                "head_samples": {"requests": 0, "bytes": 0},
            }
            # A head sample's answers are counted apart too (the swarm bench splits them).
            sample = {"Range": f"bytes=0-{HEAD_SAMPLE - 1}"}
            r = await client.get("sub/a%20b.txt", headers=sample)
            assert r.status_code == 206 and r.content == b"hello world"
            stats = (await client.get("__stats")).json()
            assert stats["head_samples"] == {"requests": 1, "bytes": 11}
            assert stats["bytes_served"] == 5 + 11
            # File reads can be made to fail (listings and HEADs still work), then served again.
            assert (await client.post("__fail_reads?status=503")).status_code == 200
            assert (await client.get("sub/a%20b.txt")).status_code == 503
            assert (await client.head("sub/a%20b.txt")).status_code == 200
            assert (await client.post("__fail_reads")).status_code == 200
            assert (await client.get("sub/a%20b.txt")).status_code == 200
            assert (await client.post("__reset")).status_code == 200
            assert json.loads((await client.get("__stats")).content)["bytes_served"] == 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert err == ""


def _self_signed(tmp: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "syncbit test origin")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return context


async def test_https_origin_lists_and_reads_and_checks_its_certificate(
    tree: Path, tmp_path: Path, make_source: Callable[..., HttpSource]
) -> None:
    with Origin(tree, tls=_self_signed(tmp_path)) as origin:
        assert origin.url.startswith("https://")
        # An untrusted certificate is refused with a clear error, not a traceback.
        with pytest.raises(SourceError, match=r"(?i)certificate verify failed"):
            await make_source(origin.url).list()
        # verify=false (a private CA one has not installed) lists and reads over TLS.
        source = make_source(origin.url, verify=False)
        files = by_path((await source.list()).files)
        data = FILES["top.bin"]
        assert await read(source, files["top.bin"], 1000, 70000) == data[1000:71000]
        # The bulk read path checks the certificate too, unless verify is off.
        with pytest.raises(SourceError, match=r"(?i)certificate verify failed"):
            await read(make_source(origin.url), files["top.bin"], 0, 10)


async def test_throttling_answers_carry_their_retry_after(tmp_path: Path) -> None:
    """429 and 503 are the origin asking this node to slow down: the read says so (a
    `SourceThrottledError`) with the Retry-After the origin gave, so the fetcher can wait
    that long and run fewer streams; other 5xx stay plain temporary failures."""
    (tmp_path / "f.bin").write_bytes(b"x" * 4096)
    with CappedOrigin(tmp_path) as origin:
        source = HttpSource(f"{origin.url}f.bin")
        try:
            entry = (await source.list()).files[0]
            origin.throttle(429, retry_after=7, count=1)
            with pytest.raises(SourceThrottledError, match="HTTP 429") as info:
                await read(source, entry, 0, 10)
            assert info.value.retry_after == 7.0
            assert source.is_temp_failure(info.value)
            origin.throttle(503, retry_after=None, count=1)
            with pytest.raises(SourceThrottledError, match="HTTP 503") as info:
                await read(source, entry, 0, 10)
            assert info.value.retry_after is None
            assert await read(source, entry, 0, 10) == b"x" * 10
        finally:
            source.close()
