"""Test and benchmark helpers that run real servers on loopback.

Owns nothing the product depends on: no module under `syncbit/` outside `testing` may import
from here, and nothing here may listen beyond the address it is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from syncbit.testing.origin import Origin

__all__ = ["Origin"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m syncbit.testing.origin` does not find its own
    # module already in sys.modules (runpy warns about that).
    if name == "Origin":
        from syncbit.testing.origin import Origin

        return Origin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
