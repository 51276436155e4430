"""A real OCI registry on loopback for tests and benchmarks, and images to put in it.

Owns: Debian's `docker-registry` (distribution v2) as a process with its own config,
storage and access log in a tmp dir, anonymous or with htpasswd basic auth or with token
auth against a token server of our own (`TokenServer`, JWTs signed with a key whose
self-signed certificate is the registry's root bundle); test images written from Python as
OCI image layouts (`Layout`) and pushed with `skopeo copy`; and `RegistryProxy`, a front
that can redirect blob reads to a storage host of its own, replace a manifest or flip a
byte of a blob. Everything listens on loopback only and is stopped by the object (the
registry by the PID we started), also on failure. Nothing here imports pytest; failures
raise `HarnessError`.

    layout = Layout(tmp / "layout")
    image = layout.image([layout.random_layer(rng, 3, 64 * KiB)])
    layout.tag(image, "v1")
    with Registry(tmp / "reg") as registry:
        registry.push(layout, "v1", "team/app:v1")
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import re
import secrets
import shutil
import ssl
import subprocess
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from integration.cluster import HOST, HarnessError, ManagedProcess, free_port, wait_until
from syncbit_testing._http import (
    UNSATISFIABLE,
    LoopbackServer,
    ServedInThread,
    TrackedHandler,
    parse_range,
)

KiB = 1024
MiB = 1024 * KiB

OCI_LAYOUT = "application/vnd.oci.image.layout.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
REF_NAME = "org.opencontainers.image.ref.name"

_TOOLS = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "htpasswd": "apache2-utils",
}


def registry_unavailable() -> str | None:
    """Why a real registry cannot run here (a missing tool, with its Debian package)."""
    for tool, package in _TOOLS.items():
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    try:
        import cryptography  # noqa: F401 - only checking that the token server can sign
    except ImportError:
        return "the token server needs the cryptography package (pip install cryptography)"
    return None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def docker_config(config_dir: Path, host: str, user: str, password: str) -> str:
    """Write `<config_dir>/config.json` as `docker login host` would (the `auth` entry:
    base64 of user:password, which is returned)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return auth


# -- images as OCI layouts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest or index.json says about one blob."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, str] | None = None
    annotations: dict[str, str] | None = None

    @property
    def hex(self) -> str:
        return self.digest.partition(":")[2]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform:
            doc["platform"] = self.platform
        if self.annotations:
            doc["annotations"] = self.annotations
        return doc


