"""The autoindex link parser on literal nginx and Apache pages, and on hostile listings."""

# The sample pages are kept byte for byte as the servers write them, long lines included.
# ruff: noqa: E501

from __future__ import annotations

import pytest

from syncbit.errors import UnsafePathError
from syncbit.sources.http import IndexLink, parse_index, redact_url

NGINX_BASE = "http://origin.test:8080/models/"
NGINX_PAGE = """<html>
<head><title>Index of /models/</title></head>
<body>
<h1>Index of /models/</h1><hr><pre><a href="../">../</a>
<a href="llama/">llama/</a>                                             04-Jan-2024 10:00                   -
<a href="my%20weights/">my weights/</a>                                        04-Jan-2024 10:00                   -
<a href="R&D.txt">R&amp;D.txt</a>                                           04-Jan-2024 10:00                1234
<a href="%E6%97%A5%E6%9C%AC%E8%AA%9E.bin">\u65e5\u672c\u8a9e.bin</a>                                         04-Jan-2024 10:00                  17
<a href="100%25.txt">100%.txt</a>                                           04-Jan-2024 10:00                   3
<a href="a%23b">a#b</a>                                               04-Jan-2024 10:00                   0
<a href="a..b">a..b</a>                                               04-Jan-2024 10:00                   0
<a href="model-00001-of-00002-with-a-very-long-name.safetensors">model-00001-of-00002-with-a-very-long-name.saf..&gt;</a> 04-Jan-2024 10:00          4294967296
</pre><hr></body>
</html>
"""

APACHE_BASE = "https://mirror.test/pub/models/"
APACHE_PAGE = """<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">
<html>
 <head>
  <title>Index of /pub/models</title>
 </head>
 <body>
<h1>Index of /pub/models</h1>
  <table>
   <tr><th valign="top"><img src="/icons/blank.gif" alt="[ICO]"></th><th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th><th><a href="?C=S;O=A">Size</a></th><th><a href="?C=D;O=A">Description</a></th></tr>
   <tr><th colspan="5"><hr></th></tr>
<tr><td valign="top"><img src="/icons/back.gif" alt="[PARENTDIR]"></td><td><a href="/pub/">Parent Directory</a></td><td>&nbsp;</td><td align="right">  - </td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/unknown.gif" alt="[   ]"></td><td><a href="./a:b.txt">a:b.txt</a></td><td align="right">2024-01-04 10:00  </td><td align="right">  3 </td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/folder.gif" alt="[DIR]"></td><td><a href="data%20set/">data set/</a></td><td align="right">2024-01-04 10:00  </td><td align="right">  - </td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/text.gif" alt="[TXT]"></td><td><a href="R&amp;D%20notes.txt">R&amp;D notes.txt</a></td><td align="right">2024-01-04 10:00  </td><td align="right">1.2K</td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/folder.gif" alt="[DIR]"></td><td><a href="tokenizer/">tokenizer/</a></td><td align="right">2024-01-04 10:00  </td><td align="right">  - </td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/unknown.gif" alt="[   ]"></td><td><a href="caf%C3%A9.bin">caf\u00e9.bin</a></td><td align="right">2024-01-04 10:00  </td><td align="right"> 12M</td><td>&nbsp;</td></tr>
<tr><td valign="top"><img src="/icons/unknown.gif" alt="[   ]"></td><td><a href="/pub/models/absolute.bin">absolute.bin</a></td><td align="right">2024-01-04 10:00  </td><td align="right"> 12M</td><td>&nbsp;</td></tr>
   <tr><th colspan="5"><hr></th></tr>
</table>
<a href="#top">top</a> <a href="https://elsewhere.test/models/">mirror</a> <a href="mailto:ops@mirror.test">ops</a>
<address>Apache/2.4.57 (Debian) Server at mirror.test Port 443</address>
</body></html>
"""


def by_name(links: list[IndexLink]) -> dict[str, IndexLink]:
    return {link.name: link for link in links}


