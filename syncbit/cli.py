"""The `syncbit` command line (typer). The one place where errors become messages and exit
codes: a user mistake is a one-line message and exit 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

# Client commands import only what they use: `syncbit wait` runs in every initContainer
# and in loops, so trio, pydantic (the config models) and the scheduler client are
# imported by the commands that need them.
from syncbit.auth import DEFAULT_DAEMON, DEFAULT_SCHEDULER, client_token
from syncbit.errors import SyncbitError, UserError

P = ParamSpec("P")
T = TypeVar("T")

app = typer.Typer(
    name="syncbit",
    help="Peer-assisted distribution of large files through a lazy read-only FUSE mount.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(help="Register, list and remove datasets.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
node_app = typer.Typer(help="Nodes as the scheduler knows them.", no_args_is_help=True)
app.add_typer(node_app, name="node")
cache_app = typer.Typer(help="This node's cache: list, evict, collect.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
volume_app = typer.Typer(
    help="CSI-like volumes: read-only bind mounts of datasets.", no_args_is_help=True
)
app.add_typer(volume_app, name="volume")

SchedulerOpt = Annotated[
    str,
    typer.Option(
        "--scheduler",
        envvar="SYNCBIT_SCHEDULER",
        help="Scheduler URL (else $SYNCBIT_SCHEDULER, else http://127.0.0.1:7900).",
    ),
]
DaemonOpt = Annotated[
    str,
    typer.Option(
        "--daemon",
        envvar="SYNCBIT_DAEMON",
        help="This node's daemon, its --listen address (else $SYNCBIT_DAEMON).",
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file; flags override it.")
]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per control request is noise at info level; our own loggers say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def guarded(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn syncbit errors into `error: message` on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except SyncbitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


def _client_call(url: str, call: Callable[[Any], Awaitable[T]]) -> T:
    import trio

    from syncbit.scheduler.client import SchedulerClient

    token = client_token()

    async def go() -> T:
        async with SchedulerClient(url, token=token) as client:
            return await call(client)

    result: T = trio.run(go)
    return result


def _pairs(values: list[str] | None, what: str) -> dict[str, str] | None:
    if not values:
        return None
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise UserError(f"invalid {what} {value!r}: expected key=value")
        pairs[key] = val
    return pairs


# -- services ---------------------------------------------------------------------------------


@app.command()
@guarded
def scheduler(
    config: ConfigOpt = None,
    listen: Annotated[str | None, typer.Option(help="host:port to serve the API on.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Directory of the LMDB state.")] = None,
    node_timeout: Annotated[
        float | None, typer.Option(help="Seconds without heartbeat before a node is down.")
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="File with the shared cluster token.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
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
            "token_file": token_file,
            "log_level": log_level,
        },
    )
    _setup_logging(cfg.log_level)
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


@app.command()
@guarded
def daemon(
    config: ConfigOpt = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Scheduler URL; without it the scheduler runs embedded.")
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
        Path | None, typer.Option(help="File with the shared cluster token.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
) -> None:
    """Run a node: FUSE mount, cache, peer service (and the scheduler, if none is given)."""
    from syncbit.config import DaemonConfig, build

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
            "labels": _pairs(label, "label"),
            "read_deadline": read_deadline,
            "scheduler_listen": scheduler_listen,
            "prefetch_concurrency": prefetch_concurrency,
            "prefetch_bandwidth": prefetch_bandwidth,
            "upload_slots": upload_slots,
            "passthrough": passthrough,
            "kubernetes": kubernetes,
            "kubeconfig": kubeconfig,
            "token_file": token_file,
            "log_level": log_level,
        },
    )
    _setup_logging(cfg.log_level)
    from syncbit import daemon as daemon_mod

    daemon_mod.run(cfg)


# -- client commands ----------------------------------------------------------------------------


@dataset_app.command("add")
@guarded
def dataset_add(
    name: Annotated[str, typer.Argument(help="Dataset name: /syncbit/<name>.")],
    uri: Annotated[str, typer.Argument(help="Source: http(s)://..., file:///...")],
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Source option key=value (repeatable)."),
    ] = None,
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
) -> None:
    """Resolve a source to a fixed revision and register it (no bytes are downloaded)."""
    options = _pairs(option, "option") or {}
    result = _client_call(scheduler, lambda c: c.add_dataset(name, uri, options))
    ds = result["dataset"]
    verb = "added" if result.get("changed", True) else "unchanged"
    typer.echo(
        f"{verb} {ds['name']} revision {ds['revision']}: {ds['files']} files, {human(ds['size'])}"
    )


@dataset_app.command("ls")
@guarded
def dataset_ls(
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered datasets."""
    listing = _client_call(scheduler, lambda c: c.datasets())
    if as_json:
        typer.echo(json.dumps(listing["datasets"], indent=2))
        return
    rows = [
        [d["name"], d["revision"], str(d["files"]), human(d["size"]), d["source"]]
        for d in listing["datasets"]
    ]
    typer.echo(table(["NAME", "REVISION", "FILES", "SIZE", "SOURCE"], rows))