class Layout:
    """An OCI image layout on disk, written from Python: blobs, images, indexes, tags.

    Every blob is also kept in memory (`data`) so tests can compare what they read with
    what was pushed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
        self.data: dict[str, bytes] = {}
        self.diff_ids: dict[str, str] = {}  # layer digest -> digest of its uncompressed tar
        self.tags: dict[str, Descriptor] = {}
        self._write_index()

    def blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        path = self.root / "blobs" / "sha256" / digest.partition(":")[2]
        if not path.exists():
            path.write_bytes(data)
        self.data[digest] = data
        return Descriptor(media_type, digest, len(data))

    def layer(self, files: Mapping[str, bytes], compress: bool = True) -> Descriptor:
        """A layer holding `files` (name -> bytes), as a tar (gzip-compressed by default)."""
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, body in sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                info.mode = 0o644
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(body))
        tar_bytes = raw.getvalue()
        if compress:
            desc = self.blob(gzip.compress(tar_bytes, compresslevel=1, mtime=0), OCI_LAYER_GZIP)
        else:
            desc = self.blob(tar_bytes, OCI_LAYER)
        self.diff_ids[desc.digest] = sha256_digest(tar_bytes)
        return desc

    def random_layer(
        self, rng: random.Random, files: int, size: int, prefix: str = ""
    ) -> Descriptor:
        """A layer of `files` files of random bytes, `size` bytes in all."""
        each = max(1, size // files)
        return self.layer(
            {f"{prefix}data/file{i:03d}.bin": rng.randbytes(each) for i in range(files)}
        )

    def image(
        self,
        layers: Iterable[Descriptor],
        platform: tuple[str, str] | tuple[str, str, str] = ("linux", "amd64"),
        annotations: dict[str, str] | None = None,
        label: str = "",
    ) -> Descriptor:
        """An image manifest (OCI) over `layers` with a config for `platform` (os, arch
        [, variant]); `label` makes otherwise equal configs differ."""
        layers = list(layers)
        os_name, arch, *variant = platform
        config: dict[str, Any] = {
            "architecture": arch,
            "os": os_name,
            "config": {"Labels": {"test": label}} if label else {},
            "rootfs": {"type": "layers", "diff_ids": [self.diff_ids[d.digest] for d in layers]},
            "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
        }
        if variant:
            config["variant"] = variant[0]
        config_desc = self.blob(canonical_json(config), OCI_CONFIG)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [d.to_json() for d in layers],
        }
        if annotations:
            manifest["annotations"] = annotations
        desc = self.blob(canonical_json(manifest), OCI_MANIFEST)
        plat = {"os": os_name, "architecture": arch}
        if variant:
            plat["variant"] = variant[0]
        return Descriptor(desc.media_type, desc.digest, desc.size, platform=plat)

    def index(self, manifests: Iterable[Descriptor]) -> Descriptor:
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [d.to_json() for d in manifests],
        }
        return self.blob(canonical_json(doc), OCI_INDEX)

    def tag(self, desc: Descriptor, name: str) -> None:
        """Name `desc` `name` in index.json (replacing an earlier image of that name)."""
        self.tags[name] = desc
        self._write_index()

    def _write_index(self) -> None:
        entries = []
        for name, desc in sorted(self.tags.items()):
            entry = desc.to_json()
            entry.pop("platform", None)
            entry["annotations"] = {REF_NAME: name}
            entries.append(entry)
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        (self.root / "index.json").write_bytes(canonical_json(doc))

    def blobs_of(self, desc: Descriptor) -> set[str]:
        """Digests of every blob `desc` reaches: itself, child manifests, configs, layers."""
        found = {desc.digest}
        doc = json.loads(self.data[desc.digest])
        if "manifests" in doc:
            for child in doc["manifests"]:
                found |= self.blobs_of(
                    Descriptor(child["mediaType"], child["digest"], child["size"])
                )
        else:
            found.add(doc["config"]["digest"])
            found |= {layer["digest"] for layer in doc["layers"]}
        return found


# -- keys and certificates -------------------------------------------------------------------


def _certificate(
    name: str, key: Any, issuer: tuple[str, Any] | None = None, ip: str | None = None
) -> Any:
    """An X.509 certificate for `key` named `name`: self-signed CA without `issuer`
    (name, key), else a server certificate for `ip` signed by the issuer."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    def dn(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(tz=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(dn(name))
        .issuer_name(dn(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if ip is not None:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _rsa_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(obj: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        return bytes(
            obj.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    return bytes(obj.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate (for an IP address) it signed, as PEM files."""

    ca: Path
    cert: Path
    key: Path


def make_tls(workdir: Path, ip: str = HOST) -> TlsFiles:
    workdir.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = _rsa_key(), _rsa_key()
    ca = _certificate("syncbit test CA", ca_key)
    server = _certificate(ip, server_key, issuer=("syncbit test CA", ca_key), ip=ip)
    files = TlsFiles(workdir / "ca.pem", workdir / "server.pem", workdir / "server-key.pem")
    files.ca.write_bytes(_pem(ca))
    files.cert.write_bytes(_pem(server))
    files.key.write_bytes(_pem(server_key))
    return files


# -- the token server -----------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer(ServedInThread):
    """Issues registry bearer tokens (distribution's `auth: token:` protocol): JWTs signed
    RS256 with our own key, its self-signed certificate in the `x5c` header and in
    `cert_path` (the registry's `rootcertbundle`).

    `users`: name -> password; `grants`: name (or "" for anonymous requests) -> {repository
    glob: actions}. Asked for more than granted, it issues a token with what is granted
    (as Docker Hub's does); wrong credentials get 401. Counts the requests it answered."""

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, str],
        grants: Mapping[str, Mapping[str, Iterable[str]]],
        service: str = "syncbit-test-registry",
        issuer: str = "syncbit-test-issuer",
        expires_in: int = 300,
        host: str = HOST,
    ) -> None:
        from cryptography.hazmat.primitives import serialization

        self.host = host
        self.port = 0
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.users = dict(users)
        self.grants = {k: {g: set(a) for g, a in v.items()} for k, v in grants.items()}
        self.requests: Counter[str] = Counter()  # user name ("" anonymous) -> token requests
        self.refused = 0
        self._key = _rsa_key()
        cert = _certificate(issuer, self._key)
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path = workdir / "token-root.pem"
        self.cert_path.write_bytes(_pem(cert))
        self._lock = threading.Lock()

    @property
    def realm(self) -> str:
        return f"http://{self.host}:{self.port}/token"

    def _make_server(self) -> LoopbackServer:
        server = LoopbackServer((self.host, self.port), _TokenHandler)
        server.tokens = self  # type: ignore[attr-defined]
        return server

    def issue(self, user: str, scopes: list[str]) -> str:
        """A signed token for `user` ("" anonymous) with the granted part of `scopes`."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            granted: set[str] = set()
            for glob, allowed in self.grants.get(user, {}).items():
                if fnmatchcase(name, glob):
                    granted |= allowed
            wanted = [a for a in actions.split(",") if a in granted]
            if wanted:
                access.append({"type": "repository", "name": name, "actions": wanted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = f"{_b64url(canonical_json(header))}.{_b64url(canonical_json(claims))}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


class _TokenHandler(TrackedHandler):
    def do_GET(self) -> None:
        tokens: TokenServer = self.server.tokens  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        if parts.path != "/token":
            self._simple(404, "not found")
            return
        query = parse_qs(parts.query)
        user = ""
        header = self.headers.get("Authorization", "")
        if header:
            kind, _, value = header.partition(" ")
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                user, password = "", ""
            if kind.lower() != "basic" or tokens.users.get(user) != password or not user:
                with tokens._lock:
                    tokens.refused += 1
                self._simple(401, '{"details":"invalid credentials"}', "application/json")
                return
        if query.get("service", [""])[0] != tokens.service:
            self._simple(400, '{"details":"unknown service"}', "application/json")
            return
        scopes = [s for value in query.get("scope", []) for s in value.split(" ")]
        token = tokens.issue(user, scopes)
        with tokens._lock:
            tokens.requests[user] += 1
        body = {"token": token, "access_token": token, "expires_in": tokens.expires_in}
        self._simple(200, json.dumps(body), "application/json")


# -- the registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """One line of the registry's access log."""

    method: str
    path: str
    status: int
    sent: int = 0  # body bytes the registry wrote


_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<sent>\d+|-)?'
)


class Registry(ManagedProcess):
    """`docker-registry serve` on 127.0.0.1 with filesystem storage under `workdir`.

    `auth`: "none", "htpasswd" (`users` name -> password) or "token" (`tokens` issues
    them). The access log (one line per request) goes to its own file, read with
    `access()`; everything else to `registry.log`."""

    def __init__(
        self,
        workdir: Path,
        auth: str = "none",
        users: Mapping[str, str] | None = None,
        tokens: TokenServer | None = None,
        tls: TlsFiles | None = None,
        address: str = HOST,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        super().__init__("registry", workdir / "registry.log")
        if auth not in ("none", "htpasswd", "token"):
            raise HarnessError(f"unknown registry auth {auth!r}")
        if auth == "token" and tokens is None:
            raise HarnessError("token auth needs a TokenServer")
        self.workdir = workdir
        self.auth = auth
        self.users = dict(users or {})
        self.tokens = tokens
        self.tls = tls
        self.port = 0
        self.access_path = workdir / "access.log"
        self.storage = workdir / "storage"
        # Where it listens, and how its commands run (e.g. inside a network namespace,
        # bench/netns.py's `Host.argv`: then readiness and pushes are checked from there).
        self.address = address
        self.wrap = wrap

    @property
    def host(self) -> str:
        """host:port, as image references name the registry."""
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{self.address}:{self.port}", "secret": secrets.token_hex(16)},
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.tls is not None:
            config["http"]["tls"] = {"certificate": str(self.tls.cert), "key": str(self.tls.key)}
        if self.auth == "htpasswd":
            htpasswd = self.workdir / "htpasswd"
            lines = []
            for user, password in self.users.items():
                done = subprocess.run(
                    ["htpasswd", "-Bbn", user, password], capture_output=True, text=True
                )
                if done.returncode != 0:
                    raise HarnessError(f"htpasswd failed: {done.stderr}")
                lines.append(done.stdout.strip())
            htpasswd.write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "syncbit-test", "path": str(htpasswd)}}
        elif self.auth == "token":
            assert self.tokens is not None
            config["auth"] = {
                "token": {
                    "realm": self.tokens.realm,
                    "service": self.tokens.service,
                    "issuer": self.tokens.issuer,
                    "rootcertbundle": str(self.tokens.cert_path),
                }
            }
        return config

    def start(self, timeout: float = 30.0) -> Registry:
        import yaml

        if self.tokens is not None:
            self.tokens.start()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        cfg = self.workdir / "config.yml"
        cfg.write_text(yaml.safe_dump(self._config()))
        self.argv = self._wrapped(["docker-registry", "serve", str(cfg)])
        with open(self.log_path, "ab") as log, open(self.access_path, "ab") as access:
            self._log_start = log.tell()
            # The access log is written to stdout, the registry's own log to stderr.
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=access,
                stderr=log,
                start_new_session=True,
            )
        wait_until(self._ready, timeout, "the registry to answer /v2/", evidence=self.log_tail)
        return self

    def _ready(self) -> bool:
        if not self.alive:
            raise HarnessError(f"registry exited before answering\n{self.log_tail()}")
        if self.wrap is not None:
            probe = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", self.url + "/v2/"]
            done = subprocess.run(self.wrap(probe), capture_output=True, text=True, timeout=30)
            return done.stdout.strip() in ("200", "401")
        try:
            verify = ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls else True
            resp = httpx.get(self.url + "/v2/", timeout=2, trust_env=False, verify=verify)
        except httpx.HTTPError:
            return False
        return resp.status_code in (200, 401)

    def _wrapped(self, argv: list[str]) -> list[str]:
        return argv if self.wrap is None else self.wrap(argv)

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive:
            self.terminate(timeout)
        if self.tokens is not None:
            self.tokens.stop()

    def cleanup(self) -> None:
        super().cleanup()
        if self.tokens is not None:
            self.tokens.stop()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def access(self) -> list[Access]:
        """Every request the registry logged so far, in order."""
        try:
            text = self.access_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            match = _ACCESS.search(line)
            if match:
                sent = match["sent"]
                sent_bytes = int(sent) if sent and sent.isdigit() else 0
                found.append(
                    Access(match["method"], match["path"], int(match["status"]), sent_bytes)
                )
        return found

    def blob_gets(self, repo: str) -> Counter[str]:
        """Answered blob GETs of `repo` by digest (redirects and errors not counted)."""
        counts: Counter[str] = Counter()
        prefix = f"/v2/{repo}/blobs/"
        for line in self.access():
            if line.method == "GET" and line.path.startswith(prefix) and line.status in (200, 206):
                counts[line.path[len(prefix) :]] += 1
        return counts

    def blob_bytes(self, repo: str) -> Counter[str]:
        """Body bytes of answered blob GETs of `repo` by digest (ranged reads add up)."""
        sent: Counter[str] = Counter()
        prefix = f"/v2/{repo}/blobs/"
        for line in self.access():
            if line.method == "GET" and line.path.startswith(prefix) and line.status in (200, 206):
                sent[line.path[len(prefix) :]] += line.sent
        return sent

    def push(
        self,
        layout: Layout,
        tag: str,
        dest: str,
        creds: tuple[str, str] | None = None,
        docker_format: bool = False,
    ) -> None:
        """`skopeo copy oci:<layout>:<tag> docker://<registry>/<dest>`: every platform
        of an index, digests preserved (or converted to Docker v2s2 with `docker_format`)."""
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
        argv += ["--format", "v2s2"] if docker_format else ["--all", "--preserve-digests"]
        if creds is not None:
            argv += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
        argv += [f"oci:{layout.root}:{tag}", f"docker://{self.host}/{dest}"]
        env = {**os.environ, "REGISTRY_AUTH_FILE": str(self.workdir / "no-auth.json")}
        done = subprocess.run(
            self._wrapped(argv), capture_output=True, text=True, timeout=1800, env=env
        )
        if done.returncode != 0:
            raise HarnessError(f"skopeo push of {tag} to {dest} failed:\n{done.stderr}")


# -- a proxy in front of the registry ----------------------------------------------------------


def _flipped(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:] if data else data


class BlobStorage(ServedInThread):
    """The "storage host" a `RegistryProxy` redirects blob reads to (on another loopback
    address, so another host): serves the blobs of `layouts` by digest with Range when the
    URL carries a signature, and records the headers of every request it gets. `flip`:
    digests served with their first byte changed."""

    def __init__(self, layouts: Iterable[Layout], host: str = "127.0.0.2") -> None:
        self.host = host
        self.port = 0
        self.layouts = list(layouts)
        self.flip: set[str] = set()
        self.seen: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def _make_server(self) -> LoopbackServer:
        server = LoopbackServer((self.host, self.port), _StorageHandler)
        server.storage = self  # type: ignore[attr-defined]
        return server

    def blob(self, digest: str) -> bytes | None:
        for layout in self.layouts:
            if digest in layout.data:
                data = layout.data[digest]
                return _flipped(data) if digest in self.flip else data
        return None


class _StorageHandler(TrackedHandler):
    def do_GET(self) -> None:
        storage: BlobStorage = self.server.storage  # type: ignore[attr-defined]
        with storage.lock:
            storage.seen.append({k.lower(): v for k, v in self.headers.items()})
        parts = urlsplit(self.path)
        if "sig=" not in parts.query:
            self._simple(403, "unsigned request")
            return
        data = storage.blob(parts.path.lstrip("/"))
        if data is None:
            self._simple(404, "no such blob")
            return
        span = parse_range(self.headers.get("Range"), len(data))
        if span == UNSATISFIABLE:
            self._simple(416, "", extra={"Content-Range": f"bytes */{len(data)}"})
        elif isinstance(span, tuple):
            first, last = span
            extra = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
            self._simple(206, data[first : last + 1], "application/octet-stream", extra=extra)
        else:
            self._simple(200, data, "application/octet-stream")


class RegistryProxy(ServedInThread):
    """Forwards every request to `registry` (headers and all), except what a test asks it
    to change:

    - `redirect_to`: blob GETs answer 307 to that `BlobStorage` (another host), with a
      signature in the query as object stores use;
    - `manifests[(repo, reference)] = (body, content type)`: served instead of upstream's;
    - `flip`: digests whose blob bytes go out with their first byte changed;
    - `drop_auth`: how many of the next requests go upstream without their Authorization
      (so the registry refuses a token that is still good, as after a key rotation).
    """

    def __init__(self, registry: Registry, host: str = HOST) -> None:
        self.host = host
        self.port = 0
        self.registry = registry
        self.redirect_to: BlobStorage | None = None
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.flip: set[str] = set()
        self.drop_auth = 0
        self.lock = threading.Lock()
        self.client = self._client()

    @staticmethod
    def _client() -> httpx.Client:
        return httpx.Client(trust_env=False, timeout=30, follow_redirects=False)

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> RegistryProxy:
        """Serve (again, on the same port, after `stop`)."""
        if self.client.is_closed:
            self.client = self._client()
        super().start()
        return self

    def _make_server(self) -> LoopbackServer:
        server = LoopbackServer((self.host, self.port), _ProxyHandler)
        server.proxy = self  # type: ignore[attr-defined]
        return server

    def stop(self) -> None:
        super().stop()
        self.client.close()


_BLOB_PATH = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST_PATH = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)$")
_HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "host"})


