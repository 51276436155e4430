"""A shaped virtual LAN of network namespaces, so a multi-node run on one machine is bound by
its links rather than by loopback: one "hub" namespace holds a bridge, every host (origin,
scheduler, node1..N) gets its own namespace and a veth to the bridge, and `tc` caps each link
in both directions. Owns creating and always deleting those namespaces (and ending what still
runs inside them); it never touches the root namespace's interfaces and leaves no process of
its own running.

    with Topology(rate="400mbit") as topo:
        origin = topo.add_host("origin")
        node = topo.add_host("node1")
        subprocess.run(node.argv(["curl", f"http://{origin.address}:8080/"]))

Interface names live inside the namespaces, so only namespace names are global; they carry
the creating PID (`sbnet-<pid>-<n>-<host>`), which is how a later run recognises and reaps
the leftovers of a run that was killed before it could clean up.

Commands enter a host with `nsenter --net=/run/netns/NAME`, not `ip netns exec`: the latter
also unshares the mount namespace, which would hide a FUSE mount made inside it from
everything outside.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

FAMILY = "sbnet"
_STALE = re.compile(rf"^{FAMILY}-(\d+)-\d+-")
_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(bit|kbit|mbit|gbit)\s*", re.I)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
# Bytes a link may send at line speed after idling. veth hands the qdisc GSO packets of up to
# 64 KiB, so a bucket smaller than a few of them would make the shaper stutter.
_MIN_BURST = 256 * 1024
_BURST_SECONDS = 0.004
_MIN_QUEUE = 256 * 1024
_QUEUE_SECONDS = 0.005

_GET = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:\n"
    "    sys.stdout.buffer.write(r.read())"
)

_counter = 0


class NetnsError(RuntimeError):
    """A namespace, link or shaping command failed (with the command and its stderr)."""


def unusable() -> str | None:
    """Why shaped namespaces cannot be built here, or None if they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 util-linux)"
    return None


def parse_rate(rate: str) -> int:
    """A `tc` bit rate ('400mbit', '1gbit', '2.5gbit', '800kbit') in bits per second.

    Only bit units are taken: tc reads 'mbps' as megaBYTES per second, a classic trap.
    """
    match = _RATE.fullmatch(rate)
    if not match:
        raise ValueError(f"not a rate: {rate!r} (use e.g. 400mbit, 1gbit)")
    return int(float(match.group(1)) * _RATE_UNITS[match.group(2).lower()])


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _namespaces() -> list[str]:
    # `ip netns list` prints "name" or "name (id: 3)", newest first.
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a killed run whose parent has not
    reaped it yet is gone for our purposes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _delete_namespace(name: str) -> None:
    """Kill what still runs inside namespace `name` (by PID) and delete it. Never raises.

    A namespace lives on as long as a process is in it, so deleting the name alone would
    leave the processes of a killed run running on a dead link.
    """
    with contextlib.suppress(NetnsError):
        for pid in _run("ip", "netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(NetnsError):
        _run("ip", "netns", "delete", name)


def reap_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose creating process is gone; their names."""
    reaped = []
    for name in _namespaces():
        match = _STALE.match(name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            _delete_namespace(name)
            reaped.append(name)
    return reaped


def _shape(netns: str, dev: str, bits_per_second: int) -> None:
    """Cap the egress of `dev` at `bits_per_second`: an htb class (it shapes GSO packets
    without splitting them, unlike tbf) over a short byte FIFO. The FIFO is a switch port's
    few milliseconds of buffer: the default 1000-packet queue let bulk transfers delay a
    small request by ~20 ms at 400mbit, this one by ~1 ms at the same throughput."""
    rate = f"{bits_per_second}bit"
    burst = str(max(_MIN_BURST, int(bits_per_second / 8 * _BURST_SECONDS)))
    limit = str(max(_MIN_QUEUE, int(bits_per_second / 8 * _QUEUE_SECONDS)))
    tc = ("tc", "-n", netns)
    _run(*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
    htb = ("rate", rate, "ceil", rate, "burst", burst, "cburst", burst)
    _run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", *htb)
    _run(*tc, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "bfifo", "limit", limit)


@dataclass(frozen=True)
class Host:
    """One host on the LAN: its own network namespace, one interface `eth0` at `address`."""

    name: str
    netns: str
    address: str
    rate: int | None  # bits per second each way; None for an unshaped link

    def argv(self, cmd: list[str]) -> list[str]:
        """`cmd` run inside this host's network namespace (and nothing else's)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *cmd]

    def http_get(self, url: str, timeout: float = 10.0) -> bytes:
        """The body of `url` requested from inside this host, the only place the LAN's
        addresses are reachable; NetnsError unless it answers 2xx in `timeout` seconds."""
        argv = self.argv([sys.executable, "-c", _GET, url, str(timeout)])
        done = subprocess.run(argv, capture_output=True, timeout=timeout + 10)
        if done.returncode != 0:
            error = done.stderr.decode(errors="replace").strip().splitlines()
            raise NetnsError(f"GET {url} from {self.name}: {error[-1] if error else '?'}")
        return done.stdout


