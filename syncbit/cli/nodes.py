"""`syncbit node label|trust|ls`: nodes as the scheduler knows them, and their rows in
tables (`status` shows the same). Talks to the scheduler only, never to a node.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from syncbit.auth import DEFAULT_SCHEDULER
from syncbit.cli.common import JsonOpt, SchedulerOpt, pairs, scheduler_call
from syncbit.cli.exits import guarded
from syncbit.humanize import table

app = typer.Typer(help="Nodes as the scheduler knows them.", no_args_is_help=True)

NodeArg = Annotated[str, typer.Argument(help="Node name.")]


@app.command("label")
@guarded
def node_label(
    node: NodeArg,
    labels: Annotated[
        list[str], typer.Argument(help="key=value to set, key- to remove (kubectl style).")
    ],
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
) -> None:
    """Change a node's labels without restarting it; assignments by selector follow."""
    set_: dict[str, str] = {}
    remove: list[str] = []
    for item in labels:
        if item.endswith("-") and "=" not in item:
            remove.append(item[:-1])
        else:
            set_.update(pairs([item], "label") or {})
    record = scheduler_call(scheduler, lambda c: c.edit_labels(node, set_, remove))
    shown = ",".join(f"{k}={v}" for k, v in sorted(record["labels"].items())) or "(none)"
    typer.echo(f"{node}: {shown}")


@app.command("trust")
@guarded
def node_trust(node: NodeArg, scheduler: SchedulerOpt = DEFAULT_SCHEDULER) -> None:
    """Lift a node's quarantine: it is offered as a peer and heard again. The digests it
    established before were forgotten and stay so."""
    scheduler_call(scheduler, lambda c: c.lift_quarantine(node))
    typer.echo(f"{node}: quarantine lifted")


@app.command("ls")
@guarded
def node_ls(scheduler: SchedulerOpt = DEFAULT_SCHEDULER, as_json: JsonOpt = False) -> None:
    """List nodes with their labels and the datasets ready on them."""
    nodes = scheduler_call(scheduler, lambda c: c.nodes())
    if as_json:
        typer.echo(json.dumps(nodes, indent=2, sort_keys=True))
        return
    typer.echo(table(["NODE", "ADDRESS", "LABELS", "STATE", "READY"], node_rows(nodes)))


def node_rows(nodes: list[dict[str, Any]]) -> list[list[str]]:
    """NODE, ADDRESS, LABELS, STATE, READY of each node."""
    return [
        [
            n["name"],
            n["address"],
            ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-",
            ("up" if n["up"] else "down") + (" quarantined" if n.get("quarantined") else ""),
            ",".join(sorted(n.get("ready", {}))) or "-",
        ]
        for n in nodes
    ]
