"""A file opened through the mount, as the fetch layer hands it out: what to read, where
its reads were, and the capability to let the kernel read the object file itself
(passthrough). Holds no transfer state and never reads bytes itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from syncbit.fetch.readahead import Readahead
from syncbit.manifest import FileEntry
from syncbit.sources.base import Source
from syncbit.store import BackingFile, Hold, StoredObject


@dataclass(eq=False)
class OpenFile:
    """A file opened through the mount: what to read, and where sequential reads were."""

    entry: FileEntry
    obj: StoredObject
    source: Source
    backing: BackingFile  # the object file, for the kernel to read itself
    readahead: Readahead = field(default_factory=Readahead)
    hold: Hold | None = None  # while open through the mount (`Fetcher.hold`)

    async def backing_fd(self) -> int | None:
        """A descriptor of the file's bytes for FUSE passthrough, or None while not every
        byte is here and verified. Valid until the caller's next checkpoint."""
        return await self.backing.fd()
