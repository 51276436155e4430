"""The command line as an operator meets it: status, dataset errors, config errors.

Every failure is one `error:` line on stderr and a non-zero exit code, never a traceback:
exit 2 for a user's mistake, 1 for a system that failed (README, "Command line").
"""

from __future__ import annotations

import json
import signal
import subprocess
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pytest

from integration.cluster import (
    SYNCBIT,
    Cluster,
    Dataset,
    Origin,
    free_port,
    fresh_dataset,
    in_thread,
    is_mounted,
    run_cli,
    sha256_file,
    wait_until,
)

CLUSTER_NODES = 2
NODE_TIMEOUT = 3.0


def CLUSTER_LABELS(i: int) -> dict[str, str]:  # read by the conftest
    return {"zone": "a" if i == 1 else "b", "rack": f"r{i}"}


def one_error(done: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """The single `error:` line of a failed command; asserts the failure contract."""
    out = f"rc={done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode != 0, out
    if code is not None:
        assert done.returncode == code, out
    assert "Traceback" not in done.stderr + done.stdout, out
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


class Registered(NamedTuple):
    ds: Dataset
    url: str


@pytest.fixture(scope="module")
def cli_ds(cluster: Cluster, origin: Origin, origin_root: Path) -> Registered:
    ds = fresh_dataset(origin_root, "cli", {"config.json": 300, "weights/w.bin": 9 * 2**20 + 5})
    cluster.add_dataset("cli", origin.url + "cli/")
    return Registered(ds, origin.url + "cli/")


@pytest.mark.timeout(120)
def test_status_shows_nodes_datasets_and_cached_bytes(up: Cluster, cli_ds: Registered) -> None:
    ds = cli_ds.ds
    n1, n2 = up.nodes
    for rel, facts in ds.files.items():
        path = n1.path("cli", *rel.split("/"))
        assert in_thread(partial(sha256_file, path), 60, f"read {path}") == facts.sha256
    up.wait_cached(n1, "cli", ds.total_size)

    done = up.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    nodes = {n["name"]: n for n in doc["nodes"]}
    for node in (n1, n2):
        entry = nodes[node.name]
        assert entry["address"] == node.address
        assert entry["labels"] == node.labels
        assert entry["up"] is True
    datasets = {d["name"]: d for d in doc["datasets"]}
    entry = datasets["cli"]
    assert entry["source"] == cli_ds.url
    assert entry["files"] == len(ds.files)
    assert entry["size"] == ds.total_size
    assert isinstance(entry["revision"], str) and entry["revision"]
    assert entry["cached"].get("n1") == ds.total_size, entry
    assert entry["cached"].get("n2", 0) == 0, entry

    done = up.cli("status")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for node in (n1, n2):
        row = next(line for line in text.splitlines() if line.startswith(node.name + " "))
        assert node.address in row and " up" in row, row
        assert f"zone={node.labels['zone']}" in row and f"rack={node.labels['rack']}" in row
    row = next(line for line in text.splitlines() if line.startswith("cli "))
    assert entry["revision"] in row and cli_ds.url in row, row
    assert "9.0 MiB" in row and "n1:9.0 MiB" in row, row


@pytest.mark.timeout(120)
def test_killed_node_shows_down_after_the_node_timeout(up: Cluster) -> None:
    n2 = up.node("n2")
    up.wait_node_up("n2", up=True)
    n2.kill(signal.SIGKILL)

    def down() -> bool:
        done = up.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        return not next(n for n in json.loads(done.stdout)["nodes"] if n["name"] == "n2")["up"]

    # node timeout + one heartbeat interval + the CLI's own start-up time
    wait_until(down, NODE_TIMEOUT + 10, "n2 to show as down", interval=0.2)
    done = up.cli("status")
    row = next(line for line in done.stdout.splitlines() if line.startswith("n2 "))
    assert " down" in row, row
    n2.cleanup()  # the stale mount goes; `up` restarts n2 for the next test


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("uri", "code"),
    [
        ("ftp://127.0.0.1/data/", 2),  # unsupported scheme: the user's mistake
        ("http://", 2),  # not a URL
        ("http://127.0.0.1:notaport/x/", 2),
        ("UNREACHABLE", 1),  # a well-formed URL nobody answers: the system failed
    ],
)
def test_dataset_add_errors_are_one_line(up: Cluster, uri: str, code: int) -> None:
    if uri == "UNREACHABLE":
        uri = f"http://127.0.0.1:{free_port()}/data/"
    done = up.cli("dataset", "add", "broken", uri)
    line = one_error(done, code)
    assert "Traceback" not in line
    ls = up.cli("dataset", "ls", "--json")
    assert ls.returncode == 0, ls.stderr
    assert "broken" not in [d["name"] for d in json.loads(ls.stdout)]


