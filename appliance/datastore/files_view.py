"""`/files`: the files inside every restore point, read-only, beside /restore-points and /sessions.

``/files/<vm>/<point>/<disk>-p<k>/...`` shows partition k of disk `disk` (p0: a disk
without a partition table) as its file system shows it, so an operator copies a file out
of a backup with any NFS or FUSE client; an LVM2 logical volume LV of VG in partition k
is ``<disk>-p<k>-<VG>-<LV>``, named as device-mapper names it (a '-' inside a VG or LV
name doubled, so the name reads back one way only), and is what the CLI and the API call
partition "k/VG/LV". It stays lazy: a VM's folder lists the catalog; a point's folder
reads the point's partition tables (and an LVM2 PV's metadata) when it is first listed
and shows every volume that holds a file system read here; a volume's file system is
parsed when its folder is first listed (a damaged one fails there, with the parser's
fault, and not the point's listing; so does a PV whose metadata is damaged, shown as
``<disk>-p<k>``), and then only the directories walked and the files read are fetched
from the store.

The nodes are not kept in the namespace (a backup's files would flood it): they get inode
numbers from a range of their own, given out as they are first seen and kept in memory,
so after a restart a client's handle to one is stale and the client looks it up again.
`WithFiles` puts this view beside a `Datastore` behind the one `Vfs` the protocols serve.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from appliance.datastore.datastore import Datastore
from appliance.datastore.vfs import Attributes, AttributeChanges, DirEntry, Durability, FsStats, Kind
from appliance.errors import NotADirectory, NotFound, ReadOnly, StaleHandle
from appliance.flr.browse import PointFiles
from appliance.flr.filesystems import DEFAULT_DIR_MODE, FileNode, FileSystem
from appliance.flr.volumes import Volume
from appliance.store.catalog import RestorePoint
from appliance.store.reader import ReadPath

FILES = "files"
#: The view's inodes: far above any the namespace gives out (it counts up from 1).
FIRST_INODE = 1 << 62
#: Open point readers kept (each holds its parsed partition tables and file systems).
POINTS_KEPT = 8

_KINDS = {"dir": Kind.DIRECTORY, "file": Kind.FILE, "symlink": Kind.SYMLINK}


@dataclass(frozen=True)
class _Entry:
    """A node of the view: its place (vm, point, volume, path inside the volume) and parent inode."""

    parent: int
    vm: str = ""
    point: str = ""
    disk: int = -1
    volume: str = ""  # `Volume.name`: "2", or "2/vg0/root" for an LV
    path: str = ""
    node: FileNode | None = None

    @property
    def depth(self) -> int:
        """0 /files, 1 a VM, 2 a point, 3 a volume's root or anything inside a volume."""
        return 0 if not self.vm else 1 if not self.point else 2 if self.disk < 0 else 3


def folder_name(disk: int, volume: Volume) -> str:
    """`<disk>-p<k>`, or `<disk>-p<k>-<VG>-<LV>` for an LV, each '-' in its names doubled as device-mapper does."""
    return "-".join([f"{disk}-p{volume.number}", *(part.replace("-", "--") for part in volume.lv.split("/") if part)])


