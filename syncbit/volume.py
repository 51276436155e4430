"""CSI-like volumes: bind-mount `/syncbit/<dataset>` read-only at a target path.

The semantics follow CSI NodePublishVolume / NodeUnpublishVolume: both are idempotent (a
second publish of the same dataset at the same target, or an unpublish of a target that
is not published, succeeds and changes nothing), the mount is read-only, and errors are
clean: an unknown dataset, a target that is already something else's mount point or not
empty, a target busy with open files. A record of what this host published lives in a
small JSON file under a lock, so `unpublish` refuses mounts it did not make and `ls`
lists what is published.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from syncbit.errors import NotFoundError, SyncbitError, UserError, VolumeBusyError
from syncbit.fs.mount import mounted_at

DEFAULT_STATE = Path("/run/syncbit/volumes.json")


@dataclass(frozen=True)
class Publication:
    dataset: str
    source: str
    target: str
    created: bool  # the target directory was made by publish (and goes with unpublish)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)


class Volumes:
    """Publish and unpublish dataset views on this host.

    Args:
        mount: the daemon's FUSE mount point (datasets are its subdirectories).
        state: the JSON record of publications (created with its parent directory).
    """

    def __init__(self, mount: Path, state: Path = DEFAULT_STATE) -> None:
        self.mount = mount
        self.state = state

    @contextlib.contextmanager
    def _records(self) -> Iterator[dict[str, dict[str, object]]]:
        """The publication records, locked for the block and saved atomically after it."""
        self.state.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{self.state}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                records: dict[str, dict[str, object]] = json.loads(self.state.read_text())
            except FileNotFoundError:
                records = {}
            except ValueError as exc:
                raise SyncbitError(f"volume records {self.state} are corrupt: {exc}") from exc
            before = json.dumps(records, sort_keys=True)
            yield records
            if json.dumps(records, sort_keys=True) != before:
                tmp = self.state.with_suffix(".tmp")
                tmp.write_text(json.dumps(records, indent=2, sort_keys=True))
                os.replace(tmp, self.state)
        finally:
            os.close(lock)

    def source(self, dataset: str) -> Path:
        if not dataset or "/" in dataset or dataset in (".", ".."):
            raise UserError(f"invalid dataset name {dataset!r}")
        if mounted_at(self.mount) is None:
            raise SyncbitError(f"no syncbit mount at {self.mount}: is the daemon running?")
        path = self.mount / dataset
        if not path.is_dir():
            raise NotFoundError(f"no dataset {dataset!r} under {self.mount}")
        return path

    def publish(self, dataset: str, target: Path) -> Publication:
        """Bind-mount the dataset read-only at `target` (created if missing); idempotent."""
        source = self.source(dataset)
        target = Path(os.path.abspath(target))
        with self._records() as records:
            record = records.get(str(target))
            current = mounted_at(target)
            if record is not None and current is not None:
                if record["dataset"] != dataset:
                    raise VolumeBusyError(
                        f"{target} already publishes dataset {record['dataset']}, not {dataset}"
                    )
                return Publication(**record)  # type: ignore[arg-type]
            if current is not None:
                raise VolumeBusyError(f"{target} is already a mount point (not published here)")
            created = bool(record and record.get("created"))  # a stale record's target
            if target.exists():
                if not target.is_dir():
                    raise UserError(f"target {target} exists and is not a directory")
                if any(target.iterdir()):
                    raise UserError(f"target {target} is not empty")
            else:
                target.mkdir(parents=True)
                created = True
            done = _run(["mount", "--bind", "-o", "ro", str(source), str(target)])
            entry = mounted_at(target)
            if done.returncode != 0 or entry is None or "ro" not in entry.options:
                if done.returncode == 0:
                    _run(["umount", str(target)])
                if created:
                    target.rmdir()
                reason = done.stderr.strip() or "the mount is not read-only"
                raise SyncbitError(f"cannot publish {dataset} at {target}: {reason}")
            pub = Publication(dataset, str(source), str(target), created)
            records[str(target)] = pub.__dict__
            return pub

    def unpublish(self, target: Path) -> bool:
        """Unmount a target this host published; False if it was not published (a no-op)."""
        target = Path(os.path.abspath(target))
        with self._records() as records:
            record = records.get(str(target))
            current = mounted_at(target)
            if record is None:
                if current is not None:
                    raise UserError(f"{target} is a mount point syncbit did not publish: refused")
                return False
            if current is not None:
                done = _run(["umount", str(target)])
                if done.returncode != 0:
                    if "busy" in done.stderr.lower():
                        raise VolumeBusyError(
                            f"{target} is busy (open files or mounts below it); "
                            "close them and unpublish again"
                        )
                    raise SyncbitError(f"cannot unmount {target}: {done.stderr.strip()}")
            if record.get("created"):
                with contextlib.suppress(FileNotFoundError, OSError):
                    target.rmdir()
            del records[str(target)]
            return True

    def list(self) -> list[dict[str, object]]:
        """Every publication, with `mounted` telling whether its mount is still there."""
        with self._records() as records:
            return [
                {**r, "mounted": mounted_at(Path(str(r["target"]))) is not None}
                for _, r in sorted(records.items())
            ]
