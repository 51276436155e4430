"""Mount-point housekeeping: stale-mount cleanup, mount options, kernel readahead.

Owns nothing but the mount point; never serves requests (that is `ops`), and never
unmounts a mount something still serves: only a stale one, whose server is gone.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from syncbit.errors import SyncbitError, UserError

log = logging.getLogger("syncbit.fs")

# Besides ro, nosuid, nodev, fsname and subtype, which the session always sets.
MOUNT_OPTIONS = "allow_other,default_permissions"


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    point: str  # where it is mounted
    root: str  # the directory of its filesystem mounted there (bind mounts)
    options: tuple[str, ...]  # per-mount options (ro, nosuid, ...)
    device: str  # major:minor
    fstype: str


def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mountinfo() -> list[MountInfo]:
    """Every mount of this mount namespace, in mount order (later ones on top)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            point, root = _unescape(fields[4]), _unescape(fields[3])
            out.append(MountInfo(point, root, tuple(fields[5].split(",")), fields[2], fstype))
    return out


def mounted_at(path: Path) -> MountInfo | None:
    """The topmost mount at exactly `path` (made absolute), or None."""
    target = str(path.absolute())
    found = None
    for entry in mountinfo():
        if entry.point == target:
            found = entry
    return found


def _mounts() -> list[tuple[str, str]]:
    return [(m.point, m.fstype) for m in mountinfo()]


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    return any(mnt == target for mnt, _ in _mounts())


_PROBE_TIMEOUT = 5.0  # seconds a live FUSE server gets to answer one stat


def probe_mount(path: Path, timeout: float = _PROBE_TIMEOUT) -> int | None:
    """statvfs() the mount at `path` from a helper thread: 0 when it answers, the errno
    when it fails (ENOTCONN: its FUSE server is gone), None when it does not answer within
    `timeout` (its server is alive but stuck; the thread is left behind, blocked).

    statvfs, not stat: the kernel answers a stat of the root from its attribute cache for
    a while even after the server died, while every STATFS goes to the server."""
    result: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            result.append(0)
        except OSError as exc:
            result.append(exc.errno or errno.EIO)

    thread = threading.Thread(target=probe, name="syncbit-mount-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else None


def clean_stale(path: Path, probe_timeout: float = _PROBE_TIMEOUT) -> None:
    """Before mounting at `path`: unmount a FUSE mount left there by a crashed daemon
    (its server is gone: ENOTCONN), and refuse (SyncbitError) a mount that something
    still serves, such as another live daemon: taking it over would pull the data from
    under that daemon's readers."""
    target = str(path.absolute())
    stale = [fs for mnt, fs in _mounts() if mnt == target]
    if not stale:
        return
    if not all(fs.startswith("fuse") for fs in stale):
        raise UserError(f"{path} is already a mount point of type {stale[0]}: refusing")
    answer = probe_mount(path, probe_timeout)
    if answer != errno.ENOTCONN:
        state = "does not answer" if answer is None else "is in use"
        raise SyncbitError(
            f"{path} is already mounted ({stale[-1]}) and {state}: another syncbit daemon "
            "serves it? Give this daemon its own --mount (or stop the other one first)"
        )
    log.warning("cleaning stale mount at %s", path)
    for cmd in (["fusermount3", "-u", "-z", target], ["umount", "-l", target]):
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)
            return
        except (OSError, subprocess.SubprocessError):
            continue
    raise SyncbitError(f"could not unmount stale mount at {path}")


def raise_readahead(path: Path, kb: int) -> None:
    """Raise the mount's bdi read_ahead_kb: larger FUSE reads, ~2x cold throughput.

    The device comes from mountinfo, not stat(): a stat of our own mount from the thread
    that serves it would deadlock.
    """
    if kb <= 0:
        return
    entry = mounted_at(path)
    if entry is None:
        log.warning("could not raise readahead: %s not in mountinfo", path)
        return
    knob = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
    try:
        knob.write_text(str(kb))
    except OSError as exc:
        log.warning("could not raise readahead on %s (%s): %s", path, knob, exc)
