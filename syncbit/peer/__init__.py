"""The peer service: the chunk server other nodes fetch from (`server`), the client that
fetches from them behind a small transport (`client`), and the port's HTTP plumbing that
other routes on the same port share (`port`: async, in a loop of its own). Never returns
a peer's bytes unverified to a reader: the fetch layer checks every chunk against a known
digest first.

Wire format: `GET /v1/objects/<object>/data` with `Range: bytes=a-b` -> 206 and the bytes.
"""

from syncbit.peer.client import PeerClient, PeerTransport
from syncbit.peer.port import PortRequest, Route, error_answer, json_answer, plain
from syncbit.peer.server import LIMITS, PRIORITY_HEADER, PeerServer

__all__ = [
    "LIMITS",
    "PRIORITY_HEADER",
    "PeerClient",
    "PeerServer",
    "PeerTransport",
    "PortRequest",
    "Route",
    "error_answer",
    "json_answer",
    "plain",
]
