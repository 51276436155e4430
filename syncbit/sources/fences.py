"""Where a source may reach: the directories `file://` datasets may name, the redirects an
HTTP source follows, and the addresses no request may go to (cloud metadata services).

Owns the rules only: sources call `Fences.check_file`, `RedirectPolicy.next_hop` and
`RedirectPolicy.check_address` before they open or send anything. Never does I/O beyond
resolving a path (`realpath`); raises `InvalidSourceError` with what to change.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from syncbit.errors import InvalidSourceError
from syncbit.redact import redact_url

__all__ = [
    "LOOPBACK_FILE_ROOTS",
    "Fences",
    "RedirectPolicy",
    "default_file_roots",
    "inside",
    "is_link_local",
    "is_loopback_host",
]

# `file://` roots of a scheduler only this machine can reach (the embedded one of a
# single-node daemon, or one listening on loopback) when the config names none: one
# directory root owns, so that no local user can plant a path or a symlink in it.
LOOPBACK_FILE_ROOTS = (Path("/var/lib/syncbit/datasets"),)

# Link-local addresses: every cloud's instance metadata service (169.254.169.254,
# fd00:ec2::254 on AWS over IPv6) answers there, with the machine's credentials.
_LINK_LOCAL = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)
# Headers that carry credentials whatever the dataset configured: never to another host.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_DEFAULT_PORT = {"http": 80, "https": 443}


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_file_roots(listen_host: str | None) -> tuple[Path, ...]:
    """`file_roots` when the config names none: `LOOPBACK_FILE_ROOTS` for a scheduler that
    listens on loopback only, none (no `file://` datasets) for one reachable from others."""
    if listen_host is not None and is_loopback_host(listen_host):
        return LOOPBACK_FILE_ROOTS
    return ()


def is_link_local(address: str) -> bool:
    """True for link-local addresses (IPv4, IPv6, IPv4-mapped IPv6) and metadata services."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _LINK_LOCAL if net.version == ip.version)


def inside(root: str, path: str) -> bool:
    """Whether the path `path` is `root` or below it (both already real paths)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class Fences:
    """Limits the process that opens sources sets on them (from its config, never from a
    dataset). `file_roots` None means unrestricted (a library caller's own choice)."""

    file_roots: tuple[str, ...] | None = None

    @classmethod
    def for_roots(cls, roots: Iterable[Path | str]) -> Fences:
        """Fences with these `file://` roots, resolved to real paths now."""
        return cls(tuple(os.path.realpath(str(r)) for r in roots))

    def check_file(self, path: str, uri: str) -> str:
        """The real path of `path`, if it lies under a root; else InvalidSourceError.

        The real path is what counts: a symlink or `..` that leads out of every root is
        refused like a path named outside them.
        """
        real = os.path.realpath(path)
        if self.file_roots is None:
            return real
        if not any(inside(root, real) for root in self.file_roots):
            allowed = ", ".join(self.file_roots) or "none"
            raise InvalidSourceError(
                f"{uri} is outside the directories file:// datasets may use here "
                f"(file_roots: {allowed}); add its directory to file_roots in the config of "
                "the scheduler and of the nodes"
            )
        return real


@dataclass(frozen=True)
class RedirectPolicy:
    """Which redirects an HTTP source follows and what goes with them.

    A redirect keeps the scheme (https stays https; http may move up to https), goes to
    another host only when `follow` is "any", and takes the dataset's own headers
    (`private_headers`) and any credential header along only to the same origin. No
    request goes to a link-local address unless `allow_link_local`.
    """

    follow: str = "same-host"  # "none", "same-host" or "any"
    allow_link_local: bool = False
    private_headers: frozenset[str] = field(default_factory=frozenset)  # lower-case names

    def check_url(self, url: str) -> None:
        """Refuse a URL whose host is a link-local address literal."""
        host = urlsplit(url).hostname or ""
        if not self.allow_link_local and is_link_local(host):
            raise self._link_local(url, host)

    def check_address(self, url: str, address: str) -> None:
        """Refuse the connection `url` went to if `address` is link-local."""
        if not self.allow_link_local and is_link_local(address):
            raise self._link_local(url, address)

    def next_hop(
        self, current: str, location: str, headers: dict[str, str]
    ) -> tuple[str, dict[str, str]]:
        """The URL a redirect from `current` to `location` leads to, and the headers to send
        there; InvalidSourceError if the redirect is not allowed."""
        try:
            target = urljoin(current, location.strip())
            src, dst = urlsplit(current), urlsplit(target)
            src.port, dst.port  # noqa: B018 - raise ValueError for a malformed port
        except ValueError:  # an unclosed IPv6 bracket, a port out of range or not a number
            raise InvalidSourceError(
                f"{redact_url(current)} redirects to an invalid URL: refused"
            ) from None
        from_scheme, to_scheme = src.scheme.lower(), dst.scheme.lower()
        where = f"{redact_url(current)} redirects to {redact_url(target)}"
        if to_scheme != from_scheme and not (from_scheme, to_scheme) == ("http", "https"):
            raise InvalidSourceError(
                f"{where}: a redirect must keep the scheme ({from_scheme}), not go to "
                f"{to_scheme or 'a URL without one'}"
            )
        if not dst.hostname:
            raise InvalidSourceError(f"{where}: the redirect names no host")
        same_host = (src.hostname or "").lower() == dst.hostname.lower()
        if self.follow == "none":
            raise InvalidSourceError(f"{where}: redirects are off (follow_redirects=none)")
        if not same_host and self.follow != "any":
            raise InvalidSourceError(
                f"{where}: another host; allow it with -o follow_redirects=any "
                "(the dataset's headers are never sent there)"
            )
        self.check_url(target)
        if not _same_origin(src.scheme, src.hostname, src.port, dst.scheme, dst.hostname, dst.port):
            drop = _CREDENTIAL_HEADERS | self.private_headers
            headers = {k: v for k, v in headers.items() if k.lower() not in drop}
        return target, headers

    @staticmethod
    def _link_local(url: str, address: str) -> InvalidSourceError:
        return InvalidSourceError(
            f"{redact_url(url)} leads to the link-local address {address} (a cloud metadata "
            "service?): refused; an operator may allow it with allow_link_local: true in "
            "source_options of the config"
        )


def _same_origin(
    scheme_a: str,
    host_a: str | None,
    port_a: int | None,
    scheme_b: str,
    host_b: str | None,
    port_b: int | None,
) -> bool:
    """Same host and port, where an upgrade from http:80 to https:443 of one host counts
    as the same origin (the channel only got safer)."""
    if (host_a or "").lower() != (host_b or "").lower():
        return False
    a = port_a or _DEFAULT_PORT.get(scheme_a.lower())
    b = port_b or _DEFAULT_PORT.get(scheme_b.lower())
    if scheme_a.lower() == scheme_b.lower():
        return a == b
    return port_a is None and port_b is None
