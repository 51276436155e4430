"""Signed credentials: who a request comes from (a role and, for a node, its name), issued
from the cluster secret and verified anywhere with the matching public key.

A credential is `sb1.<payload>.<signature>` (base64url, no padding): the payload is JSON
{"r": role, "s": subject, "e": expiry (0: none), "a": audience ("" or "peer"), "k": key id}
and the signature is Ed25519 over the bytes "sb1.<payload>". The signing key is derived
from the cluster secret with HKDF-SHA256, so every scheduler replica with the same secret
issues and accepts the same credentials, while daemons hold only the public key: they can
check a peer's credential and cannot mint one. The cluster secret itself, sent as a bearer
token, stands for the admin role where it is known (the scheduler).

This module never logs, stores or returns a credential; callers decide where one goes.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from syncbit.errors import UnauthorizedError, UserError

PREFIX = "sb1."
PEER = "peer"  # the audience of the credential a node sends to other nodes
_MAX_LENGTH = 2048  # longer bearer values are refused before any decoding
_MAX_SUBJECT = 255  # a node name (the scheduler's Name constraint)
# Verified credentials remembered (a verify costs ~0.1 ms of CPU; an entry ~0.5 KiB). More
# than the nodes of the largest cluster: each node's requests come round once per
# heartbeat, so a smaller LRU than the node count misses on every request.
_CACHE = 16384
_HKDF_INFO = b"syncbit credential signing key v1"


class Role(enum.StrEnum):
    """What a credential may do; see `allows`."""

    ADMIN = "admin"  # datasets, assignments, labels, issuing credentials: everything
    NODE = "node"  # heartbeats, chunk reports, claims, chunk transfers for its own name
    READER = "reader"  # status, progress, `syncbit wait`: reads only
    BOOTSTRAP = "bootstrap"  # exchanged once for a node credential, nothing else


@dataclass(frozen=True)
class Principal:
    """The verified sender of a request."""

    role: Role
    subject: str = ""  # the node name of a node credential
    audience: str = ""  # "peer": valid on the peer API only
    expires: float = 0.0  # unix seconds; 0: never

    def allows(self, *roles: Role) -> bool:
        """Whether this principal has one of `roles`; admin has every role, a node also
        reads what a reader may."""
        if self.role is Role.ADMIN:
            return True
        return self.role in roles or (self.role is Role.NODE and Role.READER in roles)

    def describe(self) -> str:
        return f"{self.role.value}:{self.subject}" if self.subject else self.role.value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public: bytes) -> str:
    """A short name of a public key, carried in credentials: says "issued by another
    cluster secret" instead of a bare "bad signature"."""
    return hashlib.sha256(public).hexdigest()[:16]


def signing_key(secret: str) -> Ed25519PrivateKey:
    """The Ed25519 key every holder of the cluster secret derives the same way."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"syncbit", info=_HKDF_INFO).derive(
        secret.encode()
    )
    return Ed25519PrivateKey.from_private_bytes(seed)


def is_credential(value: str) -> bool:
    """Whether `value` has the shape of a signed credential (else: a raw secret)."""
    return value.startswith(PREFIX) and value.count(".") == 2


def peek(token: str) -> Principal:
    """The claims of a credential WITHOUT checking its signature: for a daemon to learn
    what its own `token_file` holds. Never an authorization decision."""
    try:
        _, payload, _ = token.split(".")
        return _principal(json.loads(_unb64(payload)))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"not a syncbit credential: {exc}") from None


def _principal(doc: Mapping[str, object]) -> Principal:
    role = Role(str(doc["r"]))
    subject = str(doc.get("s") or "")
    expires = doc.get("e") or 0
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise ValueError("bad expiry")
    if (role is Role.NODE) != bool(subject) or len(subject) > _MAX_SUBJECT:
        raise ValueError("a node credential names one node; no other role names any")
    return Principal(role, subject, str(doc.get("a") or ""), float(expires))


class Verifier:
    """Checks credentials against one public key (and, on a holder of the cluster
    secret, the secret itself as the admin credential).

    Thread-safe; verified credentials are remembered (bounded) so a busy peer or
    scheduler pays the signature check once per credential, not once per request.
    """

    def __init__(
        self,
        public: bytes,
        secret: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.public = public
        self.key_id = key_id(public)
        self._key = Ed25519PublicKey.from_public_bytes(public)
        self._secret = secret.encode() if secret is not None else None
        self._clock = clock
        self._seen: OrderedDict[str, Principal] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, token: str) -> Principal:
        """The principal `token` proves; UnauthorizedError says why not."""
        if self._secret is not None and hmac.compare_digest(token.encode(), self._secret):
            return Principal(Role.ADMIN)
        with self._lock:
            principal = self._seen.get(token)
            if principal is not None:
                self._seen.move_to_end(token)
        if principal is None:
            principal = self._check(token)
            with self._lock:
                self._seen[token] = principal
                if len(self._seen) > _CACHE:
                    self._seen.popitem(last=False)
        if principal.expires and self._clock() > principal.expires:
            raise UnauthorizedError(
                f"{principal.describe()} credential expired at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(principal.expires))}"
            )
        return principal

    def _check(self, token: str) -> Principal:
        if len(token) > _MAX_LENGTH or not is_credential(token):
            raise UnauthorizedError("missing or wrong cluster token (see token_file)")
        _, payload, signature = token.split(".")
        try:
            doc = json.loads(_unb64(payload))
            sig = _unb64(signature)
            if not isinstance(doc, dict):
                raise ValueError("payload is not an object")
        except ValueError:
            raise UnauthorizedError("malformed credential") from None
        try:
            self._key.verify(sig, (PREFIX + payload).encode())
        except InvalidSignature:
            other = doc.get("k")
            if isinstance(other, str) and other != self.key_id:
                raise UnauthorizedError(
                    f"credential issued for another cluster secret (key {other[:16]}, this "
                    f"cluster's is {self.key_id}): issue a new one"
                ) from None
            raise UnauthorizedError("credential signature does not verify") from None
        try:
            return _principal(doc)
        except (ValueError, TypeError, KeyError):
            raise UnauthorizedError("malformed credential") from None


class Issuer(Verifier):
    """A holder of the cluster secret: verifies as `Verifier` and issues credentials."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time) -> None:
        self._private = signing_key(secret)
        public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        super().__init__(public, secret, clock)

    def issue(
        self, role: Role, subject: str = "", ttl: float | None = None, audience: str = ""
    ) -> tuple[str, float]:
        """A credential for `role` (a node's names `subject`), valid `ttl` seconds (None:
        until the cluster secret changes), and its expiry (0: none)."""
        expires = 0 if ttl is None else int(self._clock() + ttl)
        doc = {"r": role.value, "s": subject, "e": expires, "a": audience, "k": self.key_id}
        _principal(doc)  # the same rules as when it comes back
        payload = _b64(json.dumps(doc, separators=(",", ":")).encode())
        signature = self._private.sign((PREFIX + payload).encode())
        return f"{PREFIX}{payload}.{_b64(signature)}", float(expires)


def public_key_text(public: bytes) -> str:
    return _b64(public)


def public_key_from_text(text: str) -> bytes:
    try:
        raw = _unb64(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise UserError("not an Ed25519 public key")
    return raw


__all__ = [
    "PEER",
    "Issuer",
    "Principal",
    "Role",
    "Verifier",
    "is_credential",
    "key_id",
    "peek",
    "public_key_from_text",
    "public_key_text",
    "signing_key",
]
