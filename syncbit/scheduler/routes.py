"""The scheduler API's routes: which method and path go where, how large a body each may
bring, who may call it (`RULES`), and the authorization of a request from its headers.

Pure: a request is routed and authorized from its method, path and Authorization header
alone, before a byte of its body is read. A route missing from `RULES` is admin-only
(tests/test_auth.py fails first): new routes are closed until someone decides who may
call them. The error <-> HTTP status mapping of the answers is `status_of`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from syncbit.credentials import PEER, Issuer, Principal, Role
from syncbit.errors import (
    ForbiddenError,
    MethodNotAllowedError,
    NotFoundError,
    UnauthorizedError,
)
from syncbit.scheduler.bodies import (
    CHUNKS_BODY,
    HEARTBEAT_BODY,
    NO_BODY,
    SMALL_BODY,
    TRACE_BODY,
)


@dataclass(frozen=True)
class Rule:
    """Who may call a route (admin always may). `own` binds a node credential to the node
    the request acts for: "path" is the node name in the path (`/v1/nodes/<name>/...`), any
    other value a field of the JSON body."""

    roles: tuple[Role, ...] = ()
    own: str = ""


OPEN = None  # probes: no credential needed
RULES: dict[str, Rule | None] = {
    "healthz": OPEN,
    "readyz": OPEN,
    "nodes": Rule((Role.READER,)),
    "heartbeat": Rule((Role.NODE,), own="path"),
    "leave": Rule((Role.NODE,), own="path"),
    "credential": Rule((Role.NODE, Role.BOOTSTRAP), own="path"),
    "labels": Rule(),
    "plan": Rule((Role.NODE,), own="path"),
    "assignments": Rule((Role.READER,)),
    "add_targets": Rule(),
    "remove_targets": Rule(),
    "claim": Rule((Role.NODE,), own="node"),
    "register_object": Rule((Role.NODE,), own="node"),
    "release": Rule((Role.NODE,), own="node"),
    "chunks": Rule((Role.NODE,), own="path"),
    "datasets": Rule((Role.READER,)),
    "add_dataset": Rule(),
    "manifest": Rule((Role.READER,)),
    "remove_dataset": Rule(),
    "chunk_map": Rule((Role.NODE,)),
    "updates": Rule((Role.NODE,)),
    "report": Rule((Role.NODE,), own="reporter"),
    "status": Rule((Role.READER,)),
    "generation": Rule((Role.READER,)),
    "issue": Rule(),
    "check": Rule((Role.NODE,), own="node"),
    "lift_quarantine": Rule(),
    "trace": Rule((Role.READER,)),
    "put_trace": Rule((Role.NODE,), own="node"),
}

# Body limits by route; a route not listed takes no body.
BODY_LIMITS = {
    "heartbeat": HEARTBEAT_BODY,
    "labels": SMALL_BODY,
    "add_targets": SMALL_BODY,
    "remove_targets": SMALL_BODY,
    "claim": SMALL_BODY,
    "register_object": SMALL_BODY,
    "release": SMALL_BODY,
    "chunks": CHUNKS_BODY,
    "add_dataset": SMALL_BODY,
    "report": SMALL_BODY,
    "credential": SMALL_BODY,
    "issue": SMALL_BODY,
    "check": SMALL_BODY,
    "put_trace": TRACE_BODY,
}


@dataclass(frozen=True)
class Route:
    """Where a request goes, and how large a body it may bring."""

    name: str
    body_limit: int = NO_BODY
    rule: Rule | None = field(default_factory=Rule)


def _table(seg: list[str]) -> dict[str, str]:
    match seg:
        case ["healthz"]:
            return {"GET": "healthz"}
        case ["readyz"]:
            return {"GET": "readyz"}
        case ["v1", "nodes"]:
            return {"GET": "nodes"}
        case ["v1", "nodes", _]:
            return {"PUT": "heartbeat"}
        case ["v1", "nodes", _, "labels"]:
            return {"POST": "labels"}
        case ["v1", "nodes", _, "leave"]:
            return {"POST": "leave"}
        case ["v1", "nodes", _, "plan"]:
            return {"GET": "plan"}
        case ["v1", "nodes", _, "credential"]:
            return {"POST": "credential"}
        case ["v1", "nodes", _, "quarantine"]:
            return {"DELETE": "lift_quarantine"}
        case ["v1", "nodes", _, "chunks"]:
            return {"POST": "chunks"}
        case ["v1", "tokens"]:
            return {"POST": "issue"}
        case ["v1", "assignments"]:
            return {"GET": "assignments"}
        case ["v1", "datasets"]:
            return {"GET": "datasets", "POST": "add_dataset"}
        case ["v1", "datasets", _]:
            return {"GET": "manifest", "DELETE": "remove_dataset"}
        case ["v1", "datasets", _, "trace"]:
            return {"GET": "trace", "PUT": "put_trace"}
        case ["v1", "datasets", _, "targets"]:
            return {"POST": "add_targets", "DELETE": "remove_targets"}
        case ["v1", "objects", _, "claims"]:
            return {"POST": "claim"}
        case ["v1", "objects", _, "geometry"]:
            return {"POST": "register_object"}
        case ["v1", "objects", _, "release"]:
            return {"POST": "release"}
        case ["v1", "objects", _, "checks"]:
            return {"POST": "check"}
        case ["v1", "objects", _, "chunks"]:
            return {"GET": "chunk_map"}
        case ["v1", "objects", _, "updates"]:
            return {"GET": "updates"}
        case ["v1", "reports"]:
            return {"POST": "report"}
        case ["v1", "status"]:
            return {"GET": "status"}
        case ["v1", "generation"]:
            return {"GET": "generation"}
    return {}


def route_of(method: str, seg: list[str]) -> Route:
    """The route of a request, from its method and path alone: NotFoundError for an
    unknown path, MethodNotAllowedError for a method the path does not take."""
    table = _table(seg)
    if not table:
        raise NotFoundError(f"no such endpoint: /{'/'.join(seg)}")
    if method not in table:
        allow = tuple(sorted(table))
        raise MethodNotAllowedError(
            f"{method} not allowed on /{'/'.join(seg)} (allowed: {', '.join(allow)})", allow
        )
    name = table[method]
    return Route(name, BODY_LIMITS.get(name, NO_BODY), RULES.get(name, Rule()))


def _bearer_value(header: str | None) -> str | None:
    scheme, _, value = (header or "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def authorize(
    issuer: Issuer | None, method: str, seg: list[str], header: str | None
) -> Principal | None:
    """Who sends this request, and whether they may call the route; None without a cluster
    secret (or for a probe). Body-bound rules are checked by `check_owner`.

    Raises UnauthorizedError (401) for a missing or bad credential, before the route is
    even looked up; NotFoundError (404) or MethodNotAllowedError (405) for an unknown
    route; ForbiddenError (403) for a role or node that may not call it.
    """
    if issuer is None or seg in (["healthz"], ["readyz"]):
        return None
    value = _bearer_value(header)
    if value is None:
        raise UnauthorizedError("missing or wrong cluster token (see token_file)")
    principal = issuer.verify(value)
    if principal.audience == PEER:
        raise UnauthorizedError("this credential is for the peer API only")
    rule = route_of(method, seg).rule
    if rule is None:
        return principal
    if not principal.allows(*rule.roles):
        raise ForbiddenError(
            f"a {principal.role.value} credential may not {method} /{'/'.join(seg)}"
        )
    if rule.own == "path":
        check_owner(principal, seg[2])
    return principal


def check_owner(principal: Principal | None, node: Any) -> None:
    """A node's credential acts for its own node only."""
    if principal is not None and principal.role is Role.NODE and node != principal.subject:
        raise ForbiddenError(
            f"the credential of node {principal.subject} may not act for node {node}"
        )


__all__ = [
    "OPEN",
    "RULES",
    "Route",
    "Rule",
    "authorize",
    "check_owner",
    "route_of",
]
