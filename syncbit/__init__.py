"""syncbit: peer-assisted distribution of large files through a lazy read-only FUSE mount."""

__version__ = "0.1.0"
