"""An async etcd v3 client for trio, spoken over etcd's own JSON gateway with httpx.

Owns the wire format (base64 keys and values, 64-bit integers as strings, the gateway's two
error shapes), endpoint failover, timeouts, etcd authentication, and the mapping of every
etcd and transport failure onto syncbit's errors. It must never resend a write whose
outcome is unknown, never return an unbounded range, and never block the trio loop.

Why the gateway and not a client library: etcd serves its v3 API as JSON over HTTP on the
client port (`/v3/kv/range`, `/v3/kv/txn`, `/v3/lease/...`, `/v3/watch` as a stream of
JSON lines) in every 3.4+ release; httpx is already a dependency and runs on trio. The
Python libraries are unmaintained (python-etcd3: last release 2020, breaks on current
protobuf) or asyncio-only (aetcd), and bring a gRPC stack for what fits in this module.
Limits of the gateway, and what this module does about them:

- Bidirectional streams are one request each: a keep-alive is one POST, a watch is one
  POST whose response streams; so each watch holds one HTTP connection.
- A watch never ends by itself when its member loses the cluster; every request carries
  gRPC metadata `hasleader` (header `Grpc-Metadata-hasleader`), so a member without a
  leader refuses at once (a write is then safe to send elsewhere) and cancels its watches,
  and a watch silent for `idle_timeout` is reopened (a stopped member answers nothing).
- Requests are limited by the server's `--max-request-bytes` (1.5 MiB by default): a
  larger put fails with `StateLimitError`; `syncbit.scheduler.kv_etcd` splits big values.

Failover: the endpoint that answered last is tried first. A failure that proves the
request was not processed (connection refused, "no leader", "too many requests") moves to
the next endpoint at once, passes repeat with a short backoff until the call's `timeout`;
a read is also retried after a timeout or a dropped connection, a write never is (its
outcome is unknown: `StateUnavailableError` says so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from syncbit.errors import (
    ConfigError,
    LeaseExpiredError,
    SchedulerError,
    StateUnavailableError,
)
from syncbit.retry import backoff_delays
from syncbit.scheduler.etcd_watch import Watch
from syncbit.scheduler.etcd_wire import (
    DEFAULT_PAGE,
    MAX_PAGE,
    Compare,
    DeleteOp,
    DeleteResult,
    Event,
    EventType,
    Failed,
    KeyValue,
    Lease,
    Op,
    Order,
    Outcome,
    PutOp,
    PutResult,
    RangeOp,
    RangeResult,
    Target,
    TxnResult,
    WatchBatch,
    b64,
    check_limit,
    classify,
    gateway_error,
    parse_endpoints,
    prefix_end,
    raise_permanent,
    range_result,
)

# What the rest of syncbit imports from here: the client and the wire format it speaks.
__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "Compare",
    "DeleteOp",
    "DeleteResult",
    "EtcdClient",
    "Event",
    "EventType",
    "KeyValue",
    "Lease",
    "Op",
    "Order",
    "PutOp",
    "PutResult",
    "RangeOp",
    "RangeResult",
    "Target",
    "TxnResult",
    "Watch",
    "WatchBatch",
    "parse_endpoints",
    "prefix_end",
]

log = logging.getLogger("syncbit.etcd")

# Sent with every request but stale reads: a member without a raft leader refuses at once
# (instead of after its own 5-7 s request timeout) and cancels the watches it serves.
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}


class _Body(httpx.AsyncByteStream):
    """A request body that is an iterator object, not an async generator.

    httpx's own body streams are async generators; a request cancelled while its body is
    being sent leaves one suspended for the garbage collector to finalise, and trio
    warns. This one holds no frame: nothing is left behind."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


# -- the client ------------------------------------------------------------------------------


