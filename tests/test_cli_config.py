"""CLI input errors: one clear line, exit code 2, no traceback (no daemon is started)."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from syncbit.cli import app
from syncbit.config import DaemonConfig, build, parse_size
from syncbit.errors import ConfigError
from syncbit.humanize import size_text

runner = CliRunner()


def test_unknown_config_key_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("node: n1\ncache_sise: 10GiB\n")
    result = runner.invoke(app, ["daemon", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "cache_sise" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("listen: nowhere\n", "listen"),
        ("cache_size: lots\n", "cache_size"),
        ("read_deadline: -1\n", "read_deadline"),
        ("labels: [a, b]\n", "labels"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key):
        build(DaemonConfig, cfg, {})


def test_config_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        build(DaemonConfig, tmp_path / "missing.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build(DaemonConfig, bad, {})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        build(DaemonConfig, scalar, {})


def test_flags_override_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("node: fromfile\ncache_size: 1GiB\nlabels: {zone: a}\n")
    built = build(DaemonConfig, cfg, {"node": "fromflag", "cache_size": None})
    assert built.node == "fromflag"
    assert built.cache_size == 2**30
    assert built.labels == {"zone": "a"}


def test_invalid_label_flag_exits_2() -> None:
    result = runner.invoke(app, ["daemon", "--label", "novalue"])
    assert result.exit_code == 2
    assert "invalid label 'novalue'" in result.output


@pytest.mark.parametrize(
    ("text", "value"),
    [("200GiB", 200 * 2**30), ("1.5TB", 1.5e12), ("4096", 4096), ("10 MiB", 10 * 2**20)],
)
def test_parse_size(text: str, value: float) -> None:
    assert parse_size(text) == int(value)


def test_human_sizes() -> None:
    assert size_text(0) == "0 B"
    assert size_text(1536) == "1.5 KiB"
    assert size_text(3 * 2**30) == "3.0 GiB"


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("http://origin/models/llama/", "llama"),
        ("s3://bucket/weights/v2", "v2"),
        ("hf://meta/llama-3@main", "llama-3"),
        ("hf://datasets/org/squad", "squad"),
        ("file:///srv/data/", "data"),
    ],
)
def test_pull_default_name_is_last_path_element(uri: str, name: str) -> None:
    from syncbit.cli.transfer import default_name

    assert default_name(uri) == name


def test_pull_progress_line_shows_bar_bytes_rate_eta() -> None:
    from syncbit.cli.progress import progress_line

    doc = {"dataset": "llama", "size": 4 * 2**30, "present_bytes": 2**30}
    bar = progress_line(doc, rate=512 * 2**20, bar=True)
    assert bar.startswith("llama: [######..................]  25.0%")
    assert "1.0 GiB / 4.0 GiB" in bar and "512.0 MiB/s" in bar and "ETA 6s" in bar
    plain = progress_line(doc, rate=0.0)
    assert "[" not in plain and "ETA ?" in plain


def test_every_daemon_flag_is_a_config_key() -> None:
    import typer.main

    command = typer.main.get_command(app).commands["daemon"]  # type: ignore[attr-defined]
    # --config and --mirror-config name files of keys (the whole config; the `mirror` key).
    flags = {p.name for p in command.params} - {"config", "mirror_config", "help", "label"}
    assert flags <= set(DaemonConfig.model_fields), flags - set(DaemonConfig.model_fields)
    assert {"upload_slots", "prefetch_concurrency", "prefetch_bandwidth"} <= flags


def test_a_mirror_config_file_is_the_mirror_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--mirror-config FILE` (or SYNCBIT_MIRROR_CONFIG, how the Kubernetes option sets it)
    runs the daemon's mirror with a standalone mirror's config file; a bad key in it is one
    error line naming the key, exit 2, and no daemon starts."""
    seen: list[DaemonConfig] = []
    monkeypatch.setattr("syncbit.node.run", seen.append)
    monkeypatch.setattr("syncbit.cli.services._setup_logging", lambda level: None)
    good = tmp_path / "mirror.yaml"
    good.write_text("listen: 127.0.0.1:5999\nregistries:\n  docker.io: {}\n")
    cache = tmp_path / "cache"
    base = ["daemon", "--cache-dir", str(cache), "--mount", str(tmp_path / "mnt")]
    result = runner.invoke(app, [*base, "--mirror-config", str(good)])
    assert result.exit_code == 0, result.output
    mirror = seen[-1].mirror_config()
    assert mirror is not None and mirror.cache_dir == cache / "mirror"
    assert "docker.io" in mirror.registries and mirror.listen.endswith(":5999")
    result = runner.invoke(app, base, env={"SYNCBIT_MIRROR_CONFIG": str(good)})
    assert result.exit_code == 0 and seen[-1].mirror_config() is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 127.0.0.1:5999\nregistrys: {}\n")
    result = runner.invoke(app, [*base, "--mirror-config", str(bad)])
    assert result.exit_code == 2 and "registrys" in result.output
    assert "Traceback" not in result.output and len(seen) == 2


def test_negative_upload_slots_names_the_key() -> None:
    result = runner.invoke(app, ["daemon", "--upload-slots", "-1"])
    assert result.exit_code == 2
    assert "upload_slots" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "argv",
    [
        ["pull", "s3://bucket/prefix/", "--name", "weights", "--option", "region=eu-west-1"],
        ["prefetch", "weights", "--nodes", "n1"],
        ["wait", "weights", "--timeout", "1s", "--daemon", "127.0.0.1:9"],
    ],
)
def test_commands_that_name_a_dataset_start_without_the_manifest_models(argv: list[str]) -> None:
    """A dataset name is checked by `syncbit.names`: `pull --name`, `prefetch` and `wait`
    (every pod's gate) do not import pydantic, whose models cost ~80 ms of each start."""
    code = (
        "import runpy, sys\n"
        "extra = [] if 'wait' in sys.argv else ['--scheduler', 'http://127.0.0.1:9']\n"
        "sys.argv = ['syncbit', *sys.argv[1:], *extra]\n"
        "try:\n"
        "    runpy.run_module('syncbit.cli', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 1, done.code  # nobody answers there\n"
        "loaded = sorted({'pydantic', 'syncbit.manifest'} & set(sys.modules))\n"
        "print('loaded', loaded, file=sys.stderr)\n"
        "sys.exit(3 if loaded else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "127.0.0.1:9" in out.stderr
