"""deploy/k8s/etcd.yaml's own etcd command line, run for real: three members on loopback
(Debian's etcd-server), each started with the manifest's arguments, only its DNS names,
listen addresses and data dir moved to loopback ports and a tmp dir. They must form one
cluster, and the scheduler's `state` (config/scheduler.yaml), moved the same way, must
reach it through syncbit's etcd client: writes go on with one member down, fail with
StateUnavailableError with two down, and resume with nothing lost once one is back.

Debian ships etcd 3.4 and the manifest names the 3.6 image: a flag either release lacks
fails here at start-up, but 3.6's probe paths (/livez, /readyz) are not checked here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from integration.cluster import HOST, free_port, wait_until
from integration.etcd_cluster import ETCD, EtcdMember, etcd_unavailable
from syncbit.errors import StateUnavailableError
from syncbit.scheduler.etcd import EtcdClient

pytestmark = pytest.mark.skipif(etcd_unavailable() is not None, reason=str(etcd_unavailable()))

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
PORTS = {"client": 2379, "peer": 2380, "metrics": 2381}


def manifest() -> tuple[Any, Any]:
    """etcd.yaml's StatefulSet and its one container."""
    docs = list(yaml.safe_load_all((K8S / "etcd.yaml").read_text()))
    (sts,) = [d for d in docs if d and d["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS
    return sts, container


class ManifestMember(EtcdMember):
    """One member, started with the manifest's command line moved to loopback by `moves`
    (the manifest's text -> this machine's)."""

    def __init__(
        self, pod: str, workdir: Path, args: list[str], moves: dict[str, str], ports: dict[str, int]
    ) -> None:
        super().__init__(pod, workdir)
        self.client_port, self.peer_port = ports["client"], ports["peer"]
        self.args = args
        self.moves = moves

    def command(self, initial_cluster: str, token: str) -> list[str]:
        # The manifest names the cluster and its token itself; the harness's are unused.
        argv = []
        for arg in self.args:
            for old, new in self.moves.items():
                arg = arg.replace(old, new)
            for left in ("$(", ".svc", "0.0.0.0", "/var/lib/etcd"):
                assert left not in arg, f"{arg!r}: {left} not moved to loopback"
            argv.append(arg)
        return [ETCD, *argv]


@dataclass
class Moved:
    """The manifest's members on loopback: the processes, where each manifest name:port
    went, and each member's metrics (probe) URL."""

    members: list[ManifestMember]
    names: dict[str, str]
    metrics: dict[str, str]


@pytest.fixture
def moved(tmp_path: Path) -> Iterator[Moved]:
    sts, container = manifest()
    domain = f"{sts['spec']['serviceName']}.{sts['metadata']['namespace']}.svc"
    (mount,) = container["volumeMounts"]
    pods = [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    ports = {pod: {name: free_port() for name in PORTS} for pod in pods}
    # Every member's DNS name and port, as all of them (and the scheduler) name it.
    names = {
        f"{pod}.{domain}:{PORTS[name]}": f"{HOST}:{port}"
        for pod in pods
        for name, port in ports[pod].items()
    }
    out = []
    for pod in pods:
        own = {
            "$(POD_NAME)": pod,
            mount["mountPath"]: str(tmp_path / pod),
            **{f"0.0.0.0:{PORTS[n]}": f"{HOST}:{p}" for n, p in ports[pod].items()},
        }
        # $(POD_NAME) first: the advertised URLs become names that `names` moves.
        moves = {**own, **names}
        out.append(ManifestMember(pod, tmp_path, container["args"], moves, ports[pod]))
    metrics = {pod: f"http://{HOST}:{ports[pod]['metrics']}" for pod in pods}
    try:
        yield Moved(out, names, metrics)
    finally:
        for member in out:
            member.close()


def state_url(names: dict[str, str]) -> str:
    """config/scheduler.yaml's `state`, its member names moved to loopback."""
    state = str(yaml.safe_load((K8S / "config" / "scheduler.yaml").read_text())["state"])
    for old, new in names.items():
        state = state.replace(old, new)
    assert ".svc" not in state, state
    return state


def put_get(state: str, key: bytes, value: bytes | None) -> bytes | None:
    """Write `value` at `key` (if given), then read `key`, through syncbit's etcd client."""

    async def go() -> bytes | None:
        client = EtcdClient(state, timeout=8.0)
        try:
            if value is not None:
                await client.put(key, value)
            found = await client.get(key)
            return None if found is None else bytes(found.value)
        finally:
            await client.aclose()

    result: bytes | None = trio.run(go)
    return result


@pytest.mark.timeout(240)
def test_the_manifests_etcd_keeps_a_quorum_with_one_member_down(moved: Moved) -> None:
    nodes = moved.members
    for member in nodes:
        member.spawn("", "")
    wait_until(
        lambda: all(m.healthy() for m in nodes),
        90,
        "the manifest's etcd members form one cluster",
        interval=0.2,
        evidence=lambda: "\n\n".join(m.log_tail(15) for m in nodes),
    )
    # The probes' port serves: the kubelet reaches it on every member.
    for member in nodes:
        resp = httpx.get(moved.metrics[member.member_name] + "/health", timeout=5)
        assert resp.status_code == 200, resp.text
    state = state_url(moved.names)
    assert put_get(state, b"k8s/one", b"written with three") == b"written with three"

    nodes[0].stop()  # a drain: the PodDisruptionBudget allows one
    assert put_get(state, b"k8s/two", b"written with two") == b"written with two"

    nodes[1].stop()  # two down: no quorum, writes fail with the error the scheduler maps
    with pytest.raises(StateUnavailableError):
        put_get(state, b"k8s/three", b"never written")

    nodes[0].spawn("", "")  # back with its data: the quorum returns, nothing lost
    wait_until(lambda: nodes[0].healthy() and nodes[2].healthy(), 90, "two members healthy")
    assert put_get(state, b"k8s/one", None) == b"written with three"
    assert put_get(state, b"k8s/two", None) == b"written with two"
    assert put_get(state, b"k8s/four", b"after") == b"after"
