"""OCI registry sources: `oci://host[:port]/repository[:tag][@sha256:<hex>]`.

Owns the read side of the distribution API (`/v2/`): auth challenges (anonymous, basic,
bearer tokens), a tag resolved to its manifest digest at listing, image indexes walked (all
platforms, or one), and ranged blob reads that follow the registry's redirect to its
storage. The listing is an OCI image layout: `oci-layout`, `index.json` (the tag as
`org.opencontainers.image.ref.name`) and `blobs/sha256/<hex>` for every manifest, index,
config and layer, each addressed by its digest. Credentials come from the environment or a
Docker config.json of the machine that reads; they never enter options, manifests,
messages or logs, and an Authorization header never leaves the registry's host.

    reference    references, platforms, name syntax (pure)
    credentials  SYNCBIT_OCI_* and Docker config.json
    manifest     media types, descriptors, parse_manifest (pure)
    transport    where a URL may lead, capped bodies, httpx/TLS errors mapped
    auth         challenges and tokens          client   the /v2/ API of one repository
    layout       the walk that lists an image   source   OciSource (registered as oci://)
"""

from syncbit.sources.oci.client import RegistryClient
from syncbit.sources.oci.credentials import Credentials, find_credentials
from syncbit.sources.oci.layout import INLINE_LIMIT
from syncbit.sources.oci.manifest import (
    ACCEPT,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    parse_manifest,
)
from syncbit.sources.oci.reference import OciReference, Platform, parse_oci_uri
from syncbit.sources.oci.source import OPTION_KEYS, OciSource

__all__ = [
    "ACCEPT",
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "INLINE_LIMIT",
    "MAX_MANIFEST_BYTES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "OPTION_KEYS",
    "Credentials",
    "OciReference",
    "OciSource",
    "Platform",
    "RegistryClient",
    "find_credentials",
    "parse_manifest",
    "parse_oci_uri",
]
