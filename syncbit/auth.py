"""What clients send and servers require: the bearer value (`token_file`, $SYNCBIT_TOKEN),
the client-side TLS settings from the environment, where client commands find services by
default, and the rule that nothing listens beyond loopback without a token.

A `token_file` holds either the cluster secret (the scheduler's; admin wherever it is
known) or a signed credential (`syncbit.credentials`), sent as `Authorization: Bearer`.
Probes (`/healthz`, `/readyz`) and `/metrics` stay open so kubelets and scrapers need
none. Standard library only: client commands (`syncbit wait` in every initContainer)
import this instead of the pydantic config models, which cost ~70 ms of start-up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from syncbit.errors import ConfigError
from syncbit.tls import is_loopback

DEFAULT_SCHEDULER = "http://127.0.0.1:7900"
DEFAULT_DAEMON = "127.0.0.1:7901"  # a daemon's default --listen: where local commands go


def bearer(token: str | None) -> dict[str, str]:
    """The header that carries `token` (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def read_token(path: Path | None) -> str | None:
    """The cluster token in `path` (surrounding whitespace dropped), None without a path."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token_file {path}: {exc.strerror}") from exc
    if not token:
        raise ConfigError(f"token_file {path} is empty")
    return token


def client_token() -> str | None:
    """The token client commands send: $SYNCBIT_TOKEN, else the file $SYNCBIT_TOKEN_FILE."""
    if os.environ.get("SYNCBIT_TOKEN"):
        return os.environ["SYNCBIT_TOKEN"].strip()
    path = os.environ.get("SYNCBIT_TOKEN_FILE")
    return read_token(Path(path)) if path else None


def client_ca() -> Path | None:
    """The CA file client commands trust for https:// services: $SYNCBIT_TLS_CA (else the
    system's CAs)."""
    path = os.environ.get("SYNCBIT_TLS_CA")
    return Path(path) if path else None


def client_tls_name() -> str | None:
    """$SYNCBIT_TLS_NAME: the name a daemon's certificate carries (`peer_tls_name`), checked
    instead of the address dialled (a pod dials its node's IP)."""
    return os.environ.get("SYNCBIT_TLS_NAME") or None


def check_exposure(
    what: str, listen: str, token: str | None, insecure: bool, log: logging.Logger
) -> None:
    """Refuse to serve beyond loopback without a token, unless told `insecure` (then say
    so loudly). Loopback-only without a token stays open: a single-node setup."""
    host = listen.rpartition(":")[0]
    if token is not None or is_loopback(host):
        return
    if not insecure:
        raise ConfigError(
            f"{what} would listen on {listen}, beyond this host, without a token_file: anyone "
            "who reaches it could register nodes, add datasets and read every chunk. Set "
            'token_file (README "Security and reliability"), listen on 127.0.0.1, or pass '
            "--insecure (config `insecure: true`) to run it open anyway"
        )
    log.warning(
        "INSECURE: %s listens on %s without a token_file (--insecure): anyone who reaches "
        "it can register nodes, add and remove datasets and read every chunk",
        what,
        listen,
    )
