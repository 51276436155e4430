"""The read-only FUSE filesystem: inode tree, operations, the kernel protocol, mount handling."""
