"""`python -m syncbit.mirror serve`: the registry mirror on its own, until SIGTERM/SIGINT
(before it is part of the daemon, and for nodes that only mirror); `python -m
syncbit.mirror hosts`: containerd's hosts.toml files for it. Bad flags or config: one
`error:` line and exit 2; a failure to start (address in use, cache unwritable): exit 1.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from syncbit.config import build
from syncbit.errors import SyncbitError, UserError
from syncbit.mirror.config import MirrorConfig
from syncbit.mirror.hosts import write_hosts
from syncbit.mirror.server import run_mirror

app = typer.Typer(add_completion=False, no_args_is_help=True)
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config.")]


def _setup_logging(level: str) -> None:
    from syncbit.redact import ScrubbingFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    # One line per request phase from the HTTP client: noise next to what the mirror says.
    for name in ("httpx", "httpcore", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _config(config_file: Path | None, flags: dict[str, Any], insecure: list[str]) -> MirrorConfig:
    """The config from the file and flags; `insecure` registries added over plain HTTP."""
    try:
        config = build(MirrorConfig, config_file, flags)
        if insecure:
            registries = {k: v.model_dump() for k, v in config.registries.items()}
            registries.update({host: {"insecure": True} for host in insecure})
            config = build(MirrorConfig, None, {**config.model_dump(), "registries": registries})
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return config


@app.command()
def serve(
    config_file: ConfigOpt = None,
    listen: Annotated[str | None, typer.Option(help="host:port (default 127.0.0.1:5050).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="The mirror's own cache.")] = None,
    cache_size: Annotated[str | None, typer.Option(help="e.g. 20GiB.")] = None,
    insecure_registry: Annotated[
        list[str] | None,
        typer.Option(help="A registry reached over plain HTTP (repeatable)."),
    ] = None,
    default_registry: Annotated[
        str | None, typer.Option(help="Upstream of requests without ?ns= (CRI-O).")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning.")] = None,
) -> None:
    """Serve the read side of the OCI distribution API for the registries mirrored."""
    flags: dict[str, Any] = {
        "listen": listen,
        "cache_dir": cache_dir,
        "cache_size": cache_size,
        "default_registry": default_registry,
        "log_level": log_level,
    }
    config = _config(config_file, flags, insecure_registry or [])
    _setup_logging(config.log_level)
    try:
        trio.run(_run, config)
    except BaseException as exc:  # mapped below, else raised again
        cause = _single(exc)
        if isinstance(cause, KeyboardInterrupt):
            raise typer.Exit(130) from None
        if isinstance(cause, OSError):
            errno_ = cause.errno
            why = "address in use" if errno_ == errno.EADDRINUSE else cause.strerror or str(cause)
            typer.echo(f"error: cannot serve the mirror on {config.listen}: {why}", err=True)
            raise typer.Exit(1) from None
        if isinstance(cause, SyncbitError):
            typer.echo(f"error: {cause}", err=True)
            raise typer.Exit(1) from None
        raise


def _single(exc: BaseException) -> BaseException:
    """The one error inside nurseries' exception groups (trio >= 0.25 always groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@app.command()
def hosts(
    certs_d: Annotated[
        Path, typer.Option(help="containerd's config_path (e.g. /etc/containerd/certs.d).")
    ],
    config_file: ConfigOpt = None,
    mirror: Annotated[
        str | None, typer.Option(help="The mirror's URL (default: from its listen address).")
    ] = None,
    insecure_registry: Annotated[
        list[str] | None,
        typer.Option(help="A registry reached over plain HTTP (repeatable)."),
    ] = None,
) -> None:
    """Write a hosts.toml for every registry mirrored: the mirror first, the registry as
    the fallback (files syncbit did not write are left alone)."""
    config = _config(config_file, {}, insecure_registry or [])
    _setup_logging(config.log_level)
    try:
        written = write_hosts(certs_d, config, mirror)
    except OSError as exc:
        typer.echo(f"error: cannot write under {certs_d}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    for path in written:
        typer.echo(f"wrote {path}")


async def _run(config: MirrorConfig) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_mirror, config, shutdown)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                shutdown.set()
                break


if __name__ == "__main__":
    app()
