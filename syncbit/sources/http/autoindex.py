"""Autoindex pages (nginx, Apache, lighttpd): the entries of one directory listing, parsed
with the stdlib's html.parser (never regexes on HTML). Pure: a page in, safe names and
request-ready URLs out; an entry whose decoded name would escape the root is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from syncbit.errors import UnsafePathError
from syncbit.manifest import safe_relpath
from syncbit.redact import redact_url

# Characters left as they are when a raw href is re-quoted into a request URL: existing
# escapes and RFC 3986 reserved characters that are legal in a path.
_PATH_SAFE = "/%:@!$&'()*+,;=~"


@dataclass(frozen=True)
class IndexLink:
    """One entry of a directory listing.

    `name` is decoded and checked safe (may contain `/` only when the page linked deeper);
    `url` is absolute and percent-encoded, ready for a request.
    """

    name: str
    url: str
    is_dir: bool


class _LinkCollector(HTMLParser):
    def __init__(self) -> None:
        # Attribute values are always entity-decoded by HTMLParser (`&amp;` -> `&`).
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            for name, value in attrs:
                if name == "href" and value is not None:
                    self.hrefs.append(value)


def _canonical_path(path: str) -> str:
    return quote(unquote(path), safe="/")


def _relative_href(href: str, base_scheme: str, base_netloc: str, base_path: str) -> str | None:
    """The part of `href` below the listed directory, still percent-encoded; None to skip."""
    if not href or href.startswith(("#", "?")):
        return None  # anchors and column-sort links (`?C=N;O=D`)
    parts = urlsplit(href)
    if parts.query or parts.fragment:
        return None  # names with '?' or '#' are percent-encoded, so these are not entries
    if parts.scheme or parts.netloc or href.startswith("/"):
        # An absolute link (Apache's "Parent Directory", a logo, a mirror): it is an entry
        # only if it points inside the directory being listed.
        if parts.scheme and parts.scheme.lower() != base_scheme.lower():
            return None
        if parts.netloc and parts.netloc.lower() != base_netloc.lower():
            return None
        path, base = _canonical_path(parts.path), _canonical_path(base_path)
        if not path.startswith(base) or path == base:
            return None
        return path[len(base) :]
    if href in ("../", "..", "./", "."):
        return None  # parent and self links
    if href.startswith("./"):
        href = href[2:]  # Apache writes './a:b' so that a name never reads as a URL scheme
    return href


def parse_index(page: str, base_url: str) -> list[IndexLink]:
    """The entries of an autoindex page listing the directory `base_url` (ending in `/`).

    Skips parent, self and sort links, anchors, and absolute links outside the directory.
    Raises UnsafePathError naming the entry when a decoded name would escape the root
    (`..` components, absolute paths, NUL, `..%2f`, backslash traversal, non-UTF-8).
    """
    base = urlsplit(base_url)
    prefix = urlunsplit((base.scheme, base.netloc, base.path, "", ""))
    if not prefix.endswith("/"):
        prefix += "/"
    collector = _LinkCollector()
    collector.feed(page)
    collector.close()
    links: dict[tuple[str, bool], IndexLink] = {}
    for raw_href in collector.hrefs:
        href = raw_href.strip()
        try:
            href.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: not text any request could carry
            raise UnsafePathError(
                f"unsafe entry {href!r} in the listing of {redact_url(base_url)}: not valid Unicode"
            ) from None
        rel = _relative_href(href, base.scheme, base.netloc, base.path)
        if rel is None:
            continue
        is_dir = rel.endswith("/")
        raw_name = rel[:-1] if is_dir else rel
        try:
            name = safe_relpath(unquote(raw_name, errors="strict"))
            name.encode("utf-8")
        except UnicodeError:
            raise UnsafePathError(
                f"unsafe entry {href!r} in the listing of {redact_url(base_url)}: "
                "the name is not valid UTF-8"
            ) from None
        except UnsafePathError as exc:
            raise UnsafePathError(
                f"unsafe entry {href!r} in the listing of {redact_url(base_url)}: {exc}"
            ) from None
        url = prefix + quote(rel, safe=_PATH_SAFE)
        links.setdefault((name, is_dir), IndexLink(name, url, is_dir))
    return list(links.values())