class EtcdClient:
    """A client of one etcd cluster through several endpoints (see the module docstring).

    Args:
        endpoints: base URLs (`http://host:2379`), or one `etcd://h1:2379,h2:2379` string.
        timeout: seconds one call may take in all, over every endpoint and retry.
        attempt_timeout: seconds one endpoint gets to answer before a read moves on.
        connect_timeout: seconds to connect to one endpoint.
        username, password: etcd's own authentication (a token is fetched and renewed).
        ca_file, cert_file, key_file: TLS: the CA that signed the servers' certificates,
            and a client certificate and key when etcd wants one.
        transport: an httpx transport (tests); the default is httpx's own.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        timeout: float = 5.0,
        attempt_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        urls = parse_endpoints(endpoints) if isinstance(endpoints, str) else list(endpoints)
        if not urls:
            raise ConfigError("etcd: no endpoints given")
        self.endpoints = [u.rstrip("/") for u in urls]
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.connect_timeout = min(connect_timeout, attempt_timeout)
        self.username = username
        self._password = password
        if (username is None) != (password is None):
            raise ConfigError("etcd: give both a username and a password, or neither")
        verify: ssl.SSLContext | bool = True
        if ca_file is not None or cert_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
                if cert_file is not None:
                    verify.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"etcd TLS files: {exc}") from exc
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(attempt_timeout, connect=self.connect_timeout),
            verify=verify,
            transport=transport,
            trust_env=False,  # etcd is reached directly; never through a proxy from the env
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
        )
        self._current = 0
        self._token: str | None = None
        self._auth_lock = trio.Lock()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- plumbing ------------------------------------------------------------------------------

    def _rotation(self) -> list[str]:
        n = len(self.endpoints)
        return [self.endpoints[(self._current + i) % n] for i in range(n)]

    def _headers(self, stale_ok: bool) -> dict[str, str]:
        headers = {} if stale_ok else dict(_REQUIRE_LEADER)
        if self._token is not None:
            headers["Authorization"] = self._token
        return headers

    def _request(
        self, url: str, body: dict[str, Any], headers: dict[str, str], timeout: httpx.Timeout
    ) -> httpx.Request:
        request = self._http.build_request(
            "POST",
            url,
            content=json.dumps(body).encode(),
            headers={**headers, "Content-Type": "application/json"},
            timeout=timeout,
        )
        request.stream = _Body(request.content)
        return request

    async def _attempt(
        self,
        endpoint: str,
        path: str,
        body: dict[str, Any],
        *,
        stale_ok: bool,
        what: str,
        read_timeout: float,
    ) -> dict[str, Any] | Failed:
        """One POST to one endpoint: the answer, or how it failed (permanent errors raise)."""
        resp: httpx.Response | None = None
        request = self._request(
            endpoint + path,
            body,
            self._headers(stale_ok),
            httpx.Timeout(read_timeout, connect=self.connect_timeout),
        )
        # httpx bounds each socket operation; this bounds the attempt as a whole.
        with trio.move_on_after(self.connect_timeout + read_timeout):
            try:
                resp = await self._http.send(request)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                return Failed(Outcome.REFUSED, f"cannot connect: {exc or type(exc).__name__}")
            except httpx.TimeoutException:
                pass
            except httpx.HTTPError as exc:
                return Failed(Outcome.UNKNOWN, f"{type(exc).__name__}: {exc}")
        if resp is None:
            return Failed(Outcome.UNKNOWN, f"no answer within {read_timeout:.3g}s")
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.status_code == 404 and doc is None:
            raise SchedulerError(
                f"{endpoint} does not serve etcd's v3 JSON API ({path} not found): "
                "etcd 3.4 or later is needed"
            )
        error = gateway_error(doc)
        if error is None and resp.status_code == 200 and isinstance(doc, dict):
            return doc
        code, message = error or (2, f"HTTP {resp.status_code}: {resp.text[:200]}")
        raise_permanent(code, message, what, self.username)
        return classify(code, message)

    async def _login(self, endpoint: str) -> Failed | None:
        """Fetch an auth token with the username and password unless one is held; None
        when there is one (or no auth is configured), else why it could not be had."""
        if self.username is None or self._token is not None:
            return None
        async with self._auth_lock:
            if self._token is not None:
                return None
            body = {"name": self.username, "password": self._password}
            found = await self._attempt(
                endpoint,
                "/v3/auth/authenticate",
                body,
                stale_ok=False,
                what="login",
                read_timeout=self.attempt_timeout,
            )
            if isinstance(found, Failed):
                return found
            token = str(found.get("token", ""))
            if not token:
                raise ConfigError(f"etcd at {endpoint} gave no auth token to {self.username!r}")
            self._token = token
            return None

    async def _call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        write: bool,
        what: str,
        stale_ok: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """POST to the first endpoint that answers (see the module docstring). A write
        waits for its answer as long as the call's budget allows: it cannot move on."""
        budget = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + budget
        errors: dict[str, str] = {}
        sent_write = False
        with trio.move_on_after(budget):
            delays = backoff_delays(base=0.05, cap=0.5)
            while True:
                for endpoint in self._rotation():
                    found: dict[str, Any] | Failed | None = await self._login(endpoint)
                    if found is None:
                        left = max(deadline - trio.current_time(), 0.001)
                        sent_write = write
                        found = await self._attempt(
                            endpoint,
                            path,
                            body,
                            stale_ok=stale_ok,
                            what=what,
                            read_timeout=left if write else min(left, self.attempt_timeout),
                        )
                        sent_write = False
                    if not isinstance(found, Failed):
                        assert found is not None
                        self._current = self.endpoints.index(endpoint)
                        return found
                    if found.outcome is Outcome.AUTH:
                        self._token = None  # refused before processing: log in, send again
                    elif found.outcome is Outcome.UNKNOWN and write:
                        raise StateUnavailableError(
                            f"etcd at {endpoint} did not confirm {what}: {found.reason}; "
                            "it may or may not have happened"
                        )
                    errors[endpoint] = found.reason
                await trio.sleep(next(delays))
        detail = "; ".join(f"{ep}: {why}" for ep, why in errors.items()) or "no answer"
        # The deadline can fall while a write is on its way: then nobody knows its fate.
        fate = "; the last attempt may or may not have happened" if sent_write else ""
        raise StateUnavailableError(
            f"etcd is unavailable (down or without quorum): {what} failed within "
            f"{budget:g}s: {detail}{fate}"
        )

    # -- key-value -----------------------------------------------------------------------------

    async def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        limit: int = DEFAULT_PAGE,
        revision: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        stale_ok: bool = False,
        timeout: float | None = None,
    ) -> RangeResult:
        """Keys in [key, range_end) (just `key` without an end), at most `limit` of them,
        in key order; at `revision` when given (RevisionCompactedError if compacted).
        `stale_ok` reads the answering member's local copy: it works without a quorum,
        and may lag behind the cluster."""
        body: dict[str, Any] = {"key": b64(key), "limit": str(check_limit(limit))}
        if range_end:
            body["range_end"] = b64(range_end)
        if revision:
            body["revision"] = str(revision)
        if keys_only:
            body["keys_only"] = True
        if count_only:
            body["count_only"] = True
        if stale_ok:
            body["serializable"] = True
        doc = await self._call(
            "/v3/kv/range", body, write=False, what="read", stale_ok=stale_ok, timeout=timeout
        )
        return range_result(doc)

    async def range_prefix(
        self,
        prefix: bytes,
        *,
        after: bytes | None = None,
        limit: int = DEFAULT_PAGE,
        revision: int = 0,
        keys_only: bool = False,
        stale_ok: bool = False,
    ) -> RangeResult:
        """One page of the keys starting with `prefix`: those after key `after` (the last
        key of the previous page), at most `limit`. Read the next pages at the first page's
        `revision` for one consistent view."""
        start = (prefix or b"\x00") if after is None else after + b"\x00"
        return await self.range(
            start,
            prefix_end(prefix),
            limit=limit,
            revision=revision,
            keys_only=keys_only,
            stale_ok=stale_ok,
        )

    async def get(self, key: bytes, *, stale_ok: bool = False) -> KeyValue | None:
        """The key, or None if absent."""
        found = await self.range(key, limit=1, stale_ok=stale_ok)
        return found.kvs[0] if found.kvs else None

    async def revision(self, *, stale_ok: bool = False) -> int:
        """The store's current revision."""
        return (await self.range(b"\x00", count_only=True, limit=1, stale_ok=stale_ok)).revision

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write `key`; the revision of the write."""
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        doc = await self._call("/v3/kv/put", body, write=True, what=f"put {key!r}")
        return int(doc.get("header", {}).get("revision", 0))

    async def delete(self, key: bytes, range_end: bytes = b"") -> int:
        """Delete `key` (or [key, range_end)); how many keys were deleted."""
        body = {"key": b64(key)}
        if range_end:
            body["range_end"] = b64(range_end)
        doc = await self._call("/v3/kv/deleterange", body, write=True, what=f"delete {key!r}")
        return int(doc.get("deleted", 0))

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """If every compare holds, run `success`, else `failure`: atomically, at one
        revision. etcd allows 128 operations per transaction (`--max-txn-ops`)."""
        body = {
            "compare": [c.to_json() for c in compares],
            "success": [op.to_json() for op in success],
            "failure": [op.to_json() for op in failure],
        }
        doc = await self._call("/v3/kv/txn", body, write=True, what="transaction")
        revision = int(doc.get("header", {}).get("revision", 0))
        results: list[RangeResult | PutResult | DeleteResult] = []
        for item in doc.get("responses", []):
            if "response_range" in item:
                results.append(range_result(item["response_range"]))
            elif "response_put" in item:
                results.append(PutResult(revision))
            elif "response_delete_range" in item:
                deleted = int(item["response_delete_range"].get("deleted", 0))
                results.append(DeleteResult(deleted, revision))
        return TxnResult(bool(doc.get("succeeded", False)), revision, results)

    async def compact(self, revision: int) -> None:
        """Drop the history before `revision` (etcd keeps every revision until compacted)."""
        body = {"revision": str(revision), "physical": True}
        await self._call("/v3/kv/compaction", body, write=True, what="compaction")

    # -- leases --------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> Lease:
        """A new lease of at least `ttl` seconds (etcd raises a TTL below its minimum)."""
        doc = await self._call("/v3/lease/grant", {"TTL": str(ttl)}, write=True, what="lease grant")
        return Lease(int(doc["ID"]), int(doc["TTL"]))

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Renew a lease; the TTL it now has, 0 if it is gone (expired or revoked).

        A renewal is idempotent, so it is retried on other endpoints like a read."""
        doc = await self._call(
            "/v3/lease/keepalive",
            {"ID": str(lease_id)},
            write=False,
            what="lease keep-alive",
            timeout=timeout,
        )
        result = doc.get("result", doc)
        return int(result.get("TTL", 0))

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on a lease, -1 if it is gone."""
        doc = await self._call(
            "/v3/lease/timetolive", {"ID": str(lease_id)}, write=False, what="lease lookup"
        )
        return int(doc.get("TTL", -1))

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        """Revoke a lease and delete its keys; a lease already gone is fine."""
        with contextlib.suppress(LeaseExpiredError):
            await self._call(
                "/v3/lease/revoke",
                {"ID": str(lease_id)},
                write=True,
                what="lease revoke",
                timeout=timeout,
            )

    # -- watches -------------------------------------------------------------------------------

    def watch(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        start_revision: int = 0,
        idle_timeout: float = 30.0,
    ) -> Watch:
        """Changes to `key` (or [key, range_end)) from `start_revision` (0: those after
        the watch is entered), as an async context manager and iterator of `WatchBatch`es.
        It reconnects to another endpoint by itself and resumes where it stopped; a gap in
        history (the revision was compacted) arrives as a batch with `compacted=True`."""
        return Watch(self, key, range_end, start_revision, idle_timeout)
