"""`syncbit tls init`: a private CA and the two server certificates a cluster needs, one
for the scheduler (its Service names) and one every daemon shares (`peer_tls_name`).

Writes PEM files and nothing else; never overwrites one (a CA replaced by accident would
orphan every certificate it signed). Any other CA works as well (cert-manager, your PKI):
syncbit only reads `tls_cert`, `tls_key` and `tls_ca`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from syncbit.errors import UserError

SCHEDULER_NAMES = (
    "syncbit-scheduler",
    "syncbit-scheduler.syncbit",
    "syncbit-scheduler.syncbit.svc",
    "syncbit-scheduler.syncbit.svc.cluster.local",
    # Each replica's own name (deploy/k8s: the followers forward to the leader there).
    "*.syncbit-scheduler-replicas.syncbit.svc",
    "*.syncbit-scheduler-replicas.syncbit.svc.cluster.local",
    "localhost",
    "127.0.0.1",
)
DAEMON_NAME = "syncbit-daemon"
_CA_DAYS = 3650


@dataclass(frozen=True)
class Issued:
    cert: bytes  # PEM
    key: bytes  # PEM, unencrypted


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_ca(common_name: str = "syncbit cluster CA", days: int = _CA_DAYS) -> Issued:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def make_cert(ca: Issued, names: list[str] | tuple[str, ...], days: int = 825) -> Issued:
    """A server certificate for `names` (DNS names or IP addresses), signed by `ca`."""
    if not names:
        raise UserError("a certificate needs at least one name")
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise UserError("the CA key is not an EC key made by `syncbit tls init`")
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def _write(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError:
        raise UserError(f"{path} exists: syncbit tls init never overwrites a file") from None
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init(
    directory: Path,
    scheduler_names: list[str] | tuple[str, ...] = SCHEDULER_NAMES,
    daemon_names: list[str] | tuple[str, ...] = (DAEMON_NAME, "localhost", "127.0.0.1"),
    days: int = 825,
) -> list[Path]:
    """Write ca.crt/ca.key, scheduler.crt/.key and daemon.crt/.key into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    names = ["ca", "scheduler", "daemon"]
    for name in names:
        for ext in ("crt", "key"):
            if (directory / f"{name}.{ext}").exists():
                raise UserError(
                    f"{directory / f'{name}.{ext}'} exists: syncbit tls init never "
                    "overwrites a file"
                )
    ca = make_ca()
    issued = {
        "ca": ca,
        "scheduler": make_cert(ca, scheduler_names, days),
        "daemon": make_cert(ca, daemon_names, days),
    }
    written = []
    for name in names:
        _write(directory / f"{name}.crt", issued[name].cert, private=False)
        _write(directory / f"{name}.key", issued[name].key, private=True)
        written += [directory / f"{name}.crt", directory / f"{name}.key"]
    return written


__all__ = ["DAEMON_NAME", "SCHEDULER_NAMES", "Issued", "init", "make_ca", "make_cert"]
