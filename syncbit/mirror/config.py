"""The registry mirror's settings (pydantic, extra='forbid') and the upstream policy: which
registries it mirrors and how it reaches each.

Owns validation only; starts nothing. An upstream is reached over HTTPS with the system's
CAs unless its entry says otherwise; plain HTTP only for an entry that says
`insecure: true`, never for the `"*"` entry (any other registry).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from syncbit.config import Address, Size
from syncbit.errors import InvalidSourceError, RegistryError
from syncbit.sources.oci import parse_oci_uri

__all__ = ["ANY_REGISTRY", "MirrorConfig", "UpstreamOptions"]

ANY_REGISTRY = "*"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpstreamOptions(_Strict):
    """How the mirror reaches one upstream registry."""

    insecure: bool = Field(False, description="plain HTTP to this registry (and its realm)")
    ca: Path | None = Field(None, description="PEM CA trusted for it, besides the system's")
    timeout: float = Field(30.0, gt=0, le=3600, description="seconds per request")

    @model_validator(mode="after")
    def _ca_or_insecure(self) -> UpstreamOptions:
        if self.ca is not None and self.insecure:
            raise ValueError("ca and insecure exclude each other (insecure is plain HTTP)")
        return self


def registry_host(text: str) -> str:
    """A registry as image references name it (host[:port]), lowercased; ValueError else."""
    try:
        return parse_oci_uri(f"oci://{text}/x").registry
    except InvalidSourceError:
        raise ValueError(f"not a registry host[:port]: {text[:100]!r}") from None


class MirrorConfig(_Strict):
    """`syncbit mirror` settings (the daemon's `mirror:` section once it is wired in)."""

    listen: Address = Field("127.0.0.1:5050", description="loopback unless you mean it")
    cache_dir: Path = Path("/var/lib/syncbit/mirror")
    cache_size: Size = Field(20 * 2**30, gt=0, description="bytes of verified content kept")
    registries: dict[str, UpstreamOptions] = Field(
        default_factory=lambda: {ANY_REGISTRY: UpstreamOptions.model_validate({})},
        description='registries mirrored, host[:port] -> options; "*": any other (HTTPS)',
    )
    default_registry: str | None = Field(
        None, description="upstream of requests without ?ns= (CRI-O, plain clients)"
    )
    max_requests: int = Field(256, ge=1, description="requests served at once; more: 429")
    fetch_concurrency: int = Field(8, ge=1, description="upstream requests at once")
    log_level: str = "info"

    @field_validator("registries")
    @classmethod
    def _hosts(cls, value: dict[str, UpstreamOptions]) -> dict[str, UpstreamOptions]:
        checked = {}
        for host, options in value.items():
            if host == ANY_REGISTRY:
                if options.insecure:
                    raise ValueError('"*" may not be insecure: name each plain-HTTP registry')
                checked[host] = options
            else:
                checked[registry_host(host)] = options
        return checked

    @field_validator("default_registry")
    @classmethod
    def _default(cls, value: str | None) -> str | None:
        return None if value is None else registry_host(value)

    def upstream(self, registry: str) -> UpstreamOptions:
        """The options for `registry`; RegistryError if this mirror does not serve it."""
        options = self.registries.get(registry) or self.registries.get(ANY_REGISTRY)
        if options is None:
            raise RegistryError(
                f"registry {registry} is not mirrored here (mirrored: "
                f"{', '.join(sorted(self.registries)) or 'none'})",
                "NAME_UNKNOWN",
                404,
            )
        try:
            address = ipaddress.ip_address(urlsplit(f"//{registry}").hostname or "")
        except ValueError:
            return options
        if address.is_link_local or address.is_unspecified or address.is_multicast:
            raise RegistryError(
                f"registry {registry}: link-local and unspecified addresses are refused",
                "NAME_UNKNOWN",
                404,
            )
        return options
