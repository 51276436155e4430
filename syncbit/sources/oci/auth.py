"""Registry auth for one repository: anonymous first, then what a 401's `WWW-Authenticate`
asks (Basic credentials, or a Bearer token from its realm, kept until it expires).
Thread-safe. Never puts a credential or a token in a message or log, only their origin.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from syncbit.errors import SourceError, SourceUnavailableError
from syncbit.redact import redact_url
from syncbit.sources.oci.credentials import Credentials, config_key
from syncbit.sources.oci.reference import PRINTABLE, OciReference
from syncbit.sources.oci.transport import TEMPORARY, check_target, read_capped, transport_error

log = logging.getLogger("syncbit.sources.oci")

MAX_TOKEN_BYTES = 64 * 1024
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


@dataclass
class Challenge:
    """What a registry's 401 asked for."""

    scheme: str  # "basic" or "bearer"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """A `WWW-Authenticate` header's Basic or Bearer challenge; None for any other scheme."""
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("basic", "bearer"):
        return None
    params = {
        m[1].lower(): m[2] if m[2] is not None else m[3] for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return Challenge(scheme, params)


class RegistryAuth:
    """The Authorization header of the next request to one repository's registry, and
    what a 401 teaches. `http` is the client that asks a token realm (its redirects not
    followed); `insecure` allows a plain-HTTP realm.

    The first request goes out anonymous; a 401's `WWW-Authenticate` says what the
    registry wants (Basic: the credentials; Bearer: a token from its realm, asked with the
    credentials if there are any, for `repository:<name>:pull`), and the request is sent
    once more. Tokens are kept until they expire."""

    def __init__(
        self,
        ref: OciReference,
        insecure: bool,
        credentials: Callable[[], Credentials | None],
        http: Callable[[], httpx.Client],
    ) -> None:
        self.ref = ref
        self.insecure = insecure
        self.scope = f"repository:{ref.repository}:pull"
        self._http = http
        self._credentials = credentials
        self._creds: Credentials | None = None
        self._creds_read = False
        self._lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._token: str | None = None
        self._token_expires = 0.0

    def credentials(self) -> Credentials | None:
        """This machine's credentials for the registry, read once (again after a refusal)."""
        with self._lock:
            if not self._creds_read:
                self._creds = self._credentials()
                self._creds_read = True
            return self._creds

    def _valid_token(self) -> str | None:
        """The kept token if it has not expired (caller holds `_lock`)."""
        return self._token if time.monotonic() < self._token_expires else None

    def authorization(self) -> tuple[str | None, bool]:
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

    def challenged(self, header: str | None, sent: str | None, fresh: bool) -> None:
        """A 401 from the registry: remember what it asks for (the caller tries again), or
        fail when what was just sent, new, was refused."""
        challenge = parse_challenge(header or "")
        if challenge is None:
            raise SourceError(
                f"registry {self.ref.registry} refused access to {self.ref.repository} "
                "(HTTP 401) without saying how to authenticate"
            )
        creds = self.credentials()
        if (sent is not None and fresh) or (challenge.scheme == "basic" and creds is None):
            with self._lock:
                self._creds_read = False  # fixed credentials count from the next request on
            raise self.refused(creds, challenge.params.get("error"))
        with self._lock:
            self._challenge = challenge
            if sent is not None and sent == f"Bearer {self._token}":
                self._token = None  # refused before its time: ask for a new one

    def refused(self, creds: Credentials | None, error: str | None) -> SourceError:
        """The error for a registry that refused `creds` (None: refused anonymous access)."""
        if creds is None:
            hint = (
                "set SYNCBIT_OCI_REGISTRY, SYNCBIT_OCI_USERNAME and SYNCBIT_OCI_PASSWORD, or "
                "log in to a Docker config.json ($DOCKER_CONFIG or ~/.docker) on this machine"
            )
            env = os.environ
            if (
                env.get("SYNCBIT_OCI_USERNAME")
                and config_key(env.get("SYNCBIT_OCI_REGISTRY", "")) != self.ref.registry
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

    def _fetch_token(self, challenge: Challenge, creds: Credentials | None) -> tuple[str, float]:
        """A token from the challenge's realm, and its lifetime in seconds."""
        realm = challenge.params.get("realm", "")
        check_target(realm, f"the token realm of registry {self.ref.registry}", self.insecure)
        params = {"scope": self.scope}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers = {"Authorization": creds.basic()} if creds else {}
        where = f"the token service {redact_url(realm)} of registry {self.ref.registry}"
        log.debug(
            "token for %s from %s (%s)",
            f"{self.ref.repository} on registry {self.ref.registry}",
            redact_url(realm),
            f"credentials from {creds.origin}" if creds else "anonymous",
        )
        try:
            with self._http().stream("GET", realm, params=params, headers=headers) as resp:
                status = resp.status_code
                body = read_capped(resp, MAX_TOKEN_BYTES, where)
        except httpx.HTTPError as exc:
            raise transport_error(exc, where) from exc
        if status in (401, 403):
            raise (
                self.refused(creds, None)
                if creds
                else SourceError(
                    f"{where} refused an anonymous token for {self.ref.repository}: "
                    "set credentials for it (SYNCBIT_OCI_USERNAME/PASSWORD or config.json)"
                )
            )
        if status in TEMPORARY or status >= 500:
            raise SourceUnavailableError(f"{where} is unavailable: HTTP {status}")
        if status != 200:
            raise SourceError(f"{where} answered HTTP {status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise SourceError(f"{where} sent an invalid token answer") from None
        if not isinstance(token, str) or not PRINTABLE.match(token):
            raise SourceError(f"{where} sent no usable token")
        return token, expires_in
