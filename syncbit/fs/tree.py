"""The inode table: datasets and their manifests as a tree of directories and files.

Pure data, no FUSE and no I/O. Dataset versions are immutable, so an inode's attributes
never change; a new revision of a dataset gets new inodes and the old ones stay valid for
files still open on it. Owners and modes are the manifest's: a directory or file the
source recorded them for (`file://`) keeps them; anything else is root's and readable
by all.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field

from syncbit.manifest import FileEntry, Manifest

ROOT_INODE = 1


@dataclass(eq=False)
class Node:
    inode: int
    name: str
    mode: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    mtime: float = 0.0
    children: dict[str, int] | None = None  # directories only, name -> inode
    entry: FileEntry | None = None  # files only
    manifest: Manifest | None = None  # the dataset version this node belongs to
    dataset_root: bool = False  # the directory /<mount>/<dataset>

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclass
class Tree:
    """Inodes for the mount root, one directory per dataset, and the datasets' trees."""

    nodes: dict[int, Node] = field(default_factory=dict)
    revisions: dict[str, str] = field(default_factory=dict)  # dataset -> revision shown
    _next: int = ROOT_INODE + 1

    def __post_init__(self) -> None:
        self.nodes[ROOT_INODE] = Node(
            ROOT_INODE, "", stat.S_IFDIR | 0o555, mtime=time.time(), children={}
        )

    @property
    def root(self) -> Node:
        return self.nodes[ROOT_INODE]

    def _new(self, name: str, **kw: object) -> Node:
        node = Node(self._next, name, **kw)  # type: ignore[arg-type]
        self.nodes[node.inode] = node
        self._next += 1
        return node

    def update(self, manifests: dict[str, Manifest]) -> list[str]:
        """Show exactly these dataset versions; returns the names that changed or went."""
        root = self.root
        assert root.children is not None
        changed: list[str] = []
        for name in list(root.children):
            manifest = manifests.get(name)
            if manifest is None or manifest.revision != self.revisions.get(name):
                del root.children[name]
                self.revisions.pop(name, None)
                changed.append(name)
        for name, manifest in manifests.items():
            if name not in root.children:
                root.children[name] = self._add_dataset(manifest).inode
                self.revisions[name] = manifest.revision
        if changed or len(root.children) != len(manifests):
            root.mtime = time.time()
        return changed

    def _add_dataset(self, manifest: Manifest) -> Node:
        mtime = manifest.created
        perms = manifest.dir_perms

        def owner(path: str) -> dict[str, int]:
            perm = perms.get(path)
            if perm is None:
                return {"mode": stat.S_IFDIR | 0o555, "uid": 0, "gid": 0}
            return {"mode": stat.S_IFDIR | perm.mode, "uid": perm.uid, "gid": perm.gid}

        top = self._new(
            manifest.dataset,
            mtime=mtime,
            children={},
            manifest=manifest,
            dataset_root=True,
            **owner(""),
        )
        dirs: dict[str, Node] = {"": top}

        def directory(path: str) -> Node:
            node = dirs.get(path)
            if node is None:
                parent_path, _, name = path.rpartition("/")
                parent = directory(parent_path)
                node = self._new(name, mtime=mtime, children={}, manifest=manifest, **owner(path))
                assert parent.children is not None
                parent.children[name] = node.inode
                dirs[path] = node
            return node

        for path in manifest.dirs:
            directory(path)
        for entry in manifest.files:
            parent_path, _, name = entry.path.rpartition("/")
            parent = directory(parent_path)
            node = self._new(
                name,
                mode=stat.S_IFREG | entry.mode,
                size=entry.size,
                uid=entry.uid or 0,
                gid=entry.gid or 0,
                mtime=mtime,
                entry=entry,
                manifest=manifest,
            )
            assert parent.children is not None
            parent.children[name] = node.inode
        return top

    def lookup(self, parent: int, name: str) -> Node | None:
        node = self.nodes.get(parent)
        if node is None or node.children is None:
            return None
        inode = node.children.get(name)
        return None if inode is None else self.nodes[inode]
