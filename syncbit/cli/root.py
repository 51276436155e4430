"""The root `syncbit` command: every command and group, in the order `--help` lists them,
and `main`, the console entry point. Wiring only: the commands live in the modules of
their concern, and `cli.exits` turns every failure into an `error:` line.
"""

from __future__ import annotations

import typer

from syncbit.cli import cache, datasets, exits, nodes, security, services, status, transfer, volumes

app = typer.Typer(
    name="syncbit",
    help="Peer-assisted distribution of large files through a lazy read-only FUSE mount.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (
    services.scheduler,
    services.daemon,
    transfer.pull,
    transfer.prefetch,
    transfer.wait,
    status.status,
):
    app.command()(command)
app.add_typer(datasets.app, name="dataset")
app.add_typer(nodes.app, name="node")
app.add_typer(cache.app, name="cache")
app.add_typer(volumes.app, name="volume")
app.add_typer(security.token_app, name="token")
app.add_typer(security.tls_app, name="tls")


def main() -> None:
    """The `syncbit` command: runs the app and exits with its code."""
    exits.run(app)