def test_nginx_page() -> None:
    links = by_name(parse_index(NGINX_PAGE, NGINX_BASE))
    assert set(links) == {
        "llama",
        "my weights",
        "R&D.txt",
        "\u65e5\u672c\u8a9e.bin",
        "100%.txt",
        "a#b",
        "a..b",
        "model-00001-of-00002-with-a-very-long-name.safetensors",
    }
    assert links["llama"].is_dir and links["my weights"].is_dir
    assert not links["R&D.txt"].is_dir
    assert links["my weights"].url == NGINX_BASE + "my%20weights/"
    assert links["100%.txt"].url == NGINX_BASE + "100%25.txt"
    assert links["a#b"].url == NGINX_BASE + "a%23b"
    assert links["\u65e5\u672c\u8a9e.bin"].url == NGINX_BASE + "%E6%97%A5%E6%9C%AC%E8%AA%9E.bin"


def test_apache_page() -> None:
    links = by_name(parse_index(APACHE_PAGE, APACHE_BASE))
    # No parent ("/pub/"), sort links, anchors, other hosts or mailto.
    assert set(links) == {
        "a:b.txt",
        "data set",
        "R&D notes.txt",
        "tokenizer",
        "caf\u00e9.bin",
        "absolute.bin",
    }
    assert links["data set"].is_dir and links["tokenizer"].is_dir
    assert links["a:b.txt"].url == APACHE_BASE + "a:b.txt"
    assert links["R&D notes.txt"].url == APACHE_BASE + "R&D%20notes.txt"
    assert links["absolute.bin"].url == APACHE_BASE + "absolute.bin"


def test_unencoded_names_are_quoted_for_requests() -> None:
    page = '<a href="a b.txt">a b.txt</a><a href="\u00fc/">\u00fc/</a>'
    links = by_name(parse_index(page, "http://h/d/"))
    assert links["a b.txt"].url == "http://h/d/a%20b.txt"
    assert links["\u00fc"].url == "http://h/d/%C3%BC/"


def test_duplicate_links_listed_once() -> None:
    page = '<a href="x.bin"><img src="i.gif"></a> <a href="x.bin">x.bin</a>'
    assert parse_index(page, "http://h/d/") == [IndexLink("x.bin", "http://h/d/x.bin", False)]


def test_absolute_links_outside_the_directory_are_skipped() -> None:
    page = (
        '<a href="/etc/passwd">x</a><a href="/">root</a><a href="/pub/">up</a>'
        '<a href="/pub/models/">self</a><a href="http://h/pub/other/">sibling</a>'
        '<a href="//evil.test/pub/models/x">protocol-relative</a>'
    )
    assert parse_index(page, "http://h/pub/models/") == []


def test_links_may_point_deeper() -> None:
    links = by_name(parse_index('<a href="sub/file.bin">f</a>', "http://h/d/"))
    assert links["sub/file.bin"].url == "http://h/d/sub/file.bin"


@pytest.mark.parametrize(
    "href",
    [
        "../../etc/passwd",
        "../x",
        "%2e%2e/x",
        "%2E%2E%2Fx",
        ".%2e/",
        "..%2fx",
        "..%2F..%2Fetc%2Fpasswd",
        "sub/../../x",
        "%2Fetc%2Fpasswd",
        "a%00b",
        "..%5cx",
        "a%2F%2Fb",
        "%ff%fe.bin",
        "/pub/models/../../etc/passwd",
        "http://h/pub/models/sub/%2e%2e/%2e%2e/x",
    ],
)
def test_hostile_listing_raises(href: str) -> None:
    page = f'<html><body><a href="ok.bin">ok</a><a href="{href}">evil</a></body></html>'
    with pytest.raises(UnsafePathError, match="unsafe entry") as info:
        parse_index(page, "http://h/pub/models/")
    assert repr(href) in str(info.value)


def test_raw_nul_is_rejected_and_nul_entity_is_replaced() -> None:
    with pytest.raises(UnsafePathError, match="NUL"):
        parse_index('<a href="a\x00b">x</a>', "http://h/d/")
    # HTML turns the character reference &#0; into U+FFFD, which is a harmless name.
    assert [link.name for link in parse_index('<a href="a&#0;b">x</a>', "http://h/d/")] == [
        "a\ufffdb"
    ]


def test_redact_url_drops_credentials_and_query() -> None:
    assert (
        redact_url("https://user:secret@h.test:8443/a/b.bin?X-Amz-Signature=abc#frag")
        == "https://h.test:8443/a/b.bin"
    )
