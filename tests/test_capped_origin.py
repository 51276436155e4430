"""The rate-capped, throttling test origin (syncbit_testing/capped.py) that the fetcher's
tests run against: pacing arithmetic on a fake clock, and the server on loopback serving
ranges intact, pacing each body, refusing with Retry-After and counting streams."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from syncbit_testing import command, environ
from syncbit_testing.capped import CappedOrigin, RateLimit

MiB = 1 << 20


class VirtualTime:
    """A clock that only `sleep` moves: the pacing's waits, summed, thread-safe."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0
        self._lock = threading.Lock()

    def clock(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
            self.slept += seconds


@pytest.fixture
def data(tmp_path: Path) -> bytes:
    payload = os.urandom(3 * MiB + 12345)
    (tmp_path / "big.bin").write_bytes(payload)
    return payload


def get(
    origin: CappedOrigin, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(origin.host, origin.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# -- the pacing arithmetic ----------------------------------------------------------------------


def test_rate_limit_spaces_bytes_and_keeps_no_idle_credit() -> None:
    now = [10.0]
    limit = RateLimit(1000.0, lambda: now[0])
    assert limit.reserve(500) == 10.0
    assert limit.reserve(500) == pytest.approx(10.5)
    assert limit.reserve(1000) == pytest.approx(11.0)
    now[0] = 100.0  # idle for a long time: the next bytes go now, not in a burst of credit
    assert limit.reserve(1000) == 100.0
    assert limit.reserve(1) == pytest.approx(101.0)
    with pytest.raises(ValueError):
        RateLimit(0)


# -- the server ---------------------------------------------------------------------------------


def test_ranges_come_back_intact_while_paced(tmp_path: Path, data: bytes) -> None:
    vt = VirtualTime()
    with CappedOrigin(tmp_path, per_connection=MiB, clock=vt.clock, sleep=vt.sleep) as origin:
        status, headers, body = get(origin, "/big.bin", {"Range": "bytes=1000-2099999"})
        assert status == 206 and body == data[1000:2100000]
        assert headers["Content-Range"] == f"bytes 1000-2099999/{len(data)}"
        status, _, body = get(origin, "/big.bin")
        assert status == 200 and body == data
        assert origin.bytes_served == 2099000 + len(data)


def test_each_body_is_paced_to_the_per_connection_rate(tmp_path: Path, data: bytes) -> None:
    vt = VirtualTime()
    with CappedOrigin(tmp_path, per_connection=MiB, clock=vt.clock, sleep=vt.sleep) as origin:
        get(origin, "/big.bin", {"Range": f"bytes=0-{2 * MiB - 1}"})
    # 2 MiB at 1 MiB/s: the last block may start after 2 s less one block.
    assert 2.0 - 0.1 <= vt.slept <= 2.0


def test_all_bodies_share_the_total_rate(tmp_path: Path, data: bytes) -> None:
    vt = VirtualTime()
    with CappedOrigin(tmp_path, total=MiB, clock=vt.clock, sleep=vt.sleep) as origin:
        threads = [
            threading.Thread(target=get, args=(origin, "/big.bin", {"Range": r}))
            for r in (f"bytes=0-{MiB - 1}", f"bytes={MiB}-{2 * MiB - 1}")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert origin.bytes_served == 2 * MiB
        # Two 1 MiB bodies through one 1 MiB/s: the shared schedule reaches 2 s.
        assert vt.clock() >= 2.0 - 0.1


def test_throttle_on_demand_answers_with_retry_after(tmp_path: Path, data: bytes) -> None:
    with CappedOrigin(tmp_path) as origin:
        origin.throttle(429, retry_after=2.5, count=2)
        for _ in range(2):
            status, headers, _ = get(origin, "/big.bin")
            assert status == 429 and headers["Retry-After"] == "3"  # whole seconds, up
        status, _, body = get(origin, "/big.bin")
        assert status == 200 and body == data
        origin.throttle(503, retry_after=None)  # every request until unthrottled
        for _ in range(3):
            status, headers, _ = get(origin, "/big.bin")
            assert status == 503 and "Retry-After" not in headers
        origin.unthrottle()
        assert get(origin, "/big.bin")[0] == 200
        assert origin.throttled == 5


@pytest.fixture
def slow(tmp_path: Path, data: bytes) -> Iterator[CappedOrigin]:
    # 256 KiB/s per body: a 3 MiB body keeps its request open for seconds.
    with CappedOrigin(
        tmp_path, per_connection=256 << 10, throttle_above=2, throttle_retry_after=1
    ) as origin:
        yield origin


def _open_body(origin: CappedOrigin) -> socket.socket:
    """A request whose body the client does not read: it stays open on the server."""
    sock = socket.create_connection((origin.host, origin.port))
    sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_requests_beyond_the_limit_are_refused(slow: CappedOrigin) -> None:
    socks = [_open_body(slow), _open_body(slow)]
    try:
        _wait(lambda: slow.streams == 2, "two bodies in flight")
        status, headers, _ = get(slow, "/big.bin", {"Range": "bytes=0-9"})
        assert status == 503 and headers["Retry-After"] == "1"
        assert slow.peak_streams == 2 and slow.throttled == 1
    finally:
        for s in socks:
            s.close()
    _wait(lambda: slow.streams == 0, "the abandoned bodies to end")
    status, _, body = get(slow, "/big.bin", {"Range": "bytes=0-9"})
    assert status == 206 and len(body) == 10


def test_runs_as_a_process_with_control_endpoints(tmp_path: Path, data: bytes) -> None:
    proc = subprocess.Popen(
        command("capped", "--root", str(tmp_path), "--per-connection", "50MB", "--port", "0"),
        stdout=subprocess.PIPE,
        text=True,
        env=environ(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY ")
        port = int(line.split()[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/__throttle", body=json.dumps({"status": 429, "count": 1}))
        assert conn.getresponse().read() == b"ok\n"
        conn.request("GET", "/big.bin", headers={"Range": "bytes=0-99"})
        resp = conn.getresponse()
        assert resp.status == 429
        resp.read()
        conn.request("GET", "/big.bin", headers={"Range": "bytes=0-99"})
        resp = conn.getresponse()
        assert resp.status == 206 and resp.read() == data[:100]
        conn.request("GET", "/__stats")
        stats = json.loads(conn.getresponse().read())
        assert stats["throttled"] == 1 and stats["bytes_served"] == 100
        conn.request("POST", "/__throttle", body=b'{"status": 418}')
        resp = conn.getresponse()
        assert resp.status == 400 and b"status must be" in resp.read()
        conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_bad_flags_are_one_error_line(tmp_path: Path) -> None:
    for args in (["--per-connection", "fast"], ["--per-connection", "0"]):
        result = subprocess.run(
            command("capped", "--root", str(tmp_path), *args),
            capture_output=True,
            text=True,
            timeout=30,
            env=environ(),
        )
        assert result.returncode == 2
        assert "error:" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        command("capped", "--root", str(tmp_path / "none")),
        capture_output=True,
        text=True,
        timeout=30,
        env=environ(),
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ")
