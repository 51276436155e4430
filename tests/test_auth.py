"""Authentication, roles and TLS on real servers on loopback (no FUSE): every scheduler
route and every daemon route against every kind of credential, credentials themselves,
a node's registration, and TLS with the right and a wrong CA."""

from __future__ import annotations

import io
import json
import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import Clock, MemSource
from schedulerfixtures import CHUNK, TIMEOUT, any_port

from syncbit import certs
from syncbit.auth import check_exposure
from syncbit.cli.daemon_client import local
from syncbit.cli.progress import follow
from syncbit.config import SchedulerConfig
from syncbit.credentials import PEER, Issuer, Principal, Role, Verifier, peek
from syncbit.errors import (
    ConfigError,
    ForbiddenError,
    PeerError,
    SyncbitError,
    TrustError,
    UnauthorizedError,
)
from syncbit.manifest import FileEntry
from syncbit.node.http import LocalApi
from syncbit.nodeauth import NodeCredentials
from syncbit.peer import PeerClient, PeerServer
from syncbit.scheduler import SchedulerClient, SchedulerServer
from syncbit.scheduler.routes import RULES, route_of
from syncbit.sources import Listing
from syncbit.store import ObjectStore
from syncbit.tls import server_context

SECRET = "auth-test-cluster-secret-0123456789"
OID = "c" * 64


@pytest.fixture(autouse=True)
def _listed() -> Iterator[None]:
    listing = Listing(files=[FileEntry(path="a.bin", size=10, object=OID, locator="a.bin")])
    with MemSource.serving({"mem://x/": listing, "mem://d/": listing}):
        yield


# -- credentials ----------------------------------------------------------------------------


def test_every_node_of_a_5000_node_cluster_is_verified_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signature check costs ~0.1 ms: a scheduler that forgot credentials before each
    node's next request came round would pay it on every request of a large cluster."""
    issuer = Issuer(SECRET, clock=lambda: 1000.0)
    tokens = [issuer.issue(Role.NODE, f"n{i}", ttl=600)[0] for i in range(5000)]
    for token in tokens:
        issuer.verify(token)

    def no_more_checks(token: str) -> Principal:
        raise AssertionError("a credential was checked twice")

    monkeypatch.setattr(issuer, "_check", no_more_checks)
    assert [issuer.verify(t).subject for t in tokens] == [f"n{i}" for i in range(5000)]


def test_a_credential_proves_its_role_and_node_and_nothing_else() -> None:
    now = [1000.0]
    issuer = Issuer(SECRET, clock=lambda: now[0])
    token, expires = issuer.issue(Role.NODE, "n1", ttl=60)
    assert expires == 1060
    checker = Verifier(issuer.public, clock=lambda: now[0])  # a daemon: public key only
    assert checker.verify(token) == Principal(Role.NODE, "n1", "", 1060.0)
    assert peek(token).subject == "n1"
    # The secret is admin only where it is known: not on a daemon.
    assert issuer.verify(SECRET) == Principal(Role.ADMIN)
    with pytest.raises(UnauthorizedError, match="missing or wrong cluster token"):
        checker.verify(SECRET)
    # Expiry, also for a credential verified (and remembered) before.
    now[0] = 1061.0
    with pytest.raises(UnauthorizedError, match="expired"):
        checker.verify(token)
    # Another cluster's credential, a changed payload, a changed signature, garbage.
    other, _ = Issuer("another-secret").issue(Role.ADMIN)
    with pytest.raises(UnauthorizedError, match="another cluster secret"):
        checker.verify(other)
    head, payload, sig = issuer.issue(Role.READER)[0].split(".")
    forged = json.loads(httpx_b64(payload))
    forged["r"] = "admin"
    with pytest.raises(UnauthorizedError, match="does not verify"):
        checker.verify(f"{head}.{b64(json.dumps(forged).encode())}.{sig}")
    with pytest.raises(UnauthorizedError, match="does not verify"):
        checker.verify(f"{head}.{payload}.{sig[:-4]}AAAA")
    for junk in ("sb1.x.y", "sb1..", "sb1.e30.AAAA", "x" * 5000, ""):
        with pytest.raises(UnauthorizedError):
            checker.verify(junk)
    with pytest.raises(ValueError):
        issuer.issue(Role.NODE)  # a node credential names its node
    with pytest.raises(ValueError):
        issuer.issue(Role.READER, "n1")  # and no other role names one