@dataclass(frozen=True)
class Port:
    """The counters of a host's port on the bridge, since the port was made."""

    to_host: int  # bytes the port delivered to the host (its download)
    from_host: int  # bytes the host sent into the bridge (its upload)
    dropped: int  # packets the port's queue dropped on the way to the host

    @staticmethod
    def deltas(before: dict[str, Port], after: dict[str, Port]) -> dict[str, Port]:
        """What each host's port counted between two `Topology.ports` looks."""
        return {
            name: Port(
                now.to_host - before[name].to_host,
                now.from_host - before[name].from_host,
                now.dropped - before[name].dropped,
            )
            for name, now in after.items()
            if name in before
        }


class Topology:
    """A bridge in a hub namespace and hosts attached to it, shaped at `rate` per direction.

    Addresses come from `subnet` in the order hosts are added (.1, .2, ...). Entering reaps
    leftovers of killed earlier runs and creates the hub; leaving deletes every namespace this
    object created, killing any process still inside (also after an exception).
    """

    def __init__(self, rate: str | None, subnet: str = "10.77.0.0/24") -> None:
        global _counter
        _counter += 1
        self.rate = None if rate is None else parse_rate(rate)
        self.prefix = f"{FAMILY}-{os.getpid()}-{_counter}"
        self.hub = f"{self.prefix}-hub"
        self.network = ipaddress.ip_network(subnet)
        self._free = self.network.hosts()
        self.hosts: dict[str, Host] = {}
        self._created: list[str] = []

    def __enter__(self) -> Topology:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def start(self) -> None:
        reap_stale()
        self._add_namespace(self.hub)
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")

    def add_host(self, name: str, shaped: bool = True) -> Host:
        """A new host `name` with a link to the bridge; capped at the topology's rate in both
        directions unless `shaped` is False (e.g. a scheduler carrying only control traffic).
        """
        if name in self.hosts or not re.fullmatch(r"[a-z0-9]{1,12}", name):
            raise ValueError(f"host name {name!r} is taken or not 1-12 of [a-z0-9]")
        host = Host(
            name,
            f"{self.prefix}-{name}",
            str(next(self._free)),
            self.rate if shaped else None,
        )
        port = f"p-{name}"  # the bridge side, inside the hub namespace
        self._add_namespace(host.netns)
        hub = ("ip", "-n", self.hub)
        _run(*hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _run(*hub, "link", "set", port, "master", "br0")
        _run(*hub, "link", "set", port, "up")
        inner = ("ip", "-n", host.netns)
        _run(*inner, "addr", "add", f"{host.address}/{self.network.prefixlen}", "dev", "eth0")
        _run(*inner, "link", "set", "eth0", "up")
        if host.rate is not None:
            _shape(host.netns, "eth0", host.rate)  # what the host sends: its upload
            _shape(self.hub, port, host.rate)  # what the bridge sends it: its download
        self.hosts[name] = host
        return host

    def ports(self) -> dict[str, Port]:
        """Each host's port counters now (what the emulated switch saw: a byte a host sent
        that its receiver's port dropped counts in `from_host` and not in `to_host`)."""
        links = json.loads(_run("ip", "-n", self.hub, "-j", "-s", "link", "show"))
        qdiscs = json.loads(_run("tc", "-n", self.hub, "-s", "-j", "qdisc", "show"))
        drops: dict[str, int] = {}
        for q in qdiscs:
            if q.get("kind") == "bfifo":  # the port's queue, under its htb class
                drops[q["dev"]] = drops.get(q["dev"], 0) + int(q.get("drops", 0))
        out: dict[str, Port] = {}
        for link in links:
            name = link.get("ifname", "")
            if name.startswith("p-"):
                stats = link["stats64"]
                out[name[2:]] = Port(
                    stats["tx"]["bytes"], stats["rx"]["bytes"], drops.get(name, 0)
                )
        return out

    def close(self) -> None:
        """Delete every namespace this topology created. Safe to call twice; never raises."""
        while self._created:
            _delete_namespace(self._created.pop())
