"""Registry credentials of the machine that lists or reads: `SYNCBIT_OCI_*` variables for
one named registry, else a Docker config.json. Values never reach a repr, a message or a
log line (only where they were found does), and never go to another registry.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from syncbit.errors import InvalidSourceError
from syncbit.sources.oci.reference import HUB_NAMES


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


def config_key(key: str) -> str:
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
    if user and password and config_key(env.get("SYNCBIT_OCI_REGISTRY", "")) == registry:
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
    names = HUB_NAMES if registry in HUB_NAMES else {registry}
    for key, entry in auths.items():
        if config_key(str(key)) not in names or not isinstance(entry, dict):
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
