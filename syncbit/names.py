"""Dataset names: the one rule every command, API and mount path checks them by. Its own
module, free of pydantic, so that the command line's `pull --name`, `wait` and
`prefetch` check a name without loading the manifest models (~80 ms of every start).
"""

from __future__ import annotations

import re

from syncbit.errors import UnsafePathError

# Dataset names: one path component under the mount, a URL path segment, a label value
# and a shell word without quoting. Documented in the README ("Dataset names").
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


def validate_dataset_name(name: str) -> str:
    """`name` if it is a valid dataset name (`DATASET_NAME`), else UnsafePathError."""
    if isinstance(name, str) and DATASET_NAME.fullmatch(name):
        return name
    if not isinstance(name, str):  # a JSON number or list from an API client
        shown = f"of type {type(name).__name__}"
    else:
        shown = repr(name) if len(name) <= 140 else repr(name[:137] + "...")
    raise UnsafePathError(f"invalid dataset name {shown}: use {NAME_RULE}")


__all__ = ["DATASET_NAME", "NAME_RULE", "validate_dataset_name"]
