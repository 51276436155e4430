"""Serving the mirror: its app over hypercorn on trio, on the configured address.

Owns the HTTP server's settings (connection timeouts, header limits, no server banner) and
the lifetime of what it builds: the cache, the upstream source and its clients, all
closed when the server stops. Builds nothing the node owns: the daemon passes its own
`BlobSource` to `serve` once it is wired in.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from syncbit.mirror.api import make_app
from syncbit.mirror.backend import Background, BlobSource
from syncbit.mirror.cache import BlobCache
from syncbit.mirror.config import MirrorConfig
from syncbit.mirror.upstream import UpstreamSource

__all__ = ["hypercorn_config", "run_mirror", "serve"]

log = logging.getLogger("syncbit.mirror")


def hypercorn_config(listen: str) -> Config:
    config = Config()
    config.bind = [listen]
    config.accesslog = None  # the mirror logs what fails itself; a line per blob is noise
    config.errorlog = logging.getLogger("syncbit.mirror.http")
    config.include_server_header = False
    config.keep_alive_timeout = 120  # idle seconds between requests of one connection
    config.read_timeout = 120  # seconds a request may take to arrive
    config.h11_max_incomplete_size = 16 * 1024  # request line and headers: a GET is small
    config.graceful_timeout = 5.0
    return config


async def serve(
    config: MirrorConfig,
    source: BlobSource,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `source` on `config.listen` until `shutdown` is set; `task_status.started`
    gets the addresses bound (http://host:port, the real port when asked for port 0)."""

    async def run(
        done: trio.CancelScope, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await hypercorn_serve(
            make_app(config, source),  # type: ignore[arg-type]
            hypercorn_config(config.listen),
            shutdown_trigger=shutdown.wait,
            task_status=task_status,
        )
        done.cancel()  # served to the end (gracefully): the background work ends too

    async with trio.open_nursery() as nursery:
        if isinstance(source, Background):
            # Its background work lives as long as the server: ended when serving ends.
            await nursery.start(source.run)
        binds: list[str] = await nursery.start(run, nursery.cancel_scope)
        log.info("registry mirror listening on %s", ", ".join(binds))
        task_status.started(binds)


async def run_mirror(
    config: MirrorConfig,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The standalone mirror: its own cache under `config.cache_dir`, blobs from upstream."""
    cache = await BlobCache.open(Path(config.cache_dir), config.cache_size)
    source = UpstreamSource(config, cache)
    try:
        await serve(config, source, shutdown, task_status=task_status)
    finally:
        with trio.CancelScope(shield=True):
            await source.close()
