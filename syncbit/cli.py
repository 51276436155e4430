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
from syncbit.auth import DEFAULT_DAEMON, DEFAULT_SCHEDULER, client_ca, client_token
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
cache_app = typer.Typer(
    help="This node's cache: list, evict, collect, verify.", no_args_is_help=True
)
app.add_typer(cache_app, name="cache")
volume_app = typer.Typer(
    help="CSI-like volumes: read-only bind mounts of datasets.", no_args_is_help=True
)
app.add_typer(volume_app, name="volume")
token_app = typer.Typer(help="Credentials: issue one for a role.", no_args_is_help=True)
app.add_typer(token_app, name="token")
tls_app = typer.Typer(help="Certificates for TLS between all parts.", no_args_is_help=True)
app.add_typer(tls_app, name="tls")

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
        help="This node's daemon, its --listen address, https://host:port for TLS "
        "(else $SYNCBIT_DAEMON).",
    ),
]
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


def _setup_logging(level: str) -> None:
    from syncbit.diskspace import LogHandler
    from syncbit.redact import ScrubbingFormatter

    # Written straight to stderr's descriptor, and a full disk under the log loses lines
    # (counted, and said so once it can write again) instead of raising.
    handler = LogHandler(sys.stderr.fileno())
    # Every line scrubbed: a library's debug line with a signed URL or a header leaks nothing.
    handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    # One line per control request is noise at info level; our own loggers say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def guarded(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn syncbit errors into `error: message` on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {_shown(exc)}", err=True)
            raise typer.Exit(2) from None
        except SyncbitError as exc:
            typer.echo(f"error: {_shown(exc)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


def _shown(exc: BaseException) -> str:
    """An error's message on one line, credentials masked (a URL the user typed with a
    password in it is not echoed back into a terminal log)."""
    from syncbit.redact import scrub

    return " ".join(scrub(str(exc)).split()) or type(exc).__name__


def _client_call(url: str, call: Callable[[Any], Awaitable[T]]) -> T:
    import trio

    from syncbit.scheduler.client import SchedulerClient

    token = client_token()

    async def go() -> T:
        async with SchedulerClient(url, token=token, ca=client_ca()) as client:
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


def _name(name: str) -> str:
    """A dataset name as the scheduler accepts new ones (README, "Dataset names")."""
    from syncbit.manifest import validate_dataset_name

    return validate_dataset_name(name)


def _any_name(name: str) -> str:
    """A dataset name to remove: also one from before the name rules, if printable."""
    if not name or not name.isprintable() or "/" in name or len(name) > 255:
        return _name(name)  # the same message as everywhere else
    return name


def _source_options(uri: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options `pull`/`dataset add` send: for hf:// sources, the Hub token and endpoint
    of the user's shell (HF_TOKEN or the token file, HF_ENDPOINT) unless given with -o.
    The scheduler uses the token for this listing only and never stores it."""
    options = dict(given)
    if uri.lower().startswith("hf://"):
        import os

        from syncbit.sources.hf import token_from_env

        if "token" not in options and (token := token_from_env()):
            options["token"] = token
        endpoint = os.environ.get("HF_ENDPOINT", "").strip()
        if "endpoint" not in options and endpoint:
            options["endpoint"] = endpoint
    return options


def _print_warnings(result: dict[str, Any]) -> None:
    for warning in result.get("warnings") or []:
        typer.echo(f"warning: {warning}", err=True)


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
    token_file: Annotated[Path | None, typer.Option(help="File with the cluster secret.")] = None,
    insecure: InsecureOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    file_roots: FileRootsOpt = None,
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
            "insecure": insecure,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "file_roots": file_roots,
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
        Path | None,
        typer.Option(help="File with a bootstrap or node credential, or the cluster secret."),
    ] = None,
    insecure: InsecureOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA file the scheduler's and peers' certificates match.")
    ] = None,
    file_roots: FileRootsOpt = None,
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
            "insecure": insecure,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "tls_ca": tls_ca,
            "file_roots": file_roots,
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
    _name(name)
    options = _source_options(uri, _pairs(option, "option") or {})
    result = _client_call(scheduler, lambda c: c.add_dataset(name, uri, options))
    _print_warnings(result)
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
    _any_name(name)
    _client_call(scheduler, lambda c: c.remove_dataset(name))
    typer.echo(f"removed {name}")


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
    dataset = _name(name) if name is not None else default_name(uri)
    options = _source_options(uri, options)
    result = _client_call(scheduler, lambda c: c.add_dataset(dataset, uri, options))
    _print_warnings(result)
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
    """'30m', '1h', '90s', '1h30m', '7d', '45' (seconds) -> seconds."""
    import re

    text = value.strip().lower()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return float(text)
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)([dhms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UserError(f"not a duration: {value!r} (use e.g. 30m, 1h, 90s, 7d)")
    return sum(float(n) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


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
    _name(name)
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


@node_app.command("trust")
@guarded
def node_trust(
    node: Annotated[str, typer.Argument(help="Node name.")],
    scheduler: SchedulerOpt = DEFAULT_SCHEDULER,
) -> None:
    """Lift a node's quarantine: it is offered as a peer and heard again. The digests it
    established before were forgotten and stay so."""
    _client_call(scheduler, lambda c: c.lift_quarantine(node))
    typer.echo(f"{node}: quarantine lifted")


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
            ("up" if n["up"] else "down") + (" quarantined" if n.get("quarantined") else ""),
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

    _name(name)
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
        f"{u['evictions']} evictions ({human(u['evicted_bytes'])}), "
        f"{human(u['disk_free'])} free on disk"
    )
    if u["disk_full"]:
        typer.echo(_disk_full_warning("this node", u["disk_free"]))
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

    _any_name(name)
    doc = local(daemon_addr, "POST", "cache/evict", {"dataset": name, "force": force})
    extra = []
    if doc["shared"]:
        extra.append(f"{doc['shared']} objects kept (shared with assigned datasets)")
    if doc["in_use"]:
        extra.append(f"{doc['in_use']} objects kept (in use)")
    typer.echo(
        f"evicted {name}: {human(doc['freed'])} freed" + (f"; {'; '.join(extra)}" if extra else "")
    )


@cache_app.command("verify")
@guarded
def cache_verify(
    daemon_addr: DaemonOpt = DEFAULT_DAEMON,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Re-read every cached chunk and check it against its digest; drop the bad ones
    (fetched again when needed). Exit 0 if all were good, 1 if some were dropped."""
    from syncbit.pull import local

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
                f"verify ({run['reason']}): {run['checked']} chunks ({human(run['checked_bytes'])})"
                f" of {run['objects']} objects checked in {took:.0f}s, "
                f"{len(run['dropped'])} dropped"
            )
        for d in dropped:
            files = ", ".join(d["files"]) or "no known dataset"
            typer.echo(f"dropped: chunk {d['chunk']} of object {d['object'][:12]} ({files})")
    if dropped:
        raise typer.Exit(1)


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

    _name(name)
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
        doc = _client_call(scheduler, lambda c: c.issue_token(wanted.value, node, seconds))
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
        if n.get("disk_full"):
            typer.echo(_disk_full_warning(n["name"], n.get("disk_free", 0)))
        if n.get("pinned_over_budget"):
            typer.echo(
                f"warning: {n['name']}: assigned datasets need {human(n['pinned_bytes'])}, more "
                f"than its cache budget of {human(n['cache_size'])}; they cannot all stay cached"
            )
    for q in doc.get("quarantined", []):
        typer.echo(
            f"warning: node {q['node']} is quarantined: {q['reason']} (not offered as a peer, "
            f"its reports ignored; `syncbit node trust {q['node']}` lifts it)"
        )
    for d in doc.get("disputes", []):
        typer.echo(
            f"note: chunk {d['chunk']} of {d['dataset']}/{d['path']} is disputed "
            f"({d['reporter']} vs {d['establisher'] or 'the record'}); "
            f"{d['checker'] or 'a third node (none up yet)'} re-checks it against the source"
        )
    for d in doc["datasets"]:
        for b in d.get("broken", []):
            typer.echo(
                f"warning: {d['name']}/{b['path']} is broken: {b['reason']}; reads fail until "
                f"`syncbit dataset add {d['name']} {d['source']}` picks up the current content"
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


def _disk_full_warning(node: str, free: int) -> str:
    return (
        f"warning: {node}: cache filesystem full ({human(free)} free): new chunks are not "
        "cached there until space is freed; cached data is still served"
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
    """The `syncbit` command: every failure is one `error:` line and an exit code, usage
    mistakes (a missing argument, an unknown flag) included: exit 2, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (typer vendors click)
        format_message = getattr(exc, "format_message", None)
        message = " ".join(str(format_message() if format_message else exc).split())
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        if message:  # none: the help was shown (a group called without a command)
            typer.echo(f"error: {message}{where}", err=True)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # a bug: one line here, the traceback only in a debug log
        logging.getLogger("syncbit").debug("unexpected error", exc_info=True)
        typer.echo(
            f"error: unexpected {type(exc).__name__} (a bug in syncbit): {_shown(exc)}", err=True
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
