"""The client side of `syncbit pull` and `wait`: asks this node's daemon to bring a dataset
here (or only watches) and shows progress until it is complete and verified. Never fetches
bytes itself (an interrupted pull goes on in the daemon, a second one reattaches); stdlib only.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from syncbit.cli.daemon_client import DaemonClient, local
from syncbit.errors import DaemonUnreachableError, NotFoundError, SyncbitError, WaitTimeoutError
from syncbit.humanize import seconds_text, size_text
from syncbit.retry import retrying_blocking

_POLL = 0.2  # mean seconds between attempts while no daemon answers (an initContainer)
# Each progress request is a long poll: the daemon answers once the dataset is ready or
# after this many seconds (often enough to redraw a progress bar), so `wait` returns the
# moment the data is ready and costs the node one request per second, not five.
_LONG_POLL = 1.0
_PLAIN_EVERY = 5.0


def _percent(have: int, total: int) -> float:
    """Share held, rounded down to 0.1%: 100.0% only when every byte is here (two small
    files missing from 64 MiB must not read as done)."""
    return 100.0 if total == 0 or have >= total else math.floor(1000.0 * have / total) / 10


def progress_line(doc: dict[str, Any], rate: float, bar: bool = False) -> str:
    """One progress line of a progress document: share, bytes, rate, ETA (and a bar)."""
    total, have = doc["size"], doc["present_bytes"]
    pct = _percent(have, total)
    eta = seconds_text((total - have) / rate) if rate > 0 else "?"
    shown = ""
    if bar:
        filled = int(pct / 100 * 24)
        shown = "[" + "#" * filled + "." * (24 - filled) + "] "
    return (
        f"{doc['dataset']}: {shown}{pct:5.1f}%  {size_text(have)} / {size_text(total)}  "
        f"{size_text(rate)}/s  ETA {eta}"
    )


class _Display:
    """Progress on `out`: a bar redrawn in place on a terminal, else a line (with a hint
    why it may never end) every _PLAIN_EVERY seconds."""

    def __init__(self, out: Any, verb: str, first: int, started: float) -> None:
        self.out, self.verb, self.first, self.started = out, verb, first, started
        self.tty = out.isatty()
        self.last_plain = -_PLAIN_EVERY

    def _rate(self, doc: dict[str, Any], elapsed: float) -> float:
        return (doc["present_bytes"] - self.first) / elapsed if elapsed > 0 else 0.0

    def show(self, doc: dict[str, Any], elapsed: float) -> None:
        rate = self._rate(doc, elapsed)
        if self.tty:
            self.out.write("\r" + progress_line(doc, rate, bar=True).ljust(100))
            self.out.flush()
        elif elapsed - self.last_plain >= _PLAIN_EVERY:
            self.last_plain = elapsed
            print(progress_line(doc, rate) + _hint(doc, self.verb), file=self.out, flush=True)

    def done(self, doc: dict[str, Any]) -> None:
        rate = self._rate(doc, time.monotonic() - self.started)
        final = progress_line(doc, rate, bar=self.tty) + "  complete"
        if self.tty:
            print("\r" + final.ljust(100) + "\n", file=self.out, end="")
        else:
            print(final, file=self.out)


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
    progress = f"datasets/{quote(dataset, safe='')}"
    verb = "pull" if start else "wait"
    with DaemonClient(daemon, timeout=30) as client:

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
        display = _Display(out, verb, doc["present_bytes"], started)
        while not doc["complete"]:
            if start and doc.get("error") and not doc.get("pulling"):
                how = "stopped" if doc.get("cancelled") else "failed"
                raise SyncbitError(f"pull of {dataset} {how}: {doc['error']}")
            elapsed = time.monotonic() - started
            if timeout is not None and elapsed >= timeout:
                raise WaitTimeoutError(_timeout_message(doc, timeout))
            display.show(doc, elapsed)
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
        display.done(doc)
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
        f"({size_text(have)} of {size_text(total)}) on this node" + (f"; {why}" if why else "")
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
        f"cancelled the pull of {dataset} ({size_text(doc['present_bytes'])} of "
        f"{size_text(doc['size'])} here stay cached)",
        file=out,
        flush=True,
    )
    return True