def b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def httpx_b64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_every_scheduler_replica_with_the_secret_derives_the_same_key() -> None:
    a, b = Issuer(SECRET), Issuer(SECRET)
    assert a.public == b.public
    assert b.verify(a.issue(Role.NODE, "n1")[0]).subject == "n1"
    assert Issuer(SECRET + "x").public != a.public


def test_listening_beyond_loopback_needs_a_token_or_insecure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test.exposure")
    for listen in ("127.0.0.1:7900", "[::1]:7900", "localhost:7900"):
        check_exposure("the scheduler", listen, None, False, log)
    for listen in ("0.0.0.0:7900", "[::]:7900", "10.0.0.5:7900", "sched.example:7900"):
        check_exposure("the scheduler", listen, SECRET, False, log)
        with pytest.raises(ConfigError, match=r"without a token_file.*--insecure"):
            check_exposure("the scheduler", listen, None, False, log)
    with caplog.at_level(logging.WARNING):
        check_exposure("the daemon", "0.0.0.0:7901", None, True, log)
    assert "INSECURE: the daemon listens on 0.0.0.0:7901" in caplog.text


# -- the scheduler: every route, every kind of credential -----------------------------------


@pytest.fixture
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("tls")
    certs.init(where)
    return where


@pytest.fixture
def secured(tmp_path: Path, clock: Clock, tls_files: Path) -> Iterator[SchedulerServer]:
    token_file = tmp_path / "secret"
    token_file.write_text(SECRET + "\n")
    config = any_port(
        SchedulerConfig(
            state_dir=tmp_path / "state",
            node_timeout=TIMEOUT,
            chunk_size=CHUNK,
            token_file=token_file,
            tls_cert=tls_files / "scheduler.crt",
            tls_key=tls_files / "scheduler.key",
        )
    )
    server = SchedulerServer(config, clock=clock)
    server.start()
    try:
        yield server
    finally:
        server.stop()


ADMIN = {"admin", "secret"}
NODE_N1 = ADMIN | {"n1"}
NODES = NODE_N1 | {"n2"}
READERS = NODES | {"reader"}
HEARTBEAT = {"address": "127.0.0.1:1"}
OPEN = None

