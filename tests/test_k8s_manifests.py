"""deploy/k8s and the Dockerfile, checked without a cluster or a network: every manifest
against the Kubernetes API schemas, the kustomize composition, and the deployment's
requirements (privileges, propagation, probes, RBAC, examples) so that a regression fails.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import ssl
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import kubernetes_validate
import pytest
import typer.main
import yaml

from syncbit.cli import app
from syncbit.config import DaemonConfig, SchedulerConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
EXAMPLES = K8S / "examples"
KUSTOMIZATIONS = [K8S, EXAMPLES]
# The single-replica LMDB layout: an overlay of deploy/k8s, beside it (kustomize refuses a
# kustomization root inside another one it loads).
SINGLE = ROOT / "deploy" / "overlays" / "single-scheduler"
NAMESPACE = "syncbit"
IMAGE = "ghcr.io/syncbit/syncbit"
ETCD_IMAGE = "quay.io/coreos/etcd"
# The floor (admissionregistration.k8s.io/v1 and the node name in pod-bound tokens arrive
# in 1.30) and the newest release whose schemas kubernetes-validate>=1.37 bundles.
KUBERNETES_VERSIONS = ["1.30", "1.37"]
# Keys and flags of the daemon/scheduler contract for Kubernetes that may not have landed
# in syncbit/ yet; a check that needs them skips until they exist, then holds.
# `state` and `advertise` (scheduler), and several comma-separated URLs in the daemon's
# `scheduler` ("scheduler URLs"), arrive with the scheduler's high availability.
PENDING_KEYS = {"token_file", "kubernetes", "state", "advertise", "scheduler URLs"}
PENDING_FLAGS = {"--kubernetes", "--token-file", "--advertise"}

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}
NAMESPACED = {
    "ServiceAccount",
    "ConfigMap",
    "Secret",
    "Service",
    "StatefulSet",
    "DaemonSet",
    "Deployment",
    "Job",
    "Pod",
    "PodDisruptionBudget",
    "NetworkPolicy",
}

Obj = dict[str, Any]


# -- loading --------------------------------------------------------------------------------


def load_docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization(directory: Path) -> Obj:
    doc: Obj = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return doc


def manifest_files() -> list[Path]:
    """Every YAML file of Kubernetes objects (not kustomizations, not config payloads,
    not the components' patches and settings)."""
    return sorted(
        p
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml"
        and p.parent.name != "config"
        and "components" not in p.relative_to(K8S).parts
    )


def generated(directory: Path) -> list[Obj]:
    """The ConfigMaps and Secrets a kustomization's generators make (name before hash)."""
    kust = kustomization(directory)
    out: list[Obj] = []
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for gen in kust.get(key, []):
            data: dict[str, str] = {}
            for entry in gen.get("files", []):
                name, _, path = entry.rpartition("=")
                data[name or Path(path).name] = (directory / path).read_text()
            data.update(dict(lit.split("=", 1) for lit in gen.get("literals", [])))
            meta = {"name": gen["name"]}
            if "namespace" in gen:
                meta["namespace"] = gen["namespace"]
            out.append({"apiVersion": "v1", "kind": kind, "metadata": meta, "data": data})
    return out


def rendered(directory: Path) -> list[Obj]:
    """What the kustomization yields, modelled in Python: its resources (recursively),
    its generated objects (added, or replacing a base's with `behavior: replace`), its
    patches, and its `namespace:` on every namespaced object."""
    kust = kustomization(directory)
    objs: list[Obj] = []
    for res in kust.get("resources", []):
        path = directory / res
        objs += rendered(path) if path.is_dir() else load_docs(path)
    behaviours = [
        g.get("behavior", "create")
        for key in ("configMapGenerator", "secretGenerator")
        for g in kust.get(key, [])
    ]
    for obj, behaviour in zip(generated(directory), behaviours, strict=True):
        if behaviour == "create":
            objs.append(obj)
        else:
            assert behaviour == "replace", f"generator behavior {behaviour} is not modelled"
            old = find(objs, obj["kind"], obj["metadata"]["name"])
            assert old["metadata"].get("namespace") == obj["metadata"].get("namespace")
            objs[objs.index(old)] = obj
    objs = patched(objs, directory, kust.get("patches", []))
    for component in kust.get("components", []):
        objs = with_component(objs, directory / component)
    if "namespace" in kust:
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kust["namespace"]
    return objs


def merged(base: Any, patch: Any) -> Any:
    """A strategic merge patch as kustomize applies the ones here: objects key by key,
    lists of named objects by name (new names appended), anything else replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merged(base[key], value) if key in base else value
        return out
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(x, dict) and "name" in x for x in [*base, *patch]):
        by_name = {x["name"]: x for x in base}
        out_list = [merged(x, next((p for p in patch if p["name"] == x["name"]), {})) for x in base]
        return out_list + [p for p in patch if p["name"] not in by_name]
    return patch


def targeted(obj: Obj, target: Obj) -> bool:
    """Whether a kustomize patch `target` (kind, name, namespace, labelSelector) selects
    `obj`; the label selector as `key=value[,key=value]`."""
    meta = obj["metadata"]
    for key, value in (("kind", obj["kind"]), ("name", meta["name"])):
        if key in target and target[key] != value:
            return False
    if "namespace" in target and target["namespace"] != meta.get("namespace"):
        return False
    wanted = dict(t.split("=", 1) for t in target.get("labelSelector", "").split(",") if t)
    return bool(wanted.items() <= meta.get("labels", {}).items())


def patched(objs: list[Obj], directory: Path, entries: list[Obj]) -> list[Obj]:
    """`objs` with a kustomization's `patches`: strategic merge patches from a file (the
    target is the patch's own kind and name) or inline with a `target`; `$patch: delete`
    removes every object targeted."""
    out = list(objs)
    for entry in entries:
        if "path" in entry:
            (patch,) = load_docs(directory / entry["path"])
        else:
            (patch,) = [d for d in yaml.safe_load_all(entry["patch"]) if d is not None]
        meta = patch["metadata"]
        target = entry.get("target") or {"kind": patch["kind"], "name": meta["name"]}
        hits = [o for o in out if targeted(o, target)]
        assert hits, f"{directory.name}: a patch targets nothing: {target}"
        for hit in hits:
            if patch.get("$patch") == "delete":
                out.remove(hit)
            else:
                assert hit["metadata"].get("namespace") == meta.get("namespace")
                out[out.index(hit)] = merged(hit, patch)
    return out


def with_component(objs: list[Obj], component: Path) -> list[Obj]:
    """`objs` with a kustomize Component applied: its generated objects, its patches."""
    kust = kustomization(component)
    assert kust["kind"] == "Component"
    return patched(objs + generated(component), component, kust.get("patches", []))


def installed() -> list[Obj]:
    """Base and examples together, as an operator installs them."""
    return rendered(K8S) + rendered(EXAMPLES)


def find(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] == "Pod":
        spec: Obj = obj["spec"]
        return spec
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        spec = obj["spec"]["template"]["spec"]
        return spec
    return None


def containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def workloads(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for obj in objs:
        spec = pod_spec(obj)
        if spec is not None:
            yield obj, spec


def volume(spec: Obj, name: str) -> Obj:
    hits = [v for v in spec.get("volumes", []) if v["name"] == name]
    assert len(hits) == 1, f"volume {name}"
    found: Obj = hits[0]
    return found


def mount_at(spec: Obj, container: Obj, path: str) -> tuple[Obj, Obj]:
    """The volumeMount of `container` at `path` and the volume behind it."""
    hits = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(hits) == 1, f"{container['name']}: no single mount at {path}"
    return hits[0], volume(spec, hits[0]["name"])


def env(container: Obj, name: str) -> Obj:
    hits = [e for e in container.get("env", []) if e["name"] == name]
    assert len(hits) == 1, f"{container['name']}: env {name}"
    found: Obj = hits[0]
    return found


def port_number(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert len(numbers) == 1, f"{container['name']}: no port named {port}"
    return int(numbers[0])


def projected_file(spec: Obj, container: Obj, path: str) -> tuple[str, str, str]:
    """(kind, object name, key) of the ConfigMap/Secret item mounted at file `path`."""
    for m in container.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix) :]
        vol = volume(spec, m["name"])
        sources = vol["projected"]["sources"] if "projected" in vol else [vol]
        for src in sources:
            for kind, ref in (("ConfigMap", "configMap"), ("Secret", "secret")):
                if ref not in src:
                    continue
                name = src[ref].get("name") or src[ref].get("secretName")
                for item in src[ref].get("items", []):
                    if item["path"] == rel:
                        return kind, name, item["key"]
    raise AssertionError(f"{container['name']}: nothing mounted at {path}")


def option_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def only_container(objs: list[Obj], kind: str, name: str) -> tuple[Obj, Obj]:
    spec = pod_spec(find(objs, kind, name))
    assert spec is not None
    assert len(spec["containers"]) == 1
    return spec, spec["containers"][0]


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return rendered(K8S)


@pytest.fixture(scope="module")
def examples() -> list[Obj]:
    return rendered(EXAMPLES)


@pytest.fixture(scope="module")
def daemon(base: list[Obj]) -> tuple[Obj, Obj]:
    return only_container(base, "DaemonSet", "syncbit-daemon")


@pytest.fixture(scope="module")
def scheduler(base: list[Obj]) -> tuple[Obj, Obj]:
    return only_container(base, "StatefulSet", "syncbit-scheduler")


@pytest.fixture(scope="module")
def single() -> list[Obj]:
    return rendered(SINGLE)


def config_file(name: str, directory: Path = K8S) -> Obj:
    doc: Obj = yaml.safe_load((directory / "config" / name).read_text())
    return doc


def scheduler_urls(directory: Path = K8S) -> list[str]:
    """The daemon config's scheduler URLs, in order (comma-separated)."""
    return [u.strip() for u in config_file("config.yaml", directory)["scheduler"].split(",")]


def client_env_scheduler(objs: list[Obj]) -> str:
    """The scheduler URL of the client workloads (examples), beyond loopback."""
    values = {
        e["value"]
        for _, spec in workloads(objs)
        for c in containers(spec)
        for e in c.get("env", [])
        if e["name"] == "SYNCBIT_SCHEDULER" and urlsplit(e["value"]).hostname != "127.0.0.1"
    }
    (value,) = values
    return str(value)


# -- schemas --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {doc['kind']} {where}: {exc.message}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_generated_objects_validate(version: str) -> None:
    for directory in KUSTOMIZATIONS:
        for doc in generated(directory):
            kubernetes_validate.validate(doc, version, strict=True)


def test_every_object_kind_is_known_to_these_checks() -> None:
    # The namespace checks rely on knowing which kinds are cluster-scoped.
    for obj in installed() + rendered(SINGLE) + load_docs(K8S / "secret.example.yaml"):
        assert obj["kind"] in CLUSTER_SCOPED | NAMESPACED, obj["kind"]


# -- composition ----------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [*KUSTOMIZATIONS, SINGLE], ids=["base", "examples", "single"])
def test_kustomization_entries_exist(directory: Path) -> None:
    kust = kustomization(directory)
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    resources = kust.get("resources", [])
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for res in resources:
        assert (directory / res).exists(), f"{directory.name}: missing resource {res}"
    for key in ("configMapGenerator", "secretGenerator"):
        for gen in kust.get(key, []):
            for entry in gen.get("files", []) + gen.get("envs", []):
                path = entry.rpartition("=")[2]
                assert (directory / path).is_file(), f"{directory.name}: missing {path}"


def test_every_manifest_is_installed_except_the_secret_example() -> None:
    listed: set[Path] = set()
    for directory in KUSTOMIZATIONS:
        listed |= {(directory / r).resolve() for r in kustomization(directory)["resources"]}
    unlisted = {p.resolve() for p in manifest_files()} - listed
    assert unlisted == {(K8S / "secret.example.yaml").resolve()}


def test_no_secret_is_committed() -> None:
    # Secrets are made per install (README); the example only shows their shapes.
    for doc in load_docs(K8S / "secret.example.yaml"):
        values = doc.get("stringData") or doc.get("data")
        assert values and all(v.startswith("REPLACE") for v in values.values()), doc
    for obj in installed():
        assert obj["kind"] != "Secret", f"a Secret is installed: {obj['metadata']['name']}"


def references(objs: list[Obj]) -> dict[tuple[str, str], set[str]]:
    """(kind, name) of every ConfigMap/Secret the workloads mount -> the keys they use."""
    refs: dict[tuple[str, str], set[str]] = {}
    for _, spec in workloads(objs):
        for vol in spec.get("volumes", []):
            sources = vol["projected"]["sources"] if "projected" in vol else [vol]
            for src in sources:
                for kind, ref in (("ConfigMap", "configMap"), ("Secret", "secret")):
                    if ref in src:
                        name = src[ref].get("name") or src[ref].get("secretName")
                        keys = {item["key"] for item in src[ref].get("items", [])}
                        refs.setdefault((kind, name), set()).update(keys)
    return refs


def test_the_secret_example_shows_every_object_an_install_must_create() -> None:
    made_here = {("ConfigMap", g["metadata"]["name"]) for g in generated(K8S)}
    needed = {k: v for k, v in references(installed()).items() if k not in made_here}
    shown = {
        (d["kind"], d["metadata"]["name"]): set(d.get("stringData") or d.get("data") or ())
        for d in load_docs(K8S / "secret.example.yaml")
    }
    assert set(needed) == set(shown)
    for key, keys in needed.items():
        assert keys <= shown[key], key


def mounts_of(objs: list[Obj], kind: str, name: str) -> set[str]:
    """Names of the workloads whose pods can read ConfigMap/Secret `name`."""
    holders = set()
    for obj, _ in workloads(objs):
        if (kind, name) in references([obj]):
            holders.add(obj["metadata"]["name"])
    return holders


def test_each_credential_goes_only_where_it_is_needed() -> None:
    objs = installed()
    # The cluster secret signs every credential: the scheduler alone holds it.
    assert mounts_of(objs, "Secret", "syncbit-token") == {"syncbit-scheduler"}
    assert mounts_of(objs, "Secret", "syncbit-scheduler-tls") == {"syncbit-scheduler"}
    # Daemons trade the bootstrap credential for their own; they never see the secret.
    assert mounts_of(objs, "Secret", "syncbit-bootstrap") == {"syncbit-daemon"}
    assert mounts_of(objs, "Secret", "syncbit-daemon-tls") == {"syncbit-daemon"}
    # Workloads get the reader credential only; registering datasets is an admin task.
    assert mounts_of(objs, "Secret", "syncbit-reader") == {"llama-reader"}
    assert mounts_of(objs, "Secret", "syncbit-admin") == {"syncbit-prefetch-llama"}
    for directory in KUSTOMIZATIONS:
        assert "secretGenerator" not in kustomization(directory)


def test_every_namespaced_object_lands_in_the_syncbit_namespace() -> None:
    for obj in installed() + rendered(SINGLE):
        ns = obj["metadata"].get("namespace")
        if obj["kind"] in CLUSTER_SCOPED:
            assert ns is None, f"{obj['kind']} {obj['metadata']['name']} is cluster-scoped"
        else:
            assert ns == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']} in {ns}"
    assert find(rendered(K8S), "Namespace")["metadata"]["name"] == NAMESPACE


def test_names_are_unique_per_kind() -> None:
    keys = Counter(
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in installed()
    )
    assert [k for k, n in keys.items() if n > 1] == []


def test_service_accounts_exist(base: list[Obj], single: list[Obj]) -> None:
    for objs in (base, single):
        accounts = {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
        for obj, spec in workloads(objs):
            name = spec.get("serviceAccountName")
            assert name in accounts, f"{obj['metadata']['name']}: service account {name}"


def test_workloads_that_need_no_api_access_hold_no_token(base: list[Obj]) -> None:
    for obj, spec in workloads(base):
        if obj["metadata"]["name"] == "syncbit-daemon":
            continue  # --kubernetes: it patches its own Node
        assert spec["automountServiceAccountToken"] is False, obj["metadata"]["name"]
        account = find(base, "ServiceAccount", spec["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False


def test_referenced_configmaps_and_secrets_are_defined() -> None:
    objs = installed() + load_docs(K8S / "secret.example.yaml")
    defined: dict[tuple[str, str], set[str]] = {
        (o["kind"], o["metadata"]["name"]): set(o.get("data", {})) | set(o.get("stringData", {}))
        for o in objs
        if o["kind"] in {"ConfigMap", "Secret"}
    }
    refs: list[tuple[str, str, str | None]] = []
    for _, spec in workloads(objs):
        for vol in spec.get("volumes", []):
            sources = vol["projected"]["sources"] if "projected" in vol else [vol]
            for src in sources:
                for kind, field, name_key in (
                    ("ConfigMap", "configMap", "name"),
                    ("Secret", "secret", "name" if "projected" in vol else "secretName"),
                ):
                    if field in src:
                        items = src[field].get("items") or [{"key": None}]
                        refs += [(kind, src[field][name_key], i["key"]) for i in items]
        for c in containers(spec):
            for ef in c.get("envFrom", []):
                for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if field in ef:
                        refs.append((kind, ef[field]["name"], None))
            for e in c.get("env", []):
                source = e.get("valueFrom", {})
                for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if field in source:
                        refs.append((kind, source[field]["name"], source[field]["key"]))
    assert refs
    for kind, name, key in refs:
        assert (kind, name) in defined, f"{kind} {name} is referenced but not defined"
        assert key is None or key in defined[kind, name], f"{kind} {name} has no key {key}"


def test_selectors_match_pod_labels(base: list[Obj], examples: list[Obj]) -> None:
    for obj, _ in workloads(base + examples):
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}:
            wanted = obj["spec"]["selector"]["matchLabels"].items()
            assert wanted <= obj["spec"]["template"]["metadata"]["labels"].items()


def services_of(objs: list[Obj], sts: Obj) -> list[Obj]:
    """The Services whose selector picks the pods of `sts` (and no other workload's)."""
    labels = sts["spec"]["template"]["metadata"]["labels"]
    hits = []
    for svc in (o for o in objs if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        if selector.items() <= labels.items():
            hits.append(svc)
            for other, _ in workloads(objs):
                if other is not sts and "template" in other["spec"]:
                    pod_labels = other["spec"]["template"]["metadata"]["labels"]
                    assert not selector.items() <= pod_labels.items(), svc["metadata"]["name"]
    return hits


@pytest.mark.parametrize("layout", ["base", "single"])
def test_scheduler_services_front_the_statefulset(layout: str) -> None:
    objs = rendered(K8S if layout == "base" else SINGLE)
    sts = find(objs, "StatefulSet", "syncbit-scheduler")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    services = {s["metadata"]["name"]: s for s in services_of(objs, sts)}
    assert set(services) == {"syncbit-scheduler", "syncbit-scheduler-replicas"}
    # Clients: one stable virtual address. Replicas: a DNS name each (the set's service).
    assert services["syncbit-scheduler"]["spec"]["type"] == "ClusterIP"
    headless = services["syncbit-scheduler-replicas"]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert sts["spec"]["serviceName"] == "syncbit-scheduler-replicas"
    for svc in services.values():
        (port,) = svc["spec"]["ports"]
        assert port["port"] == port_number(container, port["targetPort"]) == 7900


def test_images_follow_the_kustomization(base: list[Obj], examples: list[Obj]) -> None:
    for directory, objs, names in ((K8S, base, {IMAGE, ETCD_IMAGE}), (EXAMPLES, examples, {IMAGE})):
        images = {i["name"]: i for i in kustomization(directory)["images"]}
        assert set(images) == names
        seen: Counter[str] = Counter()
        for _, spec in workloads(objs):
            for c in containers(spec):
                name, _, tag = c["image"].rpartition(":")
                if name in images:
                    seen[name] += 1
                    assert tag == images[name]["newTag"], c["image"]
        assert set(seen) == names
    tags = {kustomization(d)["images"][0]["newTag"] for d in KUSTOMIZATIONS}
    assert len(tags) == 1, "base and examples name different image tags"


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(
    kustomize_command() is None,
    reason="neither kustomize nor kubectl (which embeds it) is installed; "
    "the Python model of the composition above still ran",
)
def kustomize_build(directory: Path) -> list[Obj]:
    cmd = kustomize_command()
    assert cmd is not None
    out = subprocess.run(
        [*cmd, str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def canonical(value: Any) -> Any:
    """`value` with every list of objects in a fixed order and the whitespace in strings
    collapsed. kustomize orders the items a patch adds differently from the model (first,
    not last), which means nothing in the lists a patch here touches (volume mounts); and
    it writes folded scalars back with blank lines added (the admission policy's CEL
    expressions, where whitespace means nothing either)."""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [canonical(v) for v in value]
        if all(isinstance(v, dict) for v in items):
            return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
        return items
    return value


@pytest.mark.parametrize("directory", [*KUSTOMIZATIONS, SINGLE], ids=["base", "examples", "single"])
def test_kustomize_builds_what_the_python_model_says(directory: Path) -> None:
    built = kustomize_build(directory)
    model = rendered(directory)
    gen_names = {g["metadata"]["name"] for g in generated(directory)}
    hashed = {g: rf"{re.escape(g)}-[a-z0-9]{{10}}" for g in gen_names}

    def key(o: Obj) -> tuple[str, str | None, str]:
        name = o["metadata"]["name"]
        for g, pattern in hashed.items():  # generated names get a content hash: name-<hash>
            if re.fullmatch(pattern, name):
                name = g
        return o["kind"], o["metadata"].get("namespace"), name

    assert sorted(map(key, built), key=str) == sorted(map(key, model), key=str)
    text = json.dumps(built)
    for g in gen_names:  # every reference follows the hashed name
        assert not re.search(rf'"name": "{re.escape(g)}"', text), f"unrewritten {g}"
    # Object by object, the model is what kustomize builds (hashes aside).
    for pattern in hashed.values():
        text = re.sub(rf'"({pattern[: pattern.index("-[a-z0-9]")]})-[a-z0-9]{{10}}"', r'"\1"', text)
    by_key = {key(o): o for o in json.loads(text)}
    for obj in model:
        assert canonical(by_key[key(obj)]) == canonical(obj), key(obj)
    for doc in built:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


# -- the node daemon ------------------------------------------------------------------------


def test_daemon_runs_on_opted_in_nodes_and_tolerates_gpu_taints(base: list[Obj]) -> None:
    spec = pod_spec(find(base, "DaemonSet", "syncbit-daemon"))
    assert spec is not None
    assert spec["nodeSelector"] == {"syncbit.io/enabled": "true"}
    tolerations = {t["key"]: t for t in spec["tolerations"]}
    for taint in ("nvidia.com/gpu", "syncbit.io/warming"):
        assert tolerations[taint]["operator"] == "Exists", taint
        assert tolerations[taint].get("effect") in (None, "NoSchedule"), taint
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == find(base, "PriorityClass")["metadata"]["name"]


def test_daemon_command_follows_the_contract(daemon: tuple[Obj, Obj]) -> None:
    spec, c = daemon
    assert "command" not in c, "the image's entrypoint (tini -- syncbit) must stay"
    assert c["args"] == [
        "daemon",
        "--config",
        "/etc/syncbit/config.yaml",
        "--node",
        "$(NODE_NAME)",
        "--advertise",
        "$(HOST_IP):7901",
        "--kubernetes",
    ]
    assert env(c, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env(c, "HOST_IP")["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert projected_file(spec, c, "/etc/syncbit/config.yaml") == (
        "ConfigMap",
        "syncbit-config",
        "config.yaml",
    )
    assert port_number(c, "http") == 7901


def test_daemon_has_fuse_and_propagates_its_mount_to_the_node(daemon: tuple[Obj, Obj]) -> None:
    spec, c = daemon
    security = c["securityContext"]
    assert "SYS_ADMIN" in security["capabilities"]["add"]
    _, fuse = mount_at(spec, c, "/dev/fuse")
    assert fuse["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    mount, vol = mount_at(spec, c, config_file("config.yaml")["mount"])
    assert vol["hostPath"]["path"] == "/syncbit"
    assert mount["mountPropagation"] == "Bidirectional"
    # The API server admits Bidirectional only in privileged containers.
    assert security["privileged"] is True
    _, cache = mount_at(spec, c, config_file("config.yaml")["cache_dir"])
    assert cache["hostPath"]["path"] == "/var/lib/syncbit/cache"


def test_privilege_is_confined_to_the_daemon() -> None:
    privileged = []
    for obj, spec in workloads(installed()):
        for c in containers(spec):
            security = c.get("securityContext", {})
            mounts = c.get("volumeMounts", [])
            if any(m.get("mountPropagation") == "Bidirectional" for m in mounts):
                assert security.get("privileged") is True, "Bidirectional needs privileged"
            if security.get("privileged"):
                # The API server rejects privileged with allowPrivilegeEscalation: false.
                assert security.get("allowPrivilegeEscalation") is not False
                privileged.append((obj["metadata"]["name"], c["name"]))
            else:
                assert security.get("allowPrivilegeEscalation") is False, c["name"]
                assert security["capabilities"]["drop"] == ["ALL"], c["name"]
            assert security.get("readOnlyRootFilesystem") is True, c["name"]
    assert privileged == [("syncbit-daemon", "daemon")]


def test_daemon_probes_hit_its_health_endpoints(daemon: tuple[Obj, Obj]) -> None:
    _, c = daemon
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert (get["path"], port_number(c, get["port"])) == (path, 7901), probe
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_daemon_stops_cleanly(base: list[Obj], daemon: tuple[Obj, Obj]) -> None:
    spec, c = daemon
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    script = shlex.split(command[-1])
    # A lazy unmount (readers keep their open files), never failing the stop.
    assert script[:4] == ["fusermount3", "-u", "-z", "/syncbit"]
    assert command[-1].endswith("|| true")
    assert 20 <= spec["terminationGracePeriodSeconds"] <= 120
    strategy = find(base, "DaemonSet", "syncbit-daemon")["spec"]["updateStrategy"]
    assert strategy["type"] == "OnDelete"  # a restart breaks readers: upgrades are by hand


def test_every_container_has_requests_and_limits() -> None:
    for _, spec in workloads(installed()):
        for c in containers(spec):
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), (c["name"], part)


def test_daemon_config_matches_the_manifests(
    daemon: tuple[Obj, Obj], scheduler: tuple[Obj, Obj], base: list[Obj]
) -> None:
    cfg = config_file("config.yaml")
    headless = find(base, "Service", "syncbit-scheduler-replicas")
    for url in map(urlsplit, scheduler_urls()):
        assert url.scheme == "https"
        _, _, domain = (url.hostname or "").partition(".")
        assert domain == f"{headless['metadata']['name']}.{NAMESPACE}.svc"
        assert url.port == headless["spec"]["ports"][0]["port"]
    # Clients (the examples) use the Service: any replica, which forwards to the leader.
    service = find(base, "Service", "syncbit-scheduler")
    url = urlsplit(client_env_scheduler(installed()))
    assert url.hostname == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    assert url.port == service["spec"]["ports"][0]["port"]
    assert cfg["listen"] == "0.0.0.0:7901"
    d_spec, d_c = daemon
    assert projected_file(d_spec, d_c, cfg["token_file"]) == (
        "Secret",
        "syncbit-bootstrap",
        "token",
    )
    for key, item in (("tls_cert", "tls.crt"), ("tls_key", "tls.key"), ("tls_ca", "ca.crt")):
        assert projected_file(d_spec, d_c, cfg[key]) == ("Secret", "syncbit-daemon-tls", item)
    assert cfg["peer_tls_name"] == "syncbit-daemon"
    s_spec, s_c = scheduler
    sched = config_file("scheduler.yaml")
    assert projected_file(s_spec, s_c, sched["token_file"]) == ("Secret", "syncbit-token", "token")
    for key, item in (("tls_cert", "tls.crt"), ("tls_key", "tls.key")):
        assert projected_file(s_spec, s_c, sched[key]) == ("Secret", "syncbit-scheduler-tls", item)


def pending_or_fail(missing: set[str], what: str) -> None:
    if missing - PENDING_KEYS - PENDING_FLAGS:
        pytest.fail(f"{what}: not known to syncbit: {sorted(missing)}")
    if missing:
        pytest.skip(f"{what}: the contract's {sorted(missing)} has not landed in syncbit yet")


@pytest.mark.parametrize("directory", [K8S, SINGLE], ids=["base", "single"])
@pytest.mark.parametrize(
    ("name", "model"), [("config.yaml", DaemonConfig), ("scheduler.yaml", SchedulerConfig)]
)
def test_config_files_are_valid_for_syncbit(directory: Path, name: str, model: Any) -> None:
    data = config_file(name, directory)
    pending_or_fail(set(data) - set(model.model_fields), name)
    model.model_validate(data)


def cli_options(*path: str) -> set[str]:
    group: Any = typer.main.get_command(app)
    ctx = click.Context(group)
    for part in path:
        group = group.get_command(ctx, part)
    return {o for p in group.params for o in p.opts if o.startswith("--")}


def test_container_args_are_known_to_the_cli(base: list[Obj], examples: list[Obj]) -> None:
    for _, spec in workloads(base + examples):
        for c in containers(spec):
            if not c["image"].startswith(IMAGE + ":"):
                continue
            words = [a for a in c["args"] if not a.startswith("-")]
            path = words[:2] if words[0] in {"dataset", "node", "volume"} else words[:1]
            flags = {a for a in c["args"] if a.startswith("--")}
            pending_or_fail(flags - cli_options(*path), f"syncbit {' '.join(path)}")


# -- RBAC -----------------------------------------------------------------------------------


def test_daemon_may_only_get_and_patch_nodes(base: list[Obj], daemon: tuple[Obj, Obj]) -> None:
    spec, _ = daemon
    account = spec["serviceAccountName"]
    role = find(base, "ClusterRole", "syncbit-daemon")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    binding = find(base, "ClusterRoleBinding", "syncbit-daemon")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "syncbit-daemon",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    bound = [o for o in base if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}]
    assert bound == [binding], "no other account gets API rights"


def test_node_policy_confines_the_daemon_to_its_own_node(daemon: tuple[Obj, Obj]) -> None:
    spec, _ = daemon
    policy, binding = load_docs(K8S / "node-policy.yaml")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    username = f"system:serviceaccount:{NAMESPACE}:{spec['serviceAccountName']}"
    (condition,) = policy["spec"]["matchConditions"]
    assert f"'{username}'" in condition["expression"]
    text = json.dumps(policy["spec"]["validations"] + policy["spec"]["variables"])
    for needle in (
        "authentication.kubernetes.io/node-name",
        "syncbit.io/ds.",
        "syncbit.io/warming",
    ):
        assert needle in text


# -- the scheduler: three replicas on etcd (the base) ----------------------------------------


def pod_names(sts: Obj) -> list[str]:
    """The names a StatefulSet gives its pods, in ordinal order."""
    return [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]


def expand(value: str, container: Obj, pod: str) -> str:
    """`value` with `$(VAR)` expanded as the kubelet does in the pod named `pod`: a
    literal env value, or the downward API's metadata.name."""

    def one(match: re.Match[str]) -> str:
        var = env(container, match.group(1))
        if "value" in var:
            return str(var["value"])
        assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", var
        return pod

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def selected(objs: list[Obj], match_labels: dict[str, str]) -> set[str]:
    """Names of the workloads whose pods carry every label of `match_labels`."""
    names = set()
    for obj, _ in workloads(objs):
        meta = obj["spec"]["template"]["metadata"] if "template" in obj["spec"] else obj["metadata"]
        if match_labels.items() <= meta.get("labels", {}).items():
            names.add(obj["metadata"]["name"])
    return names


def budget_of(objs: list[Obj], sts: Obj) -> Obj:
    """The one PodDisruptionBudget that covers the pods of `sts`, and only those."""
    hits = [
        o
        for o in objs
        if o["kind"] == "PodDisruptionBudget"
        and sts["metadata"]["name"] in selected(objs, o["spec"]["selector"]["matchLabels"])
    ]
    assert len(hits) == 1, f"{len(hits)} budgets cover {sts['metadata']['name']}"
    assert selected(installed(), hits[0]["spec"]["selector"]["matchLabels"]) == {
        sts["metadata"]["name"]
    }
    return hits[0]


def spread_over_nodes(sts: Obj) -> None:
    """A preferred (never required) anti-affinity of the set's pods per node."""
    anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti  # small clusters
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    labels = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    assert labels == sts["spec"]["selector"]["matchLabels"]


def test_scheduler_runs_three_replicas_with_no_state_of_their_own(
    base: list[Obj], scheduler: tuple[Obj, Obj]
) -> None:
    spec, c = scheduler
    sts = find(base, "StatefulSet", "syncbit-scheduler")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    # Durable state is in etcd, soft state rebuilt from the nodes: no claim, no LMDB.
    assert "volumeClaimTemplates" not in sts["spec"]
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])
    cfg = config_file("scheduler.yaml")
    assert "state_dir" not in cfg and cfg["state"].startswith("etcd://")
    assert "command" not in c
    assert c["args"][:3] == ["scheduler", "--config", "/etc/syncbit/scheduler.yaml"]
    assert projected_file(spec, c, "/etc/syncbit/scheduler.yaml") == (
        "ConfigMap",
        "syncbit-config",
        "scheduler.yaml",
    )
    assert cfg["listen"] == "0.0.0.0:7900"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert (get["path"], port_number(c, get["port"])) == (path, 7900), probe
    spread_over_nodes(sts)


def test_a_drain_leaves_two_scheduler_replicas(base: list[Obj]) -> None:
    sts = find(base, "StatefulSet", "syncbit-scheduler")
    budget = budget_of(base, sts)["spec"]
    assert budget["minAvailable"] == 2 and "maxUnavailable" not in budget
    assert sts["spec"]["replicas"] > budget["minAvailable"]  # a drain can proceed
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # unready ones serve nothing


def test_each_replica_advertises_its_own_name_and_daemons_list_them_all(
    base: list[Obj], scheduler: tuple[Obj, Obj]
) -> None:
    _, c = scheduler
    sts = find(base, "StatefulSet", "syncbit-scheduler")
    # One config file for every replica: each one's own URL comes from its command line.
    assert "advertise" not in config_file("scheduler.yaml")
    template = option_value(c["args"], "--advertise")
    advertised = [expand(template, c, pod) for pod in pod_names(sts)]
    assert len(set(advertised)) == len(advertised) == 3
    assert advertised == scheduler_urls()  # the daemons' list, in the same order
    headless = find(base, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    for pod, url in zip(pod_names(sts), map(urlsplit, advertised), strict=True):
        assert url.hostname == f"{pod}.{headless['metadata']['name']}.{NAMESPACE}.svc"
        assert url.port == port_number(c, "http") == headless["spec"]["ports"][0]["port"]
        assert url.scheme == "https" and config_file("scheduler.yaml")["tls_cert"]
        assert url.path == ""


def test_daemons_take_every_scheduler_url() -> None:
    import trio

    from syncbit.scheduler.client import SchedulerClient

    if not hasattr(SchedulerClient, "urls"):
        pending_or_fail({"scheduler URLs"}, "config.yaml `scheduler`")
    cfg = DaemonConfig.model_validate(config_file("config.yaml"))

    async def urls() -> list[str]:
        async with SchedulerClient(cfg.scheduler or "") as client:
            return [str(u).rstrip("/") for u in getattr(client, "urls")]  # noqa: B009

    assert trio.run(urls) == scheduler_urls()


# -- etcd -----------------------------------------------------------------------------------


def etcd_flags(c: Obj) -> dict[str, str]:
    """etcd's command line as flag -> value (every flag given once, as --flag=value)."""
    flags: dict[str, str] = {}
    for arg in c["args"]:
        assert arg.startswith("--") and "=" in arg, arg
        key, _, value = arg[2:].partition("=")
        assert key not in flags, f"--{key} given twice"
        flags[key] = value
    return flags


@pytest.fixture(scope="module")
def etcd(base: list[Obj]) -> tuple[Obj, Obj, Obj]:
    spec, c = only_container(base, "StatefulSet", "syncbit-etcd")
    return find(base, "StatefulSet", "syncbit-etcd"), spec, c


def test_etcd_members_find_each_other_by_stable_names(
    base: list[Obj], etcd: tuple[Obj, Obj, Obj]
) -> None:
    sts, _, c = etcd
    assert sts["spec"]["replicas"] == 3  # odd: a quorum of two survives one member down
    # With OrderedReady the first member would wait for a readiness that needs a quorum.
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    peers = find(base, "Service", sts["spec"]["serviceName"])
    # Members resolve each other before any is Ready (which needs the others).
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["publishNotReadyAddresses"] is True
    domain = f"{peers['metadata']['name']}.{NAMESPACE}.svc"
    flags = etcd_flags(c)
    members = {}
    for pod in pod_names(sts):
        own = {k: expand(v, c, pod) for k, v in flags.items()}
        assert own["name"] == pod
        for key, port in (
            ("initial-advertise-peer-urls", "peer"),
            ("advertise-client-urls", "client"),
        ):
            url = urlsplit(own[key])
            assert (url.scheme, url.hostname, url.port) == (
                "http",
                f"{pod}.{domain}",
                port_number(c, port),
            )
        members[pod] = own["initial-advertise-peer-urls"]
    assert dict(m.split("=", 1) for m in flags["initial-cluster"].split(",")) == members
    assert flags["initial-cluster-state"] == "new"  # ignored once a member has its data
    for key, port in (
        ("listen-peer-urls", "peer"),
        ("listen-client-urls", "client"),
        ("listen-metrics-urls", "metrics"),
    ):
        assert urlsplit(flags[key]).port == port_number(c, port), key
    for svc in (peers, find(base, "Service", "syncbit-etcd")):
        assert services_of(base, sts) and svc in services_of(base, sts)
        for port in svc["spec"]["ports"]:
            assert port["port"] == port_number(c, port["targetPort"])
    spread_over_nodes(sts)


def test_every_etcd_member_keeps_its_data_on_its_own_claim(etcd: tuple[Obj, Obj, Obj]) -> None:
    sts, spec, c = etcd
    data_dir = etcd_flags(c)["data-dir"]
    mounts = [m for m in c["volumeMounts"] if data_dir.startswith(m["mountPath"] + "/")]
    assert len(mounts) == 1, "the data dir is below one mount (etcd makes it 0700 itself)"
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert mounts[0]["name"] in claims
    assert not any(v["name"] == mounts[0]["name"] for v in spec.get("volumes", []))
    retention = sts["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}


def test_etcd_probes_do_not_restart_members_that_lost_the_quorum(
    etcd: tuple[Obj, Obj, Obj],
) -> None:
    _, _, c = etcd
    metrics = port_number(c, "metrics")
    for probe, path in (
        ("startupProbe", "/livez"),
        ("livenessProbe", "/livez"),  # the process serves; a lost quorum is no reason
        ("readinessProbe", "/readyz"),  # part of a working cluster
    ):
        get = c[probe]["httpGet"]
        assert (get["path"], port_number(c, get["port"])) == (path, metrics), probe
    assert "command" in c and c["command"][0].endswith("/etcd")


def test_a_drain_keeps_the_etcd_quorum(base: list[Obj], etcd: tuple[Obj, Obj, Obj]) -> None:
    sts, _, _ = etcd
    members = sts["spec"]["replicas"]
    quorum = members // 2 + 1
    budget = budget_of(base, sts)["spec"]
    assert budget["minAvailable"] == quorum and "maxUnavailable" not in budget
    assert members > quorum  # a drain can still take one
    # A member that is not Ready may still be needed for the quorum: no early eviction.
    assert budget.get("unhealthyPodEvictionPolicy", "IfHealthyBudget") == "IfHealthyBudget"


def test_the_scheduler_names_every_etcd_member(etcd: tuple[Obj, Obj, Obj]) -> None:
    from syncbit.scheduler.etcd import parse_endpoints

    sts, _, c = etcd
    template = etcd_flags(c)["advertise-client-urls"]
    members = [expand(template, c, pod) for pod in pod_names(sts)]
    assert parse_endpoints(config_file("scheduler.yaml")["state"]) == members


def test_only_schedulers_reach_etcd_clients_and_only_members_its_peers(
    base: list[Obj], etcd: tuple[Obj, Obj, Obj], scheduler: tuple[Obj, Obj]
) -> None:
    _, _, c = etcd
    (policy,) = [o for o in base if o["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert selected(installed(), spec["podSelector"]["matchLabels"]) == {"syncbit-etcd"}
    assert set(spec["podSelector"]) == {"matchLabels"}
    assert spec["policyTypes"] == ["Ingress"]
    admitted: dict[int, set[str]] = {}
    for rule in spec["ingress"]:
        (source,) = rule["from"]  # no rule without `from`: that would admit everyone
        assert set(source) == {"podSelector"}, "no namespace or address range admitted"
        assert set(source["podSelector"]) == {"matchLabels"}
        (port,) = rule["ports"]
        assert port["protocol"] == "TCP"
        number = port_number(c, port["port"])
        assert number not in admitted
        admitted[number] = selected(installed(), source["podSelector"]["matchLabels"])
    assert admitted == {
        port_number(c, "client"): {"syncbit-scheduler"},
        port_number(c, "peer"): {"syncbit-etcd"},
    }
    # Policies select pods by label: a scheduler on the host network would not be one.
    s_spec, _ = scheduler
    assert not s_spec.get("hostNetwork")
    state = config_file("scheduler.yaml")["state"]
    from syncbit.scheduler.etcd import parse_endpoints

    assert {urlsplit(u).port for u in parse_endpoints(state)} == {port_number(c, "client")}


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")
def test_etcd_knows_every_flag_given(etcd: tuple[Obj, Obj, Obj]) -> None:
    # Debian's etcd, not the image's release: a misspelt flag, not a version's changes.
    _, _, c = etcd
    done = subprocess.run(["etcd", "--help"], capture_output=True, text=True, timeout=60)
    text = done.stdout + done.stderr
    for flag in etcd_flags(c):
        assert re.search(rf"^\s*--{re.escape(flag)}\b", text, re.M), f"etcd has no --{flag}"


# -- the single-replica layout (deploy/overlays/single-scheduler) ---------------------------


def test_single_layout_is_one_replica_on_lmdb_with_its_claim(single: list[Obj]) -> None:
    spec, c = only_container(single, "StatefulSet", "syncbit-scheduler")
    sts = find(single, "StatefulSet", "syncbit-scheduler")
    assert sts["spec"]["replicas"] == 1  # LMDB: one writer
    assert c["args"] == ["scheduler", "--config", "/etc/syncbit/scheduler.yaml"]
    assert projected_file(spec, c, "/etc/syncbit/scheduler.yaml")[1:] == (
        "syncbit-config",
        "scheduler.yaml",
    )
    cfg = config_file("scheduler.yaml", SINGLE)
    assert "state" not in cfg  # absent: LMDB at state_dir
    mount = [m for m in c["volumeMounts"] if m["mountPath"] == cfg["state_dir"]]
    assert len(mount) == 1
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert mount[0]["name"] in claims
    retention = sts["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    generated_config = find(single, "ConfigMap", "syncbit-config")["data"]
    for name in ("config.yaml", "scheduler.yaml"):
        assert generated_config[name] == (SINGLE / "config" / name).read_text()
    # The daemons name the one Service; no etcd, no budget that would block every drain.
    service = find(single, "Service", "syncbit-scheduler")
    assert scheduler_urls(SINGLE) == [
        f"https://{service['metadata']['name']}.{NAMESPACE}.svc:{port_number(c, 'http')}"
    ]
    assert not [o for o in single if "etcd" in json.dumps(o)]
    assert not [o for o in single if o["kind"] in {"PodDisruptionBudget", "NetworkPolicy"}]


def test_single_layout_differs_from_the_base_only_in_the_scheduler(
    base: list[Obj], single: list[Obj]
) -> None:
    def key(o: Obj) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    changed = {("StatefulSet", "syncbit-scheduler"), ("ConfigMap", "syncbit-config")}
    gone = {
        key(o)
        for o in base
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "etcd"
    }
    gone.add(("PodDisruptionBudget", "syncbit-scheduler"))
    assert {key(o) for o in single} == {key(o) for o in base} - gone
    kept = {key(o): o for o in single if key(o) not in changed}
    assert kept == {key(o): o for o in base if key(o) in kept}
    # The config files: the same settings but the scheduler's location and its state.
    for name, differ in (
        ("config.yaml", {"scheduler"}),
        ("scheduler.yaml", {"state", "state_dir"}),
    ):
        ha, one = config_file(name), config_file(name, SINGLE)
        assert {k for k in ha.keys() | one.keys() if ha.get(k) != one.get(k)} == differ, name
    ha_sts, one_sts = (find(objs, "StatefulSet", "syncbit-scheduler") for objs in (base, single))
    assert (
        one_sts["spec"]["template"]["spec"]["affinity"]
        == ha_sts["spec"]["template"]["spec"]["affinity"]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", [K8S, SINGLE], ids=["base", "single"])
def test_every_rendered_object_validates(directory: Path, version: str) -> None:
    kinds = set()
    for doc in rendered(directory):
        kinds.add(doc["kind"])
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} {where}: {exc.message}")
    if directory == K8S:
        assert {"PodDisruptionBudget", "NetworkPolicy", "StatefulSet"} <= kinds


# -- examples -------------------------------------------------------------------------------


def dataset_mount(spec: Obj, c: Obj) -> tuple[Obj, Obj]:
    mount, vol = mount_at(spec, c, "/syncbit/llama")
    assert vol["hostPath"]["path"] == "/syncbit/llama"
    assert mount["readOnly"] is True
    assert mount["mountPropagation"] == "HostToContainer"
    return mount, vol


def test_example_pod_waits_then_reads_the_dataset(examples: list[Obj]) -> None:
    spec = pod_spec(find(examples, "Pod", "llama-reader"))
    assert spec is not None
    assert spec["nodeSelector"] == {"syncbit.io/enabled": "true"}
    (init,) = spec["initContainers"]
    assert init["args"][:4] == ["wait", "llama", "--timeout", "30m"]
    assert option_value(init["args"], "--daemon") == "https://$(HOST_IP):7901"
    assert env(init, "HOST_IP")["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    token = env(init, "SYNCBIT_TOKEN_FILE")["value"]
    assert projected_file(spec, init, token) == ("Secret", "syncbit-reader", "token")
    ca = env(init, "SYNCBIT_TLS_CA")["value"]
    assert projected_file(spec, init, ca) == ("ConfigMap", "syncbit-ca", "ca.crt")
    assert env(init, "SYNCBIT_TLS_NAME")["value"] == config_file("config.yaml")["peer_tls_name"]
    (reader,) = spec["containers"]
    dataset_mount(spec, reader)


def test_example_deployment_lands_only_where_the_dataset_is_ready(examples: list[Obj]) -> None:
    spec = pod_spec(find(examples, "Deployment", "llama-server"))
    assert spec is not None
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    for term in required["nodeSelectorTerms"]:  # terms are ORed: each must demand it
        assert {"key": "syncbit.io/ds.llama", "operator": "In", "values": ["ready"]} in term[
            "matchExpressions"
        ]
    (server,) = spec["containers"]
    dataset_mount(spec, server)


def test_example_job_prefetches_to_a_selector(examples: list[Obj]) -> None:
    job = find(examples, "Job", "syncbit-prefetch-llama")
    spec = pod_spec(job)
    assert spec is not None
    assert spec["restartPolicy"] in {"OnFailure", "Never"}
    (add,) = spec["initContainers"]
    assert add["args"][:3] == ["dataset", "add", "llama"]
    (prefetch,) = spec["containers"]
    assert prefetch["args"][:2] == ["prefetch", "llama"]
    assert "=" in option_value(prefetch["args"], "--selector")
    for c in containers(spec):
        url = urlsplit(env(c, "SYNCBIT_SCHEDULER")["value"])
        assert url.hostname == f"syncbit-scheduler.{NAMESPACE}.svc"
        assert url.scheme == "https"
        token = env(c, "SYNCBIT_TOKEN_FILE")["value"]
        assert projected_file(spec, c, token) == ("Secret", "syncbit-admin", "token")
        ca = env(c, "SYNCBIT_TLS_CA")["value"]
        assert projected_file(spec, c, ca) == ("ConfigMap", "syncbit-ca", "ca.crt")


# -- the image ------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Dockerfile instructions as (INSTRUCTION, rest) per build stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        assert stages, "an instruction before FROM"
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def test_dockerfile_builds_a_slim_debian_image_with_fuse3() -> None:
    stages = dockerfile_stages()
    final = stages[-1]
    assert re.fullmatch(r"python:3\.1\d+-slim-(bookworm|trixie)", final[0][1].split()[0])
    runs = [rest for word, rest in final if word == "RUN"]
    installs = [r for r in runs if "apt-get install" in r]
    assert any("fuse3" in shlex.split(r) for r in installs), "fuse3 must be in the image"
    assert any("pip install" in r for r in runs), "the package must be installed"
    built = [rest for stage in stages for word, rest in stage if word == "RUN"]
    assert any(re.search(r"pip (wheel|install)\b.* \.$", r) for r in built), "from this repo"
    (entrypoint,) = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert json.loads(entrypoint)[-1] == "syncbit"
    assert "USER" not in {w for w, _ in final}  # the daemon mounts FUSE as root


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    for needed in ("!pyproject.toml", "!README.md", "!syncbit/"):
        assert needed in rules


# -- make-secrets.sh ------------------------------------------------------------------------


FAKE_KUBECTL = """#!{python}
import json, sys
args = sys.argv[1:]
assert args[:3] == ["-n", "syncbit", "create"], args
kind = {{"secret": "Secret", "configmap": "ConfigMap"}}[args[3]]
name = args[5] if kind == "Secret" else args[4]
data = {{}}
for arg in args:
    if arg.startswith("--from-file="):
        key, _, path = arg[len("--from-file="):].partition("=")
        data[key] = open(path).read()
with open({log!r}, "a") as log:
    log.write(json.dumps({{"kind": kind, "name": name, "data": data}}) + "\\n")
"""


def test_make_secrets_creates_what_the_manifests_mount_and_it_works(tmp_path: Path) -> None:
    """The install's one script, run with a stand-in kubectl that records what it would
    create: exactly the objects and keys the manifests mount, and they work together (a
    real scheduler and peer service on loopback, reached by the names in the manifests)."""
    import os
    import sys

    import httpx

    from syncbit.config import SchedulerConfig
    from syncbit.node.http import LocalApi
    from syncbit.peer import PeerServer
    from syncbit.scheduler import SchedulerServer
    from syncbit.store import ObjectStore
    from syncbit.tls import server_context

    log = tmp_path / "created.jsonl"
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable, log=str(log)))
    kubectl.chmod(0o755)
    env = {
        **os.environ,
        "SYNCBIT": f"{sys.executable} -m syncbit.cli",
        "KUBECTL": str(kubectl),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    script = str(K8S / "make-secrets.sh")
    done = subprocess.run(
        ["sh", script, str(tmp_path / "ca")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    created = {(o["kind"], o["name"]): o["data"] for o in map(json.loads, lines)}
    made_here = {("ConfigMap", g["metadata"]["name"]) for g in generated(K8S)}
    needed = {k: v for k, v in references(installed()).items() if k not in made_here}
    assert set(created) == set(needed)
    for key, keys in needed.items():
        assert keys <= set(created[key]), key
    # Only the CA stays on disk; the secret and the credentials are gone.
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.crt", "ca.key"]
    again = subprocess.run(["sh", script, str(tmp_path / "ca")], env=env, capture_output=True)
    assert again.returncode == 2  # one set per install

    files = tmp_path / "installed"
    files.mkdir()
    for (_, name), data in created.items():
        for key, value in data.items():
            (files / f"{name}.{key}").write_text(value)
    config = SchedulerConfig(
        listen="127.0.0.1:7900",
        state_dir=tmp_path / "state",
        token_file=files / "syncbit-token.token",
        tls_cert=files / "syncbit-scheduler-tls.tls.crt",
        tls_key=files / "syncbit-scheduler-tls.tls.key",
    ).model_copy(update={"listen": "127.0.0.1:0"})
    scheduler = SchedulerServer(config)
    scheduler.start()
    ca = ssl.create_default_context(cafile=str(files / "syncbit-ca.ca.crt"))
    # Every name a client dials: each replica (daemons), the Service (jobs, the CLI;
    # daemons in the single-replica layout).
    names = {urlsplit(u).hostname or "" for u in scheduler_urls() + scheduler_urls(SINGLE)}
    names |= {urlsplit(client_env_scheduler(installed())).hostname or ""}
    assert len(names) == 4
    try:
        with httpx.Client(verify=ca, trust_env=False) as http:

            def call(method: str, path: str, role: str, body: Any = None, name: Any = None) -> int:
                token = (files / f"syncbit-{role}.token").read_text().strip()
                resp = http.request(
                    method,
                    f"https://{scheduler.address}{path}",
                    json=body,
                    headers={"Authorization": f"Bearer {token}"},
                    extensions={"sni_hostname": name or sorted(names)[0]},
                )
                return resp.status_code

            for name in sorted(names):
                assert call("GET", "/v1/status", "reader", name=name) == 200, name
            assert call("POST", "/v1/datasets", "reader", {"name": "x", "source": "y"}) == 403
            assert call("POST", "/v1/nodes/gpu-1/credential", "bootstrap", {}) == 200
            assert call("POST", "/v1/tokens", "admin", {"role": "reader"}) == 200
    finally:
        scheduler.stop()
    store = ObjectStore.open(tmp_path / "cache", 1 << 20)
    daemon = PeerServer(
        store,
        "127.0.0.1:0",
        tls_context=server_context(
            files / "syncbit-daemon-tls.tls.crt", files / "syncbit-daemon-tls.tls.key"
        ),
    )
    api = LocalApi()

    async def ready() -> tuple[bool, str]:
        return True, "ok"

    async def metrics() -> tuple[bytes, str]:
        return b"", "text/plain"

    api.set_probes(ready, metrics)
    daemon.add_routes(api)
    daemon.start()
    try:
        name = config_file("config.yaml")["peer_tls_name"]
        with httpx.Client(verify=ca, trust_env=False) as http:
            resp = http.get(f"https://{daemon.address}/healthz", extensions={"sni_hostname": name})
            assert resp.status_code == 200
    finally:
        daemon.stop()
        store.close()


# -- the registry mirror option (components/registry-mirror) --------------------------------

MIRROR_COMPONENT = K8S / "components" / "registry-mirror"
MIRROR_CONFIG = "/etc/syncbit-mirror/mirror.yaml"


@pytest.fixture(scope="module")
def mirrored(base: list[Obj]) -> list[Obj]:
    """The install with the registry mirror component (as an operator's overlay has it)."""
    return with_component(rendered(K8S), MIRROR_COMPONENT)


def mirror_config() -> Obj:
    doc: Obj = yaml.safe_load((MIRROR_COMPONENT / "mirror.yaml").read_text())
    return doc


def daemon_pod(objs: list[Obj]) -> Obj:
    spec = pod_spec(find(objs, "DaemonSet", "syncbit-daemon"))
    assert spec is not None
    return spec


def by_name(items: list[Obj], name: str) -> Obj:
    (found,) = [c for c in items if c["name"] == name]
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_mirror_option_validates(mirrored: list[Obj], version: str) -> None:
    for doc in mirrored:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_mirror_option_adds_to_the_daemon_pod_and_changes_nothing_else(
    base: list[Obj], mirrored: list[Obj]
) -> None:
    before, after = daemon_pod(base), daemon_pod(mirrored)
    daemon, was = by_name(after["containers"], "daemon"), by_name(before["containers"], "daemon")
    # The daemon serves the mirror itself: one env entry and the config's mount more.
    assert [c["name"] for c in after["containers"]] == ["daemon"]
    assert daemon["env"] == [*was["env"], {"name": "SYNCBIT_MIRROR_CONFIG", "value": MIRROR_CONFIG}]
    assert daemon["volumeMounts"] == [
        *was["volumeMounts"],
        {"name": "mirror-config", "mountPath": str(Path(MIRROR_CONFIG).parent), "readOnly": True},
    ]
    unchanged = {"env", "volumeMounts"}
    assert {k: v for k, v in daemon.items() if k not in unchanged} == {
        k: v for k, v in was.items() if k not in unchanged
    }
    template = find(mirrored, "DaemonSet", "syncbit-daemon")["spec"]["template"]
    assert template["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == (
        "daemon"
    )
    assert [c["name"] for c in after.get("initContainers", [])] == ["containerd-hosts"]
    assert {
        k: v for k, v in after.items() if k not in {"containers", "initContainers", "volumes"}
    } == {k: v for k, v in before.items() if k not in {"containers", "initContainers", "volumes"}}
    others = [o for o in mirrored if o["kind"] != "DaemonSet"]
    assert others == [o for o in base if o["kind"] != "DaemonSet"] + generated(MIRROR_COMPONENT)
    images = {i["name"]: i["newTag"] for i in kustomization(MIRROR_COMPONENT)["images"]}
    assert images == {IMAGE: kustomization(K8S)["images"][0]["newTag"]}
    for c in containers(after):
        assert c["image"] == f"{IMAGE}:{images[IMAGE]}"


def test_the_mirror_containers_hold_no_privilege(mirrored: list[Obj]) -> None:
    spec = daemon_pod(mirrored)
    for c in [by_name(spec["initContainers"], "containerd-hosts")]:
        security = c["securityContext"]
        assert "privileged" not in security and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["readOnlyRootFilesystem"] is True
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"])
        assert not any(m.get("mountPropagation") for m in c["volumeMounts"])


def test_the_mirror_config_is_valid_and_the_manifests_follow_it(mirrored: list[Obj]) -> None:
    from syncbit.cli import app as syncbit_app
    from syncbit.config import DaemonConfig, load_yaml
    from syncbit.mirror.__main__ import app as mirror_app
    from syncbit.mirror.config import MirrorConfig
    from syncbit.mirror.hosts import mirror_url

    config = MirrorConfig.model_validate(mirror_config())
    host, _, port = config.listen.rpartition(":")
    assert host == "127.0.0.1"  # the node's loopback: nothing beyond the node reaches it
    spec = daemon_pod(mirrored)
    assert spec["hostNetwork"] is True  # so containerd, on the node, reaches that loopback
    hosts = by_name(spec["initContainers"], "containerd-hosts")
    assert hosts["command"][:5] == ["/usr/bin/tini", "--", "python", "-m", "syncbit.mirror"]
    args = hosts["command"][5:]
    assert args[0] == "hosts" and option_value(args, "--config") == MIRROR_CONFIG
    group: Any = typer.main.get_command(mirror_app)
    known = {o for p in group.get_command(click.Context(group), "hosts").params for o in p.opts}
    assert {a for a in args if a.startswith("--")} <= known
    _, certs = mount_at(spec, hosts, option_value(args, "--certs-d"))
    assert certs["hostPath"] == {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"}
    # The daemon reads the same file as its `mirror` section, through the environment
    # variable its --mirror-config flag takes.
    daemon = by_name(spec["containers"], "daemon")
    (env,) = [e for e in daemon["env"] if e["name"] == "SYNCBIT_MIRROR_CONFIG"]
    assert env["value"] == MIRROR_CONFIG
    command: Any = typer.main.get_command(syncbit_app)
    (flag,) = [
        p
        for p in command.get_command(click.Context(command), "daemon").params
        if p.name == "mirror_config"
    ]
    assert flag.envvar == "SYNCBIT_MIRROR_CONFIG"
    for c in (hosts, daemon):
        mount, vol = mount_at(spec, c, str(Path(MIRROR_CONFIG).parent))
        assert mount["readOnly"] is True and vol["configMap"]["name"] == "syncbit-mirror"
    cfg_doc = load_yaml(K8S / "config" / "config.yaml")
    node = DaemonConfig.model_validate({**cfg_doc, "mirror": mirror_config()}).mirror_config()
    assert node is not None and node.cache_dir == Path(cfg_doc["cache_dir"]) / "mirror"
    _, cache = mount_at(spec, daemon, cfg_doc["cache_dir"])
    assert cache["hostPath"]["path"] == cfg_doc["cache_dir"]  # blobs outlive the pod
    assert mirror_url(config.listen) == f"http://127.0.0.1:{port}"


def test_the_init_containers_command_writes_a_hosts_file_per_registry(tmp_path: Path) -> None:
    import os
    import sys

    argv = [sys.executable, "-m", "syncbit.mirror", "hosts", "--certs-d", str(tmp_path)]
    argv += ["--config", str(MIRROR_COMPONENT / "mirror.yaml")]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    registries = set(mirror_config()["registries"])
    assert {p.parent.name for p in tmp_path.glob("*/hosts.toml")} == registries
    hub = (tmp_path / "docker.io" / "hosts.toml").read_text()
    assert 'server = "https://registry-1.docker.io"' in hub
    assert f'[host."http://{mirror_config()["listen"]}"]' in hub


@pytest.mark.skipif(kustomize_command() is None, reason="neither kustomize nor kubectl")
def test_kustomize_builds_the_mirror_option_as_modelled(
    tmp_path: Path, mirrored: list[Obj]
) -> None:
    import os

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    to_base = os.path.relpath(K8S, overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{to_base}]\ncomponents: [{to_base}/components/registry-mirror]\n"
    )
    cmd = kustomize_command()
    assert cmd is not None
    out = subprocess.run([*cmd, str(overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    spec = daemon_pod(built)
    model = daemon_pod(mirrored)
    for key in ("containers", "initContainers"):
        # kustomize puts added containers first: the pod's default-container annotation
        # keeps `kubectl logs/exec` on the daemon.
        assert sorted(c["name"] for c in spec[key]) == sorted(c["name"] for c in model[key])
        for c in spec[key]:
            assert c == by_name(model[key], c["name"]) or c["name"] == "daemon"
    (config,) = [v for v in spec["volumes"] if v["name"] == "mirror-config"]
    assert re.fullmatch(r"syncbit-mirror-[a-z0-9]{10}", config["configMap"]["name"])
    for doc in built:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
