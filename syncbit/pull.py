"""`syncbit pull`'s client side: asks this node's daemon to bring a dataset here and shows
progress until it is complete and verified. Never fetches bytes itself: the daemon does,
so an interrupted pull keeps going there (unless the person at the terminal asks to
cancel it, or runs `syncbit pull --cancel NAME`) and a second pull simply reattaches.
"""

from __future__ import annotations

import http.client
import json
import math
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

from syncbit import tls
from syncbit.auth import bearer, client_ca, client_tls_name, client_token
from syncbit.errors import (
    DaemonUnreachableError,
    ForbiddenError,
    NotFoundError,
    SyncbitError,
    UnauthorizedError,
    UserError,
    WaitTimeoutError,
    error_class,
)
from syncbit.retry import retrying_blocking

_POLL = 0.2  # mean seconds between attempts while no daemon answers (an initContainer)
# Each progress request is a long poll: the daemon answers once the dataset is ready or
# after this many seconds (often enough to redraw a progress bar), so `wait` returns the
# moment the data is ready and costs the node one request per second, not five.
_LONG_POLL = 1.0
_PLAIN_EVERY = 5.0


class _TLSConnection(http.client.HTTPSConnection):
    """https to a daemon, its certificate checked for `name` (every daemon's certificate
    carries the same one, `peer_tls_name`) instead of the address dialled."""

    def __init__(
        self, host: str, port: int, timeout: float, context: ssl.SSLContext, name: str | None
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._name = name
        self._tls = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._name or self.host)


