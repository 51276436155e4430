"""What every request to a registry, its token service or its storage shares: where a URL
may lead (`check_target`), whose origin it is, capped bodies, and httpx and TLS failures
mapped to syncbit's errors with URLs' query strings (storage signatures) scrubbed.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from urllib.parse import urlsplit

import httpx

from syncbit.errors import SourceError, SourceUnavailableError
from syncbit.redact import redact_url
from syncbit.sources.oci.reference import PRINTABLE

TEMPORARY = frozenset({408, 429})
_URL_IN_TEXT = re.compile(r"https?://[^\s'\"<>]+", re.IGNORECASE)


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of `url`: requests to one origin may carry its credentials."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def check_target(url: str, where: str, insecure: bool, downgrade: bool = True) -> None:
    """A URL the registry sends us to (token realm, redirect) may be followed: http(s)
    without userinfo; plain HTTP only with insecure=true (when `downgrade` says it
    would leave HTTPS); no link-local, multicast or unspecified address literal."""
    refused = SourceError(f"{where} to an invalid URL {redact_url(url)[:200]!r}: refused")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:  # an unclosed IPv6 bracket, a port out of range or not a number
        raise refused from None
    if (
        parts.scheme.lower() not in ("http", "https")
        or not host
        or "@" in parts.netloc
        or not PRINTABLE.match(url)
    ):
        raise refused
    if parts.scheme.lower() == "http" and downgrade and not insecure:
        raise SourceError(
            f"{where} to plain HTTP ({redact_url(url)}): refused unless the dataset sets "
            "insecure=true"
        )
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    if address.is_link_local or address.is_unspecified or address.is_multicast:
        raise SourceError(f"{where} to {address}: link-local and unspecified addresses refused")


def read_capped(resp: httpx.Response, cap: int, what: str) -> bytes:
    """The body of `resp`, SourceError once it grows past `cap` bytes."""
    body = bytearray()
    for piece in resp.iter_bytes():
        body += piece
        if len(body) > cap:
            raise SourceError(f"{what}: answer larger than {cap} bytes")
    return bytes(body)


def scrub_urls(text: str) -> str:
    """URLs in a message without query strings (storage URLs carry signatures there)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def tls_failure(exc: BaseException, where: str) -> SourceError | None:
    """The error for a failed TLS handshake somewhere down `exc`'s causes, else None. Not
    temporary: a wrong certificate or a plain-HTTP registry stays so."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return SourceError(
                f"cannot reach {where}: TLS verification failed ({cause.verify_message}): "
                "give the registry's CA with -o ca=/path/to/ca.pem"
            )
        if isinstance(cause, ssl.SSLError):
            return SourceError(
                f"cannot reach {where}: TLS handshake failed ({cause.reason or cause}): "
                "if the registry speaks plain HTTP, add -o insecure=true"
            )
        cause = cause.__cause__ or cause.__context__
    return None


def transport_error(exc: httpx.HTTPError, where: str) -> SourceError:
    """The syncbit error for an httpx failure talking to `where`."""
    if isinstance(exc, httpx.TimeoutException):
        return SourceUnavailableError(f"cannot reach {where}: timed out")
    tls = tls_failure(exc, where)
    if tls is not None:
        return tls
    if isinstance(exc, httpx.TransportError):
        return SourceUnavailableError(
            f"cannot reach {where}: {scrub_urls(str(exc)) or type(exc).__name__}"
        )
    return SourceError(f"request to {where} failed: {scrub_urls(str(exc)) or type(exc).__name__}")
