"""The shared cluster token (`token_file`): who may talk to schedulers and peers, and where
client commands find them by default.

One secret for the whole cluster, sent as `Authorization: Bearer <token>`. Probes
(`/healthz`, `/readyz`) and `/metrics` stay open so kubelets and scrapers need no secret.
Standard library only: client commands (`syncbit wait` in every initContainer) import this
instead of the pydantic config models, which cost ~70 ms of start-up.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from syncbit.errors import ConfigError

DEFAULT_SCHEDULER = "http://127.0.0.1:7900"
DEFAULT_DAEMON = "127.0.0.1:7901"  # a daemon's default --listen: where local commands go


def bearer(token: str | None) -> dict[str, str]:
    """The header that carries `token` (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_bearer(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>` with the right token, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


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
