"""Secrets never stored or shown: URL credentials, header values, signed query strings and
Hub tokens are used where they must be and then appear in no output (status, dataset ls,
the scheduler API, metrics), no log (scheduler and daemons at debug level) and no state
file (both LMDB environments, plan.json, manifests). The nodes read with their own
credentials, from their config."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import httpx
import pytest

from integration.cluster import Cluster, Origin, in_thread, sha256_file, wait_until
from syncbit.chunks import HEAD_SAMPLE

hub_mod = pytest.importorskip("syncbit_testing.hub")

MiB = 2**20
USER, PASSWORD = "alice", "pw-userinfo-7f3a9c"
API_KEY = "hdr-api-key-5b2e81"  # a dataset's `headers` value, given with the request
SIGNED = "sig-in-url-c4d2e9"  # a signature in the URL given to `dataset add`
REDIRECT_SIG = "sig-redirect-a8f1b0"  # one the origin redirects to
NODE_KEY = "node-api-key-e1d7c3"  # the nodes' own, from their config
USER_HF = "hf_user_shell_token_9d8c7b"  # HF_TOKEN of the user's shell
NODE_HF = "hf_node_config_token_6a5b4c"  # the nodes' Hub token, from their config
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
FROM_USERS = [PASSWORD, BASIC, API_KEY, SIGNED, REDIRECT_SIG, USER_HF]
FROM_CONFIG = [NODE_KEY, NODE_HF]  # may be in the nodes' config files, nowhere else


@dataclass
class AuthOrigin:
    """An HTTP origin that wants credentials: Basic alice:..., or an X-Api-Key it knows.
    `/redir/NAME` redirects (same host) to `/ds/NAME?X-Amz-Signature=...`."""

    files: dict[str, bytes]
    seen: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_HEAD(self) -> None:
                self.answer(head=True)

            def do_GET(self) -> None:
                self.answer(head=False)

            def answer(self, head: bool) -> None:
                outer.seen.append(dict(self.headers))
                auth = self.headers.get("Authorization", "")
                if auth != f"Basic {BASIC}" and self.headers.get("X-Api-Key") not in (
                    API_KEY,
                    NODE_KEY,
                ):
                    return self.reply(401, b"who are you?", head)
                path = self.path.partition("?")[0]
                if path.startswith("/redir/"):
                    target = f"/ds/{path[7:]}?X-Amz-Signature={REDIRECT_SIG}"
                    return self.reply(302, b"", head, {"Location": target})
                if path == "/ds/":
                    links = "".join(f'<a href="{n}">{n}</a>' for n in sorted(outer.files))
                    return self.reply(200, links.encode(), head, {"Content-Type": "text/html"})
                body = outer.files.get(path[4:]) if path.startswith("/ds/") else None
                if body is None:
                    return self.reply(404, b"", head)
                span = self.headers.get("Range")
                if span:
                    first, _, last = span[6:].partition("-")
                    part = body[int(first) : int(last) + 1]
                    extra = {"Content-Range": f"bytes {first}-{last}/{len(body)}"}
                    return self.reply(206, part, head, {**extra, "ETag": '"v1"'})
                return self.reply(200, body, head, {"ETag": '"v1"'})

            def reply(
                self, status: int, body: bytes, head: bool, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@dataclass
class World:
    cluster: Cluster
    auth: AuthOrigin
    hub: Any
    outputs: list[str]  # everything the CLI printed


@pytest.fixture(scope="module")
def world(workdir: Path, origin: Origin) -> Iterator[World]:
    files = {"a.bin": os.urandom(5 * MiB + 11), "b.txt": b"small\n"}
    auth = AuthOrigin(files)
    hub = hub_mod.Hub(workdir / "secrets-hub").start()
    hub.add_token(USER_HF)
    hub.add_token(NODE_HF)
    # No process of the cluster sees a Hub token in its environment: the nodes have one
    # in their config, the scheduler none (it resolves with the token of the request).
    saved = {k: os.environ.pop(k, None) for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    saved_home = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(workdir / "secrets-hf-home")  # no token file either
    cluster = Cluster(workdir / "secrets", origin, nodes=2)
    n1, n2 = cluster.nodes
    n1.config["source_options"] = {
        auth.url: {"headers": {"X-Api-Key": NODE_KEY}},
        "hf://": {"token": NODE_HF, "endpoint": hub.url},
    }
    n2.config["source_options"] = {auth.url: {"headers": {"X-Api-Key": NODE_KEY}}}
    try:
        cluster.start()
        yield World(cluster, auth, hub, [])
    finally:
        cluster.close()
        hub.stop()
        auth.stop()
        for key, value in {**saved, "HF_HOME": saved_home}.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _cli(
    world: World, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = world.cluster.cli(*args, env=env, timeout=180)
    world.outputs.append(done.stdout + done.stderr)
    return done


def _read_all(world: World, name: str) -> None:
    for node in world.cluster.nodes:
        wait_until(node.path(name).is_dir, 20, f"{name} on {node.name}")
        for rel, data in world.auth.files.items():
            path = node.path(name, rel)
            got = in_thread(lambda p=path: p.read_bytes(), 60, f"read {path}")  # type: ignore[misc]
            assert got == data, (node.name, name, rel)


def _nodes_read_with_their_own_key(auth: AuthOrigin) -> None:
    """Every ranged read carries the nodes' own key. The one exception is the listing's
    head sample (`bytes=0-N`, N < HEAD_SAMPLE): the scheduler takes it with the
    credentials given with the request, which serve that listing only."""
    ranged = [s for s in auth.seen if "Range" in s]
    reads = [s for s in ranged if s.get("Authorization") != f"Basic {BASIC}"]
    assert reads and all(s.get("X-Api-Key") == NODE_KEY for s in reads), reads
    for s in ranged:
        if s.get("Authorization") == f"Basic {BASIC}":
            first, _, last = s["Range"].removeprefix("bytes=").partition("-")
            assert first == "0" and int(last) < HEAD_SAMPLE, s


@pytest.mark.timeout(600)
def test_no_secret_is_stored_or_shown(world: World) -> None:
    cluster, auth = world.cluster, world.auth
    host = auth.url.removeprefix("http://")

    # 1. URL credentials: they list the source; the nodes read with their own key.
    done = _cli(world, "dataset", "add", "userinfo", f"http://{USER}:{PASSWORD}@{host}ds/")
    assert done.returncode == 0, done.stderr
    assert "warning: the credentials given with this request (user:password" in done.stderr
    _read_all(world, "userinfo")
    _nodes_read_with_their_own_key(auth)

    # 2. A `headers` value given with the request (through the API: it is a mapping).
    resp = httpx.post(
        cluster.scheduler.url + "/v1/datasets",
        json={
            "name": "headers",
            "source": auth.url + "ds/",
            "options": {"headers": {"X-Api-Key": API_KEY}},
        },
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    world.outputs.append(resp.text)
    assert "headers" in resp.json()["warnings"][0]
    _read_all(world, "headers")

    # 3. A signed URL is refused, without repeating the signature.
    signed = f"{auth.url}ds/a.bin?X-Amz-Signature={SIGNED}&X-Amz-Credential=AKIAEXAMPLE"
    done = _cli(world, "dataset", "add", "signed", signed)
    assert done.returncode == 2 and "query string" in done.stderr, done.stderr
    # ... and so is one in a redirect, followed and never written down.
    done = _cli(
        world, "dataset", "add", "redirected", f"http://{USER}:{PASSWORD}@{host}redir/a.bin"
    )
    assert done.returncode == 0, done.stderr
    for node in cluster.nodes:
        wait_until(node.path("redirected").is_dir, 20, f"redirected on {node.name}")
        data = in_thread(lambda n=node: n.path("redirected", "a.bin").read_bytes(), 60, "read")  # type: ignore[misc]
        assert data == auth.files["a.bin"]

    # 4. The Hub token of the user's shell resolves the revision; the node reads with its own.
    weights = os.urandom(3 * MiB)
    world.hub.add_commit("org/private", {"w.safetensors": weights, "c.json": b"{}"}, private=True)
    env = {
        "HF_TOKEN": USER_HF,
        "HF_ENDPOINT": world.hub.url,
        "HF_HOME": str(cluster.workdir / "user-hf"),
    }
    n1, n2 = cluster.nodes
    done = _cli(world, "pull", "hf://org/private", "--name", "hfp", "--daemon", n1.address, env=env)
    assert done.returncode == 0, done.stderr
    assert "warning: the credentials given with this request (token)" in done.stderr
    assert sha256_file(n1.path("hfp", "w.safetensors")) == hashlib.sha256(weights).hexdigest()
    # A node without a token of its own says so plainly (nothing reaches it from a peer:
    # this repo is pulled on n2 alone).
    world.hub.add_commit("org/private2", {"x.bin": os.urandom(MiB)}, private=True)
    done = _cli(
        world, "pull", "hf://org/private2", "--name", "hfp2", "--daemon", n2.address, env=env
    )
    assert done.returncode != 0, done.stderr
    assert "no Hub token: set HF_TOKEN in its environment" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr

    # -- now look everywhere ------------------------------------------------------------------
    wait_until(lambda: all(_reported(cluster, n) for n in cluster.nodes), 30, "chunk reports")
    shown: list[tuple[str, str]] = [
        (f"cli output {i}", text) for i, text in enumerate(world.outputs)
    ]
    for args in (("status", "--json"), ("dataset", "ls", "--json"), ("node", "ls", "--json")):
        done = cluster.cli(*args)
        assert done.returncode == 0, done.stderr
        shown.append((" ".join(args), done.stdout + done.stderr))
    datasets = json.loads(cluster.cli("dataset", "ls", "--json").stdout)
    assert {d["name"] for d in datasets} >= {"userinfo", "headers", "redirected", "hfp", "hfp2"}
    for d in datasets:
        assert "@" not in d["source"], d["source"]
        shown.append(
            (
                f"GET /v1/datasets/{d['name']}",
                json.dumps(cluster.scheduler.get(f"/v1/datasets/{d['name']}")),
            )
        )
    for url in [cluster.scheduler.url] + [f"http://{n.address}" for n in cluster.nodes]:
        shown.append((f"{url}/metrics", httpx.get(url + "/metrics", timeout=10).text))
    for proc in [cluster.scheduler, *cluster.nodes]:
        shown.append((str(proc.log_path), proc.log_text(whole=True)))
    for name, text in shown:
        for secret in FROM_USERS + FROM_CONFIG:
            assert secret not in text, f"{secret!r} in {name}"
        assert not re.search(r"Signature=[0-9A-Za-z]", text), f"a signature in {name}"

    state_files = _files(cluster.scheduler.state_dir)
    for node in cluster.nodes:
        state_files += [p for p in _files(node.cache_dir) if "objects" not in p.parts]
    names = {p.name for p in state_files}
    assert {"data.mdb", "plan.json"} <= names, names
    for path in state_files:
        data = path.read_bytes()
        for secret in FROM_USERS + FROM_CONFIG:
            assert secret.encode() not in data, f"{secret!r} in {path}"
    # The nodes' own credentials are where they belong: their config.
    assert NODE_KEY in (n1.workdir / "config.yaml").read_text()


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _reported(cluster: Cluster, node: Any) -> bool:
    status = cluster.scheduler.status()
    return any(node.name in d.get("cached", {}) for d in status["datasets"])
