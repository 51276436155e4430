"""TLS for syncbit's servers and clients: contexts built from the `tls_cert`, `tls_key`
and `tls_ca` files, the accepting side's rule (kept by `syncbit.httpd.listener`), and the
one clear error for a server whose certificate is not trusted.

The rule on a listening socket with a certificate: a connection whose first byte is a TLS
handshake is served over TLS; any other is plain HTTP, which each server admits only for
its probes and `/metrics` (kubelets and scrapers), from loopback (the node's own CLI), and,
on a daemon with `peer_data_tls: false`, for chunk data. One port serves both, so the
addresses nodes advertise and dial never carry a scheme.

Standard library only at import: `syncbit wait` imports it and starts in every pod.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

from syncbit.errors import ConfigError, TrustError


def _load(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist or is not a file")


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with `cert` (PEM, the chain) and `key`; ConfigError if unusable."""
    _load(cert, "tls_cert")
    _load(key, "tls_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot use tls_cert {cert} with tls_key {key}: {exc}") from None
    return context


def client_context(ca: Path | None) -> ssl.SSLContext:
    """A verifying client context: trusts `ca` (PEM) only, else the system's CAs."""
    what = "CA file (tls_ca, $SYNCBIT_TLS_CA)"
    if ca is not None:
        _load(ca, what)
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load {what} {ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def config_pair(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server context of a config's `tls_cert`/`tls_key`: both or neither."""
    if (cert is None) != (key is None):
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    if cert is None or key is None:
        return None
    return server_context(cert, key)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or "localhost") is this host only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def untrusted(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure somewhere in `exc`'s chain, if that is what failed."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        current = current.__cause__ or current.__context__
    return None


def trust_error(where: str, exc: ssl.SSLCertVerificationError, hint: str) -> TrustError:
    """The one-line error for a server whose certificate this client does not accept."""
    reason = exc.verify_message or exc.reason or str(exc)
    return TrustError(f"{where}: TLS certificate not accepted ({reason}); {hint}")


__all__ = [
    "client_context",
    "config_pair",
    "is_loopback",
    "server_context",
    "trust_error",
    "untrusted",
]
