"""The scheduler's composition root: its state on a durable store, the API, and an async
HTTP server (`syncbit.httpd`: trio + h11, a coroutine per connection) on `config.listen`.

Why not hypercorn (with starlette): its HTTP/1.1 layer answers `Expect: 100-continue`
before the application sees the request, reads bodies ahead into the application's queue
and answers malformed requests with empty 400s; the trust rules (issue 12) need the
opposite: nothing of a body before the credential and the route's limit are checked, and
a JSON error for every refusal. h11 is the HTTP/1.1 state machine hypercorn, uvicorn and
httpx are built on; the loop around it (`syncbit.httpd`) is ours and small.

Standalone (`syncbit scheduler`) or embedded in a node daemon: `start()` binds the socket,
runs the server on its own trio loop in one thread and returns once it serves; `stop()`
ends every connection and closes the state. It never handles requests itself. With
`state: etcd://...` it is one replica of several (`replica`): the state lives in etcd,
one replica leads, the others follow and forward.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import trio

from syncbit import looptrace, tls
from syncbit.aio import run_in_thread
from syncbit.auth import check_exposure, read_token
from syncbit.config import SchedulerConfig
from syncbit.credentials import Issuer, is_credential
from syncbit.errors import ConfigError, SchedulerError
from syncbit.httpd import Listener, bind, connection_error, raise_descriptor_limit
from syncbit.manifest import Manifest
from syncbit.protocol import RESOLVE_TIMEOUT
from syncbit.scheduler.admission import Admission
from syncbit.scheduler.api import Api
from syncbit.scheduler.app import App
from syncbit.scheduler.etcd import EtcdClient, parse_endpoints
from syncbit.scheduler.kv import DurableStore
from syncbit.scheduler.policy import LeastLoaded, PeerPolicy
from syncbit.scheduler.replica import Replica
from syncbit.scheduler.resolve import resolve_dataset
from syncbit.scheduler.state import SchedulerState, open_lmdb_state
from syncbit.serving import Limits
from syncbit.sources.fences import Fences, default_file_roots
from syncbit.sources.options import register_secrets

log = logging.getLogger("syncbit.scheduler")

T = TypeVar("T")

# Connections: every node keeps a few (heartbeats, the generation long poll, chunk
# updates, claims), each a coroutine and a socket: 20,000 and more at 5,000 nodes, within
# the process's descriptors (`httpd.descriptor_budget`, the limit raised to its hard
# limit at start). One client address may hold 4,096.
LIMITS = Limits(max_connections=65536, max_per_client=4096)


def file_roots(config: SchedulerConfig) -> tuple[Path, ...]:
    """The directories `file://` datasets may name: the configured ones, else the default
    for where the scheduler listens (`sources.fences.default_file_roots`)."""
    if config.file_roots is not None:
        return tuple(config.file_roots)
    return default_file_roots(_split_listen(config.listen)[0])


def _split_listen(listen: str) -> tuple[str, int, socket.AddressFamily]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return host, int(port), family


def _check_replica(config: SchedulerConfig, host: str) -> None:
    """ConfigError for replica settings that cannot work, before anything starts."""
    if config.state is None:
        return
    parse_endpoints(config.state)
    if config.advertise is None and host in ("0.0.0.0", "::", ""):
        raise ConfigError(
            f"a scheduler replica listening on {config.listen} needs advertise: the URL the "
            "other replicas reach it at (e.g. http://10.0.0.5:7900)"
        )
    if config.advertise is not None and not config.advertise.startswith(("http://", "https://")):
        raise ConfigError(f"advertise must be an http(s):// URL, not {config.advertise!r}")


class SchedulerServer:
    """The scheduler API on `config.listen`, served from one background thread.

    Args:
        config: listen address, state dir, node timeout, chunk size of new manifests.
        policy: peer ranking for chunk answers (default `LeastLoaded`).
        resolve: lists a source into a manifest (default `resolve_dataset` inside the
            config's `file_roots`; tests inject). Blocking: run in a worker thread.
        clock: wall-clock seconds for liveness (tests inject).
        limits: connections open at once, per client, and their idle timeout.
        admission: paces all but heartbeats when the loop falls behind (default
            `Admission()`; tests inject).
    """

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        policy: PeerPolicy | None = None,
        resolve: Callable[[str, str, dict[str, Any], int], Manifest] | None = None,
        clock: Callable[[], float] = time.time,
        limits: Limits = LIMITS,
        admission: Admission | None = None,
    ) -> None:
        self.config = config
        self.limits = limits
        self._admission = admission or Admission()
        self.policy: PeerPolicy = policy or LeastLoaded()
        self.fences = Fences.for_roots(file_roots(config))
        for prefix, options in config.source_options.items():
            register_secrets(prefix, options)  # masked in every log line of this process
        self._resolve = resolve or functools.partial(resolve_dataset, fences=self.fences)
        self._clock = clock
        self._single: SchedulerState | None = None
        self.replica: Replica | None = None
        self.app: App | None = None
        self.listener: Listener | None = None
        self._sock: socket.socket | None = None
        self._address = ""
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None

    @property
    def state(self) -> SchedulerState | None:
        """The state this scheduler answers from: its own, or a replica's while it leads."""
        if self.replica is not None:
            return self.replica.state
        return self._single

    @property
    def address(self) -> str:
        """The bound "host:port" (valid after `start`)."""
        if not self._address:
            raise SchedulerError("scheduler server is not started")
        return self._address

    @property
    def url(self) -> str:
        """Base URL clients use, e.g. http://127.0.0.1:7900 (https:// with tls_cert)."""
        scheme = "https" if self.config.tls_cert is not None else "http"
        return f"{scheme}://{self.address}"

    def start(self) -> str:
        """Bind `config.listen` (port 0 picks one), open the state and serve in the
        background; returns the bound "host:port" once requests are answered."""
        if self._thread is not None:
            raise SchedulerError("scheduler server is already started")
        secret = read_token(self.config.token_file)
        if secret is not None and is_credential(secret):
            raise ConfigError(
                f"token_file {self.config.token_file} holds a credential: a scheduler's "
                "token_file holds the cluster secret (e.g. `openssl rand -hex 32`)"
            )
        check_exposure("the scheduler", self.config.listen, secret, self.config.insecure, log)
        raise_descriptor_limit()
        context = tls.config_pair(self.config.tls_cert, self.config.tls_key)
        host, port, family = _split_listen(self.config.listen)
        _check_replica(self.config, host)
        try:
            self._sock = bind(host, port, family)
        except OSError as exc:
            raise SchedulerError(
                f"scheduler cannot listen on {self.config.listen}: {exc.strerror or exc}"
            ) from exc
        bound, bound_port = self._sock.getsockname()[:2]
        self._address = f"[{bound}]:{bound_port}" if ":" in str(bound) else f"{bound}:{bound_port}"
        issuer = Issuer(secret, self._clock) if secret is not None else None
        try:
            # With --log-level debug, loop stretches over 100 ms are logged as the
            # daemon's are (`looptrace.StallLogger`); the daemon's loop owns the auditor.
            self._thread = run_in_thread(
                functools.partial(self._main, issuer, context),
                "syncbit-scheduler",
                "the scheduler",
                looptrace.instruments(audit=False),
            )
        except BaseException:
            self._sock.close()
            self._sock = None
            self._address = ""
            raise
        return self.address

    async def _main(self, issuer: Issuer | None, context: Any, ready: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        if self.config.state is not None:
            await self._main_replica(issuer, context, ready)
            return
        config = self.config
        async with open_lmdb_state(
            config.state_dir, config.node_timeout, **self._state_args()
        ) as state:
            api = self._api(state, issuer)
            app = App(api, tls_required=context is not None, auth=issuer, admission=self._admission)
            self._single = state
            await self._serve(app, context, ready, functools.partial(self._tend, state))
            state.close()

    async def _main_replica(
        self, issuer: Issuer | None, context: Any, ready: threading.Event
    ) -> None:
        """One replica of several on etcd (`replica.Replica`)."""
        config = self.config
        assert config.state is not None
        my_url = config.advertise or self.url
        async with EtcdClient(config.state) as etcd:
            replica = Replica(
                etcd,
                root=config.etcd_prefix,
                my_id=my_url.partition("://")[2] or my_url,
                my_url=my_url.rstrip("/"),
                ttl=config.election_ttl,
                open_state=self._open_state,
                make_api=lambda state: self._api(state, issuer),
                tend=self._tend,
                ca=config.tls_ca,
            )
            app = App(
                None,
                tls_required=context is not None,
                auth=issuer,
                replica=replica,
                admission=self._admission,
            )
            self.replica = replica
            await self._serve(app, context, ready, replica.run)

    async def _serve(
        self, app: App, context: Any, ready: threading.Event, beside: Callable[..., Any]
    ) -> None:
        """Serve `app` on the bound socket with `beside` running too, until `stop`."""
        assert self._sock is not None
        listener = Listener(self._sock, app, self.limits, connection_error, context)
        self.app, self.listener = app, listener
        with trio.CancelScope() as self._cancel:
            async with trio.open_nursery() as nursery:
                await nursery.start(listener.serve)
                if app.admission is not None:
                    nursery.start_soon(app.admission.run)
                nursery.start_soon(beside)
                ready.set()

    def _state_args(self) -> dict[str, Any]:
        return {
            "clock": self._clock,
            "policy": self.policy,
            "peers_per_chunk": self.config.peers_per_chunk,
            "heartbeat_rate": self.config.heartbeat_rate,
        }

    def _open_state(self, store: DurableStore) -> AbstractAsyncContextManager[SchedulerState]:
        return SchedulerState.open(store, self.config.node_timeout, **self._state_args())

    def _api(self, state: SchedulerState, issuer: Issuer | None) -> Api:
        config = self.config
        api = Api(
            state,
            config.chunk_size,
            self._resolve,
            config.source_options,
            issuer,
            wake_rate=config.wake_rate,
            lookup_rate=config.lookup_rate,
        )
        self._admission.pace(api.wakes)  # wakes wait while the loop is behind
        return api

    async def _tend(self, state: SchedulerState) -> None:
        """Notice nodes gone down (logged once) and move their offers, every second; and
        tell the liveness how late the loop ran this task (`Liveness.note_lag`)."""
        interval = min(1.0, self.config.node_timeout / 4)
        while True:
            due = trio.current_time() + interval
            await trio.sleep(interval)
            state.live.note_lag(trio.current_time() - due)  # how far behind the loop is
            try:
                state.tidy()
            except Exception:
                log.exception("liveness check failed")

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the server's trio loop and return its result: how another
        thread (or another trio loop) reads the server's state. Blocks until done."""
        if self._token is None:
            raise SchedulerError("scheduler server is not started")
        done = threading.Event()
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append((True, fn(*args)))
            except BaseException as exc:
                outcome.append((False, exc))
            finally:
                done.set()

        self._token.run_sync_soon(run)
        done.wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        result: T = value
        return result

    def stop(self) -> None:
        """Stop serving (every connection ends, long polls too) and close the state.
        Idempotent."""
        thread, token, cancel = self._thread, self._token, self._cancel
        if thread is None:
            return
        if token is not None and cancel is not None:
            # Thread-safe and non-blocking: stop() may be called from another trio loop
            # (the daemon that embeds this scheduler) as well as from plain threads.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(cancel.cancel)
        thread.join(timeout=30)
        self._thread = self._token = self._cancel = None
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._single = self.replica = None
        self.app = self.listener = None

    def __enter__(self) -> SchedulerServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["LIMITS", "RESOLVE_TIMEOUT", "SchedulerServer", "file_roots", "resolve_dataset"]
