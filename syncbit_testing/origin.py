"""A real HTTP/1.1 origin for tests and benchmarks: files under one root, nginx/Apache autoindex.

Owns serving GET/HEAD with ranges, validators and conditional requests (bodies go out with
sendfile) and counting the body bytes it sent. It must never serve anything outside its root
and is meant for loopback only.

In-process::

    with Origin(root, style="apache") as origin:
        httpx.get(origin.url + "dir/")

As a process (`python -m syncbit_testing.origin --root DIR --port 0`): prints `READY <port>`
once listening, serves `GET /__stats` (JSON: bytes served, and GETs of files, by path),
`POST /__reset` and `POST /__fail_reads?status=503` (file GETs answer that status until
`POST /__fail_reads` without one; listings, HEADs and the ranged GET of a file's first
64 KiB that a listing takes for its head sample still work), stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import email.utils
import html
import json
import mimetypes
import os
import ssl
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote_to_bytes, urlsplit

from syncbit.chunks import HEAD_SAMPLE
from syncbit_testing._http import (
    UNSATISFIABLE,
    CountingOwner,
    LoopbackServer,
    ServedCounts,
    ServedInThread,
    TrackedHandler,
    parse_range,
    serve_until_signal,
)

Style = Literal["nginx", "apache"]
STYLES: tuple[Style, ...] = ("nginx", "apache")

_SAMPLE_RANGE = f"bytes=0-{HEAD_SAMPLE - 1}"  # what a head sample asks for
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Apache's ap_escape_path leaves RFC 3986 sub-delims and ':' '@' unescaped in hrefs.
_APACHE_SAFE = "!$&'()*+,;=:@~"


@dataclass
class _State(ServedCounts):
    """What the in-process owner and every handler thread share; guarded by `lock`."""

    root: str
    style: Style
    control: bool
    fail_reads_with: int | None = None  # file GETs only
    gets: dict[str, int] = field(default_factory=dict)  # GETs of files, by path
    # Answers to the head-sample range (`bytes=0-{HEAD_SAMPLE - 1}`): how many, and the
    # body bytes they carried (also in `bytes_served`).
    samples: int = 0
    sample_bytes: int = 0

    def got(self, path: str) -> None:
        with self.lock:
            self.gets[path] = self.gets.get(path, 0) + 1

    def sampled(self, n: int) -> None:
        with self.lock:
            self.samples += 1
            self.sample_bytes += n

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.gets = {}
            self.samples = self.sample_bytes = 0

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "bytes_served": self.bytes_served,
                "by_path": dict(self.by_path),
                "gets": dict(self.gets),
                "head_samples": {"requests": self.samples, "bytes": self.sample_bytes},
            }


class _Server(LoopbackServer):
    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.state = state
        super().__init__(address, _Handler)


class _Handler(TrackedHandler):
    server_version = "syncbit-origin"
    server: _Server

    def _count(self, key: str, n: int) -> None:
        self.server.state.count(key, n)

    # -- methods ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        self._drain_body()
        state = self.server.state
        url = urlsplit(self.path)
        if state.control and url.path == "/__reset":
            state.reset()
            self._simple(200, "reset\n")
        elif state.control and url.path == "/__fail_reads":
            status = dict(p.partition("=")[::2] for p in url.query.split("&") if p).get("status")
            state.fail_reads_with = int(status) if status else None
            self._simple(200, f"file reads answer {status or 'normally'}\n")
        else:
            self._simple(405, "method not allowed\n")

    # -- dispatch --------------------------------------------------------------------------

    def _dispatch(self, head: bool) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        if state.control and url.path == "/__stats":
            body = json.dumps(state.stats()).encode()
            self._simple(200, body, head=head, content_type="application/json")
            return
        fail = state.fail_with
        if fail is not None:
            self._simple(fail, f"injected failure: HTTP {fail}\n", head=head)
            return
        try:
            parts = _request_parts(url.path)
        except ValueError:
            self._simple(400, "bad path\n", head=head)
            return
        root = state.root
        real = os.path.realpath(os.path.join(root, *parts))
        if not _inside(root, real):
            self._simple(404, "not found\n", head=head)
            return
        try:
            st = os.stat(real)
        except OSError:
            self._simple(404, "not found\n", head=head)
            return
        if stat.S_ISDIR(st.st_mode):
            if not url.path.endswith("/"):
                location = url.path + "/" + (f"?{url.query}" if url.query else "")
                self._simple(301, "moved\n", head=head, extra={"Location": location})
            else:
                self._index(real, url.path, head)
        elif stat.S_ISREG(st.st_mode):
            relpath = "/".join(parts)
            if not head:
                state.got(relpath)
                # The GET of the head sample is also how a listing learns a file's size.
                sample = self.headers.get("Range") == _SAMPLE_RANGE
                if state.fail_reads_with is not None and not sample:
                    status = state.fail_reads_with
                    self._simple(status, f"injected read failure: HTTP {status}\n")
                    return
            self._file(real, relpath, head)
        else:
            self._simple(404, "not found\n", head=head)

    def _file(self, real: str, relpath: str, head: bool) -> None:
        try:
            f = open(real, "rb")  # noqa: SIM115 - closed below, after the body is sent
        except OSError:
            self._simple(404, "not found\n", head=head)
            return
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = f'"{st.st_mtime_ns:x}-{size:x}-{st.st_ino:x}"'
            last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            if not self._preconditions_hold(etag, st.st_mtime):
                self._simple(412, "precondition failed\n", head=head)
                return
            span = self._range(size, etag, last_modified)
            if span == UNSATISFIABLE:
                self._simple(
                    416,
                    "range not satisfiable\n",
                    head=head,
                    extra={"Content-Range": f"bytes */{size}"},
                )
                return
            if span is None:
                status, start, length = 200, 0, size
            else:
                assert isinstance(span, tuple)
                status, start, length = 206, span[0], span[1] - span[0] + 1
            ctype = mimetypes.guess_type(real)[0] or "application/octet-stream"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", last_modified)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{start + length - 1}/{size}")
            self.end_headers()
            if not head and length:
                if status == 206 and self.headers.get("Range") == _SAMPLE_RANGE:
                    self.server.state.sampled(length)
                self._send_body(f, start, length, relpath)

    def _preconditions_hold(self, etag: str, mtime: float) -> bool:
        if_match = self.headers.get("If-Match")
        if if_match is not None:
            tags = [t.strip() for t in if_match.split(",")]
            return "*" in tags or etag in tags  # strong comparison: W/ tags never match
        since = self.headers.get("If-Unmodified-Since")
        if since is not None:
            try:
                limit = email.utils.parsedate_to_datetime(since).timestamp()
            except (TypeError, ValueError):
                return True  # an unparsable date is ignored (RFC 9110 13.1.4)
            return int(mtime) <= limit
        return True

    def _range(self, size: int, etag: str, last_modified: str) -> tuple[int, int] | str | None:
        header = self.headers.get("Range")
        if header is None:
            return None
        if_range = self.headers.get("If-Range")
        if if_range is not None:
            if_range = if_range.strip()
            matches = if_range == etag if if_range[:1] in ('"', "W") else if_range == last_modified
            if not matches:
                return None  # the client's copy is stale: send the whole current body
        return parse_range(header, size)

    def _index(self, real: str, urlpath: str, head: bool) -> None:
        entries = _scan(self.server.state.root, real)
        if self.server.state.style == "apache":
            host, port = self.server.server_name, self.server.server_port
            page = _apache_index(urlpath, entries, f"{host} Port {port}")
        else:
            page = _nginx_index(urlpath, entries)
        self._simple(200, page, head=head, content_type="text/html; charset=utf-8")

    # -- helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: bytes
    is_dir: bool
    mtime: float
    size: int


def _request_parts(path: str) -> list[str]:
    """Decoded path components of a request; ValueError for NUL or `..`."""
    raw = unquote_to_bytes(path)
    if b"\x00" in raw:
        raise ValueError("NUL in path")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ValueError("'..' in path")
    return [os.fsdecode(p) for p in parts]


def _inside(root: str, real: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


def _scan(root: str, directory: str) -> list[_Entry]:
    """Regular files and directories of `directory`, symlinks only when they stay in root."""
    entries: list[_Entry] = []
    with os.scandir(os.fsencode(directory)) as it:
        for item in it:
            try:
                st = os.stat(item.path)
            except OSError:
                continue
            if item.is_symlink() and not _inside(root, os.path.realpath(os.fsdecode(item.path))):
                continue
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                entries.append(_Entry(item.name, stat.S_ISDIR(st.st_mode), st.st_mtime, st.st_size))
    return sorted(entries, key=lambda e: e.name)


def _display(name: bytes) -> str:
    return name.decode("utf-8", "replace")


def _title(urlpath: str) -> str:
    return html.escape(_display(unquote_to_bytes(urlpath)), quote=False)


def _nginx_index(urlpath: str, entries: list[_Entry]) -> str:
    title = _title(urlpath)
    lines = [
        "<html>",
        f"<head><title>Index of {title}</title></head>",
        "<body>",
        f'<h1>Index of {title}</h1><hr><pre><a href="../">../</a>',
    ]
    # nginx lists directories first, each group sorted by name.
    for entry in sorted(entries, key=lambda e: (not e.is_dir, e.name)):
        slash = "/" if entry.is_dir else ""
        href = html.escape(quote(entry.name, safe="") + slash)
        shown = _display(entry.name) + slash
        if len(shown) > 50:
            shown = shown[:47] + "..>"
        tm = time.gmtime(entry.mtime)
        date = (
            f"{tm.tm_mday:02d}-{_MONTHS[tm.tm_mon - 1]}-{tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}"
        )
        size = "-" if entry.is_dir else str(entry.size)
        pad = " " * (50 - len(shown))
        lines.append(
            f'<a href="{href}">{html.escape(shown, quote=False)}</a>{pad} {date} {size:>19}'
        )
    lines += ["</pre><hr></body>", "</html>", ""]
    return "\r\n".join(lines)


def _apache_size(size: int) -> str:
    # apr_strfsize: at most three digits and a unit, one decimal below 10.
    value = float(size)
    for unit in (" ", "K", "M", "G", "T", "P"):
        if value < 973 or unit == "P":
            if unit == " ":
                return f"{int(value):3d} "
            return f"{value:3.1f}{unit}" if value < 9.95 else f"{value:3.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _apache_index(urlpath: str, entries: list[_Entry], address: str) -> str:
    shown_path = urlpath.rstrip("/") or "/"
    title = _title(shown_path)
    rows = [
        '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">',
        "<html>",
        " <head>",
        f"  <title>Index of {title}</title>",
        " </head>",
        " <body>",
        f"<h1>Index of {title}</h1>",
        "  <table>",
        '   <tr><th valign="top"><img src="/icons/blank.gif" alt="[ICO]"></th>'
        '<th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th>'
        '<th><a href="?C=S;O=A">Size</a></th><th><a href="?C=D;O=A">Description</a></th></tr>',
        '   <tr><th colspan="5"><hr></th></tr>',
    ]
    if urlpath != "/":
        parent = urlpath.rstrip("/").rsplit("/", 1)[0] + "/"
        rows.append(
            '<tr><td valign="top"><img src="/icons/back.gif" alt="[PARENTDIR]"></td>'
            f'<td><a href="{html.escape(parent)}">Parent Directory</a></td><td>&nbsp;</td>'
            '<td align="right">  - </td><td>&nbsp;</td></tr>'
        )
    for entry in entries:
        slash = "/" if entry.is_dir else ""
        href = quote(entry.name, safe=_APACHE_SAFE) + slash
        if ":" in href.split("/", 1)[0]:
            href = "./" + href  # mod_autoindex: never let a name read as a URL scheme
        icon, alt = ("folder.gif", "[DIR]") if entry.is_dir else ("unknown.gif", "[   ]")
        date = time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry.mtime))
        size = "  - " if entry.is_dir else _apache_size(entry.size)
        rows.append(
            f'<tr><td valign="top"><img src="/icons/{icon}" alt="{alt}"></td>'
            f'<td><a href="{html.escape(href)}">{html.escape(_display(entry.name) + slash)}</a>'
            f'</td><td align="right">{date}  </td><td align="right">{size}</td>'
            "<td>&nbsp;</td></tr>"
        )
    rows += [
        '   <tr><th colspan="5"><hr></th></tr>',
        "</table>",
        f"<address>Apache/2.4.57 (Unix) Server at {html.escape(address)}</address>",
        "</body></html>",
        "",
    ]
    return "\n".join(rows)


class Origin(CountingOwner, ServedInThread):
    """An HTTP/1.1 origin serving the files under `root` on `host:port` (0 = any free port).

    `bytes_served` and `bytes_by_path` count file body bytes actually sent (index pages and
    error bodies are not counted). While `fail_with` is set, every request is answered with
    that status. A stopped origin may be started again on the same port.
    """

    _state: _State

    def __init__(
        self,
        root: str | os.PathLike[str],
        port: int = 0,
        style: Style = "nginx",
        host: str = "127.0.0.1",
        control: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, not {style!r}")
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise ValueError(f"origin root {os.fspath(root)!r} is not a directory")
        self.host = host
        self.port = port
        self.tls = tls  # a server-side context: serve https:// instead of http://
        self._state = _State(real, style, control)

    @property
    def root(self) -> str:
        return self._state.root

    @property
    def style(self) -> Style:
        return self._state.style

    @property
    def url(self) -> str:
        """Base URL with a trailing slash, e.g. `http://127.0.0.1:41234/`."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}/"

    def _make_server(self) -> _Server:
        server = _Server((self.host, self.port), self._state)
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m syncbit_testing.origin", description="HTTP/1.1 test origin"
    )
    parser.add_argument("--root", required=True, help="directory to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--style", choices=STYLES, default="nginx", help="autoindex style")
    args = parser.parse_args(argv)
    try:
        origin = Origin(args.root, port=args.port, style=args.style, host=args.host, control=True)
        origin.start()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve_until_signal(origin)


if __name__ == "__main__":
    sys.exit(main())
