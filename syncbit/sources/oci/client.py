"""The distribution API (`/v2/`) of one repository: manifests by tag or digest, ranged blob
reads, and the registry's redirects followed by hand under `transport.check_target`,
the Authorization header dropped once a hop leaves the registry's origin. Blocking and
thread-safe: worker threads only. Decides nothing about what to list (see `layout`).
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import httpx

from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceUnavailableError,
)
from syncbit.sources.base import check_range_body
from syncbit.sources.oci.auth import RegistryAuth
from syncbit.sources.oci.credentials import Credentials
from syncbit.sources.oci.manifest import ACCEPT, MAX_MANIFEST_BYTES
from syncbit.sources.oci.reference import PRINTABLE, OciReference
from syncbit.sources.oci.transport import (
    TEMPORARY,
    check_target,
    origin,
    read_capped,
    scrub_urls,
    tls_failure,
    transport_error,
)
from syncbit.wire import Pool, Response, WireError

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _registry_errors(body: bytes) -> str:
    """The error codes of a distribution error body, for messages (never the whole body)."""
    try:
        errors = json.loads(body).get("errors") or []
        codes = [str(e.get("code"))[:40] for e in errors if isinstance(e, dict) and e.get("code")]
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""
    return ", ".join(c for c in codes[:3] if PRINTABLE.match(c))


class _Pool(Pool):
    """wire.Pool with the registry's TLS context and no redirect following of its own:
    redirects are followed by `RegistryClient` under the registry's rules."""

    def __init__(self, timeout: float, context: Callable[[], ssl.SSLContext]) -> None:
        super().__init__(timeout=timeout)
        self._context = context

    def _ssl(self) -> ssl.SSLContext:
        return self._context()

    def get_once(self, url: str, offset: int, buf: memoryview, headers: dict[str, str]) -> Response:
        return self._get_once(url, offset, buf, headers)


