"""What ships: the wheel and the image hold the `syncbit` package only; the loopback test
servers (`syncbit_testing`) stay in the checkout, and the product never imports them."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_packages

import syncbit
import syncbit_testing
from syncbit_testing import CHECKOUT, command, environ

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_takes_the_product_package_only() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"])
    assert "syncbit" in packages and "syncbit.sources" in packages
    assert all(p == "syncbit" or p.startswith("syncbit.") for p in packages), packages


def test_the_image_copies_the_product_package_only() -> None:
    copies = [
        line.split()[1:]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY")
    ]
    sources = {src for args in copies for src in args[:-1] if not src.startswith("--")}
    assert sources == {"pyproject.toml", "README.md", "syncbit"}, sources
    for path in (ROOT / "deploy").rglob("*"):
        if path.is_file():
            assert "syncbit_testing" not in path.read_text(errors="replace"), path


def test_the_product_never_imports_the_test_servers() -> None:
    package = Path(syncbit.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "syncbit_testing" for n in names), path


def test_a_test_server_runs_as_a_child_from_any_directory(tmp_path: Path) -> None:
    """`python -m syncbit_testing.X` from elsewhere than the checkout, with a PYTHONPATH
    that does not name it: `environ()` adds it."""
    assert Path(syncbit_testing.__file__).resolve().parent.parent == CHECKOUT == ROOT
    bare = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        command("capped", "--root", str(tmp_path / "none")),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=environ(bare),
    )
    # It ran (and refused the missing root in one line), rather than failing to import.
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert environ(bare)["PYTHONPATH"].split(":") == [str(tmp_path), str(CHECKOUT)]
    assert command("origin", "--port", "0")[:3] == [sys.executable, "-m", "syncbit_testing.origin"]
