"""Fixtures of the tests that talk to a real registry (the oci:// source, the registry
mirror): no credentials from the machine running the tests. A module imports the fixture
function to make it autouse there; tests ask for it as `no_ambient_credentials`."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True, name="no_ambient_credentials")
def no_ambient_credentials_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test starts with no credentials: an empty Docker config dir, no SYNCBIT_OCI_*."""
    for var in ("SYNCBIT_OCI_USERNAME", "SYNCBIT_OCI_PASSWORD", "SYNCBIT_OCI_REGISTRY"):
        monkeypatch.delenv(var, raising=False)
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    return config_dir
