"""`syncbit scheduler` and `syncbit daemon`: build a config from a YAML file and flags, set
up logging, and hand over to the service (which owns everything from there). Never runs
service logic itself; the services' modules load only when their command runs.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
from pathlib import Path
from typing import Annotated

import typer

from syncbit.cli.common import (
    ConfigOpt,
    FileRootsOpt,
    InsecureOpt,
    LogLevelOpt,
    TlsCertOpt,
    TlsKeyOpt,
    pairs,
)
from syncbit.cli.exits import guarded


class _Queued(logging.handlers.QueueHandler):
    """Hands records to a thread of its own that writes them with `handler`: a log call
    never waits for stderr (a pipe whose reader is slow blocks its writer), so the trio
    loop does not either. `flush` waits for what is queued (the CLI's error line comes
    after the log lines before it); `stop` writes the rest, at exit."""

    def __init__(self, handler: logging.Handler) -> None:
        self.records: queue.Queue[logging.LogRecord] = queue.Queue()  # unbounded
        super().__init__(self.records)
        # The message alone (arguments and traceback merged in): `handler` makes the line.
        self.setFormatter(logging.Formatter("%(message)s"))
        self._writer = logging.handlers.QueueListener(self.records, handler)
        self._writer.start()
        self._running = True

    def flush(self) -> None:
        if self._running:  # after `stop` nothing would ever mark a late record done
            self.records.join()

    def stop(self) -> None:
        if self._running:
            self._running = False
            self._writer.stop()


def _setup_logging(level: str) -> None:
    from syncbit.diskspace import LogHandler
    from syncbit.redact import ScrubbingFormatter

    # Written straight to stderr's descriptor, and a full disk under the log loses lines
    # (counted, and said so once it can write again) instead of raising.
    handler = LogHandler(sys.stderr.fileno())
    # Every line scrubbed: a library's debug line with a signed URL or a header leaks nothing.
    handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    queued = _Queued(handler)
    atexit.register(queued.stop)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[queued])
    # One line per control request is noise at info level; our own loggers say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@guarded
def scheduler(
    config: ConfigOpt = None,
    listen: Annotated[str | None, typer.Option(help="host:port to serve the API on.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Directory of the LMDB state.")] = None,
    node_timeout: Annotated[
        float | None, typer.Option(help="Seconds without heartbeat before a node is down.")
    ] = None,
    heartbeat_rate: Annotated[
        float | None,
        typer.Option(
            help="Heartbeats a second all nodes together are asked to keep to (default "
            "500): the interval nodes are told stretches to nodes / rate."
        ),
    ] = None,
    token_file: Annotated[Path | None, typer.Option(help="File with the cluster secret.")] = None,
    insecure: InsecureOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    file_roots: FileRootsOpt = None,
    log_level: LogLevelOpt = None,
    state: Annotated[
        str | None,
        typer.Option(
            help="etcd://h1:2379,h2:2379,...: keep the state in etcd and run as one of "
            "several replicas (one leads); without it, LMDB in --state-dir."
        ),
    ] = None,
    advertise: Annotated[
        str | None,
        typer.Option(help="URL the other replicas reach this one at (default: from --listen)."),
    ] = None,
) -> None:
    """Run the central scheduler until SIGTERM/SIGINT."""
    import trio

    from syncbit.config import SchedulerConfig, build
    from syncbit.scheduler.server import SchedulerServer

    cfg = build(
        SchedulerConfig,
        config,
        {
            "listen": listen,
            "state_dir": state_dir,
            "node_timeout": node_timeout,
            "heartbeat_rate": heartbeat_rate,
            "token_file": token_file,
            "insecure": insecure,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "file_roots": file_roots,
            "log_level": log_level,
            "state": state,
            "advertise": advertise,
        },
    )
    _setup_logging(cfg.log_level)
    from syncbit import gctune

    gctune.tune()
    server = SchedulerServer(cfg)
    server.start()
    logging.getLogger("syncbit.scheduler").info("scheduler listening on %s", server.url)

    async def wait_for_signal() -> None:
        import signal

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                return

    try:
        trio.run(wait_for_signal)
    finally:
        server.stop()


# One parameter per flag (typer reads the signature), hence the length.
@guarded
def daemon(
    config: ConfigOpt = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Scheduler URL, or its replicas' URL1,URL2,...; without it the scheduler "
            "runs embedded."
        ),
    ] = None,
    listen: Annotated[str | None, typer.Option(help="host:port of the peer service.")] = None,
    advertise: Annotated[str | None, typer.Option(help="host:port peers dial.")] = None,
    node: Annotated[str | None, typer.Option(help="Node name (default: hostname).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache directory.")] = None,
    cache_size: Annotated[str | None, typer.Option(help="Cache budget, e.g. 200GiB.")] = None,
    mount: Annotated[Path | None, typer.Option(help="Mount point (default /syncbit).")] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="Node label key=value (repeatable).")
    ] = None,
    read_deadline: Annotated[
        float | None, typer.Option(help="Seconds before a read fails with EIO.")
    ] = None,
    scheduler_listen: Annotated[
        str | None, typer.Option(help="host:port of the embedded scheduler.")
    ] = None,
    prefetch_concurrency: Annotated[
        int | None, typer.Option(help="Prefetch chunk transfers at once.")
    ] = None,
    prefetch_bandwidth: Annotated[
        str | None, typer.Option(help="Prefetch bandwidth cap in bytes/s, e.g. 100MB (0: none).")
    ] = None,
    upload_slots: Annotated[
        int | None, typer.Option(help="Prefetch transfers this node serves at once (0: any).")
    ] = None,
    passthrough: Annotated[
        bool | None,
        typer.Option(
            "--passthrough/--no-passthrough",
            help="Let the kernel read fully cached files directly (FUSE passthrough).",
        ),
    ] = None,
    kubernetes: Annotated[
        bool | None,
        typer.Option(
            "--kubernetes/--no-kubernetes",
            help="Keep this Node's syncbit.io/ds.* labels and warm-up taint in step.",
        ),
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Kubeconfig (default: in-cluster service account).")
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File with a bootstrap or node credential, or the cluster secret."),
    ] = None,
    insecure: InsecureOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA file the scheduler's and peers' certificates match.")
    ] = None,
    file_roots: FileRootsOpt = None,
    mirror_config: Annotated[
        Path | None,
        typer.Option(
            envvar="SYNCBIT_MIRROR_CONFIG",
            help="Run the node's registry mirror with this YAML (the `mirror` config "
            "section's keys, as `python -m syncbit.mirror serve --config` reads them).",
        ),
    ] = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Run a node: FUSE mount, cache, peer service (and the scheduler, if none is given)."""
    from syncbit.config import DaemonConfig, build, load_yaml

    cfg = build(
        DaemonConfig,
        config,
        {
            "scheduler": scheduler,
            "listen": listen,
            "advertise": advertise,
            "node": node,
            "cache_dir": cache_dir,
            "cache_size": cache_size,
            "mount": mount,
            "labels": pairs(label, "label"),
            "read_deadline": read_deadline,
            "scheduler_listen": scheduler_listen,
            "prefetch_concurrency": prefetch_concurrency,
            "prefetch_bandwidth": prefetch_bandwidth,
            "upload_slots": upload_slots,
            "passthrough": passthrough,
            "kubernetes": kubernetes,
            "kubeconfig": kubeconfig,
            "token_file": token_file,
            "insecure": insecure,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "tls_ca": tls_ca,
            "file_roots": file_roots,
            "mirror": load_yaml(mirror_config) if mirror_config is not None else None,
            "log_level": log_level,
        },
    )
    _setup_logging(cfg.log_level)
    from syncbit import gctune
    from syncbit.node import run

    gctune.tune()
    run(cfg)
