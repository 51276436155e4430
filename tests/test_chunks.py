"""Chunk math and digests."""

import pytest

from syncbit.chunks import chunk_count, chunk_length, chunk_span, digest

CS = 4


@pytest.mark.parametrize(
    ("size", "count"), [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)]
)
def test_chunk_count(size: int, count: int) -> None:
    assert chunk_count(size, CS) == count


def test_chunk_length_last_chunk_is_short() -> None:
    assert [chunk_length(10, CS, i) for i in range(3)] == [4, 4, 2]
    with pytest.raises(IndexError):
        chunk_length(10, CS, 3)
    with pytest.raises(IndexError):
        chunk_length(0, CS, 0)


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 1, [0]),
        (0, 4, [0]),
        (3, 2, [0, 1]),
        (4, 4, [1]),
        (0, 100, [0, 1, 2]),  # clipped at the end of the object
        (9, 5, [2]),
        (10, 5, []),  # at EOF
        (50, 5, []),  # past EOF
        (2, 0, []),
    ],
)
def test_chunk_span(offset: int, length: int, expected: list[int]) -> None:
    assert list(chunk_span(offset, length, 10, CS)) == expected


def test_digest_is_cryptographic_and_stable() -> None:
    a = digest(b"hello")
    assert a == digest(memoryview(bytearray(b"hello")))
    assert len(a) == 64  # 256-bit BLAKE3
    assert a != digest(b"hellp")