class _Daemon:
    """JSON requests to a node's daemon (`/v1/local/...`) over one keep-alive connection.

    The standard library's http.client, not httpx: `syncbit wait` runs in every
    initContainer and in scripts' loops, and importing httpx (with httpcore and trio) and
    building its TLS context cost ~0.15 s of CPU per start for a plain-HTTP loopback call.
    `https://host:port` speaks TLS, trusting $SYNCBIT_TLS_CA (one file: no system bundle
    to load) and checking the name $SYNCBIT_TLS_NAME when set.
    """

    def __init__(self, address: str, timeout: float) -> None:
        scheme, sep, rest = address.partition("://")
        if not sep:
            scheme, rest = "http", address
        host, _, port = rest.rstrip("/").rpartition(":")
        if (
            scheme not in ("http", "https")
            or not host
            or not port.isdigit()
            or not 0 < int(port) < 65536
        ):
            raise UserError(
                f"--daemon must be host:port or https://host:port (port 1-65535), not {address!r}"
            )
        self.address = f"{scheme}://{rest.rstrip('/')}"
        self._conn: http.client.HTTPConnection
        if scheme == "https":
            context = tls.client_context(client_ca())
            self._conn = _TLSConnection(
                host.strip("[]"), int(port), timeout, context, client_tls_name()
            )
        else:
            self._conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
        self._headers = {"Accept": "application/json", **bearer(client_token())}

    def __enter__(self) -> _Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """One request to `/v1/local/<path>`; the JSON answer, or the daemon's error as the
        SyncbitError the one status table names (NotFoundError for 404, ...);
        DaemonUnreachableError while no daemon answers or it is still starting."""
        url = f"/v1/local/{path}" + (f"?{urlencode(params)}" if params else "")
        headers = dict(self._headers)
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            self._conn.request(method, url, body=payload, headers=headers)
            resp = self._conn.getresponse()
            raw = resp.read()
        except ssl.SSLCertVerificationError as exc:
            self._conn.close()  # not worth retrying: the same certificate comes back
            raise tls.trust_error(
                f"daemon at {self.address}",
                exc,
                "set SYNCBIT_TLS_CA to the cluster's CA file (and SYNCBIT_TLS_NAME to the "
                "daemons' certificate name, peer_tls_name)",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()  # the next call dials again
            raise DaemonUnreachableError(
                f"no syncbit daemon answers at {self.address} ({type(exc).__name__}): "
                "start one with `syncbit daemon` or pass --daemon host:port"
            ) from exc
        try:
            doc: dict[str, Any] = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        if resp.status == 200:
            return doc
        if not isinstance(doc, dict):
            doc = {}
        cls = error_class(resp.status, doc.get("kind"))
        if cls is DaemonUnreachableError or (cls is None and resp.status == 503):
            # Listening, but still starting up (a daemon before JSON errors: a bare 503).
            raise DaemonUnreachableError(f"the syncbit daemon at {self.address} is starting")
        reason = str(doc.get("error") or raw.decode(errors="replace").strip())[:500]
        if cls is UnauthorizedError:
            reason = reason or "missing or wrong cluster token"
            raise cls(f"daemon at {self.address}: {reason} (set SYNCBIT_TOKEN_FILE)")
        if cls is ForbiddenError:
            raise cls(f"daemon at {self.address}: {reason or 'forbidden'}")
        raise (cls or SyncbitError)(reason or f"daemon answered HTTP {resp.status} to {url}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _percent(have: int, total: int) -> float:
    """Share held, rounded down to 0.1%: 100.0% only when every byte is here (two small
    files missing from 64 MiB must not read as done)."""
    return 100.0 if total == 0 or have >= total else math.floor(1000.0 * have / total) / 10


def _line(doc: dict[str, Any], rate: float, bar: bool = False) -> str:
    total, have = doc["size"], doc["present_bytes"]
    pct = _percent(have, total)
    eta = f"{(total - have) / rate:.0f}s" if rate > 0 else "?"
    shown = ""
    if bar:
        filled = int(pct / 100 * 24)
        shown = "[" + "#" * filled + "." * (24 - filled) + "] "
    return (
        f"{doc['dataset']}: {shown}{pct:5.1f}%  {_size(have)} / {_size(total)}  "
        f"{_size(rate)}/s  ETA {eta}"
    )


def follow(
    daemon: str,
    dataset: str,
    out: Any = None,
    *,
    start: bool = True,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Wait until `dataset` is complete and verified on the daemon at `daemon`, showing
    progress; with `start`, first ask the daemon to pull it (or rejoin that pull).

    Returns the final progress document. Raises SyncbitError with the daemon's reason if
    the dataset cannot be completed, WaitTimeoutError after `timeout` seconds.
    """
    out = out or sys.stderr
    tty = out.isatty()
    progress = f"datasets/{quote(dataset, safe='')}"
    verb = "pull" if start else "wait"
    with _Daemon(daemon, timeout=30) as client:

        def ask() -> dict[str, Any]:
            # After a restart the daemon has forgotten the pull: asking again is harmless
            # (it keeps what it has, so nothing is fetched twice).
            if start:
                return client.call("POST", "pull", {"dataset": dataset})
            return client.call("GET", progress)

        started = time.monotonic()
        if start:
            doc = ask()
        else:
            doc = _until_answered(ask, started, timeout, out, "waiting for the daemon")
        first = doc["present_bytes"]
        last_plain = -_PLAIN_EVERY
        while not doc["complete"]:
            if start and doc.get("error") and not doc.get("pulling"):
                how = "stopped" if doc.get("cancelled") else "failed"
                raise SyncbitError(f"pull of {dataset} {how}: {doc['error']}")
            elapsed = time.monotonic() - started
            if timeout is not None and elapsed >= timeout:
                raise WaitTimeoutError(_timeout_message(doc, timeout))
            rate = (doc["present_bytes"] - first) / elapsed if elapsed > 0 else 0.0
            if tty:
                out.write("\r" + _line(doc, rate, bar=True).ljust(100))
                out.flush()
            elif elapsed - last_plain >= _PLAIN_EVERY:
                last_plain = elapsed
                print(_line(doc, rate) + _hint(doc, verb), file=out, flush=True)
            wait = _LONG_POLL if timeout is None else max(0.0, min(_LONG_POLL, timeout - elapsed))
            asked = time.monotonic()
            try:
                doc = client.call("GET", progress, params={"wait": f"{wait:.3f}"})
            except NotFoundError:
                raise SyncbitError(
                    f"{verb} of {dataset} stopped: the dataset was removed from the scheduler"
                ) from None
            except DaemonUnreachableError:
                # The daemon restarted (a DaemonSet rollout) or is briefly gone: wait for
                # it within the timeout instead of failing the pod's initContainer.
                note = "the daemon stopped answering; waiting for it to come back"
                doc = _until_answered(ask, started, timeout, out, note)
                continue
            if not doc["complete"]:
                # A daemon from before the long poll answers at once: do not spin on it.
                time.sleep(max(0.0, min(_POLL, wait) - (time.monotonic() - asked)))
        elapsed = time.monotonic() - started
        rate = (doc["present_bytes"] - first) / elapsed if elapsed > 0 else 0.0
        end = "\n" if tty else ""
        final = _line(doc, rate, bar=tty) + "  complete"
        print(("\r" + final.ljust(100) if tty else final) + end, file=out, end="")
        if not tty:
            print(file=out)
        return doc


def _until_answered(
    call: Callable[[], dict[str, Any]],
    started: float,
    timeout: float | None,
    out: Any,
    note: str,
) -> dict[str, Any]:
    """`call()`'s answer, retrying while no daemon answers (saying `note` once): an
    initContainer may start before the node's daemon does, or see it restart. An unknown
    dataset or any other error from a daemon that answers fails at once. Without a
    timeout it waits until interrupted."""
    told = False

    def waiting(exc: Exception, delay: float) -> None:
        nonlocal told
        if not told:
            print(f"{note}: {exc}", file=out, flush=True)
            told = True

    try:
        return retrying_blocking(
            call,
            lambda exc: isinstance(exc, DaemonUnreachableError),
            deadline=None if timeout is None else started + timeout,
            until_cancelled=timeout is None,
            base=_POLL,
            cap=2 * _POLL,
            on_retry=waiting,
        )
    except DaemonUnreachableError as exc:
        raise WaitTimeoutError(f"gave up after {timeout:g}s: {exc}") from None


def _hint(doc: dict[str, Any], verb: str) -> str:
    """Why a wait may never end: nothing is bringing the dataset to this node."""
    if verb == "wait" and not doc.get("assigned") and not doc.get("pulling"):
        return "  (not assigned to this node: run `syncbit prefetch` or `syncbit pull`)"
    if doc.get("error"):
        return f"  (retrying: {doc['error']})"
    return ""


def _timeout_message(doc: dict[str, Any], timeout: float) -> str:
    total, have = doc["size"], doc["present_bytes"]
    pct = _percent(have, total)
    why = _hint(doc, "wait").strip(" ()")
    return (
        f"{doc['dataset']} is not ready after {timeout:g}s: {pct:.1f}% "
        f"({_size(have)} of {_size(total)}) on this node" + (f"; {why}" if why else "")
    )


def cancel(daemon: str, dataset: str) -> dict[str, Any]:
    """Stop the pull of `dataset` on the daemon (what it brought stays); its progress."""
    doc: dict[str, Any] = local(daemon, "POST", "pull/cancel", {"dataset": dataset})
    return doc


def interrupted(daemon: str, dataset: str, stdin: Any = None, out: Any = None) -> bool:
    """Ctrl-C during `syncbit pull`: the daemon goes on pulling unless the person at the
    terminal says to cancel it (y/N, default no). Without a terminal on stdin (a script,
    a pipe) nobody is asked and the pull goes on. Returns whether it was cancelled."""
    stdin = stdin or sys.stdin
    out = out or sys.stderr
    goes_on = (
        f"the pull of {dataset} goes on in the daemon: `syncbit pull --cancel {dataset}` "
        f"stops it, `syncbit wait {dataset}` follows it"
    )
    answer = ""
    if stdin.isatty():
        print(f"\ncancel the pull of {dataset} on the daemon? [y/N] ", end="", file=out, flush=True)
        try:
            answer = stdin.readline().strip().lower()
        except KeyboardInterrupt:  # a second Ctrl-C: no
            print(file=out)
    if answer not in ("y", "yes"):
        print(("" if stdin.isatty() else "\n") + goes_on, file=out, flush=True)
        return False
    doc = cancel(daemon, dataset)
    print(
        f"cancelled the pull of {dataset} ({_size(doc['present_bytes'])} of "
        f"{_size(doc['size'])} here stay cached)",
        file=out,
        flush=True,
    )
    return True


def local(daemon: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request to the daemon's node-local control API (`/v1/local/<path>`)."""
    with _Daemon(daemon, timeout=120) as client:
        return client.call(method, path, body)
