"""The node's dataset status against a real store: what it answers matches a scan of
every file at every step, yet a question costs a look at the objects that changed since
the last one, not at every file (a scrape or heartbeat on a node with many files)."""

from __future__ import annotations

import random
from pathlib import Path

import trio
from storefixtures import content, fill, oid

from syncbit.chunks import digest
from syncbit.manifest import FileEntry, Manifest, build_manifest
from syncbit.node.status import Status
from syncbit.store import ObjectStore, PresenceChanges, StoredObject

CS = 4096


class Marks:
    """The fetch layer's broken and verified marks, set by the test."""

    def __init__(self) -> None:
        self.broken: set[str] = set()
        self.verified: set[str] = set()

    def is_broken(self, object_id: str) -> bool:
        return object_id in self.broken

    def is_verified(self, object_id: str) -> bool:
        return object_id in self.verified


class Counting:
    """The store as status sees it, counting the objects looked up."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.looked_up = 0

    @property
    def presence(self) -> PresenceChanges:
        return self.store.presence

    def get(self, object_id: str) -> StoredObject | None:
        self.looked_up += 1
        return self.store.get(object_id)


class Empty:
    """A store that holds nothing."""

    presence = PresenceChanges()

    def get(self, object_id: str) -> StoredObject | None:
        return None


def _size(n: int) -> int:
    return CS * (1 + n % 3) + n  # 2 to 4 chunks, the last one short


def _manifest(name: str, objects: list[int], sha: set[int] = frozenset()) -> Manifest:  # type: ignore[assignment]
    files = [
        FileEntry(
            path=f"f{n}.bin",
            size=_size(n),
            object=oid(n),
            locator=f"f{n}.bin",
            version={"sha256": "x" * 64} if n in sha else {},
        )
        for n in objects
    ]
    files.append(FileEntry(path="empty", size=0, object=oid(0), locator="empty"))
    return build_manifest(name, "file:///data/", files, chunk_size=CS)


async def _first_chunk(store: ObjectStore, n: int, flush: bool) -> None:
    """Store the first chunk of object `n` only (written; durable once flushed)."""
    obj = store.object(oid(n), _size(n), CS)
    chunk = content(n, _size(n))[:CS]
    await store.store_chunk(obj, 0, memoryview(chunk), digest(chunk))
    if flush:
        await store.flush()


def _scan(store: ObjectStore, marks: Marks, manifest: Manifest) -> tuple[bool, int]:
    """(ready, bytes held) the way a scan of every file finds them."""
    ready, held = True, 0
    for entry in manifest.files:
        if not entry.size:
            continue
        obj = store.get(entry.object)
        whole = obj is not None and len(obj.durable) == obj.chunks
        if not whole or entry.object in marks.broken:
            ready = False
        if entry.version.get("sha256") and entry.object not in marks.verified:
            ready = False
    for object_id in {f.object for f in manifest.files if f.size}:
        obj = store.get(object_id)
        held += obj.bytes_in(obj.written) if obj is not None else 0
    return ready, held


def test_status_matches_a_scan_of_every_file(tmp_path: Path) -> None:
    async def main() -> None:
        rng = random.Random(7)
        store = ObjectStore.open(tmp_path / "cache", 1 << 30)
        marks = Marks()
        status = Status(store, marks, 2.0, lambda: True)
        manifests = {
            "a": _manifest("a", [1, 2, 3, 4], sha={2, 3}),
            "b": _manifest("b", [3, 4, 5], sha={5}),  # shares 3 and 4 with a
        }
        status.set_datasets(manifests)
        try:
            for step in range(200):
                n = rng.randint(1, 6)
                action = rng.choices(
                    ["fill", "part", "discard", "verify", "break", "swap", "pin"],
                    [6, 3, 3, 3, 1, 1, 2],
                )[0]
                if action == "fill":
                    await fill(store, n, _size(n), CS)
                elif action == "part":
                    await _first_chunk(store, n, flush=rng.random() < 0.5)
                elif action == "discard" and (obj := store.get(oid(n))) is not None:
                    await store.discard(obj)
                elif action == "verify":
                    marks.verified.add(oid(n))  # the fetch layer only wakes waiters
                elif action == "break":
                    marks.broken.add(oid(n))
                    status.object_changed(oid(n))
                elif action == "swap":
                    manifests = {**manifests, "b": _manifest("b", sorted({n, 6}))}
                    status.set_datasets(manifests)
                elif action == "pin":  # any objects: listed or not (an older plan's)
                    sizes = {oid(k): _size(k) for k in rng.sample(range(1, 8), 3)}
                    store.set_pins(sizes, sizes)
                    status.set_pins(sizes)
                usage = store.usage()  # the store's own count of the pinned objects
                assert status.pinned() == (usage["pinned"], usage["pinned_size"])
                for name, manifest in manifests.items():
                    ready, held = _scan(store, marks, manifest)
                    assert status.ready(name) is ready, (step, action, name)
                    assert status.present(name) == held, (step, action, name)
                    assert status.is_ready(manifest) is ready
                assert status.ready_datasets() == {
                    n: m.revision for n, m in manifests.items() if _scan(store, marks, m)[0]
                }
        finally:
            store.close()

    trio.run(main)


def test_a_question_looks_only_at_objects_that_changed(tmp_path: Path) -> None:
    async def main() -> None:
        store = ObjectStore.open(tmp_path / "cache", 1 << 30)
        counting = Counting(store)
        status = Status(counting, Marks(), 2.0, lambda: True)
        try:
            for n in range(1, 201):
                await fill(store, n, _size(n), CS)
            status.set_datasets({"big": _manifest("big", list(range(1, 202)))})
            assert counting.looked_up == 201  # each object once, when the version arrives
            assert not status.ready("big") and status.attrs("big")["user.syncbit.ready"] == "0"
            before = counting.looked_up
            status.set_pins({oid(n): _size(n) for n in range(1, 101)})  # listed: no lookups
            for _ in range(10):  # scrapes, heartbeats, xattrs, progress: nothing changed
                status.pinned()
                status.datasets()
                status.ready_datasets()
                status.attrs("big")
            assert counting.looked_up == before
            await fill(store, 201, _size(201), CS)  # the one missing object lands
            assert status.ready("big") and status.present("big") == sum(
                _size(n) for n in range(1, 202)
            )
            assert counting.looked_up == before + 1
            assert status.pinned() == (sum(_size(n) for n in range(1, 101)),) * 2
        finally:
            store.close()

    trio.run(main)


def test_readiness_needs_the_mount_and_a_recent_heartbeat() -> None:
    async def main() -> None:
        mounted = False
        status = Status(Empty(), Marks(), 2.0, lambda: mounted)
        assert status.readiness() == (False, "not mounted yet")
        mounted = True
        assert status.readiness()[0] is False  # never heard from the scheduler
        status.heard()
        assert status.readiness() == (True, "ok")
        await trio.sleep(3 * 2.0 + 6)
        ready, why = status.readiness()
        assert not ready and why == "no answer from the scheduler for 12s"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
