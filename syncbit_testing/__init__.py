"""Test and benchmark servers that run for real on loopback: an HTTP origin (plain and
rate-capped), a Hugging Face Hub, a Kubernetes API, small real filesystems.

Not part of the product: it lives beside `syncbit/`, outside the wheel and the image, and
nothing in `syncbit/` imports it (tests check both). Nothing here may listen beyond the
address it is given. It is found from the checkout: tests put the repository root on the
path (pytest's `pythonpath`), and a server run as a child process gets it from `command`
and `environ`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from syncbit_testing.origin import Origin

__all__ = ["CHECKOUT", "Origin", "command", "environ"]

CHECKOUT = Path(__file__).resolve().parent.parent  # the repository that holds this package


def command(module: str, *args: str) -> list[str]:
    """The argv that runs `python -m syncbit_testing.<module> ARGS` with this interpreter;
    start it with `environ()` so it imports this package wherever it runs."""
    return [sys.executable, "-m", f"{__name__}.{module}", *args]


def environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the checkout on PYTHONPATH, after
    any entries already there: a child process finds `syncbit_testing` (which no install
    provides) whatever its working directory."""
    env = dict(os.environ if base is None else base)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(CHECKOUT) not in paths:
        paths.append(str(CHECKOUT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m syncbit_testing.origin` does not find its own
    # module already in sys.modules (runpy warns about that).
    if name == "Origin":
        from syncbit_testing.origin import Origin

        return Origin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
