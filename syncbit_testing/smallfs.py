"""Small real filesystems for full-disk tests: a tmpfs, or an ext4 image on a loop device,
mounted for the length of a `with` block, and a filler file that takes what is left.

Owns only what it mounts and creates: every mount is detached when the block ends, also
when it fails; the ext4 image file and the filler are the caller's to keep or delete
(they live where the caller says). Needs root (mount) and, for ext4, mkfs.ext4.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


class CannotMount(Exception):
    """This machine cannot mount the filesystem (no root, no loop devices, no mkfs):
    callers skip their test."""


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CannotMount(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def _unmount(mnt: Path) -> None:
    """Detach, lazily if still busy (a killed daemon's file may be open a moment longer)."""
    if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@contextlib.contextmanager
def small_fs(kind: str, mnt: Path, size_mib: int) -> Iterator[Path]:
    """Mount a `kind` ("tmpfs" or "ext4") filesystem of `size_mib` MiB at `mnt` (created);
    ext4 is made in `<mnt>.img`, removed afterwards. Raises CannotMount."""
    mnt.mkdir(parents=True, exist_ok=True)
    image = mnt.with_name(mnt.name + ".img")
    if kind == "tmpfs":
        _run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(mnt)])
    elif kind == "ext4":
        if shutil.which("mkfs.ext4") is None:
            raise CannotMount("mkfs.ext4 is not installed (e2fsprogs)")
        with open(image, "wb") as f:
            f.truncate(size_mib << 20)
        try:
            _run(["mkfs.ext4", "-q", "-F", str(image)])
            _run(["mount", "-o", "loop", str(image), str(mnt)])
        except CannotMount:
            image.unlink()
            raise
    else:
        raise ValueError(f"unknown filesystem kind {kind!r}")
    try:
        yield mnt
    finally:
        _unmount(mnt)
        with contextlib.suppress(FileNotFoundError):
            image.unlink()


def free_bytes(path: Path) -> int:
    """What any writer, root included, may still allocate there."""
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def takes_no_block(directory: Path) -> bool:
    """Whether the filesystem refuses even one more block, to root too (ext4 keeps a few
    for itself that `statvfs` still counts as free)."""
    probe = directory / ".probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    return False


def fill(path: Path, leave: int = 0) -> int:
    """Append to a filler file at `path` until its filesystem has less than `leave` bytes
    free plus a block (`leave=0`: until the last block is taken: ENOSPC, as root). Returns
    the bytes written."""
    written = 0
    with open(path, "ab") as f:
        for block in (1 << 20, 64 << 10, 4 << 10, 1):
            data = b"\0" * block
            while not leave or free_bytes(path.parent) - block >= leave:
                try:
                    written += os.write(f.fileno(), data)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return written
