"""What several commands share: the options that mean the same everywhere, the call to the
scheduler, `key=value` pairs and dataset names as typed. Imports only what every command
needs at start-up: the scheduler client loads inside `scheduler_call`, which blocks and
never loads trio or httpx.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from syncbit.auth import client_ca, client_token
from syncbit.errors import UserError

T = TypeVar("T")

SchedulerOpt = Annotated[
    str,
    typer.Option(
        "--scheduler",
        envvar="SYNCBIT_SCHEDULER",
        help="Scheduler URL, or its replicas' URL1,URL2,... (else $SYNCBIT_SCHEDULER, else "
        "http://127.0.0.1:7900).",
    ),
]
DaemonOpt = Annotated[
    str,
    typer.Option(
        "--daemon",
        envvar="SYNCBIT_DAEMON",
        help="This node's daemon, its --listen address, https://host:port for TLS "
        "(else $SYNCBIT_DAEMON).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
NameArg = Annotated[str, typer.Argument(help="Dataset name.")]
InsecureOpt = Annotated[
    bool | None,
    typer.Option(
        "--insecure",
        help="Serve beyond loopback without a token_file: anyone who reaches it may do anything.",
    ),
]
TlsCertOpt = Annotated[Path | None, typer.Option(help="PEM certificate (chain) to serve TLS with.")]
TlsKeyOpt = Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file; flags override it.")
]
FileRootsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--file-roots",
        help="A directory file:// datasets may name (repeatable; default: "
        "/var/lib/syncbit/datasets with a loopback-only scheduler, else none).",
    ),
]
LogLevelOpt = Annotated[str | None, typer.Option(help="debug, info, warning, error.")]


def scheduler_call(url: str, call: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """`call(client)` against the scheduler at `url` (or its replicas'), with this shell's
    credential; blocking, without an event loop (see `endpoints.run_blocking`)."""
    from syncbit.scheduler.client import SchedulerClient
    from syncbit.scheduler.endpoints import run_blocking

    client = SchedulerClient(url, token=client_token(), ca=client_ca(), blocking=True)
    try:
        return run_blocking(call(client))
    finally:
        run_blocking(client.aclose())


def pairs(values: list[str] | None, what: str) -> dict[str, str] | None:
    """`key=value` items as a mapping (None for none); UserError naming `what` otherwise."""
    if not values:
        return None
    found: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise UserError(f"invalid {what} {value!r}: expected key=value")
        found[key] = val
    return found


def dataset_name(name: str) -> str:
    """A dataset name as the scheduler accepts new ones (README, "Dataset names")."""
    from syncbit.names import validate_dataset_name

    return validate_dataset_name(name)


def any_dataset_name(name: str) -> str:
    """A dataset name to remove or evict: also one from before the name rules, if printable."""
    if not name or not name.isprintable() or "/" in name or len(name) > 255:
        return dataset_name(name)  # the same message as everywhere else
    return name