class FilesView:
    """The read-only tree under /files."""

    def __init__(self, points: Callable[[], list[RestorePoint]], read_path: ReadPath, parent_inode: int,
                 mtime_ns: int) -> None:
        self._points, self._read_path = points, read_path
        self._mtime_ns = mtime_ns
        self._lock = threading.RLock()  # the parsers' streams are not thread-safe
        self._entries: dict[int, _Entry] = {FIRST_INODE: _Entry(parent_inode)}
        self._inodes: dict[tuple[Any, ...], int] = {}
        self._readers: OrderedDict[str, PointFiles] = OrderedDict()
        self._open: OrderedDict[int, BinaryIO] = OrderedDict()
        self.root_inode = FIRST_INODE

    @staticmethod
    def owns(inode: int) -> bool:
        return inode >= FIRST_INODE

    def _entry(self, inode: int) -> _Entry:
        entry = self._entries.get(inode)
        if entry is None:
            raise StaleHandle(f"inode {inode} of /files is not known since the last start: look it up again")
        return entry

    def _inode_of(self, entry: _Entry) -> int:
        key = (entry.vm, entry.point, entry.disk, entry.volume, entry.path)
        inode = self._inodes.get(key)
        if inode is None:
            inode = self._inodes[key] = FIRST_INODE + len(self._entries)
        self._entries[inode] = entry
        return inode

    def _files(self, vm: str, point_id: str) -> PointFiles:
        files = self._readers.get(point_id)
        if files is None:
            point = next((p for p in self._points() if p.id == point_id and p.vm == vm), None)
            if point is None:
                raise NotFound(f"restore point {point_id} of VM {vm!r} is gone")
            files = self._readers[point_id] = PointFiles(self._read_path, point)
            while len(self._readers) > POINTS_KEPT:
                self._readers.popitem(last=False)
        self._readers.move_to_end(point_id)
        return files

    def _filesystem(self, entry: _Entry) -> FileSystem:
        return self._files(entry.vm, entry.point).filesystem(entry.disk, entry.volume)[1]

    def _attributes(self, inode: int, entry: _Entry) -> Attributes:
        node = entry.node
        kind = _KINDS[node.kind] if node is not None else Kind.DIRECTORY
        mode = (node.permissions if node is not None else DEFAULT_DIR_MODE) & 0o7555
        size = len((node.target or "").encode()) if node is not None and kind is Kind.SYMLINK else \
            node.size if node is not None else 0
        mtime = node.mtime_ns if node is not None and node.mtime_ns is not None else self._mtime_ns
        return Attributes(inode=inode, generation=1, kind=kind, mode=mode, nlink=2 if kind is Kind.DIRECTORY else 1,
                          uid=0, gid=0, size=size, used=size, atime_ns=mtime, mtime_ns=mtime, ctime_ns=mtime,
                          read_only=True)

    def getattr(self, inode: int) -> Attributes:
        with self._lock:
            return self._attributes(inode, self._entry(inode))

    def _children(self, inode: int, entry: _Entry) -> list[tuple[str, _Entry]]:
        if entry.node is not None and entry.node.kind != "dir":
            raise NotADirectory(f"{entry.path} is not a directory")
        if entry.depth == 0:
            vms = sorted({point.vm for point in self._points()})
            return [(vm, _Entry(inode, vm)) for vm in vms]
        if entry.depth == 1:
            return [(point.id, _Entry(inode, entry.vm, point.id)) for point in self._points() if point.vm == entry.vm]
        if entry.depth == 2:
            files = self._files(entry.vm, entry.point)
            return [(folder_name(disk, volume), _Entry(inode, entry.vm, entry.point, disk, volume.name, "/"))
                    for disk in range(len(files.point.disks)) for volume in files.volumes(disk) if volume.browsable]
        filesystem = self._filesystem(entry)
        directory = entry.node if entry.node is not None else filesystem.node("/")
        return [(child.name, _Entry(inode, entry.vm, entry.point, entry.disk, entry.volume, child.path, child))
                for child in filesystem.children(directory) if child.kind in _KINDS]

    def lookup(self, parent: int, name: str) -> Attributes:
        with self._lock:
            entry = self._entry(parent)
            if name == ".":
                return self._attributes(parent, entry)
            found = next((child for child_name, child in self._children(parent, entry) if child_name == name), None)
            if found is None:
                raise NotFound(f"no {name!r} in /files inode {parent}")
            inode = self._inode_of(found)
            return self._attributes(inode, found)

    def parent_of(self, inode: int) -> int:
        with self._lock:
            return self._entry(inode).parent

    def readdir(self, inode: int, after_cookie: int = 0) -> Iterator[DirEntry]:
        """Entries in a fixed order; a cookie is the entry's position (1 first)."""
        with self._lock:
            entry = self._entry(inode)
            listed = []
            for position, (name, child) in enumerate(self._children(inode, entry), 1):
                if position > after_cookie:
                    child_inode = self._inode_of(child)
                    listed.append(DirEntry(name, self._attributes(child_inode, child), position))
        yield from listed

    def read(self, inode: int, offset: int, length: int) -> bytes:
        with self._lock:
            entry = self._entry(inode)
            if entry.node is None or entry.node.kind != "file":
                raise NotFound(f"/files inode {inode} is not a file")
            stream = self._open.get(inode)
            if stream is None:
                stream = self._open[inode] = self._filesystem(entry).open(entry.node)
                while len(self._open) > 64:
                    self._open.popitem(last=False)[1].close()
            self._open.move_to_end(inode)
            stream.seek(offset)
            return stream.read(min(length, max(0, entry.node.size - offset)))

    def readlink(self, inode: int) -> str:
        with self._lock:
            node = self._entry(inode).node
        if node is None or node.kind != "symlink":
            raise NotFound(f"/files inode {inode} is not a symbolic link")
        return node.target or ""


