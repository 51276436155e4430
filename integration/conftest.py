"""Fixtures for the integration tests: real processes, real FUSE mounts, loopback only.

Owns the lifetimes: one origin and one reference dataset per session, one scheduler and its
nodes per test module. Every process is stopped by its PID and every mount detached in the
finalizers, also when a test fails. Skips everything when FUSE cannot run here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from integration.cluster import (
    ALL_PROCESSES,
    Cluster,
    Dataset,
    Node,
    Origin,
    build_dataset,
    fuse_unavailable,
    mounts_under,
    unmount_lazy,
)

_HERE = Path(__file__).parent
_SKIP = fuse_unavailable()
_KEPT = pytest.StashKey[Path]()


_WORKDIRS: list[Path] = []  # every run directory made here, for the last-resort cleanup


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # pytest then tears the fixtures down: processes, mounts


def pytest_configure(config: pytest.Config) -> None:
    # A run stopped with SIGTERM (`timeout`, CI cancelling a job) cleans up like Ctrl-C
    # does, instead of leaving daemons running and their mounts attached.
    signal.signal(signal.SIGTERM, _interrupted)
    # A run started in the background by a shell without job control (CI, `cmd &`)
    # inherits SIGINT ignored, and so would every process it starts: the tests that press
    # Ctrl-C on a `syncbit pull` would then press it on a deaf process. Python installs
    # its Ctrl-C handler in a child only when SIGINT is at its default there, and a
    # handler (unlike SIG_IGN) is reset to the default across exec.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Last resort, after every finalizer: whatever a failed teardown left is stopped
    (by the PID we started) and unmounted."""
    for proc in list(ALL_PROCESSES):
        with contextlib.suppress(Exception):
            proc.terminate(10)
    for path in _WORKDIRS:
        for mount in mounts_under(path):
            unmount_lazy(mount)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    kept = terminalreporter.config.stash.get(_KEPT, None)
    if kept is not None:
        terminalreporter.write_line(f"syncbit integration logs kept in {kept}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A module-level pytest.skip() in a conftest crashes pytest when this directory is named
    # on the command line (it is then an "initial" conftest); marking the items skips them
    # cleanly however the suite is invoked.
    if _SKIP is None:
        return
    mark = pytest.mark.skip(reason=f"integration tests skipped: {_SKIP}")
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(mark)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the log tail of every process the harness started (taken before
    the running daemons dump their stacks, so the dump does not push the log out), then
    each daemon's trio task tree from that dump (the threads' stacks stay in the log)."""
    report = yield
    if report.failed and _HERE in Path(item.path).parents:
        procs = [p for p in list(ALL_PROCESSES) if p.proc is not None]
        tails = [p.log_tail(60) for p in procs]
        dumped = [p for p in procs if p.alive and isinstance(p, Node)]
        for proc in dumped:
            with contextlib.suppress(Exception):
                proc.kill(signal.SIGUSR1)  # threads' stacks
                proc.kill(signal.SIGUSR2)  # trio's tasks
        time.sleep(0.5)
        for proc in dumped:
            text = proc.log_text()
            at = text.rfind("trio tasks:")
            if at >= 0:
                tasks = text[at:].splitlines()[:40]
                tails.append(f"--- {proc.name}: trio tasks at the failure\n" + "\n".join(tasks))
        if tails:
            report.sections.append(("syncbit process logs", "\n\n".join(tails)))
    return report


@pytest.fixture(scope="session")
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The run's own directory (not pytest's basetemp: concurrent pytest runs prune each
    other's basetemps, which must never happen under a live mount). Removed at the end;
    after a failure only the logs stay, and their place is printed."""
    base = os.environ.get("SYNCBIT_IT_DIR") or None
    path = Path(tempfile.mkdtemp(prefix="syncbit-integration-", dir=base))
    _WORKDIRS.append(path)
    yield path
    for mount in mounts_under(path):
        unmount_lazy(mount)
    if mounts_under(path):
        return  # never delete below a mount point
    if request.session.testsfailed:
        for item in sorted(path.rglob("*"), reverse=True):
            if item.is_symlink() or (item.is_file() and item.suffix != ".log"):
                item.unlink()
            elif item.is_dir() and not any(item.iterdir()):
                item.rmdir()
        request.config.stash[_KEPT] = path
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def origin_root(workdir: Path) -> Path:
    root = workdir / "origin"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def dataset(origin_root: Path) -> Dataset:
    """The reference dataset under `<origin root>/ds/` (256 MiB big file)."""
    return build_dataset(origin_root, "ds")


@pytest.fixture(scope="session")
def origin(origin_root: Path, workdir: Path, dataset: Dataset) -> Iterator[Origin]:
    server = Origin(origin_root, workdir / "logs")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, workdir: Path, origin: Origin) -> Iterator[Cluster]:
    """Scheduler + nodes for one test module. A module may set CLUSTER_NODES,
    NODE_TIMEOUT, CLUSTER_LABELS (a function: node number -> labels), CLUSTER_TOKEN (the
    cluster secret: every process then requires credentials), CLUSTER_BOOTSTRAP (daemons
    get a bootstrap credential instead of the secret), CLUSTER_TLS (TLS everywhere) and
    NODE_CONFIG (node name -> config keys of that daemon)."""
    module = request.module
    name = module.__name__.rsplit(".", 1)[-1]
    where = workdir / name
    shutil.rmtree(where, ignore_errors=True)
    cl = Cluster(
        where,
        origin,
        nodes=getattr(module, "CLUSTER_NODES", 3),
        node_timeout=getattr(module, "NODE_TIMEOUT", 4.0),
        labels=getattr(module, "CLUSTER_LABELS", None),
        token=getattr(module, "CLUSTER_TOKEN", None),
        bootstrap=getattr(module, "CLUSTER_BOOTSTRAP", False),
        tls=getattr(module, "CLUSTER_TLS", False),
    )
    for node, config in getattr(module, "NODE_CONFIG", {}).items():
        cl.node(node).config.update(config)
    try:
        cl.start()
        yield cl
    finally:
        cl.close()


@pytest.fixture
def up(cluster: Cluster) -> Cluster:
    """The cluster with everything an earlier test stopped or killed running again."""
    cluster.ensure_up()
    return cluster
