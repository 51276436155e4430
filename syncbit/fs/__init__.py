"""The read-only FUSE filesystem: inode tree, pyfuse3 operations, mount handling."""
