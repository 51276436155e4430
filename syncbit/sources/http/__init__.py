"""HTTP(S) sources: one file URL, or a directory tree behind nginx/Apache autoindex pages.

Owns parsing autoindex pages (stdlib html.parser, never regexes on HTML), pinning each file
to its ETag/Last-Modified/size and a digest of its first bytes (`version["head"]`: an ETag
proves nothing about content, the fetcher checks the head on every source read), range
reads that refuse any other version, and following redirects only as the dataset's
`RedirectPolicy` allows (same scheme, same host unless `follow_redirects=any`, its headers
only to the same origin, never a link-local address). It never puts query strings,
credentials or header values into messages, logs or entries.

    autoindex  directory pages -> entries (pure)
    client     one listing's requests: headers, redirects, link-local checks, errors
    walk       the listing: pages walked, files pinned
    source     HttpSource (registered as http:// and https://): listing and range reads
"""

from syncbit.redact import redact_url
from syncbit.sources.http.autoindex import IndexLink, parse_index
from syncbit.sources.http.source import HttpSource

__all__ = ["HttpSource", "IndexLink", "parse_index", "redact_url"]
