"""OCI registry sources: `oci://host[:port]/repository[:tag][@sha256:<hex>]`.

Owns the read side of the distribution API (`/v2/`): auth challenges (anonymous, basic,
bearer tokens), a tag resolved to its manifest digest at listing, image indexes walked (all
platforms, or one), and ranged blob reads that follow the registry's redirect to its
storage. The listing is an OCI image layout: `oci-layout`, `index.json` (the tag as
`org.opencontainers.image.ref.name`) and `blobs/sha256/<hex>` for every manifest, index,
config and layer, each addressed by its digest. Credentials come from the environment or a
Docker config.json of the machine that reads; they never enter options, manifests,
messages or logs, and an Authorization header never leaves the registry's host.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import inspect
import ipaddress
import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from syncbit.chunks import identity_digest
from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
)
from syncbit.manifest import FileEntry
from syncbit.sources.base import Listing, Source, check_range_body, pinned_size, register
from syncbit.sources.fences import Fences
from syncbit.sources.http import redact_url
from syncbit.wire import Pool, Response, WireError

__all__ = [
    "OPTION_KEYS",
    "Credentials",
    "OciReference",
    "OciSource",
    "Platform",
    "find_credentials",
    "parse_oci_uri",
]

log = logging.getLogger("syncbit.sources.oci")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
ACCEPT = ", ".join(sorted(IMAGE_TYPES | INDEX_TYPES))
_UNSUPPORTED = {
    "application/vnd.docker.distribution.manifest.v1+json": "Docker schema 1",
    "application/vnd.docker.distribution.manifest.v1+prettyjws": "Docker schema 1",
    "application/vnd.oci.artifact.manifest.v1+json": "OCI artifact manifest",
}
# Layers a registry may not hold: their bytes live at `urls` outside the registry.
_FOREIGN = (
    "application/vnd.docker.image.rootfs.foreign.",
    "application/vnd.oci.image.layer.nondistributable.",
)
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'

OPTION_KEYS = frozenset({"platform", "insecure", "ca", "timeout"})
DEFAULT_TIMEOUT = 30.0
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution's own limit on a manifest's size
MAX_MANIFESTS = 256  # manifests and indexes one listing may walk
MAX_DEPTH = 4  # indexes within indexes
MAX_BLOBS = 10_000  # files of one listing
MAX_BLOB_SIZE = 1 << 44  # 16 TiB: a descriptor claiming more is not a real blob
MAX_TOKEN_BYTES = 64 * 1024
MAX_REDIRECTS = 5
# Manifests up to this size travel inside the dataset manifest (no registry round trip to
# read them); the total is capped so that a huge index cannot bloat the scheduler's state.
INLINE_LIMIT = 16 * 1024
INLINE_BUDGET = 256 * 1024
_TEMPORARY = frozenset({408, 429})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

_HOST = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)(?::(?P<port>\d{1,5}))?$"
)
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+$")
_PLATFORM_WORD = re.compile(r"^[a-z0-9_.-]{1,32}$")
_PLATFORM = re.compile(r"^[a-z0-9_.-]+/[a-z0-9_.-]+(?:/[a-z0-9_.-]+)?$")
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")  # what may go into a request header or line
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
# Docker Hub is named docker.io in references; its API lives elsewhere.
_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HUB_API = "registry-1.docker.io"

# Listing only reads: a deadline may walk away from its thread. (trio 0.23 renamed the
# `cancellable` flag to `abandon_on_cancel`.)
_ABANDON: dict[str, Any] = {
    (
        "abandon_on_cancel"
        if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
        else "cancellable"
    ): True
}


# -- references, options, platforms -----------------------------------------------------------


@dataclass(frozen=True)
class OciReference:
    """One image in one repository: `registry` as written (host[:port]), and a tag, a
    digest, or both (the digest then decides, the tag names it in index.json)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        return _HUB_API if self.registry in _HUB_NAMES else self.registry

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def at(self, digest: str) -> str:
        """Another manifest of this repository, for messages."""
        return f"{self.registry}/{self.repository}@{digest}"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_oci_uri(uri: str) -> OciReference:
    """`oci://host[:port]/repo/path[:tag][@sha256:<hex>]` -> OciReference (tag `latest`
    when neither tag nor digest is given). InvalidSourceError on anything else."""

    def bad(why: str) -> InvalidSourceError:
        return InvalidSourceError(f"invalid OCI source {redact_url(uri)!r}: {why}")

    scheme, sep, rest = uri.partition("://")
    if scheme.lower() != "oci" or not sep:
        raise bad("expected oci://host[:port]/repository[:tag][@sha256:...]")
    if "?" in rest or "#" in rest:
        raise bad("no query or fragment allowed")
    host, slash, path = rest.partition("/")
    if "@" in host:
        raise bad(
            "credentials do not belong in the URI: set SYNCBIT_OCI_USERNAME/PASSWORD "
            "or log in to a Docker config.json on the machines that read"
        )
    match = _HOST.match(host)
    if not match or not slash:
        raise bad("expected a registry host[:port] and a repository")
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        raise bad(f"port {match['port']} out of range")
    path, at, digest = path.partition("@")
    if at and not _DIGEST.match(digest):
        if _other_algorithm(digest):
            raise bad(f"digest algorithm {digest.partition(':')[0]!r} unsupported: only sha256")
        raise bad(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    repository, tag = path, None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = path.rpartition(":")
        if not _TAG.match(tag):
            raise bad(f"invalid tag {tag!r}")
    parts = repository.split("/")
    if len(repository) > 255 or not all(_COMPONENT.match(p) for p in parts):
        raise bad(
            f"invalid repository {repository!r}: lowercase letters, digits and separators "
            "('.', '_', '__', '-') in '/'-separated components"
        )
    if host.lower() in _HUB_NAMES and len(parts) == 1:
        repository = f"library/{repository}"  # Docker Hub's official images
    return OciReference(host.lower(), repository, tag, digest if at else None)


def _other_algorithm(digest: str) -> bool:
    """A well-formed digest of another algorithm than sha256 (sha512, blake3...)."""
    return bool(_ANY_DIGEST.match(digest)) and digest.partition(":")[0] != "sha256"


def _bool_option(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidSourceError(f"invalid OCI option {key}={value!r}: expected true or false")


@dataclass(frozen=True)
class Platform:
    """os/architecture[/variant], as in an index's descriptors and image configs."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        text = text.strip().lower()
        if not _PLATFORM.match(text):
            raise InvalidSourceError(
                f"invalid OCI option platform={text!r}: expected os/arch[/variant], "
                "e.g. linux/amd64 or linux/arm64/v8"
            )
        os_name, arch, *variant = text.split("/")
        return cls(os_name, arch, variant[0] if variant else "")

    @classmethod
    def of(cls, doc: Any) -> Platform | None:
        """The platform of a descriptor's `platform` field or an image config."""
        if not isinstance(doc, dict):
            return None
        # Only plain words: these names end up in messages and in index.json.
        parts = [doc.get("os"), doc.get("architecture"), doc.get("variant") or ""]
        if not all(isinstance(p, str) and _PLATFORM_WORD.match(p.lower()) for p in parts[:2]):
            return None
        variant = (
            parts[2] if isinstance(parts[2], str) and _PLATFORM_WORD.match(parts[2].lower()) else ""
        )
        return cls(str(parts[0]).lower(), str(parts[1]).lower(), variant.lower())

    def _variant(self) -> str:
        # arm64 images rarely name their variant; v8 is the only one there is.
        return self.variant or ("v8" if self.architecture == "arm64" else "")

    def matches(self, other: Platform) -> bool:
        """`other` is this platform (any variant of it, if this one names none)."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or self._variant() == other._variant()

    def to_json(self) -> dict[str, str]:
        doc = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            doc["variant"] = self.variant
        return doc

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


# -- credentials ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or identity token) for one registry, and where they were
    found (for messages: the variable or file, never the values)."""

    username: str = field(repr=False)
    password: str = field(repr=False)
    origin: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def _config_key(key: str) -> str:
    """A config.json `auths` key (`host`, `https://host/v1/`) as host[:port]."""
    key = key.strip().lower()
    if "://" in key:
        key = key.partition("://")[2]
    return key.partition("/")[0]


def _docker_config(environ: Mapping[str, str]) -> Path:
    if environ.get("DOCKER_CONFIG"):
        return Path(environ["DOCKER_CONFIG"]).expanduser() / "config.json"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".docker" / "config.json"


def find_credentials(registry: str, environ: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for `registry` (host[:port] as in the reference), or None.

    1. `SYNCBIT_OCI_USERNAME` + `SYNCBIT_OCI_PASSWORD`, used only for the registry that
       `SYNCBIT_OCI_REGISTRY` names (so they are never sent to another registry);
    2. a Docker config.json (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`):
       `auths.<registry>.auth` (base64 user:password) or `username`/`password`.
    Raises InvalidSourceError for a config file that cannot be read as one."""
    env = os.environ if environ is None else environ
    registry = registry.lower()
    user, password = env.get("SYNCBIT_OCI_USERNAME", ""), env.get("SYNCBIT_OCI_PASSWORD", "")
    if user and password and _config_key(env.get("SYNCBIT_OCI_REGISTRY", "")) == registry:
        return Credentials(user, password, "SYNCBIT_OCI_USERNAME/SYNCBIT_OCI_PASSWORD")
    path = _docker_config(env)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidSourceError(f"cannot read {path}: {exc.strerror}") from None
    try:
        auths = json.loads(text).get("auths") or {}
        if not isinstance(auths, dict):
            raise ValueError("auths is not an object")
    except (ValueError, AttributeError) as exc:
        raise InvalidSourceError(f"{path} is not a Docker config file: {exc}") from None
    # `docker login` files Docker Hub under https://index.docker.io/v1/.
    names = _HUB_NAMES if registry in _HUB_NAMES else {registry}
    for key, entry in auths.items():
        if _config_key(str(key)) not in names or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidSourceError(
                    f"{path}: the auth entry for {key} is not base64 of user:password"
                ) from None
            name, sep, secret = decoded.partition(":")
            if not sep or not name:
                raise InvalidSourceError(
                    f"{path}: the auth entry for {key} is not base64 of user:password"
                )
            return Credentials(name, secret, str(path))
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"], str(path))
    return None


# -- descriptors and manifests --------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    foreign: bool = False

    @property
    def hex(self) -> str:
        return self.digest.partition(":")[2]


def _descriptor(doc: Any, where: str) -> Descriptor:
    if not isinstance(doc, dict):
        raise SourceError(f"{where}: a descriptor is not an object")
    media_type, digest, size = doc.get("mediaType"), doc.get("digest"), doc.get("size")
    if not isinstance(media_type, str) or not _PRINTABLE.match(media_type):
        raise SourceError(f"{where}: a descriptor has no valid mediaType")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        if isinstance(digest, str) and _other_algorithm(digest):
            raise InvalidSourceError(
                f"{where}: blob {digest[:80]} uses a digest algorithm other than sha256 "
                "(unsupported)"
            )
        raise SourceError(f"{where}: a descriptor has no valid digest")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB_SIZE:
        raise SourceError(f"{where}: descriptor {digest} has an invalid size")
    foreign = media_type.startswith(_FOREIGN)
    return Descriptor(media_type, digest, size, Platform.of(doc.get("platform")), foreign)


@dataclass(frozen=True)
class _Parsed:
    """A manifest's parts: an index's `children`, or an image's `config` and `layers`."""

    media_type: str
    children: list[Descriptor] = field(default_factory=list)
    config: Descriptor | None = None
    layers: list[Descriptor] = field(default_factory=list)


def _unsupported(media_type: str, where: str) -> InvalidSourceError:
    kind = _UNSUPPORTED.get(media_type, "this")
    return InvalidSourceError(
        f"{where} is a {kind} manifest ({media_type[:100]}), which syncbit does not support: "
        "OCI image manifests and indexes and Docker v2 schema 2 manifests and lists are"
    )


def parse_manifest(body: bytes, content_type: str | None, where: str) -> _Parsed:
    """Parse an image manifest or index (OCI or Docker v2 schema 2). The registry's
    Content-Type and the document's own mediaType must agree where both are given."""
    ctype = (content_type or "").partition(";")[0].strip().lower()
    if ctype in _UNSUPPORTED:
        raise _unsupported(ctype, where)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SourceError(f"{where}: the manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{where}: the manifest is not a JSON object")
    declared = doc.get("mediaType")
    if declared is not None and (not isinstance(declared, str) or not _PRINTABLE.match(declared)):
        raise SourceError(f"{where}: invalid mediaType in the manifest")
    if doc.get("schemaVersion") == 1 or declared in _UNSUPPORTED:
        raise _unsupported(
            declared or "application/vnd.docker.distribution.manifest.v1+json", where
        )
    known = IMAGE_TYPES | INDEX_TYPES
    if declared in known and ctype in known and declared != ctype:
        raise SourceError(
            f"{where}: the registry says {ctype} but the manifest says {declared}: refusing "
            "an ambiguous manifest"
        )
    media_type = declared if declared in known else ctype if ctype in known else ""
    if not media_type:
        if declared or ctype not in ("", "application/json", "application/octet-stream"):
            raise _unsupported(declared or ctype, where)
        # OCI manifests may leave mediaType out: tell them apart by their fields.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if doc.get("schemaVersion") != 2:
        raise SourceError(f"{where}: schemaVersion is not 2")
    if media_type in INDEX_TYPES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise SourceError(f"{where}: the index has no manifests list")
        return _Parsed(media_type, children=[_descriptor(c, where) for c in children])
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise SourceError(f"{where}: the image manifest has no layers list")
    return _Parsed(
        media_type,
        config=_descriptor(doc.get("config"), where),
        layers=[_descriptor(layer, where) for layer in layers],
    )


def _check_digest(body: bytes | bytearray | memoryview, digest: str, what: str) -> None:
    got = hashlib.sha256(body).hexdigest()
    if got != digest.partition(":")[2]:
        raise SourceError(
            f"{what}: the registry's bytes do not match digest {digest} (got sha256:{got})"
        )


# -- the registry client ------------------------------------------------------------------


@dataclass
class _Challenge:
    scheme: str  # "basic" or "bearer"
    params: dict[str, str]


def _parse_challenge(header: str) -> _Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("basic", "bearer"):
        return None
    params = {
        m[1].lower(): m[2] if m[2] is not None else m[3] for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return _Challenge(scheme, params)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _registry_errors(body: bytes) -> str:
    """The error codes of a distribution error body, for messages (never the whole body)."""
    try:
        errors = json.loads(body).get("errors") or []
        codes = [str(e.get("code"))[:40] for e in errors if isinstance(e, dict) and e.get("code")]
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""
    return ", ".join(c for c in codes[:3] if _PRINTABLE.match(c))


class _Pool(Pool):
    """wire.Pool with the registry's TLS context and no redirect following of its own:
    redirects are followed by `RegistryClient` under the registry's rules."""

    def __init__(self, timeout: float, context: Callable[[], ssl.SSLContext]) -> None:
        super().__init__(timeout=timeout)
        self._context = context

    def _ssl(self) -> ssl.SSLContext:
        return self._context()

    def get_once(self, url: str, offset: int, buf: memoryview, headers: dict[str, str]) -> Response:
        return self._get_once(url, offset, buf, headers)


class RegistryClient:
    """The distribution API of one repository, for listing and for reads. Thread-safe;
    blocking (worker threads only).

    Auth: the first request goes out anonymous; a 401's `WWW-Authenticate` says what the
    registry wants (Basic: the credentials; Bearer: a token from its realm, asked with the
    credentials if there are any, for `repository:<name>:pull`), and the request is sent
    once more. Tokens are kept until they expire."""

    def __init__(
        self,
        ref: OciReference,
        insecure: bool,
        ca: str | None,
        timeout: float,
        credentials: Callable[[], Credentials | None],
    ) -> None:
        self.ref = ref
        self.insecure = insecure
        self.ca = ca
        self.scheme = "http" if insecure else "https"
        self.base = f"{self.scheme}://{ref.api_host}"
        self.origin = _origin(self.base)
        self.scope = f"repository:{ref.repository}:pull"
        self._credentials = credentials
        self._creds: Credentials | None = None
        self._creds_read = False
        self._lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._challenge: _Challenge | None = None
        self._token: str | None = None
        self._token_expires = 0.0
        self._context: ssl.SSLContext | None = None
        self._http: httpx.Client | None = None
        self._timeout = timeout
        self._pool = _Pool(timeout, self._tls)

    @property
    def where(self) -> str:
        return f"{self.ref.repository} on registry {self.ref.registry}"

    def _tls(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                context = ssl.create_default_context()
                if self.ca:
                    try:
                        context.load_verify_locations(cafile=self.ca)
                    except (OSError, ssl.SSLError) as exc:
                        raise InvalidSourceError(
                            f"cannot load the CA file {self.ca} for registry "
                            f"{self.ref.registry}: {getattr(exc, 'strerror', None) or exc}"
                        ) from None
                self._context = context
            return self._context

    def _client(self) -> httpx.Client:
        context = self._tls()
        with self._lock:
            if self._http is None:
                self._http = httpx.Client(
                    verify=context,
                    timeout=self._timeout,
                    follow_redirects=False,  # followed by hand, under `_next_hop`'s rules
                    trust_env=False,
                    headers={"Accept-Encoding": "identity"},
                )
            return self._http

    def close(self) -> None:
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()
        self._pool.close()

    # -- auth ---------------------------------------------------------------------------

    def credentials(self) -> Credentials | None:
        with self._lock:
            if not self._creds_read:
                self._creds = self._credentials()
                self._creds_read = True
            return self._creds

    def _valid_token(self) -> str | None:
        """The kept token if it has not expired (caller holds `_lock`)."""
        return self._token if time.monotonic() < self._token_expires else None

    def _authorization(self) -> tuple[str | None, bool]:
        """The Authorization header for the next registry request (None: anonymous), and
        whether it is new (a token fetched just now, or basic credentials)."""
        with self._lock:
            challenge, token = self._challenge, self._valid_token()
        if challenge is None:
            return None, False
        if challenge.scheme == "basic":
            creds = self.credentials()
            return (creds.basic() if creds else None), True
        if token:
            return f"Bearer {token}", False
        with self._token_lock:  # one token request at a time; the others take its token
            with self._lock:
                token = self._valid_token()
            if token:
                return f"Bearer {token}", False
            token, expires_in = self._fetch_token(challenge, self.credentials())
            with self._lock:
                self._token = token
                # Renewed a little early, so that a token does not expire on its way.
                self._token_expires = time.monotonic() + max(10.0, expires_in * 0.9)
        return f"Bearer {token}", True

    def _challenged(self, header: str | None, sent: str | None, fresh: bool) -> None:
        """A 401 from the registry: remember what it asks for (the caller tries again), or
        fail when what was just sent, new, was refused."""
        challenge = _parse_challenge(header or "")
        if challenge is None:
            raise SourceError(
                f"registry {self.ref.registry} refused access to {self.ref.repository} "
                "(HTTP 401) without saying how to authenticate"
            )
        creds = self.credentials()
        if (sent is not None and fresh) or (challenge.scheme == "basic" and creds is None):
            with self._lock:
                self._creds_read = False  # fixed credentials count from the next request on
            raise self._refused(creds, challenge.params.get("error"))
        with self._lock:
            self._challenge = challenge
            if sent is not None and sent == f"Bearer {self._token}":
                self._token = None  # refused before its time: ask for a new one

    def _refused(self, creds: Credentials | None, error: str | None) -> SourceError:
        if creds is None:
            hint = (
                "set SYNCBIT_OCI_REGISTRY, SYNCBIT_OCI_USERNAME and SYNCBIT_OCI_PASSWORD, or "
                "log in to a Docker config.json ($DOCKER_CONFIG or ~/.docker) on this machine"
            )
            env = os.environ
            if (
                env.get("SYNCBIT_OCI_USERNAME")
                and _config_key(env.get("SYNCBIT_OCI_REGISTRY", "")) != self.ref.registry
            ):
                hint = (
                    "SYNCBIT_OCI_USERNAME is set, but SYNCBIT_OCI_REGISTRY does not name "
                    f"{self.ref.registry}"
                )
            return SourceError(
                f"registry {self.ref.registry} requires authentication to pull "
                f"{self.ref.repository} (or it does not exist): {hint}"
            )
        why = " (insufficient scope)" if error == "insufficient_scope" else ""
        return SourceError(
            f"registry {self.ref.registry} refused the credentials from {creds.origin} for "
            f"{self.ref.repository}{why}: wrong user or password, no pull access, or no such "
            "repository"
        )

    def _check_target(self, url: str, where: str, downgrade: bool = True) -> None:
        """A URL the registry sends us to (token realm, redirect) may be followed: http(s)
        without userinfo; plain HTTP only with insecure=true (when `downgrade` says it
        would leave HTTPS); no link-local, multicast or unspecified address literal."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            host = None
        if (
            parts.scheme.lower() not in ("http", "https")
            or not host
            or "@" in parts.netloc
            or not _PRINTABLE.match(url)
        ):
            raise SourceError(f"{where} to an invalid URL {redact_url(url)[:200]!r}: refused")
        if parts.scheme.lower() == "http" and downgrade and not self.insecure:
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

    def _fetch_token(self, challenge: _Challenge, creds: Credentials | None) -> tuple[str, float]:
        realm = challenge.params.get("realm", "")
        self._check_target(realm, f"the token realm of registry {self.ref.registry}")
        params = {"scope": self.scope}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers = {"Authorization": creds.basic()} if creds else {}
        where = f"the token service {redact_url(realm)} of registry {self.ref.registry}"
        log.debug(
            "token for %s from %s (%s)",
            self.where,
            redact_url(realm),
            f"credentials from {creds.origin}" if creds else "anonymous",
        )
        try:
            with self._client().stream("GET", realm, params=params, headers=headers) as resp:
                status = resp.status_code
                body = _read_capped(resp, MAX_TOKEN_BYTES, where)
        except httpx.HTTPError as exc:
            raise _transport(exc, where) from exc
        if status in (401, 403):
            raise (
                self._refused(creds, None)
                if creds
                else SourceError(
                    f"{where} refused an anonymous token for {self.ref.repository}: "
                    "set credentials for it (SYNCBIT_OCI_USERNAME/PASSWORD or config.json)"
                )
            )
        if status in _TEMPORARY or status >= 500:
            raise SourceUnavailableError(f"{where} is unavailable: HTTP {status}")
        if status != 200:
            raise SourceError(f"{where} answered HTTP {status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise SourceError(f"{where} sent an invalid token answer") from None
        if not isinstance(token, str) or not _PRINTABLE.match(token):
            raise SourceError(f"{where} sent no usable token")
        return token, expires_in

    # -- requests -----------------------------------------------------------------------

    def _next_hop(
        self, url: str, location: str, headers: dict[str, str]
    ) -> tuple[str, dict[str, str]]:
        """Where a redirect may go, and with which headers: http(s) only, never from https
        down to http (unless insecure), never to a link-local or unspecified address, and
        without the registry's Authorization once it leaves the registry's host."""
        target = urljoin(url, location)
        where = f"a redirect from registry {self.ref.registry}"
        self._check_target(target, where, downgrade=urlsplit(url).scheme.lower() == "https")
        if _origin(target) != self.origin:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return target, headers

    def manifest(
        self, reference: str, what: str, missing: Callable[[str], SourceError | InvalidSourceError]
    ) -> tuple[bytes, str | None, str | None]:
        """GET a manifest (tag or digest): (body, Content-Type, Docker-Content-Digest).
        A 404 raises `missing(detail)`."""
        url = f"{self.base}/v2/{self.ref.repository}/manifests/{reference}"
        for _ in range(3):  # anonymous, then as challenged, then with a renewed token
            auth, fresh = self._authorization()
            headers = {"Accept": ACCEPT, **({"Authorization": auth} if auth else {})}
            status, resp_headers, body, final = self._get_small(url, headers, what)
            if status == 401 and _origin(final) == self.origin:
                self._challenged(resp_headers.get("www-authenticate"), auth, fresh)
                continue
            break
        codes = _registry_errors(body)
        detail = f" ({codes})" if codes else ""
        if status == 200:
            return body, resp_headers.get("content-type"), resp_headers.get("docker-content-digest")
        if status == 404:
            raise missing(detail)
        if status == 401:
            raise self._refused(self.credentials(), None)
        if status == 403:
            raise SourceError(f"registry {self.ref.registry} denied access to {what}{detail}")
        if status in _TEMPORARY or status >= 500:
            raise SourceUnavailableError(
                f"registry {self.ref.registry} is unavailable: HTTP {status}"
            )
        raise SourceError(f"registry {self.ref.registry} answered HTTP {status} for {what}{detail}")

    def _get_small(
        self, url: str, headers: dict[str, str], what: str
    ) -> tuple[int, httpx.Headers, bytes, str]:
        """A GET of a bounded body (manifests), following redirects under `_next_hop`."""
        client = self._client()
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with client.stream("GET", url, headers=headers) as resp:
                    if resp.status_code in _REDIRECTS and "location" in resp.headers:
                        url, headers = self._next_hop(url, resp.headers["location"], headers)
                        continue
                    body = _read_capped(resp, MAX_MANIFEST_BYTES, what)
                    return resp.status_code, resp.headers, body, url
            except httpx.HTTPError as exc:
                raise _transport(exc, f"registry {self.ref.registry}") from exc
        raise SourceError(f"too many redirects reading {what}")

    def read_blob(self, digest: str, offset: int, buf: memoryview, size: int, what: str) -> None:
        """Bytes [offset, offset+len(buf)) of blob `digest` (of `size` bytes) into `buf`,
        by a ranged GET, following the registry's redirect to its storage."""
        url = f"{self.base}/v2/{self.ref.repository}/blobs/{digest}"
        for _ in range(3):  # anonymous, then as challenged, then with a renewed token
            auth, fresh = self._authorization()
            headers = {"Accept-Encoding": "identity", **({"Authorization": auth} if auth else {})}
            resp, final = self._get_range(url, offset, buf, headers, what)
            if resp.status == 401 and _origin(final) == self.origin:
                self._challenged(resp.headers.get("www-authenticate"), auth, fresh)
                continue
            break
        at_registry = _origin(final) == self.origin
        status = resp.status
        if status == 401:
            raise self._refused(self.credentials(), None)
        if status in (404, 410, 416):
            raise SourceChangedError(f"source changed: {what} is gone (HTTP {status})")
        if status == 403:
            if at_registry:
                raise SourceError(f"registry {self.ref.registry} denied access to {what}")
            # A storage URL whose signature expired: the next try gets a new one.
            raise SourceUnavailableError(f"cannot read {what}: HTTP 403 from blob storage")
        if status in _TEMPORARY or status >= 500:
            raise SourceUnavailableError(f"cannot read {what}: HTTP {status}")
        if status not in (200, 206):
            raise SourceError(f"cannot read {what}: HTTP {status}")
        served = resp.headers.get("docker-content-digest")
        if served and served != digest:
            raise SourceError(f"cannot read {what}: the registry served {served[:80]} instead")
        check_range_body(
            resp,
            offset,
            len(buf),
            size,
            what,
            lambda why: SourceChangedError(f"source changed: {what} is {why}, not {size}"),
        )

    def _get_range(
        self, url: str, offset: int, buf: memoryview, headers: dict[str, str], what: str
    ) -> tuple[Response, str]:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = self._pool.get_once(url, offset, buf, headers)
            except WireError as exc:
                where = urlsplit(url).netloc
                raise _tls_failure(exc, where) or SourceUnavailableError(
                    f"cannot read {what} from {where}: {_scrub(str(exc))}"
                ) from exc
            if resp.status in _REDIRECTS and "location" in resp.headers:
                url, headers = self._next_hop(url, resp.headers["location"], headers)
                continue
            return resp, url
        raise SourceError(f"too many redirects reading {what}")


def _read_capped(resp: httpx.Response, cap: int, what: str) -> bytes:
    body = bytearray()
    for piece in resp.iter_bytes():
        body += piece
        if len(body) > cap:
            raise SourceError(f"{what}: answer larger than {cap} bytes")
    return bytes(body)


_URL_IN_TEXT = re.compile(r"https?://[^\s'\"<>]+", re.IGNORECASE)


def _scrub(text: str) -> str:
    """URLs in a message without query strings (storage URLs carry signatures there)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def _tls_failure(exc: BaseException, where: str) -> SourceError | None:
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


def _transport(exc: httpx.HTTPError, where: str) -> SourceError:
    if isinstance(exc, httpx.TimeoutException):
        return SourceUnavailableError(f"cannot reach {where}: timed out")
    tls = _tls_failure(exc, where)
    if tls is not None:
        return tls
    if isinstance(exc, httpx.TransportError):
        return SourceUnavailableError(
            f"cannot reach {where}: {_scrub(str(exc)) or type(exc).__name__}"
        )
    return SourceError(f"request to {where} failed: {_scrub(str(exc)) or type(exc).__name__}")


# -- the source -------------------------------------------------------------------------------


def _inline(data: bytes) -> str:
    return "data:" + base64.b64encode(data).decode()


def _blob_entry(path: str, digest: str, size: int, locator: str) -> FileEntry:
    hex_digest = digest.partition(":")[2]
    return FileEntry(
        path=path,
        size=size,
        mode=0o444,
        object=identity_digest("sha256", hex_digest),
        locator=locator,
        version={"sha256": hex_digest, "size": str(size)},
    )


class _Walk:
    """One listing: the manifests reachable from the pinned one, as layout files."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.files: dict[str, FileEntry] = {}  # path -> entry
        self.manifests = 0
        self.inline_left = INLINE_BUDGET

    def fetch(
        self, desc: Descriptor | None, reference: str, what: str
    ) -> tuple[bytes, _Parsed, Descriptor]:
        """A manifest by digest (`desc`) or by tag, checked against its digest."""
        self.manifests += 1
        if self.manifests > MAX_MANIFESTS:
            raise InvalidSourceError(f"{what}: more than {MAX_MANIFESTS} manifests in one image")
        body, ctype, served = self.client.manifest(
            reference, what, lambda detail: InvalidSourceError(f"no such image: {what}{detail}")
        )
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if desc is not None:
            _check_digest(body, desc.digest, what)
            if len(body) != desc.size:
                raise SourceError(f"{what}: {len(body)} bytes, the index says {desc.size}")
        if served and served != digest and served.startswith("sha256:"):
            raise SourceError(
                f"{what}: the registry says digest {served[:80]}, its bytes are {digest}"
            )
        parsed = parse_manifest(body, ctype, what)
        if (
            desc is not None
            and desc.media_type in INDEX_TYPES | IMAGE_TYPES
            and desc.media_type != parsed.media_type
        ):
            raise SourceError(
                f"{what}: the index says {desc.media_type}, the manifest is {parsed.media_type}"
            )
        found = Descriptor(parsed.media_type, digest, len(body), desc.platform if desc else None)
        self.add_manifest(found, body)
        return body, parsed, found

    def add_manifest(self, desc: Descriptor, body: bytes) -> None:
        if len(body) <= INLINE_LIMIT and len(body) <= self.inline_left:
            self.inline_left -= len(body)
            locator = _inline(body)
        else:
            locator = f"manifest:{desc.digest}"
        self.add(desc, locator)

    def add(self, desc: Descriptor, locator: str) -> None:
        path = f"blobs/sha256/{desc.hex}"
        if len(self.files) >= MAX_BLOBS:
            raise InvalidSourceError(f"{self.client.ref}: more than {MAX_BLOBS} blobs in one image")
        known = self.files.get(path)
        if known is not None:
            if known.size != desc.size:
                raise SourceError(
                    f"{self.client.where}: blob {desc.digest} is listed with sizes "
                    f"{known.size} and {desc.size}"
                )
            return
        self.files[path] = _blob_entry(path, desc.digest, desc.size, locator)

    def image(self, parsed: _Parsed, what: str) -> None:
        assert parsed.config is not None
        for blob in [parsed.config, *parsed.layers]:
            if blob.foreign:
                raise InvalidSourceError(
                    f"{what} has a foreign layer {blob.digest} ({blob.media_type}) that the "
                    "registry does not hold: choose another platform (-o platform=os/arch)"
                )
            self.add(blob, f"blob:{blob.digest}")

    def everything(self, parsed: _Parsed, what: str, depth: int) -> None:
        """Every manifest, config and layer below an index or image."""
        if not parsed.children:
            if parsed.media_type in IMAGE_TYPES:
                self.image(parsed, what)
            return
        if depth >= MAX_DEPTH:
            raise InvalidSourceError(f"{what}: indexes nested deeper than {MAX_DEPTH}")
        for child in parsed.children:
            if child.media_type in _UNSUPPORTED:
                raise _unsupported(child.media_type, f"{what} -> {child.digest}")
            if child.media_type not in IMAGE_TYPES | INDEX_TYPES:
                raise InvalidSourceError(
                    f"{what} lists {child.digest} of media type {child.media_type[:100]}, "
                    "which syncbit does not support"
                )
            if f"blobs/sha256/{child.hex}" in self.files:
                continue  # listed twice (several indexes name it): walked already
            child_what = self.client.ref.at(child.digest)
            _, sub, _ = self.fetch(child, child.digest, child_what)
            self.everything(sub, child_what, depth + 1)


@register
class OciSource(Source):
    """One image (or multi-platform index) of an OCI registry, as an OCI image layout.

    Options (none secret): `platform` (`os/arch[/variant]`: only that image of an index;
    default: every platform), `insecure` (true: plain HTTP to the registry, token realm
    and redirects; default false: HTTPS only), `ca` (a PEM file on every reading machine,
    trusted in addition to the system's CAs), `timeout` (seconds per request).

    Credentials: see `find_credentials`; read on each machine that lists or reads.

    The revision is the manifest digest the reference resolved to at listing: a new
    listing of the same tag makes a new revision only if that digest changed. Every file
    is addressed by its sha256 (`identity_digest("sha256", hex)`, as HF LFS files are, so
    equal blobs are one object everywhere) and carries it in `version["sha256"]` for the
    whole-object check. Locators: `data:<base64>` (index.json, oci-layout and small
    manifests, served from the dataset manifest itself), `manifest:<digest>` and
    `blob:<digest>` (read from the registry)."""

    schemes = ("oci",)

    def __init__(
        self, uri: str, options: dict[str, Any] | None = None, fences: Fences | None = None
    ) -> None:
        super().__init__(uri, options, fences)
        self.ref = parse_oci_uri(uri)
        unknown = sorted(set(self.options) - OPTION_KEYS)
        if unknown:
            raise InvalidSourceError(
                f"unknown option {unknown[0]!r} for oci:// sources; valid options: "
                + ", ".join(sorted(OPTION_KEYS))
            )
        opts = self.options
        self.insecure = _bool_option(opts.get("insecure", False), "insecure")
        platform = opts.get("platform")
        self.platform = Platform.parse(str(platform)) if platform not in (None, "") else None
        ca = opts.get("ca")
        self.ca = str(ca) if ca not in (None, "") else None
        if self.ca and self.insecure:
            raise InvalidSourceError(
                "OCI options ca and insecure=true exclude each other: insecure=true speaks "
                "plain HTTP to the registry"
            )
        try:
            self.timeout = float(opts.get("timeout", DEFAULT_TIMEOUT))
            if not 0 < self.timeout <= 3600:
                raise ValueError
        except (TypeError, ValueError):
            raise InvalidSourceError(
                f"invalid OCI option timeout={opts.get('timeout')!r}: seconds, 0 < t <= 3600"
            ) from None
        self.client = RegistryClient(
            self.ref,
            self.insecure,
            self.ca,
            self.timeout,
            lambda: find_credentials(self.ref.registry),
        )

    # -- listing ---------------------------------------------------------------------------

    async def list(self) -> Listing:
        result: Listing = await trio.to_thread.run_sync(self._list, **_ABANDON)
        return result

    def _list(self) -> Listing:
        ref = self.ref
        walk = _Walk(self.client)
        what = str(ref)
        _, parsed, top = walk.fetch(None, ref.reference, what)
        if ref.digest and top.digest != ref.digest:
            raise SourceError(f"{what}: the registry's bytes do not match the digest asked for")
        root = top
        if self.platform is not None:
            root = self._choose(walk, parsed, top, what)
        else:
            walk.everything(parsed, what, 0)
        entry: dict[str, Any] = {
            "mediaType": root.media_type,
            "digest": root.digest,
            "size": root.size,
        }
        if root.platform is not None:
            entry["platform"] = root.platform.to_json()
        if ref.tag:
            entry["annotations"] = {REF_NAME: ref.tag}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        index_bytes = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
        files = list(walk.files.values())
        for path, data in (("oci-layout", LAYOUT_BYTES), ("index.json", index_bytes)):
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            files.append(_blob_entry(path, digest, len(data), _inline(data)))
        log.info("listed %s: %s (%d files)", what, root.digest, len(files))
        return Listing(files=sorted(files, key=lambda e: e.path))

    def _choose(self, walk: _Walk, parsed: _Parsed, top: Descriptor, what: str) -> Descriptor:
        """The one image of `platform` under the pinned manifest (it, if it is an image)."""
        want = self.platform
        assert want is not None
        if parsed.media_type in IMAGE_TYPES:
            have = self._image_platform(parsed, what)
            if have is None or not want.matches(have):
                raise InvalidSourceError(
                    f"{what} is a single-platform image for {have or 'an unknown platform'}, "
                    f"not {want}"
                )
            walk.image(parsed, what)
            return Descriptor(top.media_type, top.digest, top.size, have)
        matches = [
            c for c in parsed.children if c.platform is not None and want.matches(c.platform)
        ]
        digests = {c.digest for c in matches}
        if not matches:
            offered = sorted(
                {
                    str(c.platform)
                    for c in parsed.children
                    if c.platform and c.platform.os != "unknown"
                }
            )
            raise InvalidSourceError(
                f"{what} has no image for platform {want}; it has: {', '.join(offered) or 'none'}"
            )
        if len(digests) > 1:
            offered = sorted(str(c.platform) for c in matches)
            raise InvalidSourceError(
                f"{what} has several images for {want} ({', '.join(offered)}): name the variant"
            )
        child = matches[0]
        if child.media_type not in IMAGE_TYPES:
            raise _unsupported(child.media_type, f"{what} -> {child.digest}")
        child_what = self.client.ref.at(child.digest)
        _, sub, found = walk.fetch(child, child.digest, child_what)
        walk.image(sub, child_what)
        return found

    def _image_platform(self, parsed: _Parsed, what: str) -> Platform | None:
        """The platform an image's config names (read from the registry)."""
        config = parsed.config
        assert config is not None
        if config.size > MAX_MANIFEST_BYTES:
            raise SourceError(f"{what}: the image config is larger than {MAX_MANIFEST_BYTES} bytes")
        buf = bytearray(config.size)
        self.client.read_blob(config.digest, 0, memoryview(buf), config.size, f"config of {what}")
        _check_digest(buf, config.digest, f"config of {what}")
        try:
            return Platform.of(json.loads(buf))
        except (ValueError, UnicodeDecodeError):
            raise SourceError(f"{what}: the image config is not JSON") from None

    # -- reads -----------------------------------------------------------------------------

    def read_into(self, entry: FileEntry, offset: int, buf: memoryview) -> None:
        want = len(buf)
        if want == 0:
            return
        size = pinned_size(entry, offset, want)
        expected = entry.version.get("sha256", "")
        kind, _, rest = entry.locator.partition(":")
        what = f"{entry.path} of {self.client.where}"
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise SourceError(f"cannot read {what}: the manifest records no sha256 for it")
        digest = f"sha256:{expected}"
        if kind == "data":
            try:
                data = base64.b64decode(rest, validate=True)
            except binascii.Error:
                raise SourceError(f"cannot read {what}: its inline bytes are not base64") from None
            _check_digest(data, digest, what)
            buf[:] = data[offset : offset + want]
            return
        if rest != digest:
            raise SourceError(f"cannot read {what}: locator and digest disagree")
        if kind == "manifest":
            body, _, _ = self.client.manifest(
                digest,
                what,
                lambda detail: SourceChangedError(f"source changed: {what} is gone{detail}"),
            )
            _check_digest(body, digest, what)
            if len(body) != size:
                raise SourceError(f"cannot read {what}: {len(body)} bytes, listed as {size}")
            buf[:] = body[offset : offset + want]
            return
        if kind != "blob":
            raise SourceError(f"cannot read {what}: unknown locator kind {kind[:20]!r}")
        self.client.read_blob(digest, offset, buf, size, what)
        if offset == 0 and want == size:
            # The whole blob in one read: checked here, before anyone sees a byte of it.
            _check_digest(buf, digest, what)

    def close(self) -> None:
        self.client.close()