class _ProxyHandler(TrackedHandler):
    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        proxy: RegistryProxy = self.server.proxy  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        manifest = _MANIFEST_PATH.match(path)
        if manifest and (manifest["repo"], manifest["ref"]) in proxy.manifests:
            body, ctype = proxy.manifests[(manifest["repo"], manifest["ref"])]
            extra = {"Docker-Content-Digest": sha256_digest(body)}
            self._simple(200, body, ctype, head=head, extra=extra)
            return
        blob = _BLOB_PATH.match(path)
        storage = proxy.redirect_to
        if blob and storage is not None and not head:
            sig = secrets.token_hex(8)
            location = f"http://{storage.host}:{storage.port}/{blob['digest']}?sig={sig}"
            self._simple(307, "", extra={"Location": location})
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        with proxy.lock:
            if proxy.drop_auth > 0 and "Authorization" in headers:
                proxy.drop_auth -= 1
                del headers["Authorization"]
        method = "HEAD" if head else "GET"
        resp = proxy.client.request(method, proxy.registry.url + self.path, headers=headers)
        body = resp.content
        if blob and blob["digest"] in proxy.flip:
            body = _flipped(body)
        self.send_response(resp.status_code)
        for name, value in resp.headers.multi_items():
            if name.lower() not in _HOP_HEADERS:
                self.send_header(name, value)  # Content-Length included: the body is whole
        self.end_headers()
        if not head:
            with contextlib.suppress(OSError):
                self.wfile.write(body)
