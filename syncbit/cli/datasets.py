"""`syncbit dataset add|ls|rm`, and the source options `dataset add` and `pull` send along.
Talks to the scheduler only; never lists a source itself (the scheduler does).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from syncbit.auth import DEFAULT_SCHEDULER
from syncbit.cli.common import (
    JsonOpt,
    NameArg,
    SchedulerOpt,
    any_dataset_name,
    dataset_name,
    pairs,
    scheduler_call,
)
from syncbit.cli.exits import guarded
from syncbit.humanize import size_text, table

app = typer.Typer(help="Register, list and remove datasets.", no_args_is_help=True)

SourceOptionOpt = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="Source option key=value (repeatable)."),
]


def source_options(uri: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options `pull`/`dataset add` send: for hf:// sources, the Hub token and endpoint
    of the user's shell (HF_TOKEN or the token file, HF_ENDPOINT) unless given with -o.
    The scheduler uses the token for this listing only and never stores it."""
    options = dict(given)
    if uri.lower().startswith("hf://"):
        import os

        from syncbit.hfenv import token_from_env

        if "token" not in options and (token := token_from_env()):
            options["token"] = token
        endpoint = os.environ.get("HF_ENDPOINT", "").strip()
        if "endpoint" not in options and endpoint:
            options["endpoint"] = endpoint
    return options


def print_warnings(result: dict[str, Any]) -> None:
    """The scheduler's warnings about a dataset it registered, one line each on stderr."""
    for warning in result.get("warnings") or []:
        typer.echo(f"warning: {warning}", err=True)


def read_options(prefetch_on_open: str | None, trace: str | None) -> dict[str, str]:
    """How nodes read the dataset, as the options `dataset add` sends (the scheduler
    checks their values like every other option's)."""
    given = {"prefetch_on_open": prefetch_on_open, "trace": trace}
    return {k: v for k, v in given.items() if v is not None}


@app.command("add")
@guarded
def dataset_add(
    name: Annotated[str, typer.Argument(help="Dataset name: /syncbit/<name>.")],
    uri: Annotated[str, typer.Argument(help="Source: http(s)://..., file:///...")],
    option: SourceOptionOpt = None,
    prefetch_on_open: Annotated[
        str | None,
        typer.Option(
            help="on, off or auto (the node's prefetch_on_open settings): an open() of a "
            "cold file fetches it whole in the background."
        ),
    ] = None,
    trace: Annotated[
        str | None,
        typer.Option(
            help="on (default) or off: record the first reader's access order and let the "
            "other nodes' prefetch follow it."
        ),
    ] = None,
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
) -> None:
    """Resolve a source to a fixed revision and register it (no bytes are downloaded)."""
    dataset_name(name)
    given = {**(pairs(option, "option") or {}), **read_options(prefetch_on_open, trace)}
    options = source_options(uri, given)
    result = scheduler_call(scheduler, lambda c: c.add_dataset(name, uri, options))
    print_warnings(result)
    ds = result["dataset"]
    verb = "added" if result.get("changed", True) else "unchanged"
    typer.echo(
        f"{verb} {ds['name']} revision {ds['revision']}: {ds['files']} files, "
        f"{size_text(ds['size'])}"
    )


def image_lines(datasets: list[dict[str, Any]]) -> list[str]:
    """Below a datasets table: each image dataset's pinned digest and its platforms."""
    rows = [
        [d["name"], d["image"]["digest"], ",".join(d["image"]["platforms"]) or "-"]
        for d in datasets
        if isinstance(d.get("image"), dict)
    ]
    return ["", *table(["IMAGE", "DIGEST", "PLATFORMS"], rows).splitlines()] if rows else []


@app.command("ls")
@guarded
def dataset_ls(scheduler: SchedulerOpt = DEFAULT_SCHEDULER, as_json: JsonOpt = False) -> None:
    """List registered datasets."""
    listing = scheduler_call(scheduler, lambda c: c.datasets())
    if as_json:
        typer.echo(json.dumps(listing["datasets"], indent=2))
        return
    rows = [
        [d["name"], d["revision"], str(d["files"]), size_text(d["size"]), d["source"]]
        for d in listing["datasets"]
    ]
    typer.echo(table(["NAME", "REVISION", "FILES", "SIZE", "SOURCE"], rows))
    for line in image_lines(listing["datasets"]):
        typer.echo(line)


@app.command("rm")
@guarded
def dataset_rm(name: NameArg, scheduler: SchedulerOpt = DEFAULT_SCHEDULER) -> None:
    """Remove a dataset from the scheduler (cached bytes are evicted later)."""
    any_dataset_name(name)
    scheduler_call(scheduler, lambda c: c.remove_dataset(name))
    typer.echo(f"removed {name}")


@app.command("trace")
@guarded
def dataset_trace(
    name: NameArg, scheduler: SchedulerOpt = DEFAULT_SCHEDULER, as_json: JsonOpt = False
) -> None:
    """Show the access trace other nodes' prefetch of a dataset follows: the order its
    first reader read its files and chunks in."""
    any_dataset_name(name)
    answer = scheduler_call(scheduler, lambda c: c.trace(name))
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    record = answer.get("trace")
    if not record:
        typer.echo(f"no access trace of {name} (revision {answer['revision']}) yet")
        return
    trace = record["trace"]
    runs = trace["runs"]
    typer.echo(
        f"{name} revision {answer['revision']}: recorded on {record['node']}, {len(runs)} "
        f"runs{'' if trace['complete'] else ' (partial: the reader did not read it all)'}"
    )
    rows = [[str(n), path, f"{first}-{last}"] for n, (path, first, last) in enumerate(runs, 1)]
    typer.echo(table(["#", "FILE", "CHUNKS"], rows))