class RegistryClient:
    """The distribution API of one repository, for listing and for reads (auth by
    `RegistryAuth`). Thread-safe; blocking (worker threads only)."""

    def __init__(
        self,
        ref: OciReference,
        insecure: bool,
        ca: str | None,
        timeout: float,
        credentials: Callable[[], Credentials | None],
    ) -> None:
        self.ref = ref
        self.insecure = insecure
        self.ca = ca
        self.scheme = "http" if insecure else "https"
        self.base = f"{self.scheme}://{ref.api_host}"
        self.origin = origin(self.base)
        self.auth = RegistryAuth(ref, insecure, credentials, self._client)
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._http: httpx.Client | None = None
        self._timeout = timeout
        self._pool = _Pool(timeout, self._tls)

    @property
    def where(self) -> str:
        return f"{self.ref.repository} on registry {self.ref.registry}"

    def _tls(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                context = ssl.create_default_context()
                if self.ca:
                    try:
                        context.load_verify_locations(cafile=self.ca)
                    except (OSError, ssl.SSLError) as exc:
                        raise InvalidSourceError(
                            f"cannot load the CA file {self.ca} for registry "
                            f"{self.ref.registry}: {getattr(exc, 'strerror', None) or exc}"
                        ) from None
                self._context = context
            return self._context

    def _client(self) -> httpx.Client:
        context = self._tls()
        with self._lock:
            if self._http is None:
                self._http = httpx.Client(
                    verify=context,
                    timeout=self._timeout,
                    follow_redirects=False,  # followed by hand, under `_next_hop`'s rules
                    trust_env=False,
                    headers={"Accept-Encoding": "identity"},
                )
            return self._http

    def close(self) -> None:
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()
        self._pool.close()

    # -- auth ---------------------------------------------------------------------------
    # -- requests -----------------------------------------------------------------------

    def _check_target(self, url: str, where: str, downgrade: bool = True) -> None:
        """`transport.check_target` under this registry's `insecure` setting."""
        check_target(url, where, self.insecure, downgrade)

    def _next_hop(
        self, url: str, location: str, headers: dict[str, str]
    ) -> tuple[str, dict[str, str]]:
        """Where a redirect may go, and with which headers: http(s) only, never from https
        down to http (unless insecure), never to a link-local or unspecified address, and
        without the registry's Authorization once it leaves the registry's host."""
        target = urljoin(url, location)
        where = f"a redirect from registry {self.ref.registry}"
        self._check_target(target, where, downgrade=urlsplit(url).scheme.lower() == "https")
        if origin(target) != self.origin:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return target, headers

    def manifest(
        self, reference: str, what: str, missing: Callable[[str], SourceError | InvalidSourceError]
    ) -> tuple[bytes, str | None, str | None]:
        """GET a manifest (tag or digest): (body, Content-Type, Docker-Content-Digest).
        A 404 raises `missing(detail)`."""
        url = f"{self.base}/v2/{self.ref.repository}/manifests/{reference}"
        for _ in range(3):  # anonymous, then as challenged, then with a renewed token
            auth, fresh = self.auth.authorization()
            headers = {"Accept": ACCEPT, **({"Authorization": auth} if auth else {})}
            status, resp_headers, body, final = self._get_small(url, headers, what)
            if status == 401 and origin(final) == self.origin:
                self.auth.challenged(resp_headers.get("www-authenticate"), auth, fresh)
                continue
            break
        codes = _registry_errors(body)
        detail = f" ({codes})" if codes else ""
        if status == 200:
            return body, resp_headers.get("content-type"), resp_headers.get("docker-content-digest")
        if status == 404:
            raise missing(detail)
        if status == 401:
            raise self.auth.refused(self.auth.credentials(), None)
        if status == 403:
            raise SourceError(f"registry {self.ref.registry} denied access to {what}{detail}")
        if status in TEMPORARY or status >= 500:
            raise SourceUnavailableError(
                f"registry {self.ref.registry} is unavailable: HTTP {status}"
            )
        raise SourceError(f"registry {self.ref.registry} answered HTTP {status} for {what}{detail}")

    def _get_small(
        self, url: str, headers: dict[str, str], what: str
    ) -> tuple[int, httpx.Headers, bytes, str]:
        """A GET of a bounded body (manifests), following redirects under `_next_hop`."""
        client = self._client()
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with client.stream("GET", url, headers=headers) as resp:
                    if resp.status_code in _REDIRECTS and "location" in resp.headers:
                        url, headers = self._next_hop(url, resp.headers["location"], headers)
                        continue
                    body = read_capped(resp, MAX_MANIFEST_BYTES, what)
                    return resp.status_code, resp.headers, body, url
            except httpx.HTTPError as exc:
                raise transport_error(exc, f"registry {self.ref.registry}") from exc
        raise SourceError(f"too many redirects reading {what}")

    def read_blob(self, digest: str, offset: int, buf: memoryview, size: int, what: str) -> None:
        """Bytes [offset, offset+len(buf)) of blob `digest` (of `size` bytes) into `buf`,
        by a ranged GET, following the registry's redirect to its storage."""
        url = f"{self.base}/v2/{self.ref.repository}/blobs/{digest}"
        for _ in range(3):  # anonymous, then as challenged, then with a renewed token
            auth, fresh = self.auth.authorization()
            headers = {"Accept-Encoding": "identity", **({"Authorization": auth} if auth else {})}
            resp, final = self._get_range(url, offset, buf, headers, what)
            if resp.status == 401 and origin(final) == self.origin:
                self.auth.challenged(resp.headers.get("www-authenticate"), auth, fresh)
                continue
            break
        at_registry = origin(final) == self.origin
        status = resp.status
        if status == 401:
            raise self.auth.refused(self.auth.credentials(), None)
        if status in (404, 410, 416):
            raise SourceChangedError(f"source changed: {what} is gone (HTTP {status})")
        if status == 403:
            if at_registry:
                raise SourceError(f"registry {self.ref.registry} denied access to {what}")
            # A storage URL whose signature expired: the next try gets a new one.
            raise SourceUnavailableError(f"cannot read {what}: HTTP 403 from blob storage")
        if status in TEMPORARY or status >= 500:
            raise SourceUnavailableError(f"cannot read {what}: HTTP {status}")
        if status not in (200, 206):
            raise SourceError(f"cannot read {what}: HTTP {status}")
        served = resp.headers.get("docker-content-digest")
        if served and served != digest:
            raise SourceError(f"cannot read {what}: the registry served {served[:80]} instead")
        check_range_body(
            resp,
            offset,
            len(buf),
            size,
            what,
            lambda why: SourceChangedError(f"source changed: {what} is {why}, not {size}"),
        )

    def _get_range(
        self, url: str, offset: int, buf: memoryview, headers: dict[str, str], what: str
    ) -> tuple[Response, str]:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = self._pool.get_once(url, offset, buf, headers)
            except WireError as exc:
                where = urlsplit(url).netloc
                raise tls_failure(exc, where) or SourceUnavailableError(
                    f"cannot read {what} from {where}: {scrub_urls(str(exc))}"
                ) from exc
            if resp.status in _REDIRECTS and "location" in resp.headers:
                url, headers = self._next_hop(url, resp.headers["location"], headers)
                continue
            return resp, url
        raise SourceError(f"too many redirects reading {what}")