# (method, path, body, who may call it): one row per route. Every route must have a row
# (checked below), so a new route cannot go untested.
SCHEDULER_ROUTES: list[tuple[str, str, Any, set[str] | None]] = [
    ("GET", "/healthz", None, OPEN),
    ("GET", "/readyz", None, OPEN),
    ("GET", "/v1/nodes", None, READERS),
    ("PUT", "/v1/nodes/n1", HEARTBEAT, NODE_N1),
    ("POST", "/v1/nodes/n1/credential", {}, NODE_N1),  # n1 is up: not with bootstrap
    ("POST", "/v1/nodes/n9/credential", {}, ADMIN | {"bootstrap"}),  # a new name
    ("POST", "/v1/nodes/n1/labels", {"set": {"zone": "a"}}, ADMIN),
    ("GET", "/v1/nodes/n1/plan", None, NODE_N1),
    ("GET", "/v1/assignments", None, READERS),
    ("POST", "/v1/datasets/ds/targets", {"targets": [{"node": "n1"}]}, ADMIN),
    ("DELETE", "/v1/datasets/ds/targets", {"targets": [{"node": "n1"}]}, ADMIN),
    ("POST", f"/v1/objects/{OID}/claims", {"node": "n1", "chunks": [0]}, NODE_N1),
    ("POST", f"/v1/objects/{OID}/release", {"node": "n1", "chunks": [0]}, NODE_N1),
    ("POST", f"/v1/objects/{OID}/geometry", {"node": "n1", "size": 9, "chunk_size": 4}, NODE_N1),
    ("POST", "/v1/nodes/n1/chunks", {"add": [], "remove": []}, NODE_N1),
    ("GET", "/v1/datasets", None, READERS),
    ("POST", "/v1/datasets", {"name": "ds2", "source": "mem://x/"}, ADMIN),
    ("GET", "/v1/datasets/ds", None, READERS),
    ("DELETE", "/v1/datasets/gone", None, ADMIN),
    ("GET", f"/v1/objects/{OID}/chunks", None, NODES),
    ("POST", "/v1/reports", {"reporter": "n1", "peer": "n2", "object": OID, "chunk": 0}, NODE_N1),
    ("GET", "/v1/status", None, READERS),
    ("GET", "/v1/generation", None, READERS),
    ("GET", "/v1/generation?node=n1", None, NODE_N1),  # a node's own poll carries its plan
    ("POST", "/v1/tokens", {"role": "reader"}, ADMIN),
    ("POST", f"/v1/objects/{OID}/checks", {"node": "n1", "chunk": 0}, NODE_N1),
    ("DELETE", "/v1/nodes/n2/quarantine", None, ADMIN),
    ("GET", f"/v1/objects/{OID}/updates", None, NODES),
    ("GET", "/v1/datasets/ds/trace", None, READERS),
    ("PUT", "/v1/datasets/ds/trace", {"node": "n1", "trace": {"format": 1}}, NODE_N1),
    ("POST", "/v1/nodes/n1/leave", None, NODE_N1),  # last: n1 is down after it
]
# Never anything but 401: no credential, a wrong one, another cluster's, an expired one,
# and a node's peer credential (a peer that received it must not use it here).
REFUSED = ["none", "wrong", "other-cluster", "expired", "peer"]
ALLOWED_KINDS = ["reader", "n1", "n2", "bootstrap", "admin", "secret"]


def _credentials(clock: Clock) -> dict[str, str | None]:
    issuer = Issuer(SECRET, clock=clock)
    return {
        "none": None,
        "wrong": "not-the-secret",
        "other-cluster": Issuer("other-secret").issue(Role.ADMIN)[0],
        "expired": issuer.issue(Role.ADMIN, ttl=1)[0],
        "peer": issuer.issue(Role.NODE, "n1", audience=PEER)[0],
        "reader": issuer.issue(Role.READER)[0],
        "n1": issuer.issue(Role.NODE, "n1")[0],
        "n2": issuer.issue(Role.NODE, "n2")[0],
        "bootstrap": issuer.issue(Role.BOOTSTRAP)[0],
        "admin": issuer.issue(Role.ADMIN)[0],
        "secret": SECRET,
    }


def _as_expected(kind: str, allowed: set[str] | None, status: int) -> bool:
    """Open routes answer anyone; refused kinds get 401; allowed ones get past the checks
    (an answer about the request itself: 200, 400, 404, ...); the others get 403."""
    if allowed is OPEN:
        return status == 200
    if kind in REFUSED:
        return status == 401
    if kind in allowed:
        return status not in (401, 403, 503)
    return status == 403


def test_the_route_table_covers_every_scheduler_route() -> None:
    routed = {
        route_of(method, path.partition("?")[0].strip("/").split("/")).name
        for method, path, _, _ in SCHEDULER_ROUTES
    }
    assert routed == set(RULES)


def test_every_scheduler_route_checks_who_asks(
    secured: SchedulerServer, clock: Clock, tls_files: Path
) -> None:
    creds = _credentials(clock)
    admin = {"Authorization": f"Bearer {SECRET}"}
    context = ssl.create_default_context(cafile=str(tls_files / "ca.crt"))
    with httpx.Client(base_url=secured.url, verify=context, trust_env=False) as http:
        http.post("/v1/datasets", json={"name": "ds", "source": "mem://d/"}, headers=admin)
        http.put("/v1/nodes/n1", json=HEARTBEAT, headers=admin).raise_for_status()
        clock.now += 2  # past the expiry of "expired"; n1 stays up
        failures = []
        for method, path, body, allowed in SCHEDULER_ROUTES:
            for kind, token in creds.items():
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                resp = http.request(method, path, json=body, headers=headers)
                if not _as_expected(kind, allowed, resp.status_code):
                    failures.append(f"{kind} {method} {path}: {resp.status_code} {resp.text}")
                if resp.status_code in (401, 403):
                    assert resp.json()["error"], resp.text  # says why, in one line
    assert not failures, "\n".join(failures)


