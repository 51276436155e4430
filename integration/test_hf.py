"""HuggingFace through syncbit: a Hub-compatible server on loopback, real daemons, the real
CLI. Two revisions that share a shard cost the Hub that shard once; a private repo needs
the token the daemons were started with; the pulled files are exact."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.cluster import Cluster, Origin, sha256_file

hub_mod = pytest.importorskip("syncbit_testing.hub")

MiB = 1 << 20
TOKEN = "hf_syncbit_integration"


@pytest.fixture(scope="module")
def hf(workdir: Path, origin: Origin) -> Iterator[tuple[Cluster, object]]:
    """A Hub and a 2-node cluster whose processes see only HF_ENDPOINT and HF_TOKEN."""
    hub = hub_mod.Hub(workdir / "hub")
    hub.start()
    hub.add_token(TOKEN)
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(workdir / "hf-home"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cluster = Cluster(workdir / "hf", origin, nodes=2)
    try:
        cluster.start()
        yield cluster, hub
    finally:
        cluster.close()
        hub.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.timeout(300)
def test_revisions_sharing_a_shard_cost_the_hub_that_shard_once(
    hf: tuple[Cluster, object],
) -> None:
    cluster, hub = hf
    shared, old, new = os.urandom(24 * MiB), os.urandom(6 * MiB), os.urandom(5 * MiB + 7)
    hub.add_commit(  # type: ignore[attr-defined]
        "org/model",
        {
            "model-1.safetensors": shared,
            "model-2.safetensors": old,
            "config.json": b"{}",
            "model.bin": os.urandom(2 * MiB),
        },
        private=True,
    )
    hub.add_tag("org/model", "v1")  # type: ignore[attr-defined]
    hub.add_commit("org/model", {"model-2.safetensors": new})  # type: ignore[attr-defined]
    n1 = cluster.node("n1")
    common = ["--include", "*.safetensors", "--include", "config.json", "--daemon", n1.address]

    hub.reset_stats()  # type: ignore[attr-defined]
    first = cluster.cli("pull", "hf://org/model", "--revision", "v1", "--name", "m-v1", *common)
    assert first.returncode == 0, first.stderr
    served_v1 = hub.bytes_served  # type: ignore[attr-defined]
    assert len(shared) + len(old) <= served_v1 <= (len(shared) + len(old)) * 1.02 + 4096

    second = cluster.cli("pull", "hf://org/model", "--name", "m-main", *common)
    assert second.returncode == 0, second.stderr
    # Only the changed shard crossed the wire for the new revision.
    assert hub.bytes_served - served_v1 <= len(new) * 1.02 + 4096  # type: ignore[attr-defined]

    assert sorted(os.listdir(n1.path("m-v1"))) == [
        "config.json",
        "model-1.safetensors",
        "model-2.safetensors",
    ]  # include/exclude
    digest = hashlib.sha256(new).hexdigest()
    assert sha256_file(n1.path("m-main", "model-2.safetensors")) == digest
    assert sha256_file(n1.path("m-v1", "model-1.safetensors")) == hashlib.sha256(shared).hexdigest()


def test_unknown_repo_and_revision_are_clear_errors(hf: tuple[Cluster, object]) -> None:
    # (Private and gated repos without a token: tests/test_hf_source.py; here the
    # scheduler resolves with the token it was started with, as in production.)
    cluster, hub = hf
    hub.add_commit("org/t2", {"a.txt": b"a"})  # type: ignore[attr-defined]
    unknown = cluster.cli("dataset", "add", "x", "hf://org/t2@no-such-rev")
    assert unknown.returncode == 2 and "no-such-rev" in unknown.stderr, unknown.stderr
    missing = cluster.cli("dataset", "add", "y", "hf://org/does-not-exist")
    assert missing.returncode == 2 and "error:" in missing.stderr
    assert "Traceback" not in unknown.stderr + missing.stderr
