"""Loading a benchmark script (bench/*.py) as a module, for tests of its own logic: the
scripts are not a package and import their neighbours by name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str, module: str | None = None) -> Any:
    """bench/`name`.py as a module registered as `module` (default `name`): its
    dataclasses look their module up in sys.modules. bench/ goes on sys.path so that its
    own imports of its neighbours (_common, swarm, netns, ...) resolve."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    module = module or name
    spec = importlib.util.spec_from_file_location(module, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    return loaded
