"""This node's credentials: what its daemon sends to the scheduler and to its peers, and
the cluster key it checks other nodes' (and readers') credentials with.

What `token_file` holds decides how they are obtained:
- the cluster secret: issued here, locally (this node could issue any credential anyway);
- a bootstrap (or admin) credential: exchanged with the scheduler for this node's own
  credentials (`POST /v1/nodes/<name>/credential`), which then renew themselves;
- a node credential (`syncbit token create --role node --node NAME`): used as it is and
  renewed with itself.
Issued credentials and the cluster's public key are kept in the cache dir (mode 0600), so
a restarted daemon renews its own instead of asking with the bootstrap credential (which
the scheduler refuses for a name that is still up). Never logs a credential.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import trio

from syncbit.credentials import (
    PEER,
    Issuer,
    Principal,
    Role,
    Verifier,
    is_credential,
    peek,
    public_key_from_text,
    public_key_text,
)
from syncbit.errors import ConfigError, SyncbitError, UnauthorizedError, UserError
from syncbit.scheduler.client import SchedulerClient

log = logging.getLogger("syncbit.daemon")

LOCAL_TTL = 24 * 3600.0  # seconds a locally issued node credential is valid


class NodeCredentials:
    """The credentials of node `node`, from `configured` (the token_file's content; None:
    no authentication), kept in `state_file`.

    `token` goes to the scheduler, `peer_token` to peers, `verifier` checks what peers and
    clients send here (None until the cluster's key is known).
    """

    def __init__(
        self,
        node: str,
        configured: str | None,
        state_file: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.configured = configured
        self.state_file = state_file
        self._clock = clock
        self.token: str | None = None
        self.peer_token: str | None = None
        self.expires = 0.0
        self.verifier: Verifier | None = None
        self._issuer: Issuer | None = None
        self._given: Principal | None = None  # what a configured credential claims
        if configured is None:
            return
        if not is_credential(configured):  # the cluster secret
            self._issuer = Issuer(configured, clock)
            self.verifier = self._issuer
            self._issue_locally()
            return
        try:
            given = peek(configured)
        except UserError as exc:
            raise ConfigError(f"token_file: {exc}") from None
        if given.role is Role.READER:
            raise ConfigError(
                "token_file holds a reader credential: a daemon needs a bootstrap or node "
                "credential (syncbit token create --role bootstrap)"
            )
        if given.role is Role.NODE and given.subject != node:
            raise ConfigError(
                f"token_file holds the credential of node {given.subject!r}, but this daemon "
                f"is node {node!r} (--node)"
            )
        self._given = given
        if given.role is Role.NODE:
            self.token = self.peer_token = configured
            self.expires = given.expires
        self._load()

    @property
    def required(self) -> bool:
        """Whether this node checks and sends credentials at all (it has a token_file)."""
        return self.configured is not None

    def due(self) -> bool:
        """Whether to ask for (new) credentials now: none yet, or past half their life."""
        if not self.required:
            return False
        if self.token is None or self.verifier is None:
            return True
        if not self.expires:
            return False
        return self._clock() > self.expires - LOCAL_TTL / 2

    def invalidate(self) -> None:
        """The scheduler refused our credential (expired, or the secret changed): ask
        again with the configured one."""
        if self._issuer is not None or self.configured is None:
            return
        if self._given is not None and self._given.role is Role.NODE:
            self.token = self.peer_token = self.configured
        else:
            self.token = self.peer_token = None
        with contextlib.suppress(OSError):
            self.state_file.unlink()

    async def refresh(self, client: SchedulerClient) -> bool:
        """Obtain or renew this node's credentials; True when they changed.

        Raises SyncbitError when the scheduler cannot issue them now (unreachable; the name
        is up elsewhere: ForbiddenError; the configured credential is refused:
        UnauthorizedError).
        """
        if not self.due():
            return False
        if self._issuer is not None:
            self._issue_locally()
            return True
        assert self.configured is not None
        asks = [t for t in (self.token, self.configured) if t is not None]
        error: SyncbitError | None = None
        for using in dict.fromkeys(asks):  # ours first (renewal), then the configured one
            try:
                doc = await client.credential(self.node, using=using)
            except UnauthorizedError as exc:
                error = exc
                continue
            self._adopt(doc)
            await trio.to_thread.run_sync(self._save)
            return True
        assert error is not None
        raise error

    def _issue_locally(self) -> None:
        assert self._issuer is not None
        self.token, self.expires = self._issuer.issue(Role.NODE, self.node, LOCAL_TTL)
        self.peer_token, _ = self._issuer.issue(Role.NODE, self.node, LOCAL_TTL, PEER)

    def _adopt(self, doc: dict[str, object]) -> None:
        try:
            public = public_key_from_text(str(doc["public_key"]))
        except UserError as exc:
            raise SyncbitError(f"the scheduler sent a bad public key: {exc}") from None
        if self.verifier is None or self.verifier.public != public:
            if self.verifier is not None:
                log.warning("the cluster's key changed: credentials of the old one are refused")
            self.verifier = Verifier(public, clock=self._clock)
        self.token, self.peer_token = str(doc["token"]), str(doc["peer_token"])
        expires = doc["expires"]
        self.expires = float(expires) if isinstance(expires, int | float) else 0.0
        log.info("node credentials of %s issued (key %s)", self.node, self.verifier.key_id)

    def _save(self) -> None:
        """Blocking (a worker thread): keep the issued credentials for the next start
        (0600); failing is only a warning: the next start asks with the configured
        credential."""
        assert self.verifier is not None
        doc = {
            "node": self.node,
            "token": self.token,
            "peer_token": self.peer_token,
            "expires": self.expires,
            "public_key": public_key_text(self.verifier.public),
        }
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(doc))
            tmp.replace(self.state_file)
        except OSError as exc:
            log.warning("cannot keep the node credentials in %s: %s", self.state_file, exc)

    def _load(self) -> None:
        try:
            doc = json.loads(self.state_file.read_text())
            if doc.get("node") != self.node:
                return
            public = public_key_from_text(str(doc["public_key"]))
            token, peer_token = str(doc["token"]), str(doc["peer_token"])
            expires = float(doc["expires"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError, UserError):
            return  # none kept, or unreadable: ask the scheduler
        self.verifier = Verifier(public, clock=self._clock)
        if expires and self._clock() >= expires:
            return  # expired: the key stays useful, the credentials do not
        self.token, self.peer_token, self.expires = token, peer_token, expires


__all__ = ["LOCAL_TTL", "NodeCredentials"]
