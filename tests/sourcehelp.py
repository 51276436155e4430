"""Helpers the source tests share: a tree of files on disk, a range read through a source
(in a worker thread, as the fetcher reads), a listing indexed by path."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import trio

from syncbit.manifest import FileEntry
from syncbit.sources import Source


def write_tree(root: Path, files: Mapping[str, bytes], empty_dirs: Iterable[str] = ()) -> Path:
    """`files` (relative path -> bytes) and `empty_dirs` under `root`; returns `root`."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for rel in empty_dirs:
        (root / rel).mkdir(parents=True)
    return root


async def read(source: Source, entry: FileEntry, offset: int, length: int) -> bytes:
    """`length` bytes of `entry` at `offset`, read by `source` in a worker thread."""
    buf = bytearray(length)
    await trio.to_thread.run_sync(source.read_into, entry, offset, memoryview(buf))
    return bytes(buf)


def by_path(files: Iterable[FileEntry]) -> dict[str, FileEntry]:
    return {f.path: f for f in files}
