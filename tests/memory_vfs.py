"""A small, complete in-memory file system behind the `Vfs` protocol.

Protocol front ends (NFS) are tested against it without building a store: it follows
the datastore's rules (persistent never-reused inodes, generations, stable readdir
cookies in inode order, read-only subtrees raising ReadOnly, the same exceptions) so
a test that passes here tests the adapter, not a mock.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from appliance.datastore.vfs import (
    AttributeChanges,
    Attributes,
    DirEntry,
    Durability,
    FsStats,
    Kind,
)
from appliance.errors import (
    AlreadyExists,
    InvalidName,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    ReadOnly,
    StaleHandle,
)
from appliance.names import check_component

TOTAL_BYTES = 1 << 40


@dataclass
class _Node:
    inode: int
    generation: int
    parent: int
    kind: Kind
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    read_only: bool = False
    data: bytearray = field(default_factory=bytearray)
    target: str = ""
    children: dict[str, int] = field(default_factory=dict)


class MemoryVfs:
    """The `Vfs` of a dict of nodes; thread-safe with one lock, like a real adapter needs."""

    root_inode = 1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inodes = itertools.count(2)
        self._generations = itertools.count(7, 2)
        now = time.time_ns()
        self._nodes = {1: _Node(1, 1, 1, Kind.DIRECTORY, 0o755, 0, 0, now, now, now)}
        self.syncs: list[Durability] = []  # what each fsync or durable write asked for, in order
        self.nowait_writes = 0  # writes `write_nowait` took: the NFS tests see which path a WRITE went
        self.durable_nowait_writes = 0  # ... and `write_durably_nowait`

    # ----- helpers for tests ----------------------------------------------------------

    def freeze(self, inode: int) -> None:
        """Make a subtree read-only, as restore points are."""
        with self._lock:
            pending = [inode]
            while pending:
                node = self._nodes[pending.pop()]
                node.read_only = True
                pending.extend(node.children.values())

    # ----- internals ------------------------------------------------------------------

    def _node(self, inode: int) -> _Node:
        node = self._nodes.get(inode)
        if node is None:
            raise StaleHandle(f"inode {inode} does not exist (removed)")
        return node

    def _directory(self, inode: int) -> _Node:
        node = self._node(inode)
        if node.kind is not Kind.DIRECTORY:
            raise NotADirectory(f"inode {inode} is not a directory")
        return node

    def _writable_directory(self, inode: int) -> _Node:
        node = self._directory(inode)
        if node.read_only:
            raise ReadOnly(f"directory inode {inode} is read-only")
        return node

    def _attributes(self, node: _Node) -> Attributes:
        size = {Kind.FILE: len(node.data), Kind.SYMLINK: len(node.target.encode())}.get(node.kind, 0)
        return Attributes(
            inode=node.inode, generation=node.generation, kind=node.kind, mode=node.mode,
            nlink=2 if node.kind is Kind.DIRECTORY else 1, uid=node.uid, gid=node.gid, size=size,
            used=-(-size // 4096) * 4096, atime_ns=node.atime_ns, mtime_ns=node.mtime_ns, ctime_ns=node.ctime_ns,
            read_only=node.read_only,
        )

    def _add(self, parent: int, name: str, kind: Kind, mode: int, uid: int, gid: int, target: str = "") -> _Node:
        check_component(name)
        directory = self._writable_directory(parent)
        if name in directory.children:
            raise AlreadyExists(f"{name!r} already exists")
        now = time.time_ns()
        node = _Node(next(self._inodes), next(self._generations), parent, kind, mode & 0o7777, uid, gid, now, now,
                     now, target=target)
        self._nodes[node.inode] = node
        directory.children[name] = node.inode
        directory.mtime_ns = directory.ctime_ns = now
        return node

    def _unlink(self, parent: int, name: str, want_directory: bool) -> _Node:
        check_component(name)
        directory = self._writable_directory(parent)
        inode = directory.children.get(name)
        if inode is None:
            raise NotFound(f"no {name!r} in directory inode {parent}")
        node = self._nodes[inode]
        self._check_removable(name, node, want_directory)
        del directory.children[name]
        directory.mtime_ns = directory.ctime_ns = time.time_ns()
        return node

    def _write(self, node: _Node, offset: int, data: bytes | memoryview) -> int:
        if offset > len(node.data):
            node.data.extend(bytes(offset - len(node.data)))
        node.data[offset : offset + len(data)] = data
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return len(data)

    @staticmethod
    def _check_removable(name: str, node: _Node, want_directory: bool) -> None:
        if want_directory:
            if node.kind is not Kind.DIRECTORY:
                raise NotADirectory(f"{name!r} is not a directory")
            if node.children:
                raise NotEmpty(f"directory {name!r} is not empty")
        elif node.kind is Kind.DIRECTORY:
            raise IsADirectory(f"{name!r} is a directory")

    # ----- the Vfs protocol -----------------------------------------------------------

    def lookup(self, parent: int, name: str) -> Attributes:
        with self._lock:
            directory = self._directory(parent)
            if name == ".":
                return self._attributes(directory)
            if name == "..":
                return self._attributes(self._node(directory.parent))
            inode = directory.children.get(name)
            if inode is None:
                raise NotFound(f"no {name!r} in directory inode {parent}")
            return self._attributes(self._nodes[inode])

    def getattr(self, inode: int) -> Attributes:
        with self._lock:
            return self._attributes(self._node(inode))

    def setattr(self, inode: int, changes: AttributeChanges) -> Attributes:
        with self._lock:
            node = self._node(inode)
            if node.read_only:
                raise ReadOnly(f"inode {inode} is read-only")
            if changes.size is not None:
                if node.kind is not Kind.FILE:
                    raise IsADirectory(f"cannot truncate inode {inode}")
                del node.data[changes.size :]
                node.data.extend(bytes(changes.size - len(node.data)))
                node.mtime_ns = time.time_ns()
            for name in ("mode", "uid", "gid", "atime_ns", "mtime_ns"):
                value = getattr(changes, name)
                if value is not None:
                    setattr(node, name, value & 0o7777 if name == "mode" else value)
            node.ctime_ns = time.time_ns()
            return self._attributes(node)

    def readdir(self, inode: int, after_cookie: int = 0) -> Iterator[DirEntry]:
        with self._lock:
            directory = self._directory(inode)
            entries = sorted((child, name) for name, child in directory.children.items() if child > after_cookie)
            listing = [DirEntry(name, self._attributes(self._nodes[child]), child) for child, name in entries]
        yield from listing

    def read(self, inode: int, offset: int, length: int) -> bytes:
        with self._lock:
            node = self._node(inode)
            if node.kind is Kind.DIRECTORY:
                raise IsADirectory(f"inode {inode} is a directory")
            return bytes(node.data[offset : offset + length])

    def getattr_nowait(self, inode: int) -> Attributes | None:
        """Everything here is in memory; a missing inode is left to `getattr`."""
        with self._lock:
            present = inode in self._nodes
        return self.getattr(inode) if present else None

    def read_nowait(self, inode: int, offset: int, length: int) -> Sequence[bytes] | None:
        """Everything here is in memory; only errors are left to `read`."""
        with self._lock:
            node = self._nodes.get(inode)
            if node is None or node.kind is not Kind.FILE:
                return None
            return (bytes(node.data[offset : offset + length]),)

    def write(self, inode: int, offset: int, data: bytes | memoryview) -> int:
        with self._lock:
            node = self._node(inode)
            if node.kind is Kind.DIRECTORY:
                raise IsADirectory(f"inode {inode} is a directory")
            if node.read_only:
                raise ReadOnly(f"inode {inode} is read-only")
            return self._write(node, offset, data)

    def write_nowait(self, inode: int, offset: int, data: bytes | memoryview) -> int | None:
        """Everything here is in memory; only errors are left to `write`."""
        written = self._write_at_once(inode, offset, data)
        if written is not None:
            self.nowait_writes += 1
        return written

    def _write_at_once(self, inode: int, offset: int, data: bytes | memoryview) -> int | None:
        with self._lock:
            node = self._nodes.get(inode)
            if node is None or node.kind is not Kind.FILE or node.read_only:
                return None
            return self._write(node, offset, data)

    def create(self, parent: int, name: str, mode: int, uid: int, gid: int, exclusive: bool) -> Attributes:
        with self._lock:
            existing = self._directory(parent).children.get(name)
            if existing is not None and not exclusive:
                node = self._nodes[existing]
                if node.kind is Kind.DIRECTORY:
                    raise IsADirectory(f"{name!r} is a directory")
                return self._attributes(node)
            return self._attributes(self._add(parent, name, Kind.FILE, mode, uid, gid))

    def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Attributes:
        with self._lock:
            return self._attributes(self._add(parent, name, Kind.DIRECTORY, mode, uid, gid))

    def symlink(self, parent: int, name: str, target: str, uid: int, gid: int) -> Attributes:
        with self._lock:
            return self._attributes(self._add(parent, name, Kind.SYMLINK, 0o777, uid, gid, target))

    def readlink(self, inode: int) -> str:
        with self._lock:
            node = self._node(inode)
            if node.kind is not Kind.SYMLINK:
                raise InvalidName(f"inode {inode} is not a symbolic link")
            return node.target

    def remove(self, parent: int, name: str) -> None:
        with self._lock:
            del self._nodes[self._unlink(parent, name, want_directory=False).inode]

    def rmdir(self, parent: int, name: str) -> None:
        with self._lock:
            del self._nodes[self._unlink(parent, name, want_directory=True).inode]

    def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str) -> None:
        with self._lock:
            check_component(old_name)
            check_component(new_name)
            source, target = self._writable_directory(old_parent), self._writable_directory(new_parent)
            inode = source.children.get(old_name)
            if inode is None:
                raise NotFound(f"no {old_name!r} in directory inode {old_parent}")
            node = self._nodes[inode]
            ancestor = target
            while ancestor.inode != self.root_inode:
                if ancestor.inode == inode:
                    raise InvalidName(f"cannot move directory {old_name!r} into itself")
                ancestor = self._nodes[ancestor.parent]
            existing = target.children.get(new_name)
            if existing == inode:
                return
            if existing is not None:
                self._check_removable(new_name, self._nodes[existing], node.kind is Kind.DIRECTORY)
                del self._nodes[existing]
            del source.children[old_name]
            target.children[new_name] = inode
            now = time.time_ns()
            self._nodes[inode] = replace(node, parent=new_parent, ctime_ns=now)
            source.mtime_ns = source.ctime_ns = target.mtime_ns = target.ctime_ns = now

    def statfs(self) -> FsStats:
        with self._lock:
            used = sum(len(node.data) for node in self._nodes.values())
            return FsStats(TOTAL_BYTES, TOTAL_BYTES - used, TOTAL_BYTES - used, 1 << 20, (1 << 20) - len(self._nodes),
                           4096, 255)

    def fsync(self, inode: int, durability: Durability = Durability.FILE) -> None:
        with self._lock:
            self._node(inode)
            self.syncs.append(durability)

    def write_durably_nowait(self, inode: int, offset: int, data: bytes | memoryview,
                             durability: Durability) -> tuple[int, Callable[[], None]] | None:
        """Writes like `write_nowait`; its sync is recorded when the caller makes it durable."""
        written = self._write_at_once(inode, offset, data)
        if written is None:
            return None
        self.durable_nowait_writes += 1
        return written, lambda: self.fsync(inode, durability)

    def write_durably(self, inode: int, offset: int, data: bytes | memoryview,
                      durability: Durability) -> tuple[int, Attributes]:
        written = self.write(inode, offset, data)
        self.fsync(inode, durability)
        return written, self.getattr(inode)
