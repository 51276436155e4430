"""Bad input to the command line, against a running scheduler and daemon: each is one
`error:` line on stderr and exit code 2, never a traceback, and nothing is registered."""

from __future__ import annotations

import subprocess

import pytest

from integration.cluster import SYNCBIT, Cluster, Origin, run_cli

CLUSTER_NODES = 1


def one_error(done: subprocess.CompletedProcess[str]) -> str:
    out = f"rc={done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 2, out
    assert "Traceback" not in done.stdout + done.stderr, out
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def _cases(ds_url: str) -> list[tuple[list[str], str]]:
    """(arguments, a word the error must contain)."""
    long_name = "x" * 200
    return [
        # dataset names
        (["wait", ""], "invalid dataset name"),
        (["wait", "my model"], "invalid dataset name"),
        (["wait", "a/b"], "invalid dataset name"),
        (["wait", ".hidden"], "invalid dataset name"),
        (["wait", long_name], "invalid dataset name"),
        (["dataset", "add", "my model", ds_url], "invalid dataset name"),
        (["dataset", "add", "", ds_url], "invalid dataset name"),
        (["dataset", "add", "-", ds_url], "invalid dataset name"),
        (["pull", ds_url, "--name", "bad name"], "invalid dataset name"),
        (["prefetch", "bad name"], "invalid dataset name"),
        (["volume", "publish", "bad/name", "/tmp/nowhere"], "invalid dataset name"),
        (["dataset", "rm", ""], "invalid dataset name"),
        (["cache", "evict", ""], "invalid dataset name"),
        # sources
        (["dataset", "add", "ok", "ftp://origin/x/"], "scheme"),
        (["dataset", "add", "ok", "nonsense"], "scheme"),
        (["dataset", "add", "ok", ""], "source"),
        (["dataset", "add", "ok", "http://[::1"], "invalid"),
        (["dataset", "add", "ok", "http://" + "a" * 3000 + "/"], "a"),
        (["dataset", "add", "ok", "hf://"], "HuggingFace"),
        (["dataset", "add", "ok", "hf://a/b/c/d"], "repo id"),
        (["dataset", "add", "ok", "s3://"], "S3"),
        (["dataset", "add", "ok", "file://host/x"], "local"),
        (["dataset", "add", "ok", "file:relative"], "absolute"),
        (["dataset", "add", "ok", "file:///etc"], "file_roots"),
        (["dataset", "add", "ok", ds_url + "big.bin?X-Amz-Signature=abc"], "query string"),
        # options
        (["dataset", "add", "ok", ds_url, "-o", "includ=*.json"], "includ"),
        (["dataset", "add", "ok", ds_url, "-o", "verify=maybe"], "verify"),
        (["dataset", "add", "ok", ds_url, "-o", "timeout=-3"], "timeout"),
        (["dataset", "add", "ok", ds_url, "-o", "follow_redirects=all"], "follow_redirects"),
        (["dataset", "add", "ok", ds_url, "-o", "headers=Authorization: x"], "headers"),
        (["dataset", "add", "ok", ds_url, "-o", "allow_link_local=true"], "allow_link_local"),
        (["dataset", "add", "ok", "hf://org/model", "-o", "token="], "token"),
        (["dataset", "add", "ok", ds_url, "-o", "novalue"], "key=value"),
        (["dataset", "add", "ok", ds_url, "-o", "=x"], "key=value"),
        (["pull", ds_url, "--revision", "v1"], "hf://"),
        (["pull", "http://127.0.0.1/.../"], "--name"),
        # other flags and values
        (["prefetch", "ok", "--selector", "=x"], "selector"),
        (["node", "label", "n1", "=x"], "label"),
        (["wait", "x", "--timeout", "soon"], "duration"),
        (["wait", "x", "--daemon", "nope"], "host:port"),
        (["wait", "x", "--daemon", "127.0.0.1:70000"], "host:port"),
        (["wait", "x", "--daemon", "127.0.0.1:0"], "host:port"),
        (["status", "--scheduler", "http://[::1"], "scheduler URL"),
        (["daemon", "--cache-size", "lots"], "cache_size"),
        (["daemon", "--listen", "nope"], "listen"),
        (["daemon", "--config", "/nonexistent/syncbit.yaml"], "config"),
        (["scheduler", "--listen", "127.0.0.1:99999"], "listen"),
        (["scheduler", "--heartbeat-rate", "0"], "heartbeat_rate"),
        (["scheduler", "--heartbeat-rate", "nan"], "heartbeat_rate"),
        # usage mistakes: click's own errors, one line too
        (["wait"], "Missing argument"),
        (["dataset", "add", "x"], "Missing argument"),
        (["status", "--bogus"], "No such option"),
        (["daemon", "--file-roots"], "requires an argument"),
        (["wait", "x", "--timeout"], "requires an argument"),
        (["no-such-command"], "No such command"),
    ]


@pytest.mark.timeout(600)
def test_bad_input_is_one_error_line_and_exit_2(up: Cluster, origin: Origin) -> None:
    ds_url = origin.url + "ds/"
    node = up.nodes[0]
    failures = []
    for args, word in _cases(ds_url):
        # The cluster's addresses go right after the command's name, so that a case that
        # ends in a flag without its value stays that way.
        words = 2 if args[0] in ("dataset", "node", "cache", "volume") else 1
        extra = []
        if args[0] in ("dataset", "pull", "prefetch", "node") and "--scheduler" not in args:
            extra += ["--scheduler", up.scheduler.url]
        if args[0] in ("wait", "pull", "cache") and "--daemon" not in args:
            extra += ["--daemon", node.address]
        done = run_cli([*SYNCBIT, *args[:words], *extra, *args[words:]], timeout=60)
        try:
            line = one_error(done)
            assert word in line, line
        except AssertionError as exc:
            failures.append(f"syncbit {' '.join(args)[:120]}:\n{exc}")
    assert not failures, "\n\n".join(failures)
    # Nothing was registered by any of them.
    assert up.scheduler.get("/v1/datasets")["datasets"] == []
