"""The scheduler URLs a client knows (one, or one per replica) and one request over them
with failover; the mapping of transport failures and error answers onto syncbit's errors.

The replica that answered last is asked first; one that cannot be reached, or answers 503
(cannot answer now: no leader, no state store), hands the request to the next, each URL
at most once per request, with no sleep: the caller's loop owns backoff. Any replica may
take any request (followers forward to the leader), so failing over never changes what a
request means. No httpx or socket exception ever leaves this module.

Two ways to send, one failover: `Endpoints` (httpx under trio: daemons, the scheduler's
own calls) and `BlockingEndpoints` (the standard library: the CLI, whose start-up httpx
and trio would slow by ~0.15 s). A `SchedulerClient` built on the blocking one has async
methods that never suspend; `run_blocking` runs them without an event loop. Standard
library only at import.
"""

from __future__ import annotations

import http.client
import json
import math
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode, urlsplit

from syncbit import tls
from syncbit.auth import bearer
from syncbit.blocking_http import Connection
from syncbit.errors import (
    ForbiddenError,
    SchedulerBusyError,
    SchedulerError,
    UnauthorizedError,
    UserError,
    error_class,
)

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

UNAVAILABLE = 503  # the answer of a replica that cannot serve now: the next one may


@dataclass(frozen=True)
class Call:
    """One request, as every replica is asked it."""

    method: str
    path: str
    body: Any
    params: dict[str, str] | None
    timeout: float
    token: str | None  # instead of the client's own (None: that one)


@dataclass(frozen=True)
class Answer:
    """What one replica answered: the status, the body, its Retry-After header."""

    status: int
    body: bytes
    retry_after: str | None = None


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
            parsed = urlsplit(url)
            parsed.port  # noqa: B018 - raises ValueError for a port that is not one
        except ValueError as exc:
            raise UserError(f"invalid scheduler URL {item!r}: {exc}") from None
        if parsed.scheme.lower() not in ("http", "https") or not parsed.hostname:
            raise UserError(f"invalid scheduler URL {item!r}: expected http(s)://host:port")
        urls.append(url.rstrip("/"))
    if not urls:
        raise UserError("no scheduler URL given")
    return urls


class _Failover:
    """The URLs of one scheduler (cluster) and one request over them with failover; how a
    request reaches one URL is the subclass's `_send`."""

    def __init__(self, urls: str | Sequence[str], timeout: float) -> None:
        self.urls = parse_urls(urls)
        self.timeout = timeout
        self._first = 0

    @property
    def url(self) -> str:
        """The URL asked first: the one that answered last."""
        return self.urls[self._first]

    @property
    def https(self) -> bool:
        return any(u.lower().startswith("https://") for u in self.urls)

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
        wait = timeout if timeout is not None else self.timeout
        call = Call(method, path, body, params, wait, token)
        for step in range(count):
            index = (self._first + step) % count
            url = self.urls[index]
            try:
                answer = await self._send(url, call)
            except SchedulerError as exc:
                unreachable.append(exc)
                continue
            if answer.status == UNAVAILABLE and step < count - 1:
                try:
                    _raise_for(url, answer, method, path)
                except SchedulerError as exc:
                    refused = refused or exc
                continue
            self._first = index
            return _json(url, answer, method, path)
        if refused is not None:
            raise refused
        if count == 1:
            raise unreachable[0]
        raise SchedulerError(
            f"no scheduler of {', '.join(self.urls)} answered {method} {path}: "
            f"{'; '.join(str(e) for e in unreachable)}"
        )

    async def _send(self, url: str, call: Call) -> Answer:
        """The answer of `url`; SchedulerError (or TrustError) when it gave none."""
        raise NotImplementedError


