"""`python -m syncbit.mirror`: `serve` (bad input is one error line, a busy address exit 1,
SIGTERM a clean stop) and `hosts` (containerd's hosts.toml files: their content, and an
operator's own file is never overwritten). What containerd makes of the files is tested
with a real containerd in integration/test_containerd.py."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from syncbit.mirror.config import MirrorConfig, UpstreamOptions
from syncbit.mirror.hosts import MARK, hosts_toml, mirror_url, server_url, write_hosts

MIRROR = [sys.executable, "-m", "syncbit.mirror"]


def secure_options() -> UpstreamOptions:
    return UpstreamOptions.model_validate({})


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MIRROR, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--listen", "nowhere"], "listen"),
        (["--cache-size", "banana"], "cache_size"),
        (["--default-registry", "not a host"], "default_registry"),
        (["--insecure-registry", "bad host!"], "registries"),
    ],
)
def test_bad_flags_are_one_error_line_and_exit_2(
    tmp_path: Path, args: list[str], names: str
) -> None:
    done = _run("serve", "--cache-dir", str(tmp_path), *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0]


def test_a_bad_config_file_is_one_error_line(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text("registries:\n  '*': {insecure: true}\n")
    done = _run("serve", "--config", str(config))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert '"*" may not be insecure' in done.stderr
    config.write_text("registries:\n  registry.example: {ca: /x.pem, insecure: true}\n")
    done = _run("hosts", "--config", str(config), "--certs-d", str(tmp_path / "d"))
    assert done.returncode == 2 and "exclude each other" in done.stderr


def test_a_busy_address_is_exit_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _run("serve", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot serve the mirror on 127.0.0.1:{port}: address in use"
    )
    assert "Traceback" not in done.stderr


def test_serve_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [*MIRROR, "serve", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/v2/", trust_env=False, timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.05)
        assert resp.status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert (tmp_path / "blobs" / "sha256").is_dir()  # the cache it made
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- hosts.toml --------------------------------------------------------------------------------


def test_hosts_toml_puts_the_mirror_first_and_the_registry_last() -> None:
    text = hosts_toml("https://registry.example:5000", ["http://127.0.0.1:5050"])
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == [
        'server = "https://registry.example:5000"',
        '[host."http://127.0.0.1:5050"]',
        '  capabilities = ["pull", "resolve"]',
    ]
    assert text.startswith(MARK)
    assert "server" not in hosts_toml(None, ["http://127.0.0.1:5050"])  # _default
    assert "skip_verify = true" in hosts_toml(None, ["https://127.0.0.1:5443"])


def test_where_containerd_reaches_a_registry_and_the_mirror() -> None:
    secure = UpstreamOptions.model_validate({})
    insecure = UpstreamOptions.model_validate({"insecure": True})
    assert server_url("docker.io", secure) == "https://registry-1.docker.io"
    assert server_url("ghcr.io", secure) == "https://ghcr.io"
    assert server_url("10.0.0.5:5000", insecure) == "http://10.0.0.5:5000"
    assert mirror_url("127.0.0.1:5050") == "http://127.0.0.1:5050"
    assert mirror_url("0.0.0.0:5050") == "http://127.0.0.1:5050"


def test_hosts_files_are_written_for_each_registry_and_never_over_an_operators_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = MirrorConfig.model_validate(
        {
            "listen": "127.0.0.1:5050",
            "registries": {"*": {}, "docker.io": {}, "10.0.0.5:5000": {"insecure": True}},
        }
    )
    own = tmp_path / "ghcr.io" / "hosts.toml"
    own.parent.mkdir()
    own.write_text('server = "https://ghcr.io"\n')
    written = write_hosts(tmp_path, config)
    assert sorted(p.parent.name for p in written) == ["10.0.0.5:5000", "_default", "docker.io"]
    hub = (tmp_path / "docker.io" / "hosts.toml").read_text()
    assert 'server = "https://registry-1.docker.io"' in hub
    assert '[host."http://127.0.0.1:5050"]' in hub
    assert (
        'server = "http://10.0.0.5:5000"' in (tmp_path / "10.0.0.5:5000" / "hosts.toml").read_text()
    )
    # A file of its own is rewritten; an operator's file (no mark) is left alone.
    config = config.model_copy(update={"registries": {"ghcr.io": secure_options()}})
    assert write_hosts(tmp_path, config, "http://127.0.0.1:6000") == []
    assert own.read_text() == 'server = "https://ghcr.io"\n'
    assert any("not written by syncbit" in r.getMessage() for r in caplog.records)
    again = MirrorConfig.model_validate({"registries": {"docker.io": {}}})
    write_hosts(tmp_path, again, "http://127.0.0.1:6000")
    assert '[host."http://127.0.0.1:6000"]' in (tmp_path / "docker.io" / "hosts.toml").read_text()
    assert [p.name for p in tmp_path.rglob(".hosts.toml.*")] == []


def test_hosts_command_writes_the_files_and_says_which(tmp_path: Path) -> None:
    done = _run(
        "hosts", "--certs-d", str(tmp_path), "--insecure-registry", "10.0.0.5:5000",
        "--mirror", "http://127.0.0.1:5999",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(
        ["wrote", str(tmp_path / "10.0.0.5:5000" / "hosts.toml"),
         "wrote", str(tmp_path / "_default" / "hosts.toml")]
    )  # fmt: skip
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    done = _run("hosts", "--certs-d", str(unwritable))
    assert done.returncode == 1 and done.stderr.startswith("error: cannot write under")


def test_the_documented_hosts_toml_is_what_syncbit_writes() -> None:
    readme = (Path(__file__).parents[1] / "deploy" / "k8s" / "README.md").read_text()
    after = readme.split("e.g. `/etc/containerd/certs.d/docker.io/hosts.toml`:", 1)[1]
    shown = after.split("```toml\n", 1)[1].split("```", 1)[0]
    options = UpstreamOptions.model_validate({})
    assert shown == hosts_toml(server_url("docker.io", options), [mirror_url("127.0.0.1:5050")])
