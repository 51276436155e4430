"""OCI image references (`oci://host[:port]/repository[:tag][@sha256:<hex>]`), platforms
(`os/arch[/variant]`) and the syntax rules of names and digests. Pure parsing: no I/O,
and nothing read from a registry is trusted here beyond its syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from syncbit.errors import InvalidSourceError
from syncbit.redact import redact_url

_HOST = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)(?::(?P<port>\d{1,5}))?$"
)
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+$")
_PLATFORM_WORD = re.compile(r"^[a-z0-9_.-]{1,32}$")
_PLATFORM = re.compile(r"^[a-z0-9_.-]+/[a-z0-9_.-]+(?:/[a-z0-9_.-]+)?$")
PRINTABLE = re.compile(r"^[\x21-\x7e]+$")  # what may go into a request header or line
# Docker Hub is named docker.io in references; its API lives elsewhere.
HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
HUB_API = "registry-1.docker.io"


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
        return HUB_API if self.registry in HUB_NAMES else self.registry

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
    if at and not DIGEST.match(digest):
        if other_algorithm(digest):
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
    if host.lower() in HUB_NAMES and len(parts) == 1:
        repository = f"library/{repository}"  # Docker Hub's official images
    return OciReference(host.lower(), repository, tag, digest if at else None)


def other_algorithm(digest: str) -> bool:
    """A well-formed digest of another algorithm than sha256 (sha512, blake3...)."""
    return bool(_ANY_DIGEST.match(digest)) and digest.partition(":")[0] != "sha256"


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
