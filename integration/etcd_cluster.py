"""A real etcd cluster on loopback (Debian's `etcd-server`), for tests and benchmarks.

Owns starting, stopping, killing and always cleaning up the etcd processes it created (by
PID, never by name) and their data dirs; nothing here imports pytest. Every member has its
own free client and peer ports and data dir; heartbeat and election timeouts are short so
that a lost member or leader is noticed in well under a second.

    with EtcdCluster(workdir, size=3) as etcd:
        client = EtcdClient(etcd.endpoints)
        etcd.members[0].kill()          # SIGKILL by PID; the other two keep quorum
        etcd.members[0].start()         # rejoins with its data dir
        etcd.stop(1, 2)                 # no quorum
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

from integration.cluster import HOST, HarnessError, ManagedProcess, free_port, wait_until

ETCD = "etcd"
# Fast failure detection for tests: a leader is suspected after 500 ms without heartbeats.
# etcd derives its minimum lease TTL from these (1.5 election timeouts, rounded up: 1 s).
HEARTBEAT_MS = 50
ELECTION_MS = 500


def etcd_unavailable() -> str | None:
    """Why a real etcd cannot run here, or None if it can."""
    if shutil.which(ETCD) is None:
        return "etcd is not installed (apt-get install etcd-server)"
    return None


class EtcdMember(ManagedProcess):
    """One etcd member: its name, data dir, client and peer URLs (fixed for its life)."""

    def __init__(self, name: str, workdir: Path, extra_args: list[str] | None = None) -> None:
        super().__init__(f"etcd-{name}", workdir / "logs" / f"etcd-{name}.log")
        self.member_name = name
        self.extra_args = list(extra_args or [])
        self.paused = False
        self.data_dir = workdir / name
        self.client_port = free_port()
        self.peer_port = free_port()
        self._http = httpx.Client(timeout=2, trust_env=False)

    @property
    def client_url(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    def command(self, initial_cluster: str, token: str) -> list[str]:
        return [
            ETCD,
            f"--name={self.member_name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={initial_cluster}",
            "--initial-cluster-state=new",  # ignored once the data dir holds a member
            f"--initial-cluster-token={token}",
            f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}",
            "--logger=zap",
            "--log-outputs=stderr",
            *self.extra_args,
        ]

    def spawn(self, initial_cluster: str, token: str) -> None:
        self._spawn(self.command(initial_cluster, token))
        self.paused = False

    def healthy(self) -> bool:
        """True when this member answers /health with a leader and a quorum behind it."""
        if not self.alive:
            raise HarnessError(f"{self.name} exited\n{self.log_tail()}")
        try:
            resp = self._http.get(self.client_url + "/health")
            return resp.status_code == 200 and resp.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def status(self) -> dict[str, Any]:
        """The member's /v3/maintenance/status answer (leader id, raft term, revision...)."""
        resp = self._http.post(self.client_url + "/v3/maintenance/status", json={})
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait for it to exit."""
        if self.alive:
            self.terminate(timeout)

    def pause(self) -> None:
        """SIGSTOP: the process stays, its sockets stay open, it answers nothing."""
        self.kill(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.kill(signal.SIGCONT)
        self.paused = False

    def cleanup(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.kill(signal.SIGCONT)  # a stopped process dies of SIGKILL too; be sure
        super().cleanup()

    def close(self) -> None:
        self.cleanup()
        self._http.close()


class EtcdCluster:
    """`size` etcd members on loopback under `workdir` (`extra_args` go to every one); a
    context manager that always kills what it started and removes the data dirs (logs stay
    under `workdir/logs`)."""

    def __init__(self, workdir: Path, size: int = 3, extra_args: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.members = [EtcdMember(f"m{i}", self.workdir, extra_args) for i in range(size)]
        self.token = f"syncbit-test-{uuid.uuid4().hex[:12]}"
        self.initial_cluster = ",".join(f"{m.member_name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of every member, in member order."""
        return [m.client_url for m in self.members]

    @property
    def url(self) -> str:
        """The `--state` form: etcd://127.0.0.1:p0,127.0.0.1:p1,..."""
        return "etcd://" + ",".join(f"{HOST}:{m.client_port}" for m in self.members)

    def start(self, timeout: float = 60.0) -> EtcdCluster:
        """Start every member that is not running and wait until all of them are healthy
        (HarnessError with the log tails if one exits or the cluster does not form)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for member in self.members:
            if not member.alive:
                member.spawn(self.initial_cluster, self.token)
        self.wait_healthy(*range(len(self.members)), timeout=timeout)
        return self

    def restart(self, index: int, timeout: float = 60.0) -> None:
        """Start member `index` again with its data dir; wait until it is healthy."""
        member = self.members[index]
        member.spawn(self.initial_cluster, self.token)
        self.wait_healthy(index, timeout=timeout)

    def ensure_up(self, timeout: float = 60.0) -> None:
        """Every member running again (resumed, or started with its data dir) and healthy:
        what a test that stopped some leaves behind for the next one."""
        for member in self.members:
            if member.alive and member.paused:
                member.resume()
            elif not member.alive:
                member.spawn(self.initial_cluster, self.token)
        self.wait_healthy(*range(len(self.members)), timeout=timeout)

    def wait_healthy(self, *indexes: int, timeout: float = 60.0) -> None:
        """Until members `indexes` (all running ones when none given) report healthy."""
        chosen = [self.members[i] for i in indexes] or [m for m in self.members if m.alive]
        wait_until(
            lambda: all(m.healthy() for m in chosen),
            timeout,
            "etcd members " + ", ".join(m.member_name for m in chosen) + " healthy",
            interval=0.1,
            evidence=lambda: "\n\n".join(m.log_tail(15) for m in chosen),
        )

    def stop(self, *indexes: int) -> None:
        """SIGTERM members `indexes` and wait for them to exit."""
        for i in indexes:
            self.members[i].stop()

    def kill(self, *indexes: int) -> None:
        """SIGKILL members `indexes` (by PID) and wait for them to die."""
        for i in indexes:
            self.members[i].kill(signal.SIGKILL)

    def leader(self, timeout: float = 30.0) -> int:
        """Index of the member that is the raft leader now, as the running members see it."""

        def find() -> tuple[int] | None:
            ids: dict[str, int] = {}
            leaders: set[str] = set()
            for i, member in enumerate(self.members):
                if member.alive:
                    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                        status = member.status()
                        ids[status["header"]["member_id"]] = i
                        leaders.add(status["leader"])
            found = [ids[leader] for leader in leaders if leader in ids]
            return (found[0],) if len(found) == 1 and len(leaders) == 1 else None

        found = wait_until(find, timeout, "one etcd leader", interval=0.1)
        assert found is not None
        return found[0]

    def move_leader_away(self, index: int, timeout: float = 30.0) -> None:
        """If member `index` is the raft leader, hand leadership to another running member.

        Before pausing a member: etcd 3.4.23 (Debian's) has a bug where a raft leader that
        stalls and resumes still revokes the leases it saw expire while stalled, although
        the new leader renewed them (etcd issue 15247, fixed upstream in late 2023)."""
        if self.leader(timeout) != index:
            return
        target = next(m for i, m in enumerate(self.members) if i != index and m.alive)
        target_id = target.status()["header"]["member_id"]
        url = self.members[index].client_url + "/v3/maintenance/transfer-leadership"
        httpx.post(url, json={"targetID": target_id}, timeout=10).raise_for_status()
        wait_until(lambda: self.leader(timeout) != index, timeout, "etcd leadership moved")

    def log_tails(self, lines: int = 30) -> str:
        return "\n\n".join(m.log_tail(lines) for m in self.members if m.proc is not None)

    def close(self) -> None:
        """Kill every member still running and remove the data dirs. Safe to call twice."""
        for member in self.members:
            member.close()
        for member in self.members:
            shutil.rmtree(member.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaultyTransport(httpx.AsyncBaseTransport):
    """An httpx transport to real servers that fails on command, in process: requests to
    a host in `hang` ("*": every host) wait forever (a partition, or a stopped server);
    requests to paths in `drop_answers` reach the server, then their answer is lost (a
    read timeout). `requests` lists the path of every request, in order."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.hang: set[str] = set()
        self.drop_answers: set[str] = set()
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if "*" in self.hang or request.url.host in self.hang:
            await trio.sleep_forever()
        response = await self.inner.handle_async_request(request)
        if request.url.path in self.drop_answers:
            await response.aread()
            await response.aclose()
            raise httpx.ReadTimeout("answer dropped by the test", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
