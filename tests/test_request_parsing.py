"""Property-based tests (hypothesis) of request parsing on the real servers, over loopback:
whatever method, path, query, headers and body a client sends, the scheduler answers a
status below 500 with a JSON error for every refusal, and the peer/control server answers
below 500 too, and neither drops the connection without an answer."""

from __future__ import annotations

import http.client
import json
import string
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import pytest
import trio
from httpraw import exchange, request_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schedulerfixtures import CHUNK, TIMEOUT, any_port

from syncbit.chunks import digest
from syncbit.config import SchedulerConfig
from syncbit.credentials import Issuer, Role
from syncbit.manifest import FileEntry, Manifest, build_manifest
from syncbit.node.http import LocalApi
from syncbit.peer import PeerServer
from syncbit.scheduler import SchedulerServer
from syncbit.serving import Limits
from syncbit.store import ObjectStore

TOKEN = "parse-token"
ADMIN = Issuer(TOKEN).issue(Role.ADMIN)[0]  # what an operator's CLI sends
OBJ = "ab" * 32
HELD = "cd" * 32  # the object the peer holds one chunk of
PEER_CHUNK = 64 * 1024
SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def resolve(name: str, source: str, options: dict[str, Any], chunk_size: int) -> Manifest:
    entry = FileEntry(path="f.bin", size=10 * CHUNK, object=OBJ, locator="f.bin")
    return build_manifest(name, source, [entry], chunk_size=chunk_size)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("parse")
    token = tmp / "token"
    token.write_text(TOKEN)
    config = any_port(
        SchedulerConfig(
            state_dir=tmp / "state", node_timeout=TIMEOUT, chunk_size=CHUNK, token_file=token
        )
    )
    limits = Limits(max_connections=256, max_per_client=256, idle_timeout=5)
    with SchedulerServer(config, resolve=resolve, limits=limits) as srv:
        yield int(srv.address.rpartition(":")[2])


# -- strategies --------------------------------------------------------------------------------

# Anything but the line ends that frame the request line (those make another request).
TEXT = st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=40)
SEGMENT = st.one_of(
    st.sampled_from(["n1", "ds", OBJ, OBJ.upper(), "", ".", "..", "%00", "%2F", "a" * 300]),
    TEXT.map(lambda t: quote(t, safe="")),
    st.text(string.printable.strip(), max_size=20),
)
ROUTES = [
    ["healthz"],
    ["readyz"],
    ["metrics"],
    ["v1", "nodes"],
    ["v1", "nodes", "*"],
    ["v1", "nodes", "*", "labels"],
    ["v1", "nodes", "*", "plan"],
    ["v1", "nodes", "*", "chunks"],
    ["v1", "assignments"],
    ["v1", "datasets"],
    ["v1", "datasets", "*"],
    ["v1", "datasets", "*", "targets"],
    ["v1", "objects", "*", "claims"],
    ["v1", "objects", "*", "release"],
    ["v1", "objects", "*", "chunks"],
    ["v1", "objects", "*", "updates"],
    ["v1", "reports"],
    ["v1", "status"],
    ["v1", "generation"],
]