class WithFiles:
    """A `Vfs`: the datastore, with /files beside its own tree (every call about /files goes to the view)."""

    def __init__(self, datastore: Datastore, view: FilesView) -> None:
        self.datastore, self.view = datastore, view
        self.root_inode = datastore.root_inode

    def _refuse(self, what: str) -> ReadOnly:
        return ReadOnly(f"/files is read-only: {what} refused")

    def lookup(self, parent: int, name: str) -> Attributes:
        if self.view.owns(parent):
            if name == "..":
                return self.getattr(self.view.parent_of(parent))
            return self.view.lookup(parent, name)
        if parent == self.root_inode and name == FILES:
            return self.view.getattr(self.view.root_inode)
        return self.datastore.lookup(parent, name)

    def getattr(self, inode: int) -> Attributes:
        return self.view.getattr(inode) if self.view.owns(inode) else self.datastore.getattr(inode)

    def getattr_nowait(self, inode: int) -> Attributes | None:
        return None if self.view.owns(inode) else self.datastore.getattr_nowait(inode)

    def readdir(self, inode: int, after_cookie: int = 0) -> Iterator[DirEntry]:
        if self.view.owns(inode):
            yield from self.view.readdir(inode, after_cookie)
            return
        if after_cookie < FIRST_INODE:  # the namespace's cookies are child inodes, all below the view's
            yield from self.datastore.readdir(inode, after_cookie)
        if inode == self.root_inode and after_cookie < self.view.root_inode:
            yield DirEntry(FILES, self.view.getattr(self.view.root_inode), self.view.root_inode)

    def read(self, inode: int, offset: int, length: int) -> bytes:
        return self.view.read(inode, offset, length) if self.view.owns(inode) else self.datastore.read(inode, offset, length)

    def read_nowait(self, inode: int, offset: int, length: int) -> Sequence[bytes | bytearray | memoryview] | None:
        return None if self.view.owns(inode) else self.datastore.read_nowait(inode, offset, length)

    def readlink(self, inode: int) -> str:
        return self.view.readlink(inode) if self.view.owns(inode) else self.datastore.readlink(inode)

    def setattr(self, inode: int, changes: AttributeChanges) -> Attributes:
        if self.view.owns(inode):
            raise self._refuse("setattr")
        return self.datastore.setattr(inode, changes)

    def write(self, inode: int, offset: int, data: bytes | memoryview) -> int:
        if self.view.owns(inode):
            raise self._refuse("write")
        return self.datastore.write(inode, offset, data)

    def write_nowait(self, inode: int, offset: int, data: bytes | memoryview) -> int | None:
        return None if self.view.owns(inode) else self.datastore.write_nowait(inode, offset, data)

    def write_durably_nowait(self, inode: int, offset: int, data: bytes | memoryview,
                             durability: Durability) -> tuple[int, Callable[[], None]] | None:
        if self.view.owns(inode):
            return None
        return self.datastore.write_durably_nowait(inode, offset, data, durability)

    def write_durably(self, inode: int, offset: int, data: bytes | memoryview,
                      durability: Durability) -> tuple[int, Attributes]:
        if self.view.owns(inode):
            raise self._refuse("write")
        return self.datastore.write_durably(inode, offset, data, durability)

    def fsync(self, inode: int, durability: Durability = Durability.FILE) -> None:
        if not self.view.owns(inode):
            self.datastore.fsync(inode, durability)

    def _changing(self, parent: int, name: str, what: str) -> None:
        if self.view.owns(parent) or (parent == self.root_inode and name == FILES):
            raise self._refuse(what)

    def create(self, parent: int, name: str, mode: int, uid: int, gid: int, exclusive: bool) -> Attributes:
        self._changing(parent, name, "create")
        return self.datastore.create(parent, name, mode, uid, gid, exclusive)

    def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Attributes:
        self._changing(parent, name, "mkdir")
        return self.datastore.mkdir(parent, name, mode, uid, gid)

    def symlink(self, parent: int, name: str, target: str, uid: int, gid: int) -> Attributes:
        self._changing(parent, name, "symlink")
        return self.datastore.symlink(parent, name, target, uid, gid)

    def remove(self, parent: int, name: str) -> None:
        self._changing(parent, name, "remove")
        self.datastore.remove(parent, name)

    def rmdir(self, parent: int, name: str) -> None:
        self._changing(parent, name, "rmdir")
        self.datastore.rmdir(parent, name)

    def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str) -> None:
        self._changing(old_parent, old_name, "rename")
        self._changing(new_parent, new_name, "rename")
        self.datastore.rename(old_parent, old_name, new_parent, new_name)

    def statfs(self) -> FsStats:
        return self.datastore.statfs()


def with_files(datastore: Datastore) -> WithFiles:
    """The datastore's Vfs with the /files view beside its tree."""
    store = datastore.store

    def points() -> list[RestorePoint]:
        with store.env.begin() as txn:
            return store.catalog.points(txn)

    root = datastore.getattr(datastore.root_inode)
    return WithFiles(datastore, FilesView(points, datastore.read_path, datastore.root_inode, root.mtime_ns))
