"""`OciSource`: the `oci://` scheme's options, its listing (an OCI image layout, built by
`layout` in a worker thread) and its reads: inline bytes from the dataset manifest, or
manifests and blob ranges from the registry, each checked against its sha256. Keeps no
credential: `credentials.find_credentials` is asked on each machine that reads.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from typing import Any

import trio

from syncbit.errors import InvalidSourceError, SourceChangedError, SourceError
from syncbit.manifest import FileEntry
from syncbit.sources.base import Listing, Source, abandon_on_cancel, pinned_size, register
from syncbit.sources.fences import Fences
from syncbit.sources.oci.client import RegistryClient
from syncbit.sources.oci.credentials import find_credentials
from syncbit.sources.oci.layout import layout
from syncbit.sources.oci.manifest import check_digest
from syncbit.sources.oci.reference import Platform, parse_oci_uri
from syncbit.wire import Abort

log = logging.getLogger("syncbit.sources.oci")

OPTION_KEYS = frozenset({"platform", "insecure", "ca", "timeout"})
DEFAULT_TIMEOUT = 30.0
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _bool_option(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidSourceError(f"invalid OCI option {key}={value!r}: expected true or false")


@register
class OciSource(Source):
    """One image (or multi-platform index) of an OCI registry, as an OCI image layout.

    Options (none secret): `platform` (`os/arch[/variant]`: only that image of an index;
    default: every platform), `insecure` (true: plain HTTP to the registry, token realm
    and redirects; default false: HTTPS only), `ca` (a PEM file on every reading machine,
    trusted in addition to the system's CAs), `timeout` (seconds per request).

    Credentials: see `find_credentials`; read on each machine that lists or reads.

    The revision is the manifest digest the reference resolved to at listing: a new
    listing of the same tag makes a new revision only if that digest changed. Every file
    is addressed by its sha256 (`identity_digest("sha256", hex)`, as HF LFS files are, so
    equal blobs are one object everywhere) and carries it in `version["sha256"]` for the
    whole-object check. Locators: `data:<base64>` (index.json, oci-layout and small
    manifests, served from the dataset manifest itself), `manifest:<digest>` and
    `blob:<digest>` (read from the registry)."""

    schemes = ("oci",)

    def __init__(
        self, uri: str, options: dict[str, Any] | None = None, fences: Fences | None = None
    ) -> None:
        super().__init__(uri, options, fences)
        self.ref = parse_oci_uri(uri)
        unknown = sorted(set(self.options) - OPTION_KEYS)
        if unknown:
            raise InvalidSourceError(
                f"unknown option {unknown[0]!r} for oci:// sources; valid options: "
                + ", ".join(sorted(OPTION_KEYS))
            )
        opts = self.options
        self.insecure = _bool_option(opts.get("insecure", False), "insecure")
        platform = opts.get("platform")
        self.platform = Platform.parse(str(platform)) if platform not in (None, "") else None
        ca = opts.get("ca")
        self.ca = str(ca) if ca not in (None, "") else None
        if self.ca and self.insecure:
            raise InvalidSourceError(
                "OCI options ca and insecure=true exclude each other: insecure=true speaks "
                "plain HTTP to the registry"
            )
        try:
            self.timeout = float(opts.get("timeout", DEFAULT_TIMEOUT))
            if not 0 < self.timeout <= 3600:
                raise ValueError
        except (TypeError, ValueError):
            raise InvalidSourceError(
                f"invalid OCI option timeout={opts.get('timeout')!r}: seconds, 0 < t <= 3600"
            ) from None
        self.client = RegistryClient(
            self.ref,
            self.insecure,
            self.ca,
            self.timeout,
            lambda: find_credentials(self.ref.registry),
        )

    # -- listing ---------------------------------------------------------------------------

    async def list(self) -> Listing:
        result: Listing = await trio.to_thread.run_sync(self._list, **abandon_on_cancel())
        return result

    def _list(self) -> Listing:
        files, root = layout(self.client, self.platform)
        log.info("listed %s: %s (%d files)", self.ref, root, len(files))
        return Listing(files=files)

    # -- reads -----------------------------------------------------------------------------

    def read_into(
        self, entry: FileEntry, offset: int, buf: memoryview, abort: Abort | None = None
    ) -> None:
        want = len(buf)
        if want == 0:
            return
        size = pinned_size(entry, offset, want)
        expected = entry.version.get("sha256", "")
        kind, _, rest = entry.locator.partition(":")
        what = f"{entry.path} of {self.client.where}"
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise SourceError(f"cannot read {what}: the manifest records no sha256 for it")
        digest = f"sha256:{expected}"
        if kind == "data":
            try:
                data = base64.b64decode(rest, validate=True)
            except binascii.Error:
                raise SourceError(f"cannot read {what}: its inline bytes are not base64") from None
            check_digest(data, digest, what)
            buf[:] = data[offset : offset + want]
            return
        if rest != digest:
            raise SourceError(f"cannot read {what}: locator and digest disagree")
        if kind == "manifest":
            body, _, _ = self.client.manifest(
                digest,
                what,
                lambda detail: SourceChangedError(f"source changed: {what} is gone{detail}"),
            )
            check_digest(body, digest, what)
            if len(body) != size:
                raise SourceError(f"cannot read {what}: {len(body)} bytes, listed as {size}")
            buf[:] = body[offset : offset + want]
            return
        if kind != "blob":
            raise SourceError(f"cannot read {what}: unknown locator kind {kind[:20]!r}")
        self.client.read_blob(digest, offset, buf, size, what)
        if offset == 0 and want == size:
            # The whole blob in one read: checked here, before anyone sees a byte of it.
            check_digest(buf, digest, what)

    def close(self) -> None:
        self.client.close()
