"""file:// datasets through a real mount, read by an unprivileged user: a file only root
may read at the source is one only root may read on the mount; only directories under
`file_roots` can become datasets; redirects and options are refused at `dataset add`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest

from integration.cluster import Cluster, Origin, in_thread, write_random

NOBODY = 65534
SETPRIV = shutil.which("setpriv")


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """`argv` run as uid/gid 65534 with no supplementary groups (no capabilities)."""
    assert SETPRIV is not None
    return subprocess.run(
        [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def fenced(origin: Origin) -> Iterator[tuple[Cluster, Path]]:
    """One node whose mount everyone can reach (the session's workdir is 0700), and the
    export it may read `file://` datasets from."""
    if SETPRIV is None:
        pytest.skip("setpriv (util-linux) is needed to read as another user")
    base = Path(tempfile.mkdtemp(prefix="syncbit-fenced-", dir="/tmp"))
    base.chmod(0o755)
    export = base / "export"
    export.mkdir()
    cluster = Cluster(base / "cluster", origin, nodes=1, file_roots=[export])
    try:
        (base / "cluster").mkdir(mode=0o755)
        cluster.start()
        yield cluster, export
    finally:
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)


def _tree(root: Path) -> None:
    root.mkdir(mode=0o755)
    (root / "public.txt").write_text("everyone may read this\n")
    write_random(root / "root-only.bin", 5 * 2**20 + 3)
    (root / "root-only.bin").chmod(0o600)
    (root / "group-only.txt").write_text("root's group\n")
    (root / "group-only.txt").chmod(0o640)
    (root / "nobodys.txt").write_text("nobody's own\n")
    os.chown(root / "nobodys.txt", NOBODY, NOBODY)
    (root / "nobodys.txt").chmod(0o600)
    (root / "private").mkdir(mode=0o700)
    (root / "private" / "inner.txt").write_text("behind a closed directory\n")
    (root / "private" / "inner.txt").chmod(0o644)
    (root / "link-to-inner").symlink_to(root / "private" / "inner.txt")


@pytest.mark.timeout(300)
def test_a_root_only_file_stays_root_only_on_the_mount(fenced: tuple[Cluster, Path]) -> None:
    cluster, export = fenced
    _tree(export / "perm")
    cluster.add_dataset("perm", f"file://{export / 'perm'}")
    node = cluster.nodes[0]
    mnt = node.path("perm")

    # Owners and modes as at the source (write bits dropped: the mount is read-only).
    for name in ("public.txt", "root-only.bin", "group-only.txt", "nobodys.txt"):
        src, shown = os.stat(export / "perm" / name), os.stat(mnt / name)
        assert (shown.st_uid, shown.st_gid) == (src.st_uid, src.st_gid), name
        assert shown.st_mode & 0o7777 == src.st_mode & 0o555, name
    assert os.stat(mnt / "private").st_mode & 0o777 == 0o500

    # Root reads everything (and so fills the cache with the root-only bytes).
    data = in_thread(lambda: (mnt / "root-only.bin").read_bytes(), 60, "read as root")
    assert data == (export / "perm" / "root-only.bin").read_bytes()

    # Another user: what the source allows, nothing more.
    ok = as_nobody("cat", str(mnt / "public.txt"))
    assert ok.returncode == 0 and ok.stdout == "everyone may read this\n", ok.stderr
    mine = as_nobody("cat", str(mnt / "nobodys.txt"))
    assert mine.returncode == 0 and mine.stdout == "nobody's own\n", mine.stderr
    for refused in ("root-only.bin", "group-only.txt", "private/inner.txt", "link-to-inner"):
        done = as_nobody("cat", str(mnt / refused))
        assert done.returncode != 0 and "Permission denied" in done.stderr, (refused, done)
    listing = as_nobody("ls", str(mnt / "private"))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr
    # ... and not through the cache directory either.
    objects = node.cache_dir / "objects"
    assert objects.stat().st_mode & 0o777 == 0o700
    cached = [p for p in objects.rglob("*") if p.is_file()]
    assert cached and all(p.stat().st_mode & 0o777 == 0o600 for p in cached)
    done = as_nobody("cat", str(cached[0]))
    assert done.returncode != 0 and "Permission denied" in done.stderr


def test_only_directories_under_file_roots_become_datasets(
    fenced: tuple[Cluster, Path],
) -> None:
    cluster, export = fenced
    outside = export.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("s")
    (export / "escape").symlink_to(outside)
    for uri in (
        "file:///etc",
        f"file://{outside}",
        f"file://{export}/../outside",
        f"file://{export / 'escape'}",
        f"file://{export / 'escape' / 'secret.txt'}",
    ):
        done = cluster.cli("dataset", "add", "nope", uri)
        assert done.returncode == 2 and "file_roots" in done.stderr, (uri, done.stderr)
        assert "Traceback" not in done.stderr
    assert "nope" not in os.listdir(cluster.nodes[0].mount)


class _Redirect(BaseHTTPRequestHandler):
    """Every request: a 302 to the same path on `localhost` (another host name)."""

    def do_HEAD(self) -> None:
        port = self.connection.getsockname()[1]  # the server's: this connection's end
        self.send_response(302)
        self.send_header("Location", f"http://localhost:{port}/moved{self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, format: str, *args: object) -> None:
        return None


def test_dataset_add_refuses_a_redirect_to_another_host(fenced: tuple[Cluster, Path]) -> None:
    cluster, _ = fenced
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/f.bin"
        done = cluster.cli("dataset", "add", "moved", url)
        assert done.returncode == 2 and "follow_redirects=any" in done.stderr, done.stderr
        meta = cluster.cli(
            "dataset", "add", "meta", url, "-o", "follow_redirects=any", "-o", "verify=no"
        )
        # followed now, to a host that answers with another redirect: the chain ends
        # in a clear error, never a hang or a traceback
        assert meta.returncode in (1, 2) and meta.stderr.startswith("error: "), meta.stderr
        assert "Traceback" not in meta.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
