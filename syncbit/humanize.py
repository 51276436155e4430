"""Text for people, the one formatter of the code base: byte counts, seconds and tables as
the CLI and log lines show them, and durations as people type them (`30m`). Stdlib only,
no I/O (`syncbit wait` imports it); never used for machine output (JSON keeps numbers).
"""

from __future__ import annotations

import re

from syncbit.errors import UserError

__all__ = ["parse_duration", "seconds_text", "size_text", "table"]

_UNITS = ("B", "KiB", "MiB", "GiB")
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def size_text(n: float) -> str:
    """Bytes for people, in binary units: `512 B`, `1.5 KiB`, `4.0 MiB`, `1.2 TiB`."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def seconds_text(seconds: float) -> str:
    """A measured span for people, to the second: `6s`, `3600s`."""
    return f"{seconds:.0f}s"


def parse_duration(value: str) -> float:
    """'30m', '1h', '90s', '1h30m', '7d', '45' (seconds) -> seconds; UserError otherwise."""
    text = value.strip().lower()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return float(text)
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)([dhms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UserError(f"not a duration: {value!r} (use e.g. 30m, 1h, 90s, 7d)")
    return sum(float(n) * _SECONDS[u] for n, u in parts)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)
