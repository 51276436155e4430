"""`syncbit volume publish|unpublish|ls`: CSI-like read-only bind mounts of datasets on this
host (`syncbit.volume` does the mounting and keeps the record). Never mounts anything
syncbit did not publish, never unmounts what it did not mount.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from syncbit.auth import DEFAULT_DAEMON
from syncbit.cli.common import DaemonOpt, JsonOpt, NameArg, dataset_name
from syncbit.cli.exits import guarded
from syncbit.humanize import parse_duration, table

app = typer.Typer(help="CSI-like volumes: read-only bind mounts of datasets.", no_args_is_help=True)

MountOpt = Annotated[
    Path,
    typer.Option("--mount", envvar="SYNCBIT_MOUNT", help="The daemon's mount point."),
]
StateOpt = Annotated[
    Path,
    typer.Option(
        "--state", envvar="SYNCBIT_VOLUME_STATE", help="Record of what this host published."
    ),
]
MOUNT = Path("/syncbit")
STATE = Path("/run/syncbit/volumes.json")


@app.command("publish")
@guarded
def volume_publish(
    name: NameArg,
    target: Annotated[Path, typer.Argument(help="Where to mount it (created if missing).")],
    wait_ready: Annotated[
        bool, typer.Option("--wait", help="Publish only once the dataset is ready here.")
    ] = False,
    timeout: Annotated[
        str | None, typer.Option(help="With --wait: give up after this long, e.g. 30m.")
    ] = None,
    mount: MountOpt = MOUNT,
    state: StateOpt = STATE,
    daemon_addr: DaemonOpt = DEFAULT_DAEMON,
) -> None:
    """Bind-mount /syncbit/NAME read-only at TARGET (idempotent, like CSI NodePublish)."""
    from syncbit.volume import Volumes

    dataset_name(name)
    if wait_ready:
        from syncbit.cli.progress import follow

        seconds = parse_duration(timeout) if timeout is not None else None
        follow(daemon_addr, name, start=False, timeout=seconds)
    pub = Volumes(mount, state).publish(name, target)
    typer.echo(f"published {pub.dataset} at {pub.target} (read-only)")


@app.command("unpublish")
@guarded
def volume_unpublish(
    target: Annotated[Path, typer.Argument(help="A target `volume publish` mounted.")],
    mount: MountOpt = MOUNT,
    state: StateOpt = STATE,
) -> None:
    """Unmount a published target (idempotent; refuses mounts syncbit did not make)."""
    from syncbit.volume import Volumes

    if Volumes(mount, state).unpublish(target):
        typer.echo(f"unpublished {target}")
    else:
        typer.echo(f"{target} is not published (nothing to do)")


@app.command("ls")
@guarded
def volume_ls(mount: MountOpt = MOUNT, state: StateOpt = STATE, as_json: JsonOpt = False) -> None:
    """List the volumes this host published."""
    from syncbit.volume import Volumes

    rows = Volumes(mount, state).list()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    typer.echo(
        table(
            ["TARGET", "DATASET", "STATE"],
            [
                [str(r["target"]), str(r["dataset"]), "mounted" if r["mounted"] else "stale"]
                for r in rows
            ],
        )
    )
