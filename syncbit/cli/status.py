"""`syncbit status`: the scheduler's view of the cluster as two tables (nodes, datasets)
and the warnings a person should act on. Reads only; `--json` prints the document as the
scheduler sent it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from syncbit.auth import DEFAULT_SCHEDULER
from syncbit.cli.cache import disk_full_warning
from syncbit.cli.common import SchedulerOpt, scheduler_call
from syncbit.cli.datasets import image_lines
from syncbit.cli.exits import guarded
from syncbit.cli.nodes import node_rows
from syncbit.humanize import size_text, table


@guarded
def status(
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
    as_json: Annotated[bool, typer.Option("--json", help="Stable JSON (see README).")] = False,
) -> None:
    """Nodes, datasets and bytes cached per node."""
    doc = scheduler_call(scheduler, lambda c: c.status())
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    nodes = [
        [*row[:4], size_text(n.get("cache_bytes", 0)), row[4]]
        for n, row in zip(doc["nodes"], node_rows(doc["nodes"]), strict=True)
    ]
    typer.echo(table(["NODE", "ADDRESS", "LABELS", "STATE", "CACHED", "READY"], nodes))
    for line in _warnings(doc):
        typer.echo(line)
    typer.echo("")
    datasets = [
        [
            d["name"],
            d["revision"],
            str(d["files"]),
            size_text(d["size"]),
            " ".join(f"{n}:{size_text(b)}" for n, b in sorted(d.get("cached", {}).items())) or "-",
            _readiness(d),
            d["source"],
        ]
        for d in doc["datasets"]
    ]
    typer.echo(
        table(["DATASET", "REVISION", "FILES", "SIZE", "CACHED", "READY", "SOURCE"], datasets)
    )
    for line in image_lines(doc["datasets"]):
        typer.echo(line)


def _warnings(doc: dict[str, Any]) -> Iterator[str]:
    """What needs a person: full disks, budgets too small, quarantines, disputes, breaks."""
    for n in doc["nodes"]:
        if n.get("disk_full"):
            yield disk_full_warning(n["name"], n.get("disk_free", 0))
        if n.get("pinned_over_budget"):
            yield (
                f"warning: {n['name']}: assigned datasets need {size_text(n['pinned_bytes'])}, "
                f"more than its cache budget of {size_text(n['cache_size'])}; they cannot all "
                "stay cached"
            )
    for q in doc.get("quarantined", []):
        yield (
            f"warning: node {q['node']} is quarantined: {q['reason']} (not offered as a peer, "
            f"its reports ignored; `syncbit node trust {q['node']}` lifts it)"
        )
    for d in doc.get("disputes", []):
        yield (
            f"note: chunk {d['chunk']} of {d['dataset']}/{d['path']} is disputed "
            f"({d['reporter']} vs {d['establisher'] or 'the record'}); "
            f"{d['checker'] or 'a third node (none up yet)'} re-checks it against the source"
        )
    for d in doc["datasets"]:
        for b in d.get("broken", []):
            yield (
                f"warning: {d['name']}/{b['path']} is broken: {b['reason']}; reads fail until "
                f"`syncbit dataset add {d['name']} {d['source']}` picks up the current content"
            )


def _readiness(d: dict[str, Any]) -> str:
    """'2/3 assigned' and who is ready: the at-a-glance answer to "is it there yet?"."""
    assigned, ready = d.get("assigned", []), d.get("ready", [])
    if not assigned:
        return ",".join(ready) or "-"
    done = [n for n in assigned if n in ready]
    return f"{len(done)}/{len(assigned)}" + (f" ({','.join(done)})" if done else "")
