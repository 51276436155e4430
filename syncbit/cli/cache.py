"""`syncbit cache ls|evict|verify|gc`: this node's cache, through its daemon's local
control API (`cli.daemon_client`). Never reads or changes the cache directory itself.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from syncbit.auth import DEFAULT_DAEMON
from syncbit.cli.common import DaemonOpt, JsonOpt, NameArg, any_dataset_name
from syncbit.cli.exits import guarded
from syncbit.humanize import seconds_text, size_text, table

app = typer.Typer(help="This node's cache: list, evict, collect, verify.", no_args_is_help=True)


def disk_full_warning(node: str, free: int) -> str:
    """The warning for a node whose cache filesystem is full."""
    return (
        f"warning: {node}: cache filesystem full ({size_text(free)} free): new chunks are not "
        "cached there until space is freed; cached data is still served"
    )


@app.command("ls")
@guarded
def cache_ls(daemon_addr: DaemonOpt = DEFAULT_DAEMON, as_json: JsonOpt = False) -> None:
    """What this node caches: objects, the files they back, pinned, last used."""
    from syncbit.cli.daemon_client import local

    doc = local(daemon_addr, "GET", "cache")
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    u = doc["usage"]
    typer.echo(
        f"cache: {size_text(u['used'])} of {size_text(u['budget'])} used, "
        f"{size_text(u['pinned'])} pinned, {u['evictions']} evictions "
        f"({size_text(u['evicted_bytes'])}), {size_text(u['disk_free'])} free on disk"
    )
    if u["disk_full"]:
        typer.echo(disk_full_warning("this node", u["disk_free"]))
    if u["pinned_over_budget"]:
        typer.echo(
            f"warning: assigned datasets need {size_text(u['pinned_size'])}, more than the budget"
        )
    now = time.time()
    rows = [_object_row(o, now) for o in doc["objects"]]
    typer.echo(table(["FILE", "CACHED", "PINNED", "LAST USED", "OBJECT"], rows))


def _object_row(o: dict[str, Any], now: float) -> list[str]:
    files = o["files"]
    shown = files[0] + (f" (+{len(files) - 1})" if len(files) > 1 else "") if files else "-"
    ago = now - o["last_used"] if o["last_used"] else None
    return [
        shown,
        f"{size_text(o['held'])}/{size_text(o['size'])}",
        "yes" if o["pinned"] else "-",
        "-" if ago is None else f"{seconds_text(ago)} ago",
        o["id"][:12],
    ]


@app.command("evict")
@guarded
def cache_evict(
    name: NameArg,
    force: Annotated[
        bool, typer.Option("--force", help="Evict even if assigned here (fetched again).")
    ] = False,
    daemon_addr: DaemonOpt = DEFAULT_DAEMON,
) -> None:
    """Drop a dataset's cached bytes on this node (content other assigned datasets share
    stays; files being read stay until closed)."""
    from syncbit.cli.daemon_client import local

    any_dataset_name(name)
    doc = local(daemon_addr, "POST", "cache/evict", {"dataset": name, "force": force})
    extra = []
    if doc["shared"]:
        extra.append(f"{doc['shared']} objects kept (shared with assigned datasets)")
    if doc["in_use"]:
        extra.append(f"{doc['in_use']} objects kept (in use)")
    typer.echo(
        f"evicted {name}: {size_text(doc['freed'])} freed"
        + (f"; {'; '.join(extra)}" if extra else "")
    )


@app.command("verify")
@guarded
def cache_verify(daemon_addr: DaemonOpt = DEFAULT_DAEMON, as_json: JsonOpt = False) -> None:
    """Re-read every cached chunk and check it against its digest; drop the bad ones
    (fetched again when needed). Exit 0 if all were good, 1 if some were dropped."""
    from syncbit.cli.daemon_client import local

    runs = []
    while True:
        doc = local(daemon_addr, "POST", "cache/verify", {})  # joins a pass under way
        while doc["running"]:
            doc = local(daemon_addr, "GET", "cache/verify?wait=30")
        runs.append(doc)
        if doc["reason"] == "requested":  # a pass over everything, not one after a crash
            break
    dropped = [d for run in runs for d in run["dropped"]]
    if as_json:
        typer.echo(json.dumps(runs[-1] | {"dropped": dropped}, indent=2, sort_keys=True))
    else:
        for run in runs:
            took = (run["finished"] or run["started"]) - run["started"]
            typer.echo(
                f"verify ({run['reason']}): {run['checked']} chunks "
                f"({size_text(run['checked_bytes'])}) of {run['objects']} objects checked in "
                f"{seconds_text(took)}, {len(run['dropped'])} dropped"
            )
        for d in dropped:
            files = ", ".join(d["files"]) or "no known dataset"
            typer.echo(f"dropped: chunk {d['chunk']} of object {d['object'][:12]} ({files})")
    if dropped:
        raise typer.Exit(1)


@app.command("gc")
@guarded
def cache_gc(daemon_addr: DaemonOpt = DEFAULT_DAEMON) -> None:
    """Remove cached objects no known dataset uses and files left by crashes."""
    from syncbit.cli.daemon_client import local

    doc = local(daemon_addr, "POST", "cache/gc", {})
    typer.echo(f"gc: {size_text(doc['freed'])} freed; {size_text(doc['usage']['used'])} in use")
