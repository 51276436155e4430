"""The scheduler URLs a client knows (one, or one per replica) and one request over them
with failover; the mapping of transport failures and error answers onto syncbit's errors.

The replica that answered last is asked first; one that cannot be reached, or answers 503
(cannot answer now: no leader, no state store), hands the request to the next, each URL
at most once per request, with no sleep: the caller's loop owns backoff. Any replica may
take any request (followers forward to the leader), so failing over never changes what a
request means. No httpx exception ever leaves this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from syncbit import tls
from syncbit.auth import bearer
from syncbit.errors import (
    ForbiddenError,
    SchedulerBusyError,
    SchedulerError,
    UnauthorizedError,
    UserError,
    error_class,
)

UNAVAILABLE = 503  # the answer of a replica that cannot serve now: the next one may


def parse_urls(value: str | Sequence[str]) -> list[str]:
    """Scheduler URLs from `URL1,URL2,...` (or a list); a bare "host:port" means http.
    UserError for none, or for one that is not an http(s) URL."""
    items = value.split(",") if isinstance(value, str) else list(value)
    urls: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        url = item if "://" in item else f"http://{item}"
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as exc:
            raise UserError(f"invalid scheduler URL {item!r}: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise UserError(f"invalid scheduler URL {item!r}: expected http(s)://host:port")
        urls.append(url.rstrip("/"))
    if not urls:
        raise UserError("no scheduler URL given")
    return urls


class Endpoints:
    """The URLs of one scheduler (cluster) and the connection pool to them.

    Args:
        urls: `URL1,URL2,...` or a list (see `parse_urls`).
        transport: an httpx transport to use instead of the network (tests).
        timeout: seconds per request to one URL.
        token: the bearer value sent with every request.
        ca: the CA file https:// scheduler certificates must chain to (None: system CAs).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transport: httpx.AsyncBaseTransport | None,
        timeout: float,
        token: str | None,
        ca: Path | None,
    ) -> None:
        self.urls = parse_urls(urls)
        self.timeout = timeout
        self._first = 0
        # trust_env off: a proxy from the environment must not sit between nodes and their
        # scheduler (cluster-internal addresses). Plain http never uses a TLS context, and
        # building the verifying one (the CA bundle) costs ~50 ms of every CLI command.
        https = any(u.lower().startswith("https://") for u in self.urls)
        self.http = httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            trust_env=False,
            headers=bearer(token),
            verify=tls.client_context(ca) if https else False,
        )

    @property
    def url(self) -> str:
        """The URL asked first: the one that answered last."""
        return self.urls[self._first]

    def set_token(self, token: str | None) -> None:
        self.http.headers.pop("Authorization", None)
        self.http.headers.update(bearer(token))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
        token: str | None = None,
    ) -> Any:
        """The JSON answer of the first URL that answers other than 503; the error it
        answered as a syncbit error; SchedulerError when none answered (one line naming
        why, from a replica that said why when there is one)."""
        count = len(self.urls)
        unreachable: list[SchedulerError] = []
        refused: SchedulerError | None = None
        for step in range(count):
            index = (self._first + step) % count
            url = self.urls[index]
            try:
                resp = await self._send(url, method, path, body, params, timeout, token)
            except SchedulerError as exc:
                unreachable.append(exc)
                continue
            if resp.status_code == UNAVAILABLE and step < count - 1:
                try:
                    _raise_for(url, resp, method, path)
                except SchedulerError as exc:
                    refused = refused or exc
                continue
            self._first = index
            return _answer(url, resp, method, path)
        if refused is not None:
            raise refused
        if count == 1:
            raise unreachable[0]
        raise SchedulerError(
            f"no scheduler of {', '.join(self.urls)} answered {method} {path}: "
            f"{'; '.join(str(e) for e in unreachable)}"
        )

    async def _send(
        self,
        url: str,
        method: str,
        path: str,
        body: Any,
        params: dict[str, str] | None,
        timeout: float | None,
        token: str | None,
    ) -> httpx.Response:
        try:
            return await self.http.request(
                method,
                url + path,
                json=body,
                params=params,
                timeout=timeout if timeout is not None else self.timeout,
                headers=bearer(token) if token is not None else None,
            )
        except httpx.TimeoutException as exc:
            raise SchedulerError(
                f"scheduler at {url} did not answer {method} {path} in time: "
                f"{exc or type(exc).__name__}"
            ) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            cert = tls.untrusted(exc)
            if cert is not None:  # a configuration to fix, not a replica to skip
                raise tls.trust_error(
                    f"scheduler at {url}",
                    cert,
                    "point tls_ca (daemon) or $SYNCBIT_TLS_CA (CLI) at the cluster's CA file",
                ) from None
            raise SchedulerError(
                f"scheduler at {url} unreachable: {exc or type(exc).__name__}"
            ) from exc


def _answer(url: str, resp: httpx.Response, method: str, path: str) -> Any:
    if resp.status_code // 100 != 2:
        _raise_for(url, resp, method, path)
    try:
        return resp.json()
    except ValueError:
        raise SchedulerError(
            f"scheduler at {url} sent a body that is not JSON for {method} {path}",
            resp.status_code,
        ) from None


def _raise_for(url: str, resp: httpx.Response, method: str, path: str) -> None:
    """Raise the error an error answer stands for (`errors.error_class`)."""
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    message = doc.get("error") if isinstance(doc, dict) else None
    message = message or f"scheduler answered HTTP {resp.status_code} to {method} {path}"
    kind = doc.get("kind") if isinstance(doc, dict) else None
    cls = error_class(resp.status_code, kind)
    if cls is None:
        raise SchedulerError(message, resp.status_code)
    if issubclass(cls, (UnauthorizedError, ForbiddenError)):
        message = f"scheduler at {url}: {message}"
    error = cls(message)
    if isinstance(error, SchedulerError) and error.status is None:
        error.status = resp.status_code
    if isinstance(error, SchedulerBusyError):
        error.retry_after = _retry_after(resp.headers.get("retry-after"))
    raise error


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (0-300), None when absent or not a number of seconds."""
    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return min(max(seconds, 0.0), 300.0) if math.isfinite(seconds) else None


__all__ = ["UNAVAILABLE", "Endpoints", "parse_urls"]