@dataset_app.command("rm")
@guarded
def dataset_rm(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
) -> None:
    """Remove a dataset from the scheduler (cached bytes are evicted later)."""
    _client_call(scheduler, lambda c: c.remove_dataset(name))
    typer.echo(f"removed {name}")


def default_name(uri: str) -> str:
    """The dataset name `pull` uses without --name: the URI's last path element."""
    rest = uri.split("://", 1)[-1].split("@", 1)[0].rstrip("/")
    name = rest.rsplit("/", 1)[-1]
    if not name or name.startswith("."):
        raise UserError(f"cannot derive a dataset name from {uri!r}: give --name")
    return name


@app.command()
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
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Source option key=value (repeatable)."),
    ] = None,
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
    from syncbit import pull as pulling

    if cancel is not None:
        if uri is not None:
            raise UserError("give a source URI to pull, or --cancel NAME, not both")
        doc = pulling.cancel(daemon_addr, cancel)
        typer.echo(
            f"cancelled the pull of {cancel} ({human(doc['present_bytes'])} of "
            f"{human(doc['size'])} here stay cached)"
        )
        return
    if uri is None:
        raise UserError("missing the source URI to pull (or --cancel NAME)")
    options: dict[str, Any] = _pairs(option, "option") or {}
    if revision is not None:
        if not uri.startswith("hf://"):
            raise UserError("--revision applies to hf:// sources only")
        options["revision"] = revision
    if include:
        options["include"] = include
    if exclude:
        options["exclude"] = exclude
    dataset = name or default_name(uri)
    result = _client_call(scheduler, lambda c: c.add_dataset(dataset, uri, options))
    ds = result["dataset"]
    typer.echo(
        f"{dataset}: revision {ds['revision']}, {ds['files']} files, {human(ds['size'])}",
        err=True,
    )
    try:
        pulling.follow(daemon_addr, dataset)
    except KeyboardInterrupt:
        pulling.interrupted(daemon_addr, dataset)
        raise typer.Exit(130) from None


