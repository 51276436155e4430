"""`syncbit pull`'s client side: asks this node's daemon to bring a dataset here and shows
progress until it is complete and verified. Never fetches bytes itself: the daemon does,
so an interrupted pull keeps going there and a second pull simply reattaches.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx

from syncbit.auth import bearer
from syncbit.config import client_token
from syncbit.errors import NotFoundError, SyncbitError, UnauthorizedError, UserError

_POLL = 0.2  # seconds between progress checks: `wait` returns this soon after ready
_PLAIN_EVERY = 5.0


class DaemonUnreachableError(SyncbitError):
    """No daemon answers at the given address (yet)."""


def _call(client: httpx.Client, method: str, url: str, **kw: Any) -> dict[str, Any]:
    try:
        resp = client.request(method, url, **kw)
    except httpx.HTTPError as exc:
        raise DaemonUnreachableError(
            f"no syncbit daemon answers at {url.split('/v1')[0]} ({exc.__class__.__name__}): "
            "start one with `syncbit daemon` or pass --daemon host:port"
        ) from exc
    doc: dict[str, Any] = resp.json() if resp.content else {}
    if resp.status_code == 404:
        raise NotFoundError(doc.get("error", f"not found: {url}"))
    if resp.status_code == 401:
        raise UnauthorizedError(
            f"daemon at {url.split('/v1')[0]}: missing or wrong cluster token "
            "(set SYNCBIT_TOKEN_FILE)"
        )
    if resp.status_code == 400:
        raise UserError(doc.get("error", f"bad request: {url}"))
    if resp.status_code != 200:
        raise SyncbitError(doc.get("error", f"daemon answered HTTP {resp.status_code}"))
    return doc


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _line(doc: dict[str, Any], rate: float, bar: bool = False) -> str:
    total, have = doc["size"], doc["present_bytes"]
    pct = 100.0 if total == 0 else 100.0 * have / total
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
    base = f"http://{daemon}/v1/local"
    verb = "pull" if start else "wait"
    with httpx.Client(timeout=30, trust_env=False, headers=bearer(client_token())) as client:
        started = time.monotonic()
        if start:
            doc = _call(client, "POST", f"{base}/pull", json={"dataset": dataset})
        else:
            doc = _first_answer(client, f"{base}/datasets/{dataset}", started, timeout, out)
        first = doc["present_bytes"]
        last_plain = -_PLAIN_EVERY
        while not doc["complete"]:
            if start and doc.get("error") and not doc.get("pulling"):
                raise SyncbitError(f"pull of {dataset} failed: {doc['error']}")
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
            time.sleep(_POLL)
            doc = _call(client, "GET", f"{base}/datasets/{dataset}")
        elapsed = time.monotonic() - started
        rate = (doc["present_bytes"] - first) / elapsed if elapsed > 0 else 0.0
        end = "\n" if tty else ""
        final = _line(doc, rate, bar=tty) + "  complete"
        print(("\r" + final.ljust(100) if tty else final) + end, file=out, end="")
        if not tty:
            print(file=out)
        return doc


class WaitTimeoutError(SyncbitError):
    """`syncbit wait` ran out of time before the dataset was ready."""


def _first_answer(
    client: httpx.Client, url: str, started: float, timeout: float | None, out: Any
) -> dict[str, Any]:
    """The first progress document, retrying while no daemon answers: an initContainer
    may start before the node's daemon does. An unknown dataset fails at once."""
    told = False
    while True:
        try:
            return _call(client, "GET", url)
        except DaemonUnreachableError as exc:
            if timeout is not None and time.monotonic() - started >= timeout:
                raise WaitTimeoutError(f"gave up after {timeout:g}s: {exc}") from None
            if not told:
                print(f"waiting for the daemon: {exc}", file=out, flush=True)
                told = True
            time.sleep(_POLL)


def _hint(doc: dict[str, Any], verb: str) -> str:
    """Why a wait may never end: nothing is bringing the dataset to this node."""
    if verb == "wait" and not doc.get("assigned") and not doc.get("pulling"):
        return "  (not assigned to this node: run `syncbit prefetch` or `syncbit pull`)"
    if doc.get("error"):
        return f"  (retrying: {doc['error']})"
    return ""


def _timeout_message(doc: dict[str, Any], timeout: float) -> str:
    total, have = doc["size"], doc["present_bytes"]
    pct = 100.0 if total == 0 else 100.0 * have / total
    why = _hint(doc, "wait").strip(" ()")
    return (
        f"{doc['dataset']} is not ready after {timeout:g}s: {pct:.1f}% "
        f"({_size(have)} of {_size(total)}) on this node" + (f"; {why}" if why else "")
    )


def local(daemon: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request to the daemon's node-local control API (`/v1/local/<path>`)."""
    with httpx.Client(timeout=120, trust_env=False, headers=bearer(client_token())) as client:
        return _call(client, method, f"http://{daemon}/v1/local/{path}", json=body)
