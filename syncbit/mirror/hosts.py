"""containerd's registry host files for the mirror: `<certs.d>/<registry>/hosts.toml` with
the mirror as a host for pulls and tag resolution, and the registry itself as the
fallback (`server`); `_default/hosts.toml` for the `"*"` entry (every other registry).

Owns the file's content and writing it (atomically, and never over a file syncbit did not
write: an operator's own hosts.toml stays as it is). Never touches containerd's own
config: containerd reads this directory only when its `config_path` names it.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from syncbit.mirror.config import ANY_REGISTRY, MirrorConfig, UpstreamOptions

__all__ = ["MARK", "hosts_toml", "mirror_url", "server_url", "write_hosts"]

log = logging.getLogger("syncbit.mirror.hosts")

MARK = "# Written by syncbit's registry mirror"
_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def server_url(registry: str, options: UpstreamOptions) -> str:
    """Where containerd reaches `registry` itself (the fallback when the mirror fails)."""
    if registry in _HUB:
        return "https://registry-1.docker.io"
    return f"{'http' if options.insecure else 'https'}://{registry}"


def mirror_url(listen: str) -> str:
    """The URL containerd dials for a mirror listening on `listen` (a wildcard address
    is reached on loopback)."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "[::]", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def hosts_toml(server: str | None, mirrors: list[str]) -> str:
    """The hosts.toml: `mirrors` first (pull and resolve), then `server` (None: the
    registry the image names, as containerd's `_default` directory wants it)."""
    lines = [
        MARK + ": the mirror first, the registry itself as the fallback.",
        "# syncbit rewrites this file; delete the line above to keep your own version.",
    ]
    if server is not None:
        lines.append(f'server = "{server}"')
    for mirror in mirrors:
        lines += ["", f'[host."{mirror}"]', '  capabilities = ["pull", "resolve"]']
        if urlsplit(mirror).scheme == "https":
            lines.append("  skip_verify = true  # the node's own mirror, on loopback")
    return "\n".join(lines) + "\n"


def write_hosts(certs_d: Path, config: MirrorConfig, mirror: str | None = None) -> list[Path]:
    """A hosts.toml under `certs_d` for every registry `config` mirrors (`_default` for
    "*"), pointing at `mirror` (default: the config's listen address). Returns the files
    written; a file syncbit did not write is left alone (and logged)."""
    mirror = mirror or mirror_url(config.listen)
    written = []
    for registry, options in sorted(config.registries.items()):
        if registry == ANY_REGISTRY:
            directory, server = certs_d / "_default", None
        else:
            directory, server = certs_d / registry, server_url(registry, options)
        path = directory / "hosts.toml"
        if path.exists() and not path.read_text(errors="replace").startswith(MARK):
            log.warning("%s was not written by syncbit: left as it is", path)
            continue
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".hosts.toml.{secrets.token_hex(4)}"
        try:
            tmp.write_text(hosts_toml(server, [mirror]))
            os.chmod(tmp, 0o644)
            os.rename(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)
    return written
