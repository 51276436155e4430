"""`syncbit token create` and `syncbit tls init`: credentials for a role, and the private CA
and certificates of a cluster. Prints what it issues and writes only new files; never
prints or logs the cluster secret.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from syncbit.auth import DEFAULT_SCHEDULER
from syncbit.cli.common import SchedulerOpt, scheduler_call
from syncbit.cli.exits import guarded
from syncbit.errors import UserError
from syncbit.humanize import parse_duration

token_app = typer.Typer(help="Credentials: issue one for a role.", no_args_is_help=True)
tls_app = typer.Typer(help="Certificates for TLS between all parts.", no_args_is_help=True)


@token_app.command("create")
@guarded
def token_create(
    role: Annotated[str, typer.Option(help="admin, node, reader or bootstrap.")],
    node: Annotated[str | None, typer.Option(help="With --role node: the node it is for.")] = None,
    ttl: Annotated[
        str | None,
        typer.Option(
            help="Valid for this long, e.g. 30d, 12h (default: until the cluster secret changes)."
        ),
    ] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(help="Sign here with the cluster secret in this file, no scheduler."),
    ] = None,
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
) -> None:
    """Issue a credential and print it. Needs an admin credential or the cluster secret
    ($SYNCBIT_TOKEN[_FILE]), or --secret-file to sign offline.

    Roles: reader (status, progress, wait: for workloads); node (one node's daemon);
    bootstrap (daemons trade it for their own node credential); admin (everything).
    """
    from syncbit.credentials import Role

    try:
        wanted = Role(role)
    except ValueError:
        raise UserError(
            f"unknown role {role!r}: one of {', '.join(r.value for r in Role)}"
        ) from None
    if (wanted is Role.NODE) != (node is not None):
        raise UserError("--node goes with --role node, and only with it")
    seconds = parse_duration(ttl) if ttl is not None else None
    if seconds is not None and seconds <= 0:
        raise UserError(f"--ttl must be positive, not {ttl!r}")
    if secret_file is not None:
        from syncbit.auth import read_token
        from syncbit.credentials import Issuer, is_credential

        secret = read_token(secret_file)
        assert secret is not None
        if is_credential(secret):
            raise UserError(f"{secret_file} holds a credential, not the cluster secret")
        token, _ = Issuer(secret).issue(wanted, node or "", seconds)
    else:
        doc = scheduler_call(scheduler, lambda c: c.issue_token(wanted.value, node, seconds))
        token = str(doc["token"])
    typer.echo(token)


@tls_app.command("init")
@guarded
def tls_init(
    directory: Annotated[Path, typer.Argument(help="Where to write the PEM files.")],
    scheduler_name: Annotated[
        list[str] | None,
        typer.Option(
            help="A name clients reach the scheduler by (repeatable; default: "
            "the Kubernetes Service's names, localhost, 127.0.0.1)."
        ),
    ] = None,
    daemon_name: Annotated[
        list[str] | None,
        typer.Option(
            help="The daemons' certificate name, peer_tls_name (repeatable; "
            "default: syncbit-daemon, localhost, 127.0.0.1)."
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the server certificates.")] = 825,
) -> None:
    """Make a private CA and the scheduler's and daemons' certificates (never overwrites).

    ca.crt goes to every client (tls_ca, SYNCBIT_TLS_CA); ca.key stays offline.
    """
    from syncbit import certs

    if days <= 0:
        raise UserError(f"--days must be positive, not {days}")
    written = certs.init(
        directory,
        tuple(scheduler_name or certs.SCHEDULER_NAMES),
        tuple(daemon_name or (certs.DAEMON_NAME, "localhost", "127.0.0.1")),
        days,
    )
    for path in written:
        typer.echo(str(path))