@pytest.mark.timeout(60)
def test_dataset_add_names_an_invalid_dataset_name(up: Cluster, origin: Origin) -> None:
    one_error(up.cli("dataset", "add", "../escape", origin.url + "ds/"), 2)


@pytest.mark.timeout(60)
def test_scheduler_url_from_the_environment(up: Cluster, cli_ds: Registered) -> None:
    env = {"SYNCBIT_SCHEDULER": up.scheduler.url}
    done = up.cli("dataset", "ls", "--json", env=env, scheduler=False)
    assert done.returncode == 0, done.stderr
    assert "cli" in [d["name"] for d in json.loads(done.stdout)]
    done = up.cli("status", "--json", env=env, scheduler=False)
    assert done.returncode == 0, done.stderr
    # Pointing it at nothing fails the same command: the variable is really used.
    nowhere = {"SYNCBIT_SCHEDULER": f"http://127.0.0.1:{free_port()}"}
    line = one_error(up.cli("status", env=nowhere, scheduler=False), 1)
    assert "127.0.0.1" in line
    # A flag beats the variable.
    done = up.cli("dataset", "ls", env=nowhere)
    assert done.returncode == 0, done.stderr


@pytest.mark.timeout(60)
def test_unreachable_scheduler_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    one_error(run_cli([*SYNCBIT, "dataset", "add", "x", "http://h/x/", "--scheduler", url]), 1)
    one_error(run_cli([*SYNCBIT, "dataset", "ls", "--scheduler", url]), 1)


@pytest.mark.timeout(60)
def test_wait_keeps_trying_for_a_daemon_until_its_timeout(tmp_path: Path) -> None:
    daemon = f"127.0.0.1:{free_port()}"  # nobody listens: the daemon is not up yet
    done = run_cli([*SYNCBIT, "wait", "llama", "--timeout", "2s", "--daemon", daemon])
    assert done.returncode == 1, done.stderr
    assert "waiting for the daemon" in done.stderr
    assert "error: gave up after 2s: no syncbit daemon answers" in done.stderr
    assert "Traceback" not in done.stderr
    bad = run_cli([*SYNCBIT, "wait", "llama", "--timeout", "soon", "--daemon", daemon])
    one_error(bad, 2)
    assert "not a duration: 'soon'" in bad.stderr


def _daemon(tmp_path: Path, *args: str) -> list[str]:
    return [
        *SYNCBIT,
        "daemon",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--mount",
        str(tmp_path / "mnt"),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--scheduler",
        f"http://127.0.0.1:{free_port()}",
        *args,
    ]


@pytest.mark.timeout(60)
def test_daemon_config_with_unknown_key_exits_2_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("node: n9\nread_deadline: 5\ncache_sise: 10GiB\n")
    try:
        line = one_error(run_cli(_daemon(tmp_path, "--config", str(cfg)), timeout=30), 2)
    finally:
        assert not is_mounted(tmp_path / "mnt")
    assert "cache_sise" in line, line

    cfg.write_text("read_deadline: soon\n")
    line = one_error(run_cli(_daemon(tmp_path, "--config", str(cfg)), timeout=30), 2)
    assert "read_deadline" in line, line

    cfg.write_text("- just\n- a list\n")
    one_error(run_cli(_daemon(tmp_path, "--config", str(cfg)), timeout=30), 2)

    line = one_error(
        run_cli(_daemon(tmp_path, "--config", str(tmp_path / "missing.yaml")), timeout=30), 2
    )
    assert "missing.yaml" in line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("label", ["novalue", "=x", ""])
def test_daemon_invalid_label_exits_2(tmp_path: Path, label: str) -> None:
    try:
        line = one_error(run_cli(_daemon(tmp_path, "--label", label), timeout=30), 2)
    finally:
        assert not is_mounted(tmp_path / "mnt")
    assert "label" in line, line


@pytest.mark.timeout(60)
def test_scheduler_config_with_unknown_key_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "sched.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{free_port()}\nnode_timeot: 3\n")
    argv = [*SYNCBIT, "scheduler", "--config", str(cfg), "--state-dir", str(tmp_path / "s")]
    line = one_error(run_cli(argv, timeout=30), 2)
    assert "node_timeot" in line, line
