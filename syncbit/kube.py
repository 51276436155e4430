"""Readiness as Kubernetes scheduling signals: keeps this node's Node object in step with
what the node holds (a `syncbit.io/ds.<dataset>=ready` label per ready dataset, the warm-up
taint removed once every assigned dataset is ready).

It must never block the trio loop and never let an API-server failure reach the daemon: the
labels are advisory, reads and peers keep working without them, and a later sync catches up.

Ownership: every Node label whose key starts with `syncbit.io/ds.` belongs to syncbit. A sync
removes each such label that does not name a dataset ready here now, including labels an
earlier daemon run set for datasets since evicted, unassigned or removed; do not set labels
with that prefix by hand. The taint `syncbit.io/warming` is only ever removed, never added:
the node is registered with it (kubelet `--register-with-taints`) and the daemon lifts it.

Why threads and lightkube's sync `Client`: lightkube's `AsyncClient` does work under trio for
GET and PATCH (httpx picks the trio backend), but its exec-credential auth runs
`asyncio.create_subprocess_exec`, and its token-file auth and config loading read files on
the calling thread. A node makes one or two small calls every few seconds, so a worker
thread per call costs nothing and every kubeconfig works. The price: a call in flight is
not cancellable, so shutdown may wait up to `timeout` seconds for it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Callable, Collection, Set
from typing import Any, TypeVar

import httpx
import trio
import yaml
from lightkube import ApiError, Client, KubeConfig
from lightkube.config.kubeconfig import SingleConfig
from lightkube.core.exceptions import ConfigError as KubeConfigError
from lightkube.resources.core_v1 import Node
from lightkube.types import PatchType

from syncbit.errors import ConfigError, KubeAPIError
from syncbit.retry import retrying

log = logging.getLogger("syncbit.kube")

LABEL_PREFIX = "syncbit.io/ds."
READY = "ready"
WARMING_TAINT = "syncbit.io/warming"
FIELD_MANAGER = "syncbit"

_NAME_MAX = 63  # the name part of a label key
_HASH_HEX = 10
_READABLE_MAX = _NAME_MAX - len("ds.") - 1 - _HASH_HEX
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_MAPPED_TAIL = re.compile(rf".*-[0-9a-f]{{{_HASH_HEX}}}", re.DOTALL)
_INVALID_RUN = re.compile(r"[^A-Za-z0-9_.-]+")

T = TypeVar("T")


def label_key(dataset: str) -> str:
    """The Node label key that says `dataset` is ready on a node.

    Rule: `syncbit.io/ds.<dataset>` when `ds.<dataset>` is a valid label name (at most 63
    characters from `[A-Za-z0-9._-]`, ending in a letter or digit: a dataset name of at most
    60 such characters) and the name does not itself end in `-` and ten lowercase hex digits.
    Any other name is mapped: each run of characters outside `[A-Za-z0-9._-]` becomes one
    `-`, leading and trailing `-` are dropped, the result is cut to 49 characters, and `-`
    plus the first 10 lowercase hex digits of the SHA-256 of the UTF-8 name is appended.
    So `org/model` gets `syncbit.io/ds.org-model-<10 hex digits>`.

    Why this way: Kubernetes label names are short and ASCII while dataset names are not.
    Mapped keys always end in `-` and ten hex digits and kept keys never do, so a kept name
    can never collide with a mapped one, and two mapped names collide only if their hashes
    share 40 bits. The mapping depends on the name alone: every node and every release
    computes the same key, so workloads can select on it.
    """
    name = "ds." + dataset
    if (
        len(name) <= _NAME_MAX
        and _LABEL_NAME.fullmatch(name)
        and not _MAPPED_TAIL.fullmatch(dataset)
    ):
        return "syncbit.io/" + name
    # surrogatepass: a name decoded from bytes with surrogateescape still hashes.
    digest = hashlib.sha256(dataset.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    readable = _INVALID_RUN.sub("-", dataset).strip("-")[:_READABLE_MAX]
    return f"{LABEL_PREFIX}{readable}-{digest}"


def load_client(kubeconfig: str | os.PathLike[str] | None, timeout: float = 5.0) -> Client:
    """A lightkube client for the in-cluster service account (no `kubeconfig`; falls back
    to $KUBECONFIG, then ~/.kube/config) or for an explicit kubeconfig file.

    Raises `ConfigError` when no usable configuration is found: a daemon started with
    `kubernetes: true` should fail at start-up rather than run without its signals.
    """
    where = (
        f"kubeconfig {kubeconfig}"
        if kubeconfig is not None
        else "in-cluster service account, else $KUBECONFIG or ~/.kube/config"
    )
    try:
        config: KubeConfig = (
            KubeConfig.from_file(kubeconfig) if kubeconfig is not None else KubeConfig.from_env()
        )
        single: SingleConfig | None = config.get()
        if single is None:
            raise KubeConfigError("the kubeconfig has no current-context")
        # trust_env off: a proxy configured for sources must not sit between a node and its
        # API server (a cluster-internal address).
        return Client(
            config=single,
            field_manager=FIELD_MANAGER,
            timeout=httpx.Timeout(timeout),
            trust_env=False,
        )
    except (KubeConfigError, OSError, ValueError, yaml.YAMLError) as exc:
        raise _config_error(where, str(exc)) from exc
    except KeyError as exc:
        key = str(exc.args[0]) if exc.args else ""
        if key.startswith("KUBERNETES_SERVICE_"):  # a service account token, but not in a pod
            raise _config_error(where, f"environment variable {key} is not set") from exc
        raise _config_error(where, f"malformed kubeconfig: no {exc} entry") from exc
    except (TypeError, AttributeError) as exc:  # e.g. `contexts: null`
        raise _config_error(where, f"malformed kubeconfig: {exc}") from exc


def _config_error(where: str, reason: str) -> ConfigError:
    return ConfigError(f"cannot load the Kubernetes config ({where}): {reason}")


class NodeSync:
    """Keeps one Node's `syncbit.io/ds.*` labels and warm-up taint in step with this node.

    Args:
        node: the Kubernetes Node name (in a DaemonSet: `spec.nodeName` via the downward API).
        kubeconfig: a kubeconfig file; None: the in-cluster service account (see
            `load_client`). Ignored when `client` is given.
        client: a ready lightkube client (tests, or a caller that owns one); NodeSync then
            never closes it.
        resync: seconds after which a sync reads the Node again even when the wanted state
            has not changed, to repair edits by others (a label removed by hand, a Node
            object re-created by a re-registering kubelet).
        warn_interval: at most one warning per kind of failure in this many seconds.
        conflict_attempts: PATCHes per sync that may meet a 409 Conflict before it gives up
            until the next sync.
        timeout: seconds per API request.

    The constructor loads the configuration (small file reads) and raises `ConfigError`;
    it opens no connection.
    """

    def __init__(
        self,
        node: str,
        *,
        kubeconfig: str | os.PathLike[str] | None = None,
        client: Client | None = None,
        resync: float = 60.0,
        warn_interval: float = 30.0,
        conflict_attempts: int = 5,
        timeout: float = 5.0,
    ) -> None:
        self.node = node
        self._owns_client = client is None
        self._client = client if client is not None else load_client(kubeconfig, timeout)
        self.resync = resync
        self.warn_interval = warn_interval
        self.conflict_attempts = conflict_attempts
        self.last_error: str | None = None  # why the last sync failed; None: in step
        # The Node's own labels as last read (syncbit's readiness labels left out): the
        # daemon offers them to the scheduler, so `prefetch --selector` can match
        # Kubernetes labels such as topology.kubernetes.io/zone. Refreshed every resync.
        self.node_labels: dict[str, str] = {}
        self._lock = trio.Lock()
        self._applied: tuple[frozenset[str], frozenset[str] | None] | None = None
        self._applied_at = float("-inf")
        self._warned: dict[str, float] = {}
        self._wake = trio.Event()

    def close(self) -> None:
        """Close the HTTP connection pool (only of a client NodeSync built itself)."""
        if self._owns_client:
            self._client.close()

    def wake(self) -> None:
        """Make `run` sync now instead of at the end of its interval (e.g. a dataset just
        became ready)."""
        self._wake.set()

    async def sync(self, ready: Collection[str], assigned: Collection[str] | None) -> None:
        """One reconciliation of the Node with this node's state; never raises for API
        failures (they are logged, rate-limited, and the next call tries again).

        Args:
            ready: datasets complete and verified here: each gets `label_key(d)=ready`;
                every other `syncbit.io/ds.*` label is removed.
            assigned: datasets the scheduler assigned to this node, or None while the node
                has not received its assignment plan yet. The warm-up taint is removed once
                this is known and every dataset in it is ready (an empty plan counts).

        Costs: one GET when the wanted state changed since the last successful sync or
        `resync` seconds have passed, else no request at all; a PATCH only when the Node
        differs from the wanted state, so a steady node makes no API writes.
        """
        wanted = (frozenset(ready), None if assigned is None else frozenset(assigned))
        async with self._lock:
            now = trio.current_time()
            if wanted == self._applied and now - self._applied_at < self.resync:
                return
            try:
                await self._reconcile(*wanted)
            except (httpx.HTTPError, KubeConfigError, KubeAPIError) as exc:
                self._failed(exc)
                return
            if self.last_error is not None:
                log.info("Node %s is in step again (Kubernetes API calls succeed)", self.node)
                self.last_error = None
            self._applied, self._applied_at = wanted, now

    async def run(
        self,
        state: Callable[[], tuple[Collection[str], Collection[str] | None]],
        interval: float = 5.0,
    ) -> None:
        """Sync every `interval` seconds (or at once after `wake()`) with `state()`, the
        daemon's current (ready, assigned); runs until cancelled, then closes the client
        if NodeSync built it."""
        try:
            while True:
                try:
                    ready, assigned = state()
                    await self.sync(ready, assigned)
                except Exception as exc:
                    # A bug here must not take the mount down with it: the labels are
                    # advisory. Logged with its traceback, rate-limited like API failures.
                    self._warn("internal", f"Node sync failed: {exc!r}", exc_info=True)
                with trio.move_on_after(interval):
                    await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self.close()

    # -- one reconciliation ----------------------------------------------------------------

    async def _reconcile(self, ready: frozenset[str], assigned: frozenset[str] | None) -> None:
        """Read the Node and patch it to the wanted state; a 409 Conflict (it changed
        between the read and the patch) reads it again, `conflict_attempts` times at most."""

        def conflicted(exc: Exception, delay: float) -> None:
            log.debug("Node %s changed under us (409): reading it again", self.node)

        await retrying(
            functools.partial(self._reconcile_once, ready, assigned),
            _is_conflict,
            attempts=self.conflict_attempts,
            base=0.05,
            cap=1.0,
            on_retry=conflicted,
        )

    async def _reconcile_once(self, ready: frozenset[str], assigned: frozenset[str] | None) -> None:
        node = await self._call(functools.partial(self._client.get, Node, self.node))
        self.node_labels = {
            k: v
            for k, v in ((node.metadata and node.metadata.labels) or {}).items()
            if not k.startswith(LABEL_PREFIX)
        }
        patch, changes = plan_patch(node, {label_key(d) for d in ready}, ready, assigned)
        if patch is None:
            return
        await self._call(
            functools.partial(
                self._client.patch, Node, self.node, patch, patch_type=PatchType.MERGE
            )
        )
        log.info("Node %s: %s", self.node, "; ".join(changes))

    async def _call(self, fn: Callable[[], T]) -> T:
        """A blocking client call on a worker thread (see the module docstring)."""
        try:
            result: T = await trio.to_thread.run_sync(fn)
        except (ValueError, KeyError) as exc:
            # ValueError: a body that is not JSON (a proxy's error page); KeyError: lightkube
            # reads the Content-Type of every error answer, and a proxy's may have none.
            raise KubeAPIError(f"unexpected answer from the Kubernetes API: {exc!r}") from exc
        return result

    # -- failures --------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        kind, message = describe_failure(exc, self.node, self.conflict_attempts)
        self.last_error = message
        self._warn(kind, message)

    def _warn(self, kind: str, message: str, exc_info: bool = False) -> None:
        """Log a recurring failure at most once per `warn_interval` per kind."""
        now = trio.current_time()
        if now - self._warned.get(kind, float("-inf")) >= self.warn_interval:
            self._warned[kind] = now
            log.warning(
                "%s (labels and taint catch up once this is fixed)", message, exc_info=exc_info
            )


def plan_patch(
    node: Node,
    wanted_labels: Set[str],
    ready: Set[str],
    assigned: Set[str] | None,
) -> tuple[dict[str, Any] | None, list[str]]:
    """The JSON merge patch that brings `node` to the wanted state (None: it is there), and
    what it changes, in words for the log.

    Labels merge key by key, so a label patch needs no precondition: a concurrent writer's
    labels survive it. Taints are one list, replaced whole by a merge patch, so removing
    the warm-up taint carries the resourceVersion that was read: if anyone wrote the Node
    since, the API server answers 409 Conflict and the caller reads it again, so a taint
    added meanwhile is never dropped.
    """
    labels = dict((node.metadata.labels if node.metadata else None) or {})
    taints = list((node.spec.taints if node.spec else None) or [])
    label_patch: dict[str, str | None] = {}
    added = sorted(k for k in wanted_labels if labels.get(k) != READY)
    removed = sorted(k for k in labels if k.startswith(LABEL_PREFIX) and k not in wanted_labels)
    label_patch.update({k: READY for k in added})
    label_patch.update({k: None for k in removed})
    warm = assigned is not None and assigned <= ready
    lift = warm and any(t.key == WARMING_TAINT for t in taints)
    if not label_patch and not lift:
        return None, []
    metadata: dict[str, Any] = {}
    patch: dict[str, Any] = {"metadata": metadata}
    changes = []
    if label_patch:
        metadata["labels"] = label_patch
    if added:
        changes.append("set label " + ", ".join(f"{k}={READY}" for k in added))
    if removed:
        changes.append(f"removed label {', '.join(removed)}")
    if lift:
        assert node.metadata is not None and assigned is not None
        metadata["resourceVersion"] = node.metadata.resourceVersion
        # Kept taints go back as read (a merge patch replaces the whole list).
        kept = [t.to_dict() for t in taints if t.key != WARMING_TAINT]  # type: ignore[no-untyped-call]
        patch["spec"] = {"taints": kept or None}
        changes.append(
            f"removed taint {WARMING_TAINT} (all {len(assigned)} assigned datasets ready)"
        )
    return patch, changes


def describe_failure(exc: BaseException, node: str, attempts: int) -> tuple[str, str]:
    """(kind, message) for a failed sync: the kind rate-limits warnings, the message says
    what to fix."""
    if isinstance(exc, ApiError):
        code, text = _code(exc), exc.status.message or exc.status.reason or ""
        if code == 401:
            return "unauthorized", (
                "Kubernetes API rejected our credentials (401 Unauthorized): check the "
                "service account token or the kubeconfig's user"
            )
        if code == 403:
            return "forbidden", (
                f"Kubernetes API forbids it (403): {text}; the daemon's service account "
                "needs get and patch on nodes"
            )
        if code == 404:
            return "not-found", (
                f"no Kubernetes Node named {node!r} (404): the daemon's node name must be the "
                "Kubernetes node name (spec.nodeName)"
            )
        if code == 409:
            return "conflict", (
                f"Node {node} kept changing under us ({attempts} conflicts in a row); "
                "trying again at the next sync"
            )
        return "api-error", f"Kubernetes API answered {code} {exc.status.reason}: {text}"
    if isinstance(exc, httpx.HTTPStatusError):  # an error body that is not a Status
        status = exc.response.status_code
        return "api-error", f"Kubernetes API answered HTTP {status} {exc.response.reason_phrase}"
    if isinstance(exc, httpx.HTTPError):
        where = exc.request.url if _has_request(exc) else "the API server"
        return "unreachable", f"Kubernetes API unreachable at {where}: {type(exc).__name__}: {exc}"
    if isinstance(exc, KubeConfigError):
        return "config", f"Kubernetes credentials unusable: {exc}"
    return "bad-response", str(exc)


def _is_conflict(exc: BaseException) -> bool:
    """A PATCH refused because the Node changed since it was read: read it again."""
    return isinstance(exc, ApiError) and _code(exc) == 409


def _code(exc: ApiError) -> int | None:
    # An ApiError built from a watch event has a Status but no response.
    return exc.status.code or (exc.response.status_code if exc.response is not None else None)


def _has_request(exc: httpx.HTTPError) -> bool:
    try:
        exc.request  # noqa: B018 - raises RuntimeError when httpx never attached one
    except RuntimeError:
        return False
    return True
