"""Dataset resolution for `POST /v1/datasets`: list a source inside the scheduler's fences
and freeze the listing (filtered by the dataset's include/exclude globs) into a manifest.

Blocking (it runs its own trio loop): the API calls it in a worker thread. The manifest
keeps the source without credentials and no secret option: those serve this listing only.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import trio

from syncbit.errors import SourceUnavailableError
from syncbit.manifest import Manifest, build_manifest
from syncbit.protocol import RESOLVE_TIMEOUT
from syncbit.sources.base import Listing, open_source
from syncbit.sources.fences import Fences
from syncbit.sources.options import public_options, public_source, validate_options


def resolve_dataset(
    name: str,
    source: str,
    options: dict[str, Any],
    chunk_size: int,
    timeout: float = RESOLVE_TIMEOUT,
    fences: Fences | None = None,
) -> Manifest:
    """List `source` (blocking: runs its own trio loop in the calling thread) inside
    `fences` and freeze the listing into a manifest. The manifest keeps the source without
    credentials and no secret option: those serve this listing only. Raises UserError for
    bad input, SourceError for source failures.
    """
    public, _ = public_source(source)

    async def listing() -> Manifest:
        src = open_source(source, options, fences)
        try:
            with trio.fail_after(timeout):
                result = await src.list()
        except trio.TooSlowError:
            raise SourceUnavailableError(
                f"source {public} did not finish listing within {timeout:.0f}s"
            ) from None
        finally:
            src.close()
        parsed = validate_options(source, options)
        result = _filtered(result, parsed.get("include") or [], parsed.get("exclude") or [])
        return build_manifest(
            name,
            public,
            result.files,
            result.dirs,
            chunk_size=chunk_size,
            source_options=public_options(source, parsed),
            dir_perms=result.dir_perms,
        )

    manifest: Manifest = trio.run(listing)
    return manifest


def _filtered(listing: Listing, include: list[str], exclude: list[str]) -> Listing:
    """The files a dataset's `include`/`exclude` globs keep (for every scheme; `*` also
    crosses `/`). With a filter, directories are those of the files kept."""
    if not include and not exclude:
        return listing

    def keep(path: str) -> bool:
        if include and not any(fnmatch.fnmatchcase(path, g) for g in include):
            return False
        return not any(fnmatch.fnmatchcase(path, g) for g in exclude)

    files = [f for f in listing.files if keep(f.path)]
    dirs = {parent for f in files for parent in _parents(f.path)}
    perms = {d: p for d, p in listing.dir_perms.items() if d == "" or d in dirs}
    return Listing(files=files, dirs=sorted(dirs), dir_perms=perms)


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


__all__ = ["RESOLVE_TIMEOUT", "resolve_dataset"]
