"""Chunk math and chunk digests: pure functions shared by the store, fetcher and scheduler.

An object of `size` bytes is cut into chunks of `chunk_size` bytes; the last one may be
shorter. Never does I/O.
"""

from __future__ import annotations

import blake3
from typing_extensions import Buffer

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks of an object; an empty object has none."""
    return (size + chunk_size - 1) // chunk_size


def chunk_length(size: int, chunk_size: int, index: int) -> int:
    """Length in bytes of chunk `index` (the last chunk may be short)."""
    if index < 0 or index >= chunk_count(size, chunk_size):
        raise IndexError(f"chunk {index} out of range for size {size}")
    return min(chunk_size, size - index * chunk_size)


def chunk_span(offset: int, length: int, size: int, chunk_size: int) -> range:
    """Indexes of the chunks covering [offset, offset+length), clipped to the object."""
    end = min(offset + length, size)
    if offset >= end:
        return range(0)
    return range(offset // chunk_size, (end - 1) // chunk_size + 1)


def digest(data: Buffer) -> str:
    """Hex BLAKE3 digest of a chunk. Large inputs hash with the GIL released."""
    return blake3.blake3(data, max_threads=1).hexdigest()


def identity_digest(*parts: str) -> str:
    """Stable content identity from the parts that prove two files hold the same bytes."""
    return blake3.blake3("\x00".join(parts).encode()).hexdigest()


HEAD_SAMPLE = 64 * 1024
"""Bytes at the start of a file whose digest a listing records (`version["head"]`) for
sources that cannot prove a file's content by themselves (an HTTP ETag may stay the same
while the bytes change): every source read of such a file checks the head still matches."""


def head_length(size: int) -> int:
    """How many bytes of a `size`-byte file the head sample covers."""
    return min(HEAD_SAMPLE, size)
