"""Node labels and the warm-up taint against a loopback fake of the Kubernetes API server
(`syncbit_testing.kubeapi`), and the fake's own answers. No cluster is reachable here: the
fake reproduces the API server's rules for Nodes, not a whole cluster."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lightkube import Client, KubeConfig
from lightkube.config.kubeconfig import SERVICE_ACCOUNT
from lightkube.resources.core_v1 import Node

from syncbit.errors import ConfigError
from syncbit.kube import LABEL_PREFIX, WARMING_TAINT, NodeSync, label_key, load_client
from syncbit_testing import command, environ
from syncbit_testing.kubeapi import KubeAPI, NodeDoc

# The official rules (k8s.io/apimachinery/pkg/util/validation IsQualifiedName), written out
# here rather than imported so that the test does not share a bug with the code.
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# As deploy/k8s/README.md tells operators to register nodes.
WARMING = {"key": WARMING_TAINT, "value": "true", "effect": "NoSchedule"}
GPU = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
NODE = "n1"


def assert_valid_label_key(key: str) -> None:
    prefix, slash, name = key.rpartition("/")
    assert slash, key
    assert len(prefix) <= 253 and DNS_SUBDOMAIN.match(prefix), key
    assert len(name) <= 63 and QUALIFIED_NAME.match(name), key


# -- label keys --------------------------------------------------------------------------------

ODD_NAMES = [
    "",
    " ",
    "-",
    "a",
    "A",
    "ds",
    "llama-3-8b",
    "Org.Model_v2",
    "org/model",
    "org:model",
    "org model",
    "org//model",
    "org/model/",
    "/org/model",
    "org\\model",
    "-leading",
    "_leading",
    ".leading",
    "trailing-",
    "trailing_",
    "trailing.",
    "..",
    "a" * 60,  # the longest name kept as it is
    "a" * 61,
    "a" * 300,
    "b" * 300,
    "a" * 299 + "b",
    "x" * 49 + "/" + "y" * 10,
    "模型",
    "模型-v2",
    "модель",
    "ünïcödé",
    "unicode",
    "e\u0301",
    "\u00e9",
    "🤗/bert",
    "emoji-🤗",
    "tab\there",
    "new\nline",
    "nul\x00byte",
    "bad\udcffbytes",  # a name decoded with surrogateescape
    "UPPER",
    "upper",
    "foo-0123456789",  # looks like a mapped name: must not be kept
    "foo-abcdef0123",
    "foo-ABCDEF0123",  # uppercase hex is not the mapped form: kept
    "foo-012345678",
    "a.b.c",
    "a..b",
    "100%",
    "100-",
    "r&d #1",
    "r-d--1",
]


def test_valid_names_are_kept() -> None:
    assert label_key("llama-3-8b") == "syncbit.io/ds.llama-3-8b"
    assert label_key("Org.Model_v2") == "syncbit.io/ds.Org.Model_v2"
    assert label_key("a" * 60) == "syncbit.io/ds." + "a" * 60
    assert label_key("foo-ABCDEF0123") == "syncbit.io/ds.foo-ABCDEF0123"


def test_other_names_are_mapped_by_the_documented_rule() -> None:
    digest = hashlib.sha256(b"org/model").hexdigest()[:10]
    assert label_key("org/model") == f"syncbit.io/ds.org-model-{digest}"
    # Stable from release to release: workloads select on it.
    assert label_key("org/model") == "syncbit.io/ds.org-model-c87c0c64d2"
    assert label_key("r&d #1").startswith("syncbit.io/ds.r-d-1-")
    assert label_key("-leading") == "syncbit.io/ds.-leading"  # `ds.` makes it valid
    assert label_key("/org/model/").startswith("syncbit.io/ds.org-model-")
    assert label_key("trailing-").startswith("syncbit.io/ds.trailing-")
    assert label_key("模型") == "syncbit.io/ds.-" + hashlib.sha256("模型".encode()).hexdigest()[:10]
    long = label_key("a" * 300)
    assert long == "syncbit.io/ds." + "a" * 49 + "-" + hashlib.sha256(b"a" * 300).hexdigest()[:10]
    # A kept name can never equal a mapped one: names of the mapped form are mapped too.
    assert label_key("foo-0123456789") != "syncbit.io/ds.foo-0123456789"


def test_every_label_key_is_valid_distinct_and_stable() -> None:
    keys = [label_key(n) for n in ODD_NAMES]
    for key in keys:
        assert_valid_label_key(key)
        assert key.startswith(LABEL_PREFIX)
    assert len(set(keys)) == len(ODD_NAMES)
    assert [label_key(n) for n in ODD_NAMES] == keys
    # Names whose mapped form would be the readable text of another's are still distinct.
    assert label_key("org/model") != label_key("org:model") != label_key("org model")
    assert label_key("x-" + label_key("org/model").split(".", 2)[2]) != label_key("org/model")


def test_random_names_give_valid_distinct_keys() -> None:
    rng = random.Random(20240601)
    alphabet = "aZ09-_./: \\%~é模🤗\t"
    names = {"".join(rng.choices(alphabet, k=rng.randint(1, 90))) for _ in range(3000)}
    keys = {label_key(n) for n in names}
    assert len(keys) == len(names)
    for key in keys:
        assert_valid_label_key(key)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def api() -> Iterator[KubeAPI]:
    with KubeAPI() as server:
        yield server


@pytest.fixture
def kubeconfig(api: KubeAPI, tmp_path: Path) -> Path:
    return api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def caplog_kube(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="syncbit.kube")
    return caplog


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "syncbit.kube" and r.levelno == logging.WARNING
    ]


@pytest.fixture
def node_sync(kubeconfig: Path) -> Iterator[Callable[..., NodeSync]]:
    """Builds NodeSyncs (default: node n1, the fake's kubeconfig) and closes them after."""
    made: list[NodeSync] = []

    def make(config: Path = kubeconfig, node: str = NODE, **kw: Any) -> NodeSync:
        made.append(NodeSync(node, kubeconfig=config, **kw))
        return made[-1]

    yield make
    for sync in made:
        sync.close()


def ours(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k.startswith(LABEL_PREFIX)}


# -- labels ------------------------------------------------------------------------------------


async def test_labels_follow_ready_datasets(
    api: KubeAPI, node_sync: Callable[..., NodeSync]
) -> None:
    # A label left by an earlier daemon run for a dataset since removed, and others' labels.
    api.add_node(NODE, labels={"team": "ml", label_key("gone"): "ready"})
    sync = node_sync()
    await sync.sync({"a", "org/model"}, None)
    labels = api.labels(NODE)
    assert ours(labels) == {label_key("a"): "ready", label_key("org/model"): "ready"}
    assert labels["team"] == "ml" and labels["kubernetes.io/hostname"] == NODE

    await sync.sync({"a"}, None)  # org/model evicted or unassigned
    assert ours(api.labels(NODE)) == {label_key("a"): "ready"}
    assert api.labels(NODE)["team"] == "ml"

    await sync.sync(set(), None)
    assert ours(api.labels(NODE)) == {}
    assert sync.last_error is None
    patches = [r for r in api.requests if r.method == "PATCH"]
    assert {r.content_type for r in patches} == {"application/merge-patch+json"}
    assert all(r.query.get("fieldManager") == ["syncbit"] for r in patches)


async def test_no_requests_in_steady_state(
    api: KubeAPI, node_sync: Callable[..., NodeSync]
) -> None:
    api.add_node(NODE)
    sync = node_sync()
    await sync.sync({"a"}, {"a"})
    assert api.counts == {"GET": 1, "PATCH": 1}
    api.reset_counts()
    for _ in range(3):
        await sync.sync({"a"}, {"a"})
    assert api.counts == {}  # unchanged state, within the resync period: no request


async def test_resync_reads_but_writes_only_changes(
    api: KubeAPI, node_sync: Callable[..., NodeSync]
) -> None:
    api.add_node(NODE, labels={"team": "ml"})
    sync = node_sync(resync=0)
    await sync.sync({"a"}, None)
    api.reset_counts()
    await sync.sync({"a"}, None)
    assert api.counts == {"GET": 1}  # read again, nothing to write

    # Someone removes our label by hand: the next resync puts it back.
    api.modify(NODE, lambda n: n["metadata"]["labels"].pop(label_key("a")))
    version = api.node(NODE)["metadata"]["resourceVersion"]
    await sync.sync({"a"}, None)
    assert ours(api.labels(NODE)) == {label_key("a"): "ready"}
    assert api.node(NODE)["metadata"]["resourceVersion"] != version


# -- warm-up taint -----------------------------------------------------------------------------


async def test_taint_lifted_only_when_every_assigned_dataset_is_ready(
    api: KubeAPI, node_sync: Callable[..., NodeSync]
) -> None:
    api.add_node(NODE, taints=[WARMING, GPU])
    sync = node_sync()
    await sync.sync({"a", "b"}, None)  # no plan received yet: unknown, keep the taint
    assert api.taints(NODE) == [WARMING, GPU]
    await sync.sync({"a"}, {"a", "b"})  # b still missing
    assert api.taints(NODE) == [WARMING, GPU]
    await sync.sync({"a", "b", "c"}, {"a", "b"})
    assert api.taints(NODE) == [GPU]  # other taints kept
    assert ours(api.labels(NODE)) == {label_key(d): "ready" for d in "abc"}

    # Never added back, not even when a dataset stops being ready.
    await sync.sync({"a"}, {"a", "b"})
    assert api.taints(NODE) == [GPU]


async def test_empty_plan_lifts_the_taint(api: KubeAPI, node_sync: Callable[..., NodeSync]) -> None:
    api.add_node(NODE, taints=[WARMING])
    sync = node_sync()
    await sync.sync(set(), set())
    assert api.taints(NODE) == []
    assert "taints" not in api.node(NODE)["spec"]  # null in a merge patch deletes it


async def test_concurrent_writer_conflict_is_retried_and_both_changes_survive(
    api: KubeAPI, node_sync: Callable[..., NodeSync]
) -> None:
    api.add_node(NODE, taints=[WARMING])

    def other_writer(node: NodeDoc) -> None:
        node["spec"]["taints"].append(GPU)
        node["metadata"]["labels"]["zone"] = "a"

    api.before_next_patch(other_writer)
    sync = node_sync()
    await sync.sync({"a"}, {"a"})
    assert api.statuses[409] == 1
    assert api.counts == {"GET": 2, "PATCH": 2}
    assert api.taints(NODE) == [GPU]
    labels = api.labels(NODE)
    assert labels["zone"] == "a" and labels[label_key("a")] == "ready"
    assert sync.last_error is None


async def test_endless_conflicts_give_up_until_the_next_sync(
    api: KubeAPI, node_sync: Callable[..., NodeSync], caplog_kube: pytest.LogCaptureFixture
) -> None:
    api.add_node(NODE, taints=[WARMING])

    def writer(i: int) -> Callable[[NodeDoc], None]:
        return lambda node: node["metadata"]["labels"].update({"w": str(i)})

    for i in range(3):
        api.before_next_patch(writer(i))
    sync = node_sync(conflict_attempts=3)
    await sync.sync({"a"}, {"a"})
    assert api.statuses[409] == 3
    assert api.taints(NODE) == [WARMING]
    assert len(warnings_of(caplog_kube)) == 1 and "conflicts" in warnings_of(caplog_kube)[0]
    await sync.sync({"a"}, {"a"})  # the same state is not cached after a failure
    assert api.taints(NODE) == []
    assert api.labels(NODE)["w"] == "2"


# -- failures ----------------------------------------------------------------------------------


async def test_api_down_warns_once_and_catches_up(
    api: KubeAPI, node_sync: Callable[..., NodeSync], caplog_kube: pytest.LogCaptureFixture
) -> None:
    api.add_node(NODE, taints=[WARMING])
    sync = node_sync()
    api.stop()  # connection refused
    await sync.sync({"a"}, {"a"})
    await sync.sync({"a", "b"}, {"a"})
    warned = warnings_of(caplog_kube)
    assert len(warned) == 1 and "unreachable" in warned[0]
    assert sync.last_error is not None

    api.start()  # same port
    await sync.sync({"a", "b"}, {"a"})
    assert ours(api.labels(NODE)) == {label_key("a"): "ready", label_key("b"): "ready"}
    assert api.taints(NODE) == []
    assert sync.last_error is None
    assert any("in step again" in r.getMessage() for r in caplog_kube.records)


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_warn_and_the_next_sync_applies(
    api: KubeAPI,
    node_sync: Callable[..., NodeSync],
    caplog_kube: pytest.LogCaptureFixture,
    status: int,
) -> None:
    api.add_node(NODE)
    sync = node_sync()
    api.fail_next(2, status=status)
    await sync.sync({"a"}, None)  # GET fails
    await sync.sync({"a"}, None)  # GET fails again: no second warning
    assert ours(api.labels(NODE)) == {}
    warned = warnings_of(caplog_kube)
    assert len(warned) == 1 and f"answered {status}" in warned[0]
    await sync.sync({"a"}, None)
    assert ours(api.labels(NODE)) == {label_key("a"): "ready"}


async def test_a_proxy_error_page_is_a_warning_too(
    api: KubeAPI, node_sync: Callable[..., NodeSync], caplog_kube: pytest.LogCaptureFixture
) -> None:
    api.add_node(NODE)
    sync = node_sync()
    api.fail_next(1, status=502, status_object=False)
    await sync.sync({"a"}, None)
    warned = warnings_of(caplog_kube)
    assert len(warned) == 1 and "HTTP 502" in warned[0]
    await sync.sync({"a"}, None)
    assert ours(api.labels(NODE)) == {label_key("a"): "ready"}


async def test_connection_reset(
    api: KubeAPI, node_sync: Callable[..., NodeSync], caplog_kube: pytest.LogCaptureFixture
) -> None:
    api.add_node(NODE)
    sync = node_sync()
    await sync.sync(set(), None)  # a pooled keep-alive connection exists now
    api.reset_next(1)
    await sync.sync({"a"}, None)  # GET reset
    assert ours(api.labels(NODE)) == {}
    warned = warnings_of(caplog_kube)
    assert len(warned) == 1 and "unreachable" in warned[0]
    await sync.sync({"a"}, None)
    assert ours(api.labels(NODE)) == {label_key("a"): "ready"}


async def test_wrong_token_is_a_clear_warning(
    api: KubeAPI,
    tmp_path: Path,
    node_sync: Callable[..., NodeSync],
    caplog_kube: pytest.LogCaptureFixture,
) -> None:
    api.add_node(NODE)
    sync = node_sync(api.write_kubeconfig(tmp_path / "bad", token="wrong"))
    await sync.sync({"a"}, None)
    assert api.statuses == {401: 1}
    warned = warnings_of(caplog_kube)
    assert len(warned) == 1 and "401 Unauthorized" in warned[0] and "token" in warned[0]
    assert ours(api.labels(NODE)) == {}


async def test_missing_rbac_and_unknown_node_say_what_to_fix(
    api: KubeAPI, node_sync: Callable[..., NodeSync], caplog_kube: pytest.LogCaptureFixture
) -> None:
    api.add_node(NODE)
    api.forbid("patch")
    sync = node_sync()
    ghost = node_sync(node="ghost")
    await sync.sync({"a"}, None)
    await ghost.sync({"a"}, None)
    forbidden, missing = warnings_of(caplog_kube)
    assert "403" in forbidden and "get and patch on nodes" in forbidden
    assert "'ghost'" in missing and "spec.nodeName" in missing
    api.forbid()
    await sync.sync({"a"}, None)
    assert ours(api.labels(NODE)) == {label_key("a"): "ready"}


# -- the loop and the configuration ------------------------------------------------------------


async def test_run_follows_the_daemon_state(
    api: KubeAPI, node_sync: Callable[..., NodeSync]
) -> None:
    api.add_node(NODE, taints=[WARMING])
    state: dict[str, Any] = {"ready": set(), "assigned": None}
    sync = node_sync()

    async def until(predicate: Any) -> None:
        with trio.fail_after(5):
            while not predicate():
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        # A long interval: each change below is picked up through wake().
        nursery.start_soon(sync.run, lambda: (state["ready"], state["assigned"]), 60.0)
        state["ready"] = {"a"}
        sync.wake()
        await until(lambda: label_key("a") in api.labels(NODE))
        state["assigned"] = {"a"}
        sync.wake()
        await until(lambda: api.taints(NODE) == [])
        nursery.cancel_scope.cancel()


def test_load_client_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load the Kubernetes config"):
        load_client(tmp_path / "missing")
    bad = tmp_path / "bad"
    for doc, why in [
        ({"apiVersion": "v1", "kind": "Config", "clusters": [], "contexts": []}, "current context"),
        ({"apiVersion": "v1", "kind": "Config", "clusters": []}, "no 'contexts' entry"),
        ({"clusters": None, "contexts": None}, "malformed"),
        ([1, 2], "malformed"),
    ]:
        bad.write_text(json.dumps(doc))
        with pytest.raises(ConfigError, match=why):
            load_client(bad)
    bad.write_text("{ not yaml")
    with pytest.raises(ConfigError, match="cannot load"):
        load_client(bad)


def test_kubeconfig_from_the_environment(
    api: KubeAPI, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in a pod (no service account): $KUBECONFIG is used, as out of cluster."""
    if Path(SERVICE_ACCOUNT).exists():
        pytest.skip("running in a pod: the in-cluster service account takes precedence")
    api.add_node(NODE)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with load_client(None) as client:
        node = client.get(Node, NODE)
    assert node.metadata is not None and node.metadata.name == NODE


# -- the fake API server -----------------------------------------------------------------------


@pytest.fixture
def http(api: KubeAPI) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {api.token}"}
    with httpx.Client(base_url=api.url, headers=headers, trust_env=False) as client:
        yield client


def patch(http: httpx.Client, body: Any, ctype: str, name: str = NODE) -> httpx.Response:
    return http.patch(
        f"/api/v1/nodes/{name}", content=json.dumps(body), headers={"Content-Type": ctype}
    )


def test_fake_get_and_errors_are_kubernetes_shaped(api: KubeAPI, http: httpx.Client) -> None:
    api.add_node(NODE, labels={"zone": "a"}, taints=[GPU])
    doc = http.get(f"/api/v1/nodes/{NODE}").json()
    assert doc["apiVersion"] == "v1" and doc["kind"] == "Node"
    assert doc["metadata"]["name"] == NODE and doc["metadata"]["labels"]["zone"] == "a"
    assert isinstance(doc["metadata"]["resourceVersion"], str)
    assert doc["spec"]["taints"] == [GPU]

    missing = http.get("/api/v1/nodes/ghost")
    assert missing.status_code == 404
    assert missing.headers["Content-Type"] == "application/json"
    assert missing.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'nodes "ghost" not found',
        "reason": "NotFound",
        "details": {"name": "ghost", "kind": "nodes"},
        "code": 404,
    }
    anonymous = httpx.get(f"{api.url}/api/v1/nodes/{NODE}", trust_env=False)
    assert anonymous.status_code == 401 and anonymous.json()["reason"] == "Unauthorized"
    listing = http.get("/api/v1/nodes").json()
    assert listing["kind"] == "NodeList" and [n["metadata"]["name"] for n in listing["items"]] == [
        NODE
    ]


def test_fake_merge_patch_conflicts_on_a_stale_resource_version(
    api: KubeAPI, http: httpx.Client
) -> None:
    version = api.add_node(NODE, taints=[WARMING, GPU])["metadata"]["resourceVersion"]
    api.modify(NODE, lambda n: n["metadata"]["labels"].update({"zone": "b"}))
    stale = {"metadata": {"resourceVersion": version}, "spec": {"taints": [GPU]}}
    answer = patch(http, stale, "application/merge-patch+json")
    assert answer.status_code == 409
    status = answer.json()
    assert status["kind"] == "Status" and status["reason"] == "Conflict" and status["code"] == 409
    assert "the object has been modified" in status["message"]
    assert api.taints(NODE) == [WARMING, GPU]

    current = api.node(NODE)["metadata"]["resourceVersion"]
    fresh = {"metadata": {"resourceVersion": current}, "spec": {"taints": [GPU]}}
    answer = patch(http, fresh, "application/merge-patch+json")
    assert answer.status_code == 200 and answer.json()["spec"]["taints"] == [GPU]
    assert int(answer.json()["metadata"]["resourceVersion"]) > int(current)


def test_fake_json_patch_escapes_and_test_failures(api: KubeAPI, http: httpx.Client) -> None:
    api.add_node(NODE, labels={"syncbit.io/ds.a": "ready"}, taints=[WARMING])
    version = api.node(NODE)["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": version},
        {"op": "add", "path": "/metadata/labels/syncbit.io~1ds.b", "value": "ready"},
        {"op": "remove", "path": "/metadata/labels/syncbit.io~1ds.a"},
        {"op": "replace", "path": "/spec/taints", "value": []},
    ]
    answer = patch(http, ops, "application/json-patch+json")
    assert answer.status_code == 200, answer.text
    assert ours(api.labels(NODE)) == {"syncbit.io/ds.b": "ready"}
    assert api.taints(NODE) == []

    # The same patch again: its test op now fails. The real API server answers 422, not 409.
    answer = patch(http, ops, "application/json-patch+json")
    assert answer.status_code == 422 and answer.json()["reason"] == "Invalid"
    missing = [{"op": "remove", "path": "/metadata/labels/nope"}]
    assert patch(http, missing, "application/json-patch+json").status_code == 422


def test_fake_strategic_patch_validation_and_no_op_writes(api: KubeAPI, http: httpx.Client) -> None:
    api.add_node(NODE, labels={"zone": "a"}, taints=[WARMING, GPU])
    version = api.node(NODE)["metadata"]["resourceVersion"]
    same = {"metadata": {"labels": {"zone": "a"}}}
    assert patch(http, same, "application/strategic-merge-patch+json").status_code == 200
    assert api.node(NODE)["metadata"]["resourceVersion"] == version  # nothing written

    taints = {"spec": {"taints": [GPU]}, "metadata": {"labels": {"zone": None, "k": "v"}}}
    assert patch(http, taints, "application/strategic-merge-patch+json").status_code == 200
    assert api.taints(NODE) == [GPU] and "zone" not in api.labels(NODE)

    bad_key = {"metadata": {"labels": {"syncbit.io/ds.org/model": "ready"}}}
    answer = patch(http, bad_key, "application/merge-patch+json")
    assert answer.status_code == 422 and answer.json()["reason"] == "Invalid"
    bad_effect = {"spec": {"taints": [{"key": "k", "effect": "Sometimes"}]}}
    assert patch(http, bad_effect, "application/merge-patch+json").status_code == 422
    assert patch(http, same, "application/apply-patch+yaml").status_code == 415
    assert patch(http, same, "application/merge-patch+json", name="ghost").status_code == 404


def test_every_mapped_key_is_accepted_by_the_fake(api: KubeAPI, http: httpx.Client) -> None:
    api.add_node(NODE)
    labels = {label_key(n): "ready" for n in ODD_NAMES}
    answer = patch(http, {"metadata": {"labels": labels}}, "application/merge-patch+json")
    assert answer.status_code == 200, answer.text


def test_fake_runs_standalone(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    with subprocess.Popen(
        command(
            "kubeapi",
            *("--node", NODE, "--taint", f"{WARMING_TAINT}=true:NoSchedule"),
            *("--kubeconfig", str(kubeconfig)),
        ),
        stdout=subprocess.PIPE,
        text=True,
        env=environ(),
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline().split() for _ in range(3)]
            assert [w[0] for w in lines] == ["URL", "TOKEN", "READY"]
            with Client(KubeConfig.from_file(kubeconfig), trust_env=False) as client:
                node = client.get(Node, NODE)
            assert node.spec is not None and node.spec.taints is not None
            assert [(t.key, t.effect) for t in node.spec.taints] == [(WARMING_TAINT, "NoSchedule")]
            stats = httpx.get(lines[0][1] + "/__stats", trust_env=False).json()
            assert stats["requests"] == {"GET": 1}
        finally:
            proc.terminate()
        assert proc.wait(10) == 0
