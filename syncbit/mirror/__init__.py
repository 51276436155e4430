"""The node-local registry mirror: the read side of the OCI distribution API that
containerd (hosts.toml) and CRI-O (registries.conf) pull through.

Owns the API (`api`), the interface to whoever holds the bytes (`backend.BlobSource`), a
verified cache of its own (`cache`), the first source (`upstream`: straight from the
registry) and serving (`server`). Never serves a byte that was not verified against its
digest, and never resolves a tag differently from the upstream registry.
"""

from syncbit.mirror.api import make_app
from syncbit.mirror.backend import Blob, BlobSource, Content, Repository
from syncbit.mirror.cache import BlobCache
from syncbit.mirror.config import MirrorConfig, UpstreamOptions
from syncbit.mirror.server import run_mirror, serve
from syncbit.mirror.upstream import UpstreamSource

__all__ = [
    "Blob",
    "BlobCache",
    "BlobSource",
    "Content",
    "MirrorConfig",
    "Repository",
    "UpstreamOptions",
    "UpstreamSource",
    "make_app",
    "run_mirror",
    "serve",
]
