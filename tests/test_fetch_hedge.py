"""Hedged transfers on loopback: a holder that stalls mid-chunk is overtaken by another
holder long before the read deadline, its transfer is aborted (the stalled server sees the
connection shut), and the chunk is stored once, verified; the same for an HTTP origin's
stalled read, asked again on a second connection."""

from __future__ import annotations

import contextlib
import functools
import re
import select
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trio
from fakes import Directory, MemSource

from syncbit.chunks import digest
from syncbit.fetch import Fetcher, Priority
from syncbit.manifest import FileEntry
from syncbit.peer import PeerClient
from syncbit.protocol import Peer
from syncbit.sources.http import HttpSource
from syncbit.store import ObjectStore
from syncbit.wire import Abort, Pool

CS = 64 * 1024
CHUNKS = 40
DATA = bytes((i * 13 + i // 509) % 256 for i in range(CHUNKS * CS))
ENTRY = FileEntry(path="h.bin", size=len(DATA), object="ab" * 32, locator="h.bin")
DEADLINE = 30.0


class ChunkServer(ThreadingHTTPServer):
    """A peer's chunk service on loopback serving DATA's ranges; with `stall`, its first
    answer sends half the chunk (`silent`: nothing at all, as a stopped process's port)
    and then waits for the client to give up (`aborted`); with
    `pace`, every answer trickles in `pieces` even pieces over that many seconds (with
    `pace_first`, only the first answer: the others come at once). `stall_at` makes
    another answer than the first the stalling one, `fail_at` answers one with a 500."""

    daemon_threads = True

    def __init__(
        self,
        stall: bool,
        pace: float = 0.0,
        size: int = len(DATA),
        pieces: int = 20,
        silent: bool = False,
        pace_first: bool = False,
        stall_at: int = 1,
        fail_at: int = 0,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.stall = stall
        self.stall_at = stall_at  # which request stalls (with `stall`)
        self.fail_at = fail_at  # which request is answered 500 (0: none)
        self.silent = silent  # a stall that sends nothing, not even the headers
        self.pace = pace
        self.pace_first = pace_first
        self.pieces = pieces
        self.data = DATA[:size]  # the file it serves: DATA or its first `size` bytes
        self.requests = 0
        self.aborted = threading.Event()
        self.lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: ChunkServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return None  # quiet

    def do_GET(self) -> None:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        assert m is not None
        first, last = int(m[1]), int(m[2])
        with self.server.lock:
            self.server.requests += 1
            stall = self.server.stall and self.server.requests == self.server.stall_at
            paced = self.server.pace and (self.server.requests == 1 or not self.server.pace_first)
            fail = self.server.requests == self.server.fail_at
        if fail:
            self.send_error(500)
            return
        if stall and self.server.silent:
            self._wait_for_the_client()
            return
        data = self.server.data
        body = data[first : last + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if paced:
            step = -(-len(body) // self.server.pieces)
            for at in range(0, len(body), step):
                time.sleep(self.server.pace / self.server.pieces)
                self.wfile.write(body[at : at + step])
                self.wfile.flush()
            return
        if not stall:
            self.wfile.write(body)
            return
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self._wait_for_the_client()

    def _wait_for_the_client(self) -> None:
        """Stalled until the client shuts the connection (or a minute passes)."""
        readable, _, _ = select.select([self.connection], [], [], 60)
        if readable and not self.connection.recv(1):
            self.server.aborted.set()
        self.close_connection = True


@pytest.fixture
def servers() -> Iterator[tuple[ChunkServer, ChunkServer]]:
    slow, fast = ChunkServer(stall=True), ChunkServer(stall=False)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (slow, fast)]
    for t in threads:
        t.start()
    try:
        yield slow, fast
    finally:
        for s in (slow, fast):
            s.shutdown()
            s.server_close()


@contextlib.asynccontextmanager
async def running_fetcher(store: ObjectStore, holders: list[Peer]) -> AsyncIterator[Fetcher]:
    """A running fetcher whose chunk map names `holders` for every chunk of DATA."""
    directory = Directory()
    for i in range(CHUNKS):
        directory.info.digests[i] = digest(DATA[i * CS : (i + 1) * CS])
        directory.info.peers[i] = list(holders)
    # A peer timeout beyond the read deadline: without hedging the stall would fail it.
    peers = PeerClient(timeout=2 * DEADLINE)
    f = Fetcher(store, directory, peers, readahead_chunks=0, read_deadline=DEADLINE)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(f.run)
            yield f
            nursery.cancel_scope.cancel()
    finally:
        peers.close()


@pytest.fixture
async def fetcher(
    store: ObjectStore, servers: tuple[ChunkServer, ChunkServer]
) -> AsyncIterator[Fetcher]:
    slow, fast = servers
    holders = [Peer("slow", slow.address), Peer("fast", fast.address)]
    async with running_fetcher(store, holders) as f:
        yield f


async def test_a_holder_stalling_mid_chunk_is_overtaken_and_aborted(
    store: ObjectStore, fetcher: Fetcher, servers: tuple[ChunkServer, ChunkServer]
) -> None:
    slow, fast = servers
    source = MemSource(data=DATA)  # never read: every chunk has holders
    handle = fetcher.open(ENTRY, CS, source)
    read = 0
    # The two best holders are asked in random order (load spreading): read chunks until
    # the stalling one has been asked (1 - 2**-40 likely within the file).
    while read < CHUNKS and not slow.requests:
        with trio.fail_after(DEADLINE / 3):  # well within the read deadline
            got = await fetcher.read(handle, read * CS, CS)
        assert bytes(got) == DATA[read * CS : (read + 1) * CS]
        read += 1
    assert slow.requests == 1
    assert fetcher.stats["hedged"] >= 1 and fetcher.stats["aborted"] >= 1
    with trio.fail_after(DEADLINE):
        await trio.to_thread.run_sync(slow.aborted.wait, DEADLINE)
    assert slow.aborted.is_set()  # the stalled transfer was aborted, not waited out
    # Each chunk staged and counted once: the winner's bytes only.
    assert fetcher.stats["peer"] == read * CS
    assert fetcher.stats["source"] == 0 and source.reads == 0
    assert fast.requests == read  # the stalled chunk came from it after all
    obj = store.get(ENTRY.object)
    assert obj is not None
    with trio.fail_after(DEADLINE):
        while len(obj.written) < read:
            await trio.sleep(0.01)
    assert obj.written == set(range(read))
    assert store.read(obj, 0, read * CS) == DATA[: read * CS]


async def test_a_source_read_stalling_mid_chunk_is_asked_again_and_aborted(
    store: ObjectStore, servers: tuple[ChunkServer, ChunkServer]
) -> None:
    """An HTTP origin whose first answer stalls half-way: after the straggler delay the
    same range is asked on a second connection, that answer is staged (once, verified by
    the caller as any source read), and the stalled one is shut."""
    slow, _ = servers
    url = f"http://{slow.address}/h.bin"
    source = HttpSource(url)
    entry = FileEntry(path="h.bin", size=len(DATA), object=ENTRY.object, locator=url)
    f = Fetcher(store, Directory(), PeerClient(), readahead_chunks=0, read_deadline=DEADLINE)
    async with trio.open_nursery() as nursery:
        await nursery.start(f.run)
        handle = f.open(entry, CS, source)
        with trio.fail_after(DEADLINE / 3):  # well within the read deadline
            got = await f.read(handle, 0, CS)
        assert bytes(got) == DATA[:CS]
        with trio.fail_after(DEADLINE):
            await trio.to_thread.run_sync(slow.aborted.wait, DEADLINE)
        nursery.cancel_scope.cancel()
    source.close()
    assert slow.aborted.is_set()  # the stalled read was shut, not waited out
    assert slow.requests == 2
    assert f.stats["source_hedged"] == 1 and f.stats["source_aborted"] == 1
    assert f.stats["source"] == CS  # the winner's bytes only
    obj = store.get(ENTRY.object)
    assert obj is not None and store.read(obj, 0, CS) == DATA[:CS]


async def test_a_source_read_slow_but_about_to_finish_is_not_asked_again(
    store: ObjectStore,
) -> None:
    """An origin that sends every answer at a steady pace (a link every read shares):
    past the straggler delay (2 s while nothing is known) the read is nearly done, so it
    is waited for; a second request would only send the origin's bytes twice."""
    steady = ChunkServer(stall=False, pace=2.4)
    thread = threading.Thread(target=steady.serve_forever, daemon=True)
    thread.start()
    url = f"http://{steady.address}/h.bin"
    source = HttpSource(url)
    entry = FileEntry(path="h.bin", size=len(DATA), object=ENTRY.object, locator=url)
    f = Fetcher(store, Directory(), PeerClient(), readahead_chunks=0, read_deadline=DEADLINE)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(f.run)
            handle = f.open(entry, CS, source)
            with trio.fail_after(DEADLINE):
                got = await f.read(handle, 0, CS)
            nursery.cancel_scope.cancel()
    finally:
        source.close()
        steady.shutdown()
        steady.server_close()
    assert bytes(got) == DATA[:CS]
    assert steady.requests == 1 and f.stats["source_hedged"] == 0


async def test_source_reads_as_slow_as_those_beside_them_are_not_asked_again(
    store: ObjectStore,
) -> None:
    """Nothing known yet of the origin's reads, three on a link they share (each answer
    paced over 5 s): past the straggler delay (2 s) each still has ~3 s to go, more than
    the default's guess of a fresh read (1 s), but the reads beside it are no faster, and
    one alone has less than two delays to go: none is asked twice (at N=8 such second
    reads had the origin send 1.02-1.03x the dataset)."""
    # 100 pieces: a look at the rate (every 0.5 s) that sees no byte on a busy machine
    # would be a stall, and a stall is always asked again.
    origin = ChunkServer(stall=False, pace=5.0, size=3 * CS, pieces=100)
    thread = threading.Thread(target=origin.serve_forever, daemon=True)
    thread.start()
    url = f"http://{origin.address}/h.bin"
    source = HttpSource(url)
    entry = FileEntry(path="h.bin", size=3 * CS, object="cd" * 32, locator=url)
    f = Fetcher(store, Directory(), PeerClient(), readahead_chunks=0, source_batch=CS)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(f.run)
            with trio.fail_after(DEADLINE):
                await f.ensure(entry, CS, source, Priority.PREFETCH)
            nursery.cancel_scope.cancel()
    finally:
        source.close()
        origin.shutdown()
        origin.server_close()
    assert f.stats["source_hedged"] == 0 and origin.requests == 3
    obj = store.get(entry.object)
    assert obj is not None and store.read(obj, 0, 3 * CS) == DATA[: 3 * CS]


@contextlib.contextmanager
def one_chunk_origin(**options: Any) -> Iterator[tuple[ChunkServer, HttpSource, FileEntry]]:
    """An HTTP origin (a ChunkServer with `options`) of one chunk, its source and entry
    (an object of its own): the chunk is the file's start, so no read takes a head sample
    beside it."""
    origin = ChunkServer(size=CS, **options)
    thread = threading.Thread(target=origin.serve_forever, daemon=True)
    thread.start()
    url = f"http://{origin.address}/one.bin"
    source = HttpSource(url)
    try:
        obj = f"{origin.server_address[1]:064x}"
        yield origin, source, FileEntry(path="one.bin", size=CS, object=obj, locator=url)
    finally:
        source.close()
        origin.shutdown()
        origin.server_close()


async def test_a_prefetchs_slow_source_read_is_waited_for_until_a_reader_joins(
    store: ObjectStore,
) -> None:
    """Nothing known of the origin, one read alone, its answer paced over 8 s (a piece
    every 0.2 s, as on a link the whole cluster's first reads share): past the straggler
    delay (2 s) it still has ~6 s to go, more than twice the guess of a fresh read, yet a
    prefetch (nobody waits; a second read is the origin's bytes twice) waits for it, as it
    neither stalls nor trickles (TRICKLE: at 5 s it has 3 s to go). A reader that joins
    that read is not made to wait: the source is asked again, and the second answer, at
    once, serves it. Before, the prefetch asked again at 2 s."""
    paced = {"stall": False, "pace": 8.0, "pieces": 40, "pace_first": True}
    with one_chunk_origin(**paced) as (origin, source, entry):
        f = Fetcher(store, Directory(), PeerClient(), readahead_chunks=0, read_deadline=DEADLINE)
        async with trio.open_nursery() as nursery:
            await nursery.start(f.run)
            nursery.start_soon(f.ensure, entry, CS, source, Priority.PREFETCH)
            await trio.sleep(2.6)  # past the straggler delay and QUIET
            assert origin.requests == 1 and f.stats["source_hedged"] == 0
            with trio.fail_after(4.0):  # not the 5.4 s the first answer still takes
                got = await f.read(f.open(entry, CS, source), 0, CS)
            nursery.cancel_scope.cancel()
    assert bytes(got) == DATA[:CS]
    assert origin.requests == 2 and f.stats["source_hedged"] == 1


async def test_a_prefetchs_source_read_that_stalls_or_trickles_is_asked_again(
    store: ObjectStore,
) -> None:
    """A prefetch does not wait out an origin connection that stops sending half-way (after
    QUIET, 2 s, without a byte) nor one that trickles (a piece every 1.5 s, never quiet
    for QUIET: at TRICKLE, 5 s, its pace leaves a minute to go): the source is asked
    again, the stalled or trickling read shut, the chunk stored once."""
    with one_chunk_origin(stall=True) as (stalling, source, entry):
        f = Fetcher(store, Directory(), PeerClient(), readahead_chunks=0, read_deadline=DEADLINE)
        async with trio.open_nursery() as nursery:
            await nursery.start(f.run)
            with trio.fail_after(DEADLINE / 3):
                await f.ensure(entry, CS, source, Priority.PREFETCH)
            with trio.fail_after(DEADLINE):
                await trio.to_thread.run_sync(stalling.aborted.wait, DEADLINE)
            nursery.cancel_scope.cancel()
    assert stalling.requests == 2 and f.stats["source_hedged"] == 1
    assert f.stats["source_aborted"] == 1 and f.stats["source"] == CS
    trickle = {"stall": False, "pace": 60.0, "pieces": 40, "pace_first": True}
    with one_chunk_origin(**trickle) as (sick, source, entry):
        g = Fetcher(store, Directory(), PeerClient(), readahead_chunks=0, read_deadline=DEADLINE)
        async with trio.open_nursery() as nursery:
            await nursery.start(g.run)
            start = trio.current_time()
            with trio.fail_after(DEADLINE / 3):
                await g.ensure(entry, CS, source, Priority.PREFETCH)
            took = trio.current_time() - start
            nursery.cancel_scope.cancel()
    assert sick.requests == 2 and g.stats["source_hedged"] == 1 and g.stats["source"] == CS
    assert took >= 5.0  # not asked again before TRICKLE
    obj = store.get(entry.object)
    assert obj is not None and store.read(obj, 0, CS) == DATA[:CS]


async def test_a_stalled_source_read_whose_second_read_failed_is_asked_once_more(
    store: ObjectStore,
) -> None:
    """A prefetch's source read stalls half-way; the second read sent beside it is
    answered 500: the race keeps looking at the stalled read and asks once more (the
    budget allows it after one transfer of the origin went well), and that answer brings
    the chunk while the stalled read is shut. Before, the race stopped looking once the
    second read failed, and the prefetch waited for the stalled connection to time out."""
    with one_chunk_origin(stall=True, stall_at=2, fail_at=3) as (origin, source, entry):
        first = entry.model_copy(update={"object": "ab" * 32})
        f = Fetcher(store, Directory(), PeerClient(), readahead_chunks=0, read_deadline=DEADLINE)
        async with trio.open_nursery() as nursery:
            await nursery.start(f.run)
            with trio.fail_after(DEADLINE / 3):
                await f.ensure(first, CS, source, Priority.PREFETCH)  # request 1: well
                await f.ensure(entry, CS, source, Priority.PREFETCH)  # 2 stalls, 3 fails
            with trio.fail_after(DEADLINE):
                await trio.to_thread.run_sync(origin.aborted.wait, DEADLINE)
            nursery.cancel_scope.cancel()
    assert origin.requests == 4 and f.stats["source_hedged"] == 2
    obj = store.get(entry.object)
    assert obj is not None and store.read(obj, 0, CS) == DATA[:CS]


async def test_a_fresh_origins_stalled_read_whose_second_read_failed_is_asked_once_more(
    store: ObjectStore,
) -> None:
    """Nothing known of the origin: a reader's source read stalls half-way, the second
    read sent at the straggler delay is answered 500. It brought nothing, so it leaves the
    hedging budget (one hedge until a read of the origin completes) and the source is
    asked a third time, which serves the reader while the stalled read is shut. Before,
    the budget was spent and the read waited for the stalled connection's timeout."""
    with one_chunk_origin(stall=True, stall_at=1, fail_at=2) as (origin, source, entry):
        f = Fetcher(store, Directory(), PeerClient(), readahead_chunks=0, read_deadline=DEADLINE)
        async with trio.open_nursery() as nursery:
            await nursery.start(f.run)
            with trio.fail_after(DEADLINE / 3):  # not the connection's timeout
                got = await f.read(f.open(entry, CS, source), 0, CS)
            with trio.fail_after(DEADLINE):
                await trio.to_thread.run_sync(origin.aborted.wait, DEADLINE)
            nursery.cancel_scope.cancel()
    assert bytes(got) == DATA[:CS]
    assert origin.requests == 3 and f.stats["source_hedged"] == 2


async def test_a_source_whose_reads_cannot_be_ended_is_not_hedged(store: ObjectStore) -> None:
    """A slow read from a source `Abort` cannot end (a local file, boto3) is waited for: a
    second read would leave two running."""
    source = MemSource(data=DATA)
    source.gate = threading.Event()
    f = Fetcher(store, Directory(), PeerClient(), readahead_chunks=0, read_deadline=DEADLINE)
    async with trio.open_nursery() as nursery:
        await nursery.start(f.run)
        handle = f.open(ENTRY, CS, source)
        nursery.start_soon(trio.to_thread.run_sync, _set_later, source.gate, 3.0)
        with trio.fail_after(DEADLINE):
            got = await f.read(handle, 0, CS)
        nursery.cancel_scope.cancel()
    assert bytes(got) == DATA[:CS]
    assert source.reads == 1 and f.stats["source_hedged"] == 0


def _set_later(event: threading.Event, seconds: float) -> None:
    time.sleep(seconds)
    event.set()


def test_a_transfer_counts_its_body_bytes_as_they_arrive(
    servers: tuple[ChunkServer, ChunkServer],
) -> None:
    """What the race judges a straggler by: `Abort.received` is the body bytes got, those
    that came in with the response head included (on loopback, usually some)."""
    _, fast = servers
    pool = Pool(timeout=10)
    try:
        for length in (100, CS):
            abort = Abort()
            buf = bytearray(length)
            resp = pool.get_into(f"http://{fast.address}/h.bin", 0, memoryview(buf), abort=abort)
            assert resp.status == 206 and bytes(buf) == DATA[:length]
            assert abort.received == length
    finally:
        pool.close()


@pytest.fixture
def stalling(request: pytest.FixtureRequest) -> Iterator[ChunkServer]:
    """The only holder, whose first answer stalls: half-way, or (param "silent") before
    it sends anything."""
    server = ChunkServer(stall=True, silent=getattr(request, "param", "") == "silent")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def lone_holder(store: ObjectStore, stalling: ChunkServer) -> AsyncIterator[Fetcher]:
    """A fetcher whose chunk map names `stalling` as every chunk's only holder."""
    async with running_fetcher(store, [Peer("stuck", stalling.address)]) as f:
        yield f


@pytest.mark.parametrize("stalling", ["silent", "half-way"], indirect=True)
async def test_a_readers_chunk_whose_only_holder_stalls_comes_from_the_source(
    lone_holder: Fetcher, stalling: ChunkServer
) -> None:
    """No other holder to hedge with: past the straggler delay (1 s while nothing is
    known) the source serves it and the stalled transfer is aborted. One stall does not
    leave the holder out (a lost packet can cost a live one a second): it is asked for the
    next chunk again, which it sends."""
    source = MemSource(data=DATA)
    handle = lone_holder.open(ENTRY, CS, source)
    with trio.fail_after(DEADLINE / 10):  # it waited out the peer's timeout (60 s) before
        assert bytes(await lone_holder.read(handle, 0, CS)) == DATA[:CS]
    with trio.fail_after(DEADLINE):
        await trio.to_thread.run_sync(stalling.aborted.wait, DEADLINE)
    assert lone_holder.stats["hedged"] == 1 and lone_holder.stats["aborted"] == 1
    assert lone_holder.stats["source"] == CS and lone_holder.stats["peer"] == 0
    with trio.fail_after(1.0):
        assert bytes(await lone_holder.read(handle, CS, CS)) == DATA[CS : 2 * CS]
    assert stalling.requests == 2 and lone_holder.stats["peer"] == CS


@pytest.mark.parametrize("stalling", ["silent", "half-way"], indirect=True)
async def test_a_prefetch_gives_up_its_stalled_only_holder_and_reads_the_source(
    lone_holder: Fetcher, stalling: ChunkServer
) -> None:
    """A prefetch planned to leave every source read to other nodes (a peer serves the
    chunks) meets the only holder stalled (a stopped node: nothing at all, or nothing more
    half-way): after QUIET without a byte it gives the holder up, leaves it out, and reads
    the source itself (no node would before the scheduler finds the holder down). Before,
    it waited out the peer's timeout (60 s here; 10 s by default) or the node timeout."""
    source = MemSource(data=DATA)
    with trio.fail_after(DEADLINE / 3):
        await lone_holder.ensure(ENTRY, CS, source, Priority.PREFETCH, may_source=lambda i: False)
    with trio.fail_after(DEADLINE):
        await trio.to_thread.run_sync(stalling.aborted.wait, DEADLINE)
    handle = lone_holder.open(ENTRY, CS, source)
    assert bytes(await lone_holder.read(handle, 0, len(DATA))) == DATA
    # It served the other chunks; the stalled one, and any asked for after it was left
    # out, came from the source.
    assert lone_holder.stats["unreachable"] == 1 and lone_holder.stats["aborted"] == 1
    assert source.reads >= 1 and lone_holder.stats["source"] >= CS
    assert lone_holder.stats["source"] + lone_holder.stats["peer"] == len(DATA)


async def test_a_prefetch_waits_for_its_slow_only_holder_until_a_reader_joins(
    store: ObjectStore,
) -> None:
    """A slow holder that keeps sending, about to finish within TRICKLE (5 s) more, is no
    stall and no trickle: past the straggler delay (1 s) and QUIET a prefetch's
    chunk still waits for it and does not go to the source (the origin's bytes once); a
    reader that joins that very transfer does not wait for it."""
    slow = ChunkServer(stall=False, pace=6.0, pieces=40)  # a piece every 0.15 s
    thread = threading.Thread(target=slow.serve_forever, daemon=True)
    thread.start()
    source = MemSource(data=DATA)
    try:
        async with (
            running_fetcher(store, [Peer("slow", slow.address)]) as f,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(
                functools.partial(f.ensure, may_source=lambda i: False),
                ENTRY,
                CS,
                source,
                Priority.PREFETCH,
            )
            await trio.sleep(2.5)  # past the straggler delay and QUIET
            assert source.reads == 0 and f.stats["unreachable"] == 0
            handle = f.open(ENTRY, CS, source)
            (running, *_) = [i for i in range(CHUNKS) if not handle.obj.has(i)]
            with trio.fail_after(DEADLINE / 10):
                got = await f.read(handle, running * CS, CS)
            assert bytes(got) == DATA[running * CS : (running + 1) * CS]
            assert source.reads == 1 and f.stats["hedged"] == 1
            nursery.cancel_scope.cancel()  # the rest of the prefetch: not waited for
    finally:
        slow.shutdown()
        slow.server_close()


async def test_a_prefetch_gives_up_its_trickling_only_holder(store: ObjectStore) -> None:
    """A sick holder that sends a piece every 1.5 s (never quiet for QUIET) would take a
    minute for the chunk: after TRICKLE (5 s), its pace leaving more than that to go, the
    prefetch reads the source instead, though its plan left the chunk to another node.
    The holder is not left out: it is slow, not stopped. Before, the prefetch waited the
    minute out."""
    sick = ChunkServer(stall=False, pace=60.0, pieces=40)
    thread = threading.Thread(target=sick.serve_forever, daemon=True)
    thread.start()
    source = MemSource(data=DATA)
    one = FileEntry(path="one.bin", size=CS, object="cd" * 32, locator="one.bin")
    try:
        async with running_fetcher(store, [Peer("sick", sick.address)]) as f:
            with trio.fail_after(DEADLINE / 3):
                await f.ensure(one, CS, source, Priority.PREFETCH, may_source=lambda i: False)
            assert bytes(await f.read(f.open(one, CS, source), 0, CS)) == DATA[:CS]
            assert source.reads == 1 and f.stats["source"] == CS and f.stats["peer"] == 0
            assert f.stats["hedged"] == 1 and f.stats["unreachable"] == 0
    finally:
        sick.shutdown()
        sick.server_close()


@pytest.mark.parametrize("stalling", ["silent"], indirect=True)
async def test_a_silent_holder_is_judged_by_its_first_byte_not_by_slow_transfers(
    lone_holder: Fetcher, stalling: ChunkServer
) -> None:
    """On a busy node whole transfers took seconds lately (the straggler delay, their p95,
    is 6 s here), yet a holder that has sent nothing for QUIET (2 s) is stalled: the
    read does not wait for the delay (in a full test run it waited 8 s and failed), and
    the holder is left out: the next chunk comes from the source at once."""
    hedging = lone_holder._transfers.race.hedging  # what recent transfers took
    for _ in range(16):
        hedging.record("peer", CS, 6.0)
    source = MemSource(data=DATA)
    handle = lone_holder.open(ENTRY, CS, source)
    with trio.fail_after(4.0):
        assert bytes(await lone_holder.read(handle, 0, CS)) == DATA[:CS]
    with trio.fail_after(1.0):
        assert bytes(await lone_holder.read(handle, CS, CS)) == DATA[CS : 2 * CS]
    assert stalling.requests == 1 and lone_holder.stats["source"] == 2 * CS