@st.composite
def paths(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        route = [draw(SEGMENT) if s == "*" else s for s in draw(st.sampled_from(ROUTES))]
    else:
        route = draw(st.lists(SEGMENT, max_size=6))
    path = "/" + "/".join(route)
    if draw(st.booleans()):
        keys = st.sampled_from(["after", "timeout", "node", "wait", "cursor", "limit", "x", ""])
        values = st.one_of(
            TEXT, st.integers().map(str), st.floats().map(str), st.sampled_from(["nan", "-inf"])
        )
        pairs = draw(st.lists(st.tuples(keys, values), max_size=4))
        path += "?" + (urlencode(pairs) if draw(st.booleans()) else "&".join(map("=".join, pairs)))
    if path.startswith("/v1/generation"):
        # A long poll on the current generation would wait its timeout: ask about another.
        query = parse_qs(path.partition("?")[2])
        path = "/v1/generation?" + urlencode(
            {**{k: v[-1] for k, v in query.items()}, "after": "-7"}
        )
    return path


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["address", "labels", "load", "ready", "set", "remove", "targets", "node", "selector",
          "chunks", "ttl", "name", "source", "options", "add", "object", "size", "chunk_size",
          "reporter", "peer", "chunk", "reason", "dataset", "force"]  # fmt: skip
VALUE = st.one_of(
    JSON,
    st.sampled_from([OBJ, "h:1", -1, 2**64, 10**30, 4 * 10**8, "", [[0, "1" * 64]], {"a": "b"}]),
    st.lists(st.integers(min_value=-5, max_value=2**40), max_size=50),
    st.lists(
        st.fixed_dictionaries(
            {"object": st.sampled_from([OBJ, "zz", HELD]), "chunks": st.just([[1, "2" * 64]])},
            optional={"size": st.integers(), "chunk_size": st.integers()},
        ),
        max_size=3,
    ),
)
BODIES = st.one_of(
    st.none(),
    st.binary(max_size=300),
    JSON.map(lambda d: json.dumps(d).encode()),
    st.dictionaries(st.sampled_from(FIELDS), VALUE, max_size=6).map(
        lambda d: json.dumps(d).encode()
    ),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
)


@st.composite
def requests(draw: st.DrawFn, auth: str) -> tuple[str, bytes]:
    method = draw(st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    headers: dict[str, str] = {}
    if draw(st.integers(0, 3)):
        headers["Authorization"] = draw(st.sampled_from([auth, "Bearer nope", "Basic x", auth]))
    body = draw(BODIES)
    framing = draw(st.sampled_from(["exact", "exact", "exact", "huge", "chunked", "garbage"]))
    if framing == "huge":
        headers["Content-Length"] = str(draw(st.integers(2**24, 2**62)))
        body = b""  # refused from the header alone: nothing after it is read
    elif framing == "chunked":
        headers["Transfer-Encoding"] = "chunked"
    elif framing == "garbage":
        headers["Content-Length"] = draw(st.sampled_from(["-3", "x", "1.5", "0x20", "+1"]))
        body = b""
    if draw(st.booleans()):
        headers["Expect"] = "100-continue"
    return method, request_bytes(method, draw(paths()), headers, body)


# -- the scheduler -----------------------------------------------------------------------------


@SETTINGS
@given(req=requests(f"Bearer {TOKEN}"))
def test_scheduler_answers_any_request_below_500_with_json_errors(
    scheduler: int, req: tuple[str, bytes]
) -> None:
    method, raw = req
    try:
        answer = exchange(scheduler, raw, head_only=method == "HEAD")
    except (http.client.HTTPException, ConnectionError) as exc:
        raise AssertionError(f"no answer to {raw[:300]!r}: {exc!r}") from None
    assert answer.status < 500, (raw[:300], answer)
    if method != "HEAD" and answer.headers.get("content-type") == "application/json":
        doc = answer.json()
        if answer.status >= 400:
            assert isinstance(doc, dict) and isinstance(doc.get("error"), str), answer
    elif method != "HEAD":
        assert answer.status == 200 and raw.startswith(b"GET /metrics"), answer


@SETTINGS
@given(line=st.binary(max_size=200).filter(lambda b: b"\n" not in b))
def test_scheduler_answers_garbage_request_lines(scheduler: int, line: bytes) -> None:
    try:
        answer = exchange(scheduler, line + b"\r\nHost: x\r\n\r\n")
    except http.client.RemoteDisconnected:
        return  # an empty request line: the stdlib closes without a word, as HTTP allows
    assert 400 <= answer.status < 500 or answer.status == 200, answer
    if answer.status >= 400:
        assert isinstance(answer.json().get("error"), str)


# -- the peer and control server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, list[Any]]]:
    store = ObjectStore.open(tmp_path_factory.mktemp("peer"), 1 << 30)
    data = bytes(range(256)) * (PEER_CHUNK // 256)

    async def hold_one_chunk() -> None:
        obj = store.object(HELD, 3 * PEER_CHUNK, PEER_CHUNK)
        await store.store_chunk(obj, 1, memoryview(data), digest(data))
        await store.flush()

    trio.run(hold_one_chunk)
    seen: list[Any] = []

    async def control(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        seen.append((method, path, body))
        return {"echo": body}

    server = PeerServer(store, "127.0.0.1:0", limits=Limits(idle_timeout=5), auth_required=True)
    server.set_verifier(Issuer(TOKEN))  # the cluster's key: admin credentials pass
    api = LocalApi()
    api.set_control(control)
    server.add_routes(api)
    server.start()
    try:
        yield int(server.address.rpartition(":")[2]), seen
    finally:
        server.stop()
        store.close()


RANGES = st.one_of(
    TEXT,
    st.tuples(st.integers(-5, 4 * PEER_CHUNK), st.integers(-5, 4 * PEER_CHUNK)).map(
        lambda r: f"bytes={r[0]}-{r[1]}"
    ),
    st.tuples(st.integers(0, 10**40), st.integers(0, 10**40)).map(lambda r: f"bytes={r[0]}-{r[1]}"),
    st.sampled_from(["bytes=0-1,5-9", "bytes=-100", "bytes=65536-", "bytes= 65536-65537"]),
)
PEER_PATHS = st.one_of(
    st.sampled_from([f"/v1/objects/{HELD}/data", f"/v1/objects/{OBJ}/data", "/healthz"]),
    st.sampled_from(["/v1/local/pull", "/v1/local/datasets/ds?wait=1", "/v1/local/cache/evict"]),
    st.lists(SEGMENT, max_size=5).map(lambda s: "/" + "/".join(s)),
)


@SETTINGS
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "GET"]),
    path=PEER_PATHS,
    rng=st.none() | RANGES,
    auth=st.booleans(),
    body=BODIES,
)
def test_peer_answers_any_request_below_500(
    peer: tuple[int, list[Any]],
    method: str,
    path: str,
    rng: str | None,
    auth: bool,
    body: bytes | None,
) -> None:
    port, seen = peer
    headers = {"Authorization": f"Bearer {ADMIN}"} if auth else {}
    if rng is not None:
        headers["Range"] = rng
    seen.clear()
    raw = request_bytes(method, path, headers, body)
    try:
        answer = exchange(port, raw)
    except (http.client.HTTPException, ConnectionError) as exc:
        raise AssertionError(f"no answer to {raw[:300]!r}: {exc!r}") from None
    assert answer.status < 500, (raw[:300], answer)
    if answer.status == 206:
        # Only held, durable bytes, exactly the range asked for.
        first, _, last = (
            answer.headers["content-range"].removeprefix("bytes ").partition("/")[0].partition("-")
        )
        assert PEER_CHUNK <= int(first) <= int(last) < 2 * PEER_CHUNK
        assert len(answer.body) == int(last) - int(first) + 1
    for _, _, doc in seen:  # the daemon only ever sees JSON objects
        assert isinstance(doc, dict)
