"""The shared cluster token (`token_file`): who may talk to schedulers and peers.

One secret for the whole cluster, sent as `Authorization: Bearer <token>`. Probes
(`/healthz`, `/readyz`) and `/metrics` stay open so kubelets and scrapers need no secret.
"""

from __future__ import annotations

import hmac


def bearer(token: str | None) -> dict[str, str]:
    """The header that carries `token` (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_bearer(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>` with the right token, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )
