"""The one formatter: sizes, seconds and tables as every command and log line shows them,
and durations as people type them."""

import pytest

from syncbit.errors import UserError
from syncbit.humanize import parse_duration, seconds_text, size_text, table


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (512.0 * 2**20, "512.0 MiB"),  # a rate: a float in, the same shapes out
        (3 * 2**30, "3.0 GiB"),
        (5 * 2**40, "5.0 TiB"),
        (2048 * 2**40, "2048.0 TiB"),  # no unit past TiB
        (-2048, "-2.0 KiB"),  # a shrinking count keeps its unit
    ],
)
def test_size_text(n: float, text: str) -> None:
    assert size_text(n) == text


def test_seconds_text_rounds_to_the_second() -> None:
    assert [seconds_text(s) for s in (0, 5.6, 3600)] == ["0s", "6s", "3600s"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45", 45), ("1.5", 1.5), ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("7d", 604800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1x", "m30", "1h 30m", "-5s", "1h30"])
def test_parse_duration_refuses_anything_else(text: str) -> None:
    with pytest.raises(UserError, match="not a duration"):
        parse_duration(text)


def test_table_pads_columns_and_strips_trailing_blanks() -> None:
    text = table(["NAME", "SIZE", "NOTE"], [["a", "1.0 GiB", ""], ["longer", "0 B", "x"]])
    assert text.splitlines() == [
        "NAME    SIZE     NOTE",
        "a       1.0 GiB",
        "longer  0 B      x",
    ]
