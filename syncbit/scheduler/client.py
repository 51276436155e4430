"""Async client of the scheduler API, one method per endpoint: over httpx under trio, or,
for the CLI, over the standard library with methods that never suspend (`blocking=True`,
run with `endpoints.run_blocking`; neither httpx nor trio is imported then).

The exchange itself, failover between replicas and the mapping of failures onto syncbit's
error tree are `endpoints`'; no httpx exception ever leaves either. It keeps no state
beyond its connections and the replica that answered last. The data
types it returns live in `syncbit.protocol` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from syncbit.errors import SchedulerError
from syncbit.protocol import (  # the shared types, re-exported for the node's imports
    MAX_CLAIM_CHUNKS,
    MAX_REPORT_CHUNKS,
    MAX_REPORT_REMOVALS,
    RESOLVE_TIMEOUT,
    ChunkMap,
    ChunkReportResult,
    ChunkUpdates,
    ClaimResult,
    Peer,
    PlanEntry,
)
from syncbit.scheduler.endpoints import BlockingEndpoints, Endpoints

if TYPE_CHECKING:
    import httpx

    from syncbit.manifest import Manifest  # pydantic models: imported when first needed


def _segment(value: str) -> str:
    return quote(value, safe="")


def _checked_plan(entries: Any) -> list[dict[str, Any]]:
    """A plan as the scheduler sent it (the node keeps the entries as they came), each
    entry readable as a `PlanEntry`; KeyError/TypeError/ValueError otherwise."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise TypeError("plan: not a list of entries")
    for entry in entries:
        PlanEntry.from_json(entry)
    return entries


def _checked_listing(doc: Any) -> dict[str, Any]:
    """A dataset listing ({"generation", "datasets": [summary, ...]}) whose generation is
    a number and each summary has a name and a revision; KeyError/TypeError otherwise."""
    int(doc["generation"])
    if not isinstance(doc["datasets"], list):
        raise TypeError("datasets: not a list")
    for summary in doc["datasets"]:
        if not (isinstance(summary["name"], str) and isinstance(summary["revision"], str)):
            raise TypeError("datasets: a name or revision is not a string")
    result: dict[str, Any] = doc
    return result


def _batches(entries: list[dict[str, Any]], limit: int) -> list[list[dict[str, Any]]]:
    """Per-object chunk lists (`{"object", "chunks": [...], ...}`) cut into requests of at
    most `limit` chunks each; an object with more is split over several."""
    batches: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    room = limit
    for entry in entries:
        chunks = list(entry["chunks"])
        while chunks:
            if room == 0:
                batches.append(current)
                current, room = [], limit
            part, chunks = chunks[:room], chunks[room:]
            current.append({**entry, "chunks": part})
            room -= len(part)
    if current:
        batches.append(current)
    return batches


