"""`syncbit pull`, `prefetch` and `wait`: bring a dataset to this node, assign it to nodes,
or wait until it is here. The bytes move in the daemons: these commands only ask and
follow (`cli.progress`), so `wait` loads no more than the stdlib client on its path.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from syncbit.auth import DEFAULT_DAEMON, DEFAULT_SCHEDULER
from syncbit.cli.common import DaemonOpt, NameArg, SchedulerOpt, dataset_name, pairs, scheduler_call
from syncbit.cli.datasets import SourceOptionOpt, print_warnings, source_options
from syncbit.cli.exits import guarded
from syncbit.errors import UserError
from syncbit.humanize import parse_duration, size_text


def default_name(uri: str) -> str:
    """The dataset name `pull` uses without --name: the URI's last path element (the
    bucket or host when the path is empty), characters outside the name rules replaced
    by `-` (`my%20model` -> `my-model`). Never a part of URL credentials."""
    import re
    from urllib.parse import unquote, urlsplit

    from syncbit.redact import redact_url

    if uri.lower().startswith("hf://"):
        rest = uri.split("://", 1)[1].split("@", 1)[0]
    else:
        try:
            parts = urlsplit(uri)
        except ValueError:
            parts = urlsplit("")
        rest = parts.path if parts.path.strip("/") else parts.hostname or ""
    last = unquote(rest.rstrip("/").rsplit("/", 1)[-1])
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", last).lstrip("._-")[:128].rstrip("-")
    if not name:
        raise UserError(f"cannot derive a dataset name from {redact_url(uri)!r}: give --name")
    return name


def _pull_options(
    uri: str,
    option: list[str] | None,
    revision: str | None,
    include: list[str] | None,
    exclude: list[str] | None,
) -> dict[str, Any]:
    """The source options of `pull`'s flags: -o pairs, then --revision/--include/--exclude."""
    options: dict[str, Any] = pairs(option, "option") or {}
    if revision is not None:
        if not uri.startswith("hf://"):
            raise UserError("--revision applies to hf:// sources only")
        options["revision"] = revision
    if include:
        options["include"] = include
    if exclude:
        options["exclude"] = exclude
    return source_options(uri, options)


@guarded
def pull(
    uri: Annotated[
        str | None, typer.Argument(help="Source URI: http(s)://, file://, s3://, hf://")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Dataset name (default: last path element of URI).")
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Branch, tag or commit (hf:// sources).")
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="Only files matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Skip files matching this glob (repeatable).")
    ] = None,
    option: SourceOptionOpt = None,
    cancel: Annotated[
        str | None,
        typer.Option(
            "--cancel",
            metavar="NAME",
            help="Stop the pull of dataset NAME on this node's daemon (what it has stays).",
        ),
    ] = None,
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
    daemon_addr: DaemonOpt = DEFAULT_DAEMON,
) -> None:
    """Register a dataset and bring every byte of it to this node; resumable.

    The daemon does the work: Ctrl-C asks whether to cancel it there too (without a
    terminal it goes on); `syncbit pull --cancel NAME` stops it."""
    from syncbit.cli import progress

    if cancel is not None:
        if uri is not None:
            raise UserError("give a source URI to pull, or --cancel NAME, not both")
        doc = progress.cancel(daemon_addr, cancel)
        typer.echo(
            f"cancelled the pull of {cancel} ({size_text(doc['present_bytes'])} of "
            f"{size_text(doc['size'])} here stay cached)"
        )
        return
    if uri is None:
        raise UserError("missing the source URI to pull (or --cancel NAME)")
    options = _pull_options(uri, option, revision, include, exclude)
    dataset = dataset_name(name) if name is not None else default_name(uri)
    result = scheduler_call(scheduler, lambda c: c.add_dataset(dataset, uri, options))
    print_warnings(result)
    ds = result["dataset"]
    typer.echo(
        f"{dataset}: revision {ds['revision']}, {ds['files']} files, {size_text(ds['size'])}",
        err=True,
    )
    try:
        progress.follow(daemon_addr, dataset)
    except KeyboardInterrupt:
        progress.interrupted(daemon_addr, dataset)
        raise typer.Exit(130) from None


def _targets(selector: str | None, nodes: str | None) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    if selector is not None:
        found = pairs([p for p in selector.split(",") if p], "selector") or {}
        targets.append({"selector": found})
    for node in (nodes or "").split(","):
        if node.strip():
            targets.append({"node": node.strip()})
    return targets


def _describe(targets: list[dict[str, Any]]) -> str:
    from syncbit.scheduler.state import describe_target

    return "; ".join(describe_target(t) for t in targets)


@guarded
def prefetch(
    name: NameArg,
    selector: Annotated[
        str | None,
        typer.Option(help="Nodes whose labels match all of k=v,k2=v2 (now and later)."),
    ] = None,
    nodes: Annotated[str | None, typer.Option(help="Node names n1,n2,...")] = None,
    remove: Annotated[
        bool, typer.Option("--remove", help="Drop these targets (no target: all of them).")
    ] = False,
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
) -> None:
    """Assign a dataset to nodes: they fetch it in the background and keep it cached.

    Without --selector or --nodes the dataset is assigned to every node.
    """
    dataset_name(name)
    targets = _targets(selector, nodes)
    if remove:
        left = scheduler_call(scheduler, lambda c: c.unassign(name, targets or None))
        typer.echo(f"{name}: removed {_describe(targets) if targets else 'all targets'}")
    else:
        left = scheduler_call(scheduler, lambda c: c.assign(name, targets))
    typer.echo(f"{name}: assigned to {_describe(left) if left else 'no nodes'}")


@guarded
def wait(
    name: NameArg,
    timeout: Annotated[
        str | None, typer.Option(help="Give up after this long, e.g. 30m (default: never).")
    ] = None,
    daemon_addr: DaemonOpt = DEFAULT_DAEMON,
) -> None:
    """Wait until a dataset is complete and verified on this node (an initContainer gate).

    Exit 0 when ready; 1 on timeout; 2 if the dataset does not exist.
    """
    from syncbit.cli.progress import follow

    dataset_name(name)
    seconds = parse_duration(timeout) if timeout is not None else None
    follow(daemon_addr, name, start=False, timeout=seconds)
