"""Dataset sources: one module per URI scheme behind the `Source` interface in `base`."""

# Imported for its registration of oci://. (It belongs in base._BUILTIN, loaded on first
# use like the others; kept here until that file is free to edit.)
from syncbit.sources import oci as _oci  # noqa: F401
from syncbit.sources.base import Listing, Source, open_source, register

__all__ = ["Listing", "Source", "open_source", "register"]