class SchedulerClient:
    """Talks to the scheduler at `base_url` (e.g. http://127.0.0.1:7900), or to any of
    its replicas (`URL1,URL2,URL3`), failing over between them (`endpoints.Endpoints`).

    Args:
        base_url: scheduler URL(s), comma-separated or a list; a bare "host:port" means
            http.
        transport: an httpx transport to use instead of the network (tests).
        timeout: seconds per request; adding a dataset waits for the source listing too.
        token: the bearer value: the cluster secret or a credential (see `token_file`).
        ca: the CA file that https:// scheduler certificates must chain to (None: the
            system's CAs).
        blocking: send with the standard library, blocking: every method then runs to
            its end at its first step (`endpoints.run_blocking`), without an event loop.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10,
        token: str | None = None,
        ca: Path | None = None,
        *,
        blocking: bool = False,
    ) -> None:
        self.timeout = timeout
        self._endpoints: Endpoints | BlockingEndpoints
        if blocking:
            if transport is not None:
                raise ValueError("a blocking client sends over the network, not a transport")
            self._endpoints = BlockingEndpoints(base_url, timeout, token, ca)
        else:
            self._endpoints = Endpoints(base_url, transport, timeout, token, ca)
        self._request = self._endpoints.request

    @property
    def base_url(self) -> str:
        """The URL asked first: the replica that answered last."""
        return self._endpoints.url

    @property
    def urls(self) -> list[str]:
        """Every scheduler URL this client may ask."""
        return list(self._endpoints.urls)

    async def __aenter__(self) -> SchedulerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._endpoints.aclose()

    def set_token(self, token: str | None) -> None:
        """Send `token` from now on (a node's credential once issued or renewed)."""
        self._endpoints.set_token(token)

    @contextmanager
    def _shape(self, what: str) -> Iterator[None]:
        """An answer of the wrong shape is the scheduler's fault, not a crash here."""
        try:
            yield
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SchedulerError(
                f"scheduler at {self.base_url} sent a malformed answer to {what}: {exc!r}"
            ) from None

    # -- endpoints ----------------------------------------------------------------------------

    async def health(self) -> bool:
        """True when the scheduler answers `/healthz`."""
        doc = await self._request("GET", "/healthz")
        return bool(doc.get("ok"))

    async def heartbeat(
        self,
        node: str,
        *,
        address: str,
        labels: dict[str, str] | None = None,
        load: int = 0,
        cache_bytes: int = 0,
        cache_size: int = 0,
        ready: dict[str, str] | None = None,
        pinned_bytes: int = 0,
        pinned_over_budget: bool = False,
        disk_full: bool = False,
        disk_free: int = 0,
    ) -> dict[str, Any]:
        """Register or refresh `node`; returns its record plus `plan`, what it must hold."""
        body = {
            "address": address,
            "labels": labels or {},
            "load": load,
            "cache_bytes": cache_bytes,
            "cache_size": cache_size,
            "ready": ready or {},
            "pinned_bytes": pinned_bytes,
            "pinned_over_budget": pinned_over_budget,
            "disk_full": disk_full,
            "disk_free": disk_free,
        }
        result: dict[str, Any] = await self._request("PUT", f"/v1/nodes/{_segment(node)}", body)
        with self._shape("PUT /v1/nodes"):
            if "plan" in result:
                _checked_plan(result["plan"])
        return result

    async def plan(self, node: str) -> dict[str, Any]:
        """{"generation", "plan": [{"dataset", "revision", "members": [node, ...]}, ...]}:
        the datasets assigned to `node` and the up nodes that share each assignment."""
        result: dict[str, Any] = await self._request("GET", f"/v1/nodes/{_segment(node)}/plan")
        with self._shape("GET /v1/nodes/NODE/plan"):
            _checked_plan(result["plan"])
        return result

    async def wait_generation(self, after: int, timeout: float = 30.0) -> int:
        """The scheduler's generation once it is no longer `after`, or after `timeout`
        seconds (a long poll)."""
        result: dict[str, Any] = await self._request(
            "GET",
            "/v1/generation",
            params={"after": str(after), "timeout": f"{timeout:g}"},
            timeout=timeout + self.timeout,
        )
        return int(result["generation"])

    async def wait_change(self, after: int, timeout: float, node: str) -> dict[str, Any]:
        """`node`'s own long poll: {"generation": G}, and when G is not `after` what the
        node asks next, as of G, if the scheduler carries them (an older one does not):
        "datasets" (the listing of `datasets()`) and "plan" (the entries of `plan()`)."""
        result: dict[str, Any] = await self._request(
            "GET",
            "/v1/generation",
            params={"after": str(after), "timeout": f"{timeout:g}", "node": node},
            timeout=timeout + self.timeout,
        )
        with self._shape("GET /v1/generation"):
            answer: dict[str, Any] = {"generation": int(result["generation"])}
            if "datasets" in result or "plan" in result:
                answer["datasets"] = _checked_listing(result)["datasets"]
                answer["plan"] = _checked_plan(result["plan"])
        return answer

    async def edit_labels(
        self, node: str, set_: dict[str, str], remove: list[str]
    ) -> dict[str, Any]:
        """Set and remove operator labels on `node`; its record with the labels in effect."""
        body = {"set": set_, "remove": remove}
        result: dict[str, Any] = await self._request(
            "POST", f"/v1/nodes/{_segment(node)}/labels", body
        )
        return result

    async def assignments(self) -> dict[str, list[dict[str, Any]]]:
        """{dataset: [target, ...]} where a target is {"node": n} or {"selector": {k: v}}."""
        doc = await self._request("GET", "/v1/assignments")
        with self._shape("GET /v1/assignments"):
            result: dict[str, list[dict[str, Any]]] = dict(doc["assignments"])
        return result

    async def assign(self, dataset: str, targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add assignment targets to `dataset` (none: every node); all its targets."""
        doc = await self._request(
            "POST", f"/v1/datasets/{_segment(dataset)}/targets", {"targets": targets}
        )
        with self._shape("POST targets"):
            result: list[dict[str, Any]] = list(doc["targets"])
        return result

    async def unassign(
        self, dataset: str, targets: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        """Drop assignment targets of `dataset` (None: all); the targets left."""
        doc = await self._request(
            "DELETE", f"/v1/datasets/{_segment(dataset)}/targets", {"targets": targets}
        )
        with self._shape("DELETE targets"):
            result: list[dict[str, Any]] = list(doc["targets"])
        return result

    async def leave(self, node: str) -> None:
        """Tell the scheduler this node is stopping: it is down from now on."""
        await self._request("POST", f"/v1/nodes/{_segment(node)}/leave")

    async def claim(self, node: str, object_id: str, chunks: list[int], ttl: float) -> ClaimResult:
        """Ask to read `chunks` of an object from the source (see `scheduler.claims`)."""
        body = {"node": node, "chunks": chunks, "ttl": ttl}
        doc = await self._request("POST", f"/v1/objects/{_segment(object_id)}/claims", body)
        with self._shape("POST claims"):
            return ClaimResult(
                granted=[int(i) for i in doc["granted"]],
                busy={int(i): str(n) for i, n in doc["busy"].items()},
                held=[int(i) for i in doc["held"]],
            )
        raise AssertionError("unreachable")

    async def register_object(
        self, node: str, object_id: str, size: int, chunk_size: int
    ) -> tuple[int, int]:
        """Make an object no dataset names claimable and reportable (a registry blob the
        node's mirror serves); the (size, chunk size) the scheduler records for it."""
        body = {"node": node, "size": size, "chunk_size": chunk_size}
        doc = await self._request("POST", f"/v1/objects/{_segment(object_id)}/geometry", body)
        with self._shape("POST geometry"):
            return int(doc["size"]), int(doc["chunk_size"])
        raise AssertionError("unreachable")

    async def release(self, node: str, object_id: str, chunks: list[int]) -> None:
        """Give up claims on `chunks` (the source fetch failed)."""
        body = {"node": node, "chunks": chunks}
        await self._request("POST", f"/v1/objects/{_segment(object_id)}/release", body)

    async def nodes(self) -> list[dict[str, Any]]:
        """Every known node: name, address, labels, up, last_seen, load, cache_*, reports."""
        doc = await self._request("GET", "/v1/nodes")
        with self._shape("GET /v1/nodes"):
            nodes: list[dict[str, Any]] = list(doc["nodes"])
        return nodes

    async def add_dataset(
        self, name: str, source: str, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resolve `source` to a fixed revision and register it as `name`.

        Returns {"dataset": summary, "changed": bool}. Raises UserError for bad input or a
        name taken by another source, SourceError when the source fails to list.
        """
        body = {"name": name, "source": source, "options": options or {}}
        result: dict[str, Any] = await self._request(
            "POST",
            "/v1/datasets",
            body,
            timeout=max(self.timeout, RESOLVE_TIMEOUT + 30),
        )
        return result

    async def datasets(self) -> dict[str, Any]:
        """{"generation": int, "datasets": [summary, ...]}."""
        result = await self._request("GET", "/v1/datasets")
        with self._shape("GET /v1/datasets"):
            return _checked_listing(result)

    async def manifest(self, name: str) -> Manifest:
        """The resolved manifest of dataset `name` (NotFoundError if unknown)."""
        doc = await self._request("GET", f"/v1/datasets/{_segment(name)}")
        try:
            from syncbit.manifest import Manifest

            return Manifest.model_validate(doc)
        except ValueError as exc:
            raise SchedulerError(f"scheduler sent an invalid manifest for {name}: {exc}") from None

    async def trace(self, name: str) -> dict[str, Any]:
        """{"dataset", "revision", "trace": record or None}: the access trace kept for
        the dataset's current revision (NotFoundError if the dataset is unknown)."""
        doc: dict[str, Any] = await self._request("GET", f"/v1/datasets/{_segment(name)}/trace")
        return doc

    async def put_trace(self, name: str, node: str, trace: dict[str, Any]) -> dict[str, Any]:
        """Offer `node`'s access trace of dataset `name` (`AccessTrace.to_doc()`); the
        first one of a revision is kept. {"stored": bool, "trace": the record kept}."""
        body = {"node": node, "trace": trace}
        doc: dict[str, Any] = await self._request(
            "PUT", f"/v1/datasets/{_segment(name)}/trace", body
        )
        return doc

    async def remove_dataset(self, name: str) -> None:
        """Forget dataset `name` (NotFoundError if unknown)."""
        await self._request("DELETE", f"/v1/datasets/{_segment(name)}")

    async def report_chunks(
        self,
        node: str,
        add: list[dict[str, Any]],
        remove: list[dict[str, Any]],
    ) -> ChunkReportResult:
        """Tell the scheduler which chunks `node` gained and lost.

        `add`: [{"object", "size", "chunk_size", "chunks": [[index, digest], ...]}];
        `remove`: [{"object", "chunks": [index, ...]}]. A digest nobody recorded yet is
        recorded only if this node was granted the chunk's source read (`claim`).
        """
        adds = _batches(add, MAX_REPORT_CHUNKS)
        removes = _batches(remove, MAX_REPORT_REMOVALS)
        result = ChunkReportResult(conflicts=[], refused=[])
        for i in range(max(len(adds), len(removes), 1)):
            body = {
                "add": adds[i] if i < len(adds) else [],
                "remove": removes[i] if i < len(removes) else [],
            }
            doc = await self._request("POST", f"/v1/nodes/{_segment(node)}/chunks", body)
            with self._shape("POST chunks"):
                result.conflicts += [(str(obj), int(index)) for obj, index in doc["conflicts"]]
                result.refused += [(str(obj), int(index)) for obj, index in doc.get("refused", [])]
        return result

    async def check(
        self, node: str, object_id: str, chunk: int, digest: str | None, changed: str = ""
    ) -> str:
        """Tell the scheduler what `node` read from the source for `chunk`: its digest, or
        what changed (a re-check it was asked for, or a read that disagreed with the
        record). The outcome: "ok", "disputed", "dropped", "reporter-lied",
        "establisher-lied" or "source-changed" (see `SchedulerState.check`)."""
        body = {"node": node, "chunk": chunk, "digest": digest, "changed": changed}
        doc = await self._request("POST", f"/v1/objects/{_segment(object_id)}/checks", body)
        with self._shape("POST checks"):
            return str(doc["outcome"])
        raise AssertionError("unreachable")

    async def lift_quarantine(self, node: str) -> None:
        """Trust a quarantined node again (NotFoundError if it is not quarantined)."""
        await self._request("DELETE", f"/v1/nodes/{_segment(node)}/quarantine")

    async def chunk_map(self, object_id: str, node: str | None = None) -> ChunkMap:
        """Digests and ranked up peers per chunk of `object_id`, excluding `node` itself.
        Asks for the compact form (peers by name, each address once); a scheduler from
        before it answers the full form, read the same."""
        params = {"peers": "names"}
        if node is not None:
            params["node"] = node
        doc = await self._request("GET", f"/v1/objects/{_segment(object_id)}/chunks", params=params)
        with self._shape("GET chunks"):
            addresses = doc.get("addresses")
            if addresses is not None:
                peers = {
                    int(i): [Peer(str(n), str(addresses[n])) for n in names]
                    for i, names in doc["peers"].items()
                }
            else:
                peers = {
                    int(i): [Peer(str(p["node"]), str(p["address"])) for p in ps]
                    for i, ps in doc["peers"].items()
                }
            return ChunkMap(
                digests={int(i): str(d) for i, d in doc["digests"].items()},
                peers=peers,
                fetching={int(i): str(n) for i, n in doc.get("fetching", {}).items()},
                disputed={int(i) for i in doc.get("disputed", [])},
                broken=str(doc["broken"]) if doc.get("broken") else None,
                cursor=str(doc.get("cursor", "")),
            )
        raise AssertionError("unreachable")

    async def updates(
        self,
        object_id: str,
        node: str | None = None,
        cursor: str = "",
        *,
        limit: int | None = None,
        wait: float = 0.0,
    ) -> ChunkUpdates:
        """The chunks of `object_id` whose state changed since `cursor` (from a chunk map
        or the last updates; "" for all), each once with its state now; at most K peers
        each, never `node` itself. With `wait`, the scheduler holds the request up to
        that many seconds (at most 30) until something changes. Fold the answer into a
        `ChunkMap` with `ChunkMap.apply`; when `more` is set, ask again at once."""
        params = {"cursor": cursor}
        if node is not None:
            params["node"] = node
        if limit is not None:
            params["limit"] = str(limit)
        if wait:
            params["wait"] = f"{wait:g}"
        path = f"/v1/objects/{_segment(object_id)}/updates"
        doc = await self._request("GET", path, params=params, timeout=wait + self.timeout)
        with self._shape("GET updates"):
            return ChunkUpdates.from_json(doc)
        raise AssertionError("unreachable")

    async def report_bad_peer(
        self, reporter: str, peer: str, object_id: str, index: int, reason: str
    ) -> None:
        """`reporter` got no good chunk `index` of `object_id` from `peer`."""
        body = {
            "reporter": reporter,
            "peer": peer,
            "object": object_id,
            "chunk": index,
            "reason": reason,
        }
        await self._request("POST", "/v1/reports", body)

    async def credential(self, node: str, using: str | None = None) -> dict[str, Any]:
        """This node's credentials, asked for with `using` (a bootstrap credential, or the
        node's own to renew it; default: the client's token): {"token", "peer_token",
        "expires", "public_key", "key_id", "node"}."""
        doc = await self._request("POST", f"/v1/nodes/{_segment(node)}/credential", {}, token=using)
        with self._shape("POST credential"):
            for key in ("token", "peer_token", "public_key"):
                if not isinstance(doc[key], str):
                    raise TypeError(key)
            float(doc["expires"])
        result: dict[str, Any] = doc
        return result

    async def issue_token(
        self, role: str, node: str | None = None, ttl: float | None = None
    ) -> dict[str, Any]:
        """A new credential (admin only): {"token", "role", "node", "expires"}."""
        body = {"role": role, "node": node, "ttl": ttl}
        result: dict[str, Any] = await self._request("POST", "/v1/tokens", body)
        return result

    async def status(self) -> dict[str, Any]:
        """{"nodes": [...], "datasets": [summary + "cached": {node: bytes}, ...]}."""
        result: dict[str, Any] = await self._request("GET", "/v1/status")
        return result


__all__ = [
    "MAX_CLAIM_CHUNKS",
    "MAX_REPORT_CHUNKS",
    "MAX_REPORT_REMOVALS",
    "RESOLVE_TIMEOUT",
    "ChunkMap",
    "ChunkReportResult",
    "ChunkUpdates",
    "ClaimResult",
    "Peer",
    "SchedulerClient",
]