def test_readers_never_write_and_nodes_never_act_for_another() -> None:
    """The two rules the table above encodes, stated on their own."""
    for method, path, body, allowed in SCHEDULER_ROUTES:
        if allowed is OPEN:
            continue
        if method != "GET":
            assert "reader" not in allowed, (method, path)
        names_n1 = "/nodes/n1" in path or "node=n1" in path or "n1" in (body or {}).values()
        if names_n1:
            assert "n2" not in allowed, (method, path)


async def test_a_node_registers_once_with_bootstrap_and_renews_with_itself(
    secured: SchedulerServer, clock: Clock, tls_files: Path, tmp_path: Path
) -> None:
    bootstrap, _ = Issuer(SECRET).issue(Role.BOOTSTRAP)
    state = tmp_path / "credential.json"
    creds = NodeCredentials("n1", bootstrap, state, clock=clock)
    assert creds.required and creds.token is None and creds.verifier is None
    async with SchedulerClient(secured.url, ca=tls_files / "ca.crt") as client:
        assert await creds.refresh(client)
        assert creds.token and creds.peer_token and creds.verifier is not None
        assert state.stat().st_mode & 0o777 == 0o600
        assert Issuer(SECRET).verify(creds.token) == Principal(Role.NODE, "n1", "", creds.expires)
        assert creds.verifier.verify(creds.peer_token).audience == PEER
        client.set_token(creds.token)
        await client.heartbeat("n1", address="127.0.0.1:1")
        with pytest.raises(ForbiddenError, match="node n1 may not act for node n2"):
            await client.heartbeat("n2", address="127.0.0.1:2")
        # A second daemon named n1 with only the bootstrap credential: refused while n1 is
        # up, so it cannot take the name over.
        intruder = NodeCredentials("n1", bootstrap, tmp_path / "other.json", clock=clock)
        with pytest.raises(ForbiddenError, match="registered and up"):
            await intruder.refresh(client)
        # A restart keeps the credentials (the name is up: bootstrap would be refused).
        again = NodeCredentials("n1", bootstrap, state, clock=clock)
        assert again.token == creds.token and not again.due()
        # Past half its life the credential renews itself.
        clock.now = creds.expires - 60
        assert again.due()
        assert await again.refresh(client)
        assert again.expires > creds.expires
        # Down for good: a new daemon of that name may bootstrap.
        clock.now += 10 * TIMEOUT
        assert await intruder.refresh(client)


def test_a_daemon_refuses_credentials_that_are_not_its_own(tmp_path: Path) -> None:
    issuer = Issuer(SECRET)
    with pytest.raises(ConfigError, match="credential of node 'n2'"):
        NodeCredentials("n1", issuer.issue(Role.NODE, "n2")[0], tmp_path / "c.json")
    with pytest.raises(ConfigError, match="reader credential"):
        NodeCredentials("n1", issuer.issue(Role.READER)[0], tmp_path / "c.json")
    own = NodeCredentials("n1", issuer.issue(Role.NODE, "n1")[0], tmp_path / "c.json")
    assert own.token is not None and own.due()  # used as is; the key comes at registration
    local = NodeCredentials("n1", SECRET, tmp_path / "c.json")  # the secret: issued here
    assert local.verifier is not None and local.token is not None
    assert local.verifier.verify(local.token).subject == "n1"


# -- the daemon's routes --------------------------------------------------------------------


