"""The services' log (`syncbit daemon`, `syncbit scheduler`): one formatted line per
record on stderr, written by a thread of its own and flushed at exit; tracebacks once."""

from __future__ import annotations

import re
import subprocess
import sys

SCRIPT = """
import logging
from syncbit.cli.services import _setup_logging
_setup_logging("info")
log = logging.getLogger("syncbit.x")
log.debug("not at info")
log.info("hello %s", "world")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("failed")
"""


def test_one_line_per_record_written_by_the_log_thread_and_flushed_at_exit() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stderr.splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(rf"{stamp} INFO syncbit.x: hello world", lines[0]), lines
    assert re.fullmatch(rf"{stamp} ERROR syncbit.x: failed", lines[1]), lines
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"
    assert done.stderr.count("Traceback") == 1
    assert "not at info" not in done.stderr


ERROR_SCRIPT = """
import logging
import sys
import typer
from syncbit.cli.exits import guarded
from syncbit.cli.services import _setup_logging
from syncbit.errors import ConfigError

@guarded
def command() -> None:
    _setup_logging("info")
    for i in range(200):
        logging.getLogger("syncbit.x").info("starting, step %d", i)
    raise ConfigError("bad key")

try:
    command()
except typer.Exit as exc:
    sys.exit(exc.exit_code)
"""


def test_the_error_line_comes_after_what_was_logged_before_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", ERROR_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 201, lines
    assert lines[-2].endswith("INFO syncbit.x: starting, step 199")
    assert lines[-1] == "error: bad key"