def parse_duration(value: str) -> float:
    """'30m', '1h', '90s', '1h30m', '45' (seconds) -> seconds."""
    import re

    text = value.strip().lower()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return float(text)
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UserError(f"not a duration: {value!r} (use e.g. 30m, 1h, 90s)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _targets(selector: str | None, nodes: str | None) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    if selector is not None:
        pairs = _pairs([p for p in selector.split(",") if p], "selector") or {}
        targets.append({"selector": pairs})
    for node in (nodes or "").split(","):
        if node.strip():
            targets.append({"node": node.strip()})
    return targets


@app.command()
@guarded
def prefetch(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
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
    targets = _targets(selector, nodes)
    if remove:
        left = _client_call(scheduler, lambda c: c.unassign(name, targets or None))
        typer.echo(f"{name}: removed {_describe(targets) if targets else 'all targets'}")
    else:
        left = _client_call(scheduler, lambda c: c.assign(name, targets))
    typer.echo(f"{name}: assigned to {_describe(left) if left else 'no nodes'}")


def _describe(targets: list[dict[str, Any]]) -> str:
    from syncbit.scheduler.state import describe_target

    return "; ".join(describe_target(t) for t in targets)


@node_app.command("label")
@guarded
def node_label(
    node: Annotated[str, typer.Argument(help="Node name.")],
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
            set_.update(_pairs([item], "label") or {})
    record = _client_call(scheduler, lambda c: c.edit_labels(node, set_, remove))
    shown = ",".join(f"{k}={v}" for k, v in sorted(record["labels"].items())) or "(none)"
    typer.echo(f"{node}: {shown}")


@node_app.command("ls")
@guarded
def node_ls(
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List nodes with their labels and the datasets ready on them."""
    nodes = _client_call(scheduler, lambda c: c.nodes())
    if as_json:
        typer.echo(json.dumps(nodes, indent=2, sort_keys=True))
        return
    typer.echo(table(["NODE", "ADDRESS", "LABELS", "STATE", "READY"], _node_rows(nodes)))


def _node_rows(nodes: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            n["name"],
            n["address"],
            ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-",
            "up" if n["up"] else "down",
            ",".join(sorted(n.get("ready", {}))) or "-",
        ]
        for n in nodes
    ]


@app.command()
@guarded
def wait(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    timeout: Annotated[
        str | None, typer.Option(help="Give up after this long, e.g. 30m (default: never).")
    ] = None,
    daemon_addr: DaemonOpt = DEFAULT_DAEMON,
) -> None:
    """Wait until a dataset is complete and verified on this node (an initContainer gate).

    Exit 0 when ready; 1 on timeout; 2 if the dataset does not exist.
    """
    from syncbit.pull import follow

    seconds = parse_duration(timeout) if timeout is not None else None
    follow(daemon_addr, name, start=False, timeout=seconds)


@cache_app.command("ls")
@guarded
def cache_ls(
    daemon_addr: DaemonOpt = DEFAULT_DAEMON,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What this node caches: objects, the files they back, pinned, last used."""
    import time as _time

    from syncbit.pull import local

    doc = local(daemon_addr, "GET", "cache")
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    u = doc["usage"]
    typer.echo(
        f"cache: {human(u['used'])} of {human(u['budget'])} used, {human(u['pinned'])} pinned, "
        f"{u['evictions']} evictions ({human(u['evicted_bytes'])})"
    )
    if u["pinned_over_budget"]:
        typer.echo(
            f"warning: assigned datasets need {human(u['pinned_size'])}, more than the budget"
        )
    rows = []
    for o in doc["objects"]:
        files = o["files"]
        shown = files[0] + (f" (+{len(files) - 1})" if len(files) > 1 else "") if files else "-"
        ago = _time.time() - o["last_used"] if o["last_used"] else None
        rows.append(
            [
                shown,
                f"{human(o['held'])}/{human(o['size'])}",
                "yes" if o["pinned"] else "-",
                "-" if ago is None else f"{ago:.0f}s ago",
                o["id"][:12],
            ]
        )
    typer.echo(table(["FILE", "CACHED", "PINNED", "LAST USED", "OBJECT"], rows))


@cache_app.command("evict")
@guarded
def cache_evict(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    force: Annotated[
        bool, typer.Option("--force", help="Evict even if assigned here (fetched again).")
    ] = False,
    daemon_addr: DaemonOpt = DEFAULT_DAEMON,
) -> None:
    """Drop a dataset's cached bytes on this node (content other assigned datasets share
    stays; files being read stay until closed)."""
    from syncbit.pull import local

    doc = local(daemon_addr, "POST", "cache/evict", {"dataset": name, "force": force})
    extra = []
    if doc["shared"]:
        extra.append(f"{doc['shared']} objects kept (shared with assigned datasets)")
    if doc["in_use"]:
        extra.append(f"{doc['in_use']} objects kept (in use)")
    typer.echo(
        f"evicted {name}: {human(doc['freed'])} freed" + (f"; {'; '.join(extra)}" if extra else "")
    )


@cache_app.command("gc")
@guarded
def cache_gc(daemon_addr: DaemonOpt = DEFAULT_DAEMON) -> None:
    """Remove cached objects no known dataset uses and files left by crashes."""
    from syncbit.pull import local

    doc = local(daemon_addr, "POST", "cache/gc", {})
    typer.echo(f"gc: {human(doc['freed'])} freed; {human(doc['usage']['used'])} in use")


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


@volume_app.command("publish")
@guarded
def volume_publish(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    target: Annotated[Path, typer.Argument(help="Where to mount it (created if missing).")],
    wait_ready: Annotated[
        bool, typer.Option("--wait", help="Publish only once the dataset is ready here.")
    ] = False,
    timeout: Annotated[
        str | None, typer.Option(help="With --wait: give up after this long, e.g. 30m.")
    ] = None,
    mount: MountOpt = Path("/syncbit"),
    state: StateOpt = Path("/run/syncbit/volumes.json"),
    daemon_addr: DaemonOpt = DEFAULT_DAEMON,
) -> None:
    """Bind-mount /syncbit/NAME read-only at TARGET (idempotent, like CSI NodePublish)."""
    from syncbit.volume import Volumes

    if wait_ready:
        from syncbit.pull import follow

        seconds = parse_duration(timeout) if timeout is not None else None
        follow(daemon_addr, name, start=False, timeout=seconds)
    pub = Volumes(mount, state).publish(name, target)
    typer.echo(f"published {pub.dataset} at {pub.target} (read-only)")


@volume_app.command("unpublish")
@guarded
def volume_unpublish(
    target: Annotated[Path, typer.Argument(help="A target `volume publish` mounted.")],
    mount: MountOpt = Path("/syncbit"),
    state: StateOpt = Path("/run/syncbit/volumes.json"),
) -> None:
    """Unmount a published target (idempotent; refuses mounts syncbit did not make)."""
    from syncbit.volume import Volumes

    if Volumes(mount, state).unpublish(target):
        typer.echo(f"unpublished {target}")
    else:
        typer.echo(f"{target} is not published (nothing to do)")


@volume_app.command("ls")
@guarded
def volume_ls(
    mount: MountOpt = Path("/syncbit"),
    state: StateOpt = Path("/run/syncbit/volumes.json"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
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


@app.command()
@guarded
def status(
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
    as_json: Annotated[bool, typer.Option("--json", help="Stable JSON (see README).")] = False,
) -> None:
    """Nodes, datasets and bytes cached per node."""
    doc = _client_call(scheduler, lambda c: c.status())
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    nodes = [
        [*row[:4], human(n.get("cache_bytes", 0)), row[4]]
        for n, row in zip(doc["nodes"], _node_rows(doc["nodes"]), strict=True)
    ]
    typer.echo(table(["NODE", "ADDRESS", "LABELS", "STATE", "CACHED", "READY"], nodes))
    for n in doc["nodes"]:
        if n.get("pinned_over_budget"):
            typer.echo(
                f"warning: {n['name']}: assigned datasets need {human(n['pinned_bytes'])}, more "
                f"than its cache budget of {human(n['cache_size'])}; they cannot all stay cached"
            )
    typer.echo("")
    datasets = [
        [
            d["name"],
            d["revision"],
            str(d["files"]),
            human(d["size"]),
            " ".join(f"{n}:{human(b)}" for n, b in sorted(d.get("cached", {}).items())) or "-",
            _readiness(d),
            d["source"],
        ]
        for d in doc["datasets"]
    ]
    typer.echo(
        table(["DATASET", "REVISION", "FILES", "SIZE", "CACHED", "READY", "SOURCE"], datasets)
    )


def _readiness(d: dict[str, Any]) -> str:
    """'2/3 assigned' and who is ready: the at-a-glance answer to "is it there yet?"."""
    assigned, ready = d.get("assigned", []), d.get("ready", [])
    if not assigned:
        return ",".join(ready) or "-"
    done = [n for n in assigned if n in ready]
    return f"{len(done)}/{len(assigned)}" + (f" ({','.join(done)})" if done else "")


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
