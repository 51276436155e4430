"""Dataset sources: one module per URI scheme behind the `Source` interface in `base`."""

from syncbit.sources.base import Listing, Source, open_source, register

__all__ = ["Listing", "Source", "open_source", "register"]