class Endpoints(_Failover):
    """Failover over httpx's async client (under trio).

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
        import httpx

        super().__init__(urls, timeout)
        # trust_env off: a proxy from the environment must not sit between nodes and their
        # scheduler (cluster-internal addresses). Plain http never uses a TLS context, and
        # building the verifying one (the CA bundle) costs ~50 ms of every start.
        self.http = httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            trust_env=False,
            headers=bearer(token),
            verify=tls.client_context(ca) if self.https else False,
        )

    def set_token(self, token: str | None) -> None:
        self.http.headers.pop("Authorization", None)
        self.http.headers.update(bearer(token))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, url: str, call: Call) -> Answer:
        import httpx

        try:
            resp = await self.http.request(
                call.method,
                url + call.path,
                json=call.body,
                params=call.params,
                timeout=call.timeout,
                headers=bearer(call.token) if call.token is not None else None,
            )
        except httpx.TimeoutException as exc:
            raise _late(url, call, exc) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _failed(url, exc) from exc
        return Answer(resp.status_code, resp.content, resp.headers.get("retry-after"))


class BlockingEndpoints(_Failover):
    """Failover over the standard library's http.client, one keep-alive connection per
    URL: its `request` blocks and never suspends (see `run_blocking`). The same arguments
    as `Endpoints`, without a transport. No proxy from the environment either."""

    def __init__(
        self, urls: str | Sequence[str], timeout: float, token: str | None, ca: Path | None
    ) -> None:
        super().__init__(urls, timeout)
        self._context = tls.client_context(ca) if self.https else None
        self._headers = {"Accept": "application/json", **bearer(token)}
        self._conns: dict[str, Connection] = {}

    def set_token(self, token: str | None) -> None:
        self._headers.pop("Authorization", None)
        self._headers.update(bearer(token))

    async def aclose(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def _conn(self, url: str) -> Connection:
        conn = self._conns.get(url)
        if conn is None:
            parts = urlsplit(url)
            https = parts.scheme.lower() == "https"
            port = parts.port or (443 if https else 80)
            context = self._context if https else None
            conn = self._conns[url] = Connection(parts.hostname or "", port, self.timeout, context)
        return conn

    async def _send(self, url: str, call: Call) -> Answer:
        headers = dict(self._headers)
        if call.token is not None:
            headers.pop("Authorization", None)
            headers.update(bearer(call.token))
        payload = None
        if call.body is not None:
            payload = json.dumps(call.body).encode()
            headers["Content-Type"] = "application/json"
        query = f"?{urlencode(call.params)}" if call.params else ""
        target = urlsplit(url).path.rstrip("/") + call.path + query
        try:
            status, answer_headers, raw = self._conn(url).exchange(
                call.method, target, payload, headers, call.timeout
            )
        except TimeoutError as exc:
            raise _late(url, call, exc) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _failed(url, exc) from exc
        return Answer(status, raw, answer_headers.get("retry-after"))


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """The result of `coro`, run to its end without an event loop: a `SchedulerClient`
    method on `BlockingEndpoints`, whose awaits all end in blocking calls. RuntimeError if
    it suspends after all (it awaited something else)."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a blocking scheduler call suspended: it awaited more than a request")


def _late(url: str, call: Call, exc: BaseException) -> SchedulerError:
    return SchedulerError(
        f"scheduler at {url} did not answer {call.method} {call.path} in time: "
        f"{exc or type(exc).__name__}"
    )


def _failed(url: str, exc: BaseException) -> Exception:
    cert = tls.untrusted(exc)
    if cert is not None:  # a configuration to fix, not a replica to skip
        return tls.trust_error(
            f"scheduler at {url}",
            cert,
            "point tls_ca (daemon) or $SYNCBIT_TLS_CA (CLI) at the cluster's CA file",
        )
    return SchedulerError(f"scheduler at {url} unreachable: {exc or type(exc).__name__}")


def _json(url: str, answer: Answer, method: str, path: str) -> Any:
    if answer.status // 100 != 2:
        _raise_for(url, answer, method, path)
    try:
        return json.loads(answer.body)
    except ValueError:
        raise SchedulerError(
            f"scheduler at {url} sent a body that is not JSON for {method} {path}",
            answer.status,
        ) from None


def _raise_for(url: str, answer: Answer, method: str, path: str) -> None:
    """Raise the error an error answer stands for (`errors.error_class`)."""
    try:
        doc = json.loads(answer.body)
    except ValueError:
        doc = None
    message = doc.get("error") if isinstance(doc, dict) else None
    message = message or f"scheduler answered HTTP {answer.status} to {method} {path}"
    kind = doc.get("kind") if isinstance(doc, dict) else None
    cls = error_class(answer.status, kind)
    if cls is None:
        raise SchedulerError(message, answer.status)
    if issubclass(cls, (UnauthorizedError, ForbiddenError)):
        message = f"scheduler at {url}: {message}"
    error = cls(message)
    if isinstance(error, SchedulerError) and error.status is None:
        error.status = answer.status
    if isinstance(error, SchedulerBusyError):
        error.retry_after = _retry_after(answer.retry_after)
    raise error


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (0-300), None when absent or not a number of seconds."""
    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return min(max(seconds, 0.0), 300.0) if math.isfinite(seconds) else None


__all__ = [
    "UNAVAILABLE",
    "Answer",
    "BlockingEndpoints",
    "Call",
    "Endpoints",
    "parse_urls",
    "run_blocking",
]