async def _control(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    doc = {"dataset": "d", "size": 10, "present_bytes": 10, "complete": True, "ready": True}
    return doc


async def _ready() -> tuple[bool, str]:
    return True, "ok"


async def _metrics() -> tuple[bytes, str]:
    return b"", "text/plain"


# (method, path, who may): the peer service's routes, from loopback.
PEER_ROUTES: list[tuple[str, str, set[str] | None]] = [
    ("GET", "/healthz", OPEN),
    ("GET", "/readyz", OPEN),
    ("GET", "/metrics", OPEN),
    ("GET", f"/v1/objects/{OID}/data", NODES),
    ("GET", "/v1/local/datasets/d", READERS),
    ("GET", "/v1/local/datasets/d?wait=0.1", READERS),  # the long poll of `syncbit wait`
    ("GET", "/v1/local/datasets", READERS),
    ("GET", "/v1/local/cache", READERS),
    ("POST", "/v1/local/pull", ADMIN),
    ("POST", "/v1/local/cache/evict", ADMIN),
    ("POST", "/v1/local/cache/gc", ADMIN),
]


@pytest.fixture
def peer(tmp_path: Path, tls_files: Path) -> Iterator[PeerServer]:
    store = ObjectStore.open(tmp_path / "cache", 1 << 20)
    server = PeerServer(
        store,
        "127.0.0.1:0",
        auth_required=True,
        tls_context=server_context(tls_files / "daemon.crt", tls_files / "daemon.key"),
    )
    api = LocalApi()
    api.set_control(_control)
    api.set_probes(_ready, _metrics)
    server.add_routes(api)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        store.close()


def test_every_daemon_route_checks_who_asks(
    peer: PeerServer, clock: Clock, tls_files: Path
) -> None:
    creds = _credentials(clock)
    creds.pop("secret")  # a daemon without the secret cannot know it
    creds.pop("peer")  # a peer credential is a node's, here: tested below
    context = ssl.create_default_context(cafile=str(tls_files / "ca.crt"))
    url = f"https://{peer.address}"
    # Before the daemon knows the cluster's key it checks nothing and serves nothing.
    with httpx.Client(base_url=url, verify=context, trust_env=False) as http:
        early = http.get("/v1/local/datasets/d", headers={"Authorization": f"Bearer {creds['n1']}"})
        assert early.status_code == 503
        peer.set_verifier(Verifier(Issuer(SECRET).public, clock=clock))
        clock.now += 2
        failures = []
        for method, path, allowed in PEER_ROUTES:
            for kind, token in creds.items():
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                headers["Range"] = "bytes=0-9"
                body: dict[str, Any] | None = {} if method == "POST" else None
                resp = http.request(method, path, headers=headers, json=body)
                if not _as_expected(kind, allowed, resp.status_code):
                    failures.append(f"{kind} {method} {path}: {resp.status_code} {resp.text}")
    assert not failures, "\n".join(failures)


def test_chunk_data_goes_to_node_credentials_only(
    tmp_path: Path, peer: PeerServer, tls_files: Path
) -> None:
    issuer = Issuer(SECRET)
    peer.set_verifier(Verifier(issuer.public))
    context = ssl.create_default_context(cafile=str(tls_files / "ca.crt"))
    buf = memoryview(bytearray(10))
    for token, expect in (
        (issuer.issue(Role.NODE, "n2", audience=PEER)[0], "404"),  # a node: asked, not held
        (issuer.issue(Role.READER)[0], "403"),
        (issuer.issue(Role.BOOTSTRAP)[0], "403"),
        (None, "401"),
    ):
        client = PeerClient(timeout=5, token=token, tls_context=context, tls_name="syncbit-daemon")
        try:
            with pytest.raises(PeerError, match=expect):
                client.get_into(peer.address, OID, 0, buf)
        finally:
            client.close()


# -- TLS ------------------------------------------------------------------------------------


async def test_tls_with_the_right_ca_and_a_clear_refusal_with_a_wrong_one(
    secured: SchedulerServer, tls_files: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    certs.init(other)
    async with SchedulerClient(secured.url, token=SECRET, ca=tls_files / "ca.crt") as good:
        assert (await good.status())["nodes"] == []
    async with SchedulerClient(secured.url, token=SECRET, ca=other / "ca.crt") as bad:
        with pytest.raises(TrustError, match=r"TLS certificate not accepted \(.*\); point"):
            await bad.status()
    async with SchedulerClient(secured.url, token=SECRET) as system:  # system CAs only
        with pytest.raises(TrustError):
            await system.status()


def test_plain_http_is_refused_from_elsewhere_but_probes_stay_open(
    secured: SchedulerServer,
) -> None:
    plain = f"http://{secured.address}"
    # Loopback may speak plain HTTP (the node's own CLI); the probes are open anyway.
    assert httpx.get(plain + "/healthz", trust_env=False).status_code == 200
    assert httpx.get(plain + "/metrics", trust_env=False).status_code == 200
    ok = httpx.get(plain + "/v1/status", headers={"Authorization": f"Bearer {SECRET}"})
    assert ok.status_code == 200


def test_wait_speaks_tls_and_names_a_wrong_ca(
    peer: PeerServer, tls_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    issuer = Issuer(SECRET)
    peer.set_verifier(Verifier(issuer.public))
    other = tmp_path / "other"
    certs.init(other)
    monkeypatch.setenv("SYNCBIT_TOKEN", issuer.issue(Role.READER)[0])
    monkeypatch.setenv("SYNCBIT_TLS_NAME", "syncbit-daemon")
    daemon = f"https://{peer.address}"
    monkeypatch.setenv("SYNCBIT_TLS_CA", str(tls_files / "ca.crt"))
    out = io.StringIO()
    assert follow(daemon, "d", out, start=False, timeout=10)["complete"] is True
    # The same reader credential may not change the node.
    with pytest.raises(ForbiddenError, match="reader credential may not"):
        local(daemon, "POST", "cache/gc", {})
    monkeypatch.setenv("SYNCBIT_TLS_CA", str(other / "ca.crt"))
    started = time.monotonic()
    with pytest.raises(TrustError, match="TLS certificate not accepted"):
        follow(daemon, "d", out, start=False, timeout=30)
    assert time.monotonic() - started < 20  # refused, not retried until the timeout
    # A wrong name: the daemons' certificate is not for "elsewhere".
    monkeypatch.setenv("SYNCBIT_TLS_CA", str(tls_files / "ca.crt"))
    monkeypatch.setenv("SYNCBIT_TLS_NAME", "elsewhere")
    with pytest.raises(TrustError, match="elsewhere"):
        follow(daemon, "d", out, start=False, timeout=30)


def test_peers_refuse_a_peer_whose_certificate_the_ca_did_not_sign(
    peer: PeerServer, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    certs.init(other)
    peer.set_verifier(Verifier(Issuer(SECRET).public))
    token = Issuer(SECRET).issue(Role.NODE, "n2", audience=PEER)[0]
    context = ssl.create_default_context(cafile=str(other / "ca.crt"))
    client = PeerClient(timeout=5, token=token, tls_context=context, tls_name="syncbit-daemon")
    try:
        with pytest.raises(PeerError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get_into(peer.address, OID, 0, memoryview(bytearray(10)))
    finally:
        client.close()


def test_a_client_that_never_finishes_its_handshake_costs_one_thread(
    peer: PeerServer, tls_files: Path
) -> None:
    """The handshake happens in the connection's thread: a stalled client does not stop
    others from being served."""
    import socket

    host, port = peer.address.rsplit(":", 1)
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(b"\x16\x03\x01")  # the start of a TLS record, then nothing
    try:
        context = ssl.create_default_context(cafile=str(tls_files / "ca.crt"))
        with httpx.Client(verify=context, trust_env=False, timeout=5) as http:
            assert http.get(f"https://{peer.address}/healthz").status_code == 200
    finally:
        stalled.close()


def test_a_daemon_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    """Another process on the daemon's --listen address: a SyncbitError naming it (the
    CLI prints one line), not an OSError traceback."""
    store = ObjectStore.open(tmp_path / "cache", 1 << 20)
    first = PeerServer(store, "127.0.0.1:0")
    first.start()
    try:
        with pytest.raises(SyncbitError, match=r"cannot listen on 127\.0\.0\.1:\d+: Address"):
            PeerServer(store, first.address)
    finally:
        first.stop()
        store.close()
