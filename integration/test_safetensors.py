"""A model loader on the mount: safetensors `safe_open` (mmap) sees exactly the saved tensors,
first fetched from the source by one node, then from that node by another."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest

from integration.cluster import CHUNK_SIZE, Cluster, Origin, in_thread

np = pytest.importorskip("numpy")
safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402

CLUSTER_NODES = 2


def _tensors() -> dict[str, Any]:
    rng = np.random.default_rng(20240611)
    return {
        # ~24 MiB: spans several 4 MiB chunks, boundaries inside the tensor.
        "model.embed.weight": rng.standard_normal((3072, 2048), dtype=np.float32),
        "model.layers.0.attn.q.weight": rng.standard_normal((1024, 1024)).astype(np.float16),
        "model.layers.0.attn.q.bias": rng.standard_normal(1024).astype(np.float64),
        "model.layers.0.mlp.up.weight": rng.integers(-128, 127, (1536, 1000), dtype=np.int8),
        "model.layers.0.norm.weight": rng.standard_normal(7).astype(np.float32),
        "model.position_ids": np.arange(4099, dtype=np.int64),
        "model.mask": rng.integers(0, 2, (33, 17)).astype(np.bool_),
        "model.scalar": np.array(3.5, dtype=np.float32),
        "lm_head.weight": rng.integers(0, 255, (2048, 1031), dtype=np.uint8),
    }


@pytest.mark.timeout(300)
def test_safetensors_mmap_through_the_mount(
    cluster: Cluster, origin: Origin, origin_root: Path
) -> None:
    tensors = _tensors()
    target = origin_root / "st" / "model.safetensors"
    target.parent.mkdir(parents=True)
    save_file(tensors, str(target), metadata={"format": "np", "origin": "syncbit-test"})
    assert target.stat().st_size > 3 * CHUNK_SIZE
    cluster.add_dataset("st", origin.url + "st/")

    def load(path: Path) -> tuple[dict[str, Any], dict[str, str] | None]:
        out: dict[str, Any] = {}
        with safetensors.safe_open(str(path), framework="np") as f:
            meta = f.metadata()
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                out[key] = f.get_tensor(key)
        return out, meta

    n1, n2 = cluster.nodes
    for node in (n1, n2):  # n1 from the source, n2 from n1
        path = node.path("st", "model.safetensors")
        loaded, meta = in_thread(partial(load, path), 120, f"safe_open on {node.name}")
        assert meta == {"format": "np", "origin": "syncbit-test"}
        assert sorted(loaded) == sorted(tensors), node.name
        for key, want in tensors.items():
            got = loaded[key]
            assert got.dtype == want.dtype and got.shape == want.shape, (node.name, key)
            assert np.array_equal(got, want), (node.name, key)
        if node is n1:
            cluster.wait_cached(n1, "st", target.stat().st_size)
