"""The datastore: one VFS over restore points and sessions, served by FUSE and NFS.

A thin façade over its parts, each with one job:

- `namespace`: persistent inodes and directory entries (LMDB); `roles`: what a node is;
- `mirror`: /restore-points kept in line with the catalog, and restore points' small files;
- `backings`: where a file's bytes live, one backing per role (restore-point file,
  session disk, plain file), with the table of roles, sources and writability;
- `open_files`: the overlays and descriptors of sessions that are open, and pauses.

What stays here: resolving inodes to nodes (cached, with an epoch so a stale read is
never cached), the rules of the tree (what is read-only, what a client may create,
remove or rename where), and the nowait calls that answer from memory on an adapter's
event loop. Directories and symlinks have no backing: their attributes are the node's.

Bytes read from and written to a session's files are reported to an optional
`SessionIo` (metrics), named by session: only the datastore knows which session an
inode belongs to.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from functools import partial
from typing import Callable, Iterator, Protocol, Sequence

import lmdb

from appliance.datastore.backings import Backing, PointFile, ScratchFile, SessionDisk
from appliance.datastore.layout import (
    DIR_MODE,
    RESTORE_POINTS,
    SESSIONS,
    ensure_tree,
    overlay_path,
    scratch_path,
)
from appliance.datastore.mirror import CatalogMirror
from appliance.datastore.namespace import ROOT_INODE, Namespace, Node
from appliance.datastore.open_files import SessionFiles, paused_error
from appliance.datastore.roles import Role
from appliance.datastore.sessions import get_session
from appliance.datastore.vfs import Attributes, AttributeChanges, DirEntry, Durability, FsStats, Kind
from appliance.errors import (
    AlreadyExists,
    InvalidName,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotSupported,
    PermissionDenied,
    ReadOnly,
    SessionDiskError,
    StaleHandle,
    TryAgain,
)
from appliance.names import check_component
from appliance.store.catalog import RestorePoint
from appliance.store.reader import ReadPath
from appliance.store.repository import Store
from overlay import Overlay, OverlayError


class SessionIo(Protocol):
    """Hears the bytes each read or write moved in a session's files (worker threads)."""

    def session_read(self, session: str, size: int) -> None: ...
    def session_written(self, session: str, size: int) -> None: ...


class Datastore:
    """The `Vfs` of one store. Thread-safe: adapters call it from worker threads."""

    root_inode = ROOT_INODE

    def __init__(self, store: Store, read_path: ReadPath, session_io: SessionIo | None = None) -> None:
        self.store = store
        self.read_path = read_path
        self._session_io = session_io
        self._session_names: dict[int, str] = {}  # inode -> its session; fixed, renames stay within one
        self.namespace = Namespace(store.env)
        tops = ensure_tree(self.namespace)
        self._rp_root, self._sessions_root = tops[RESTORE_POINTS], tops[SESSIONS]
        self._area = store.path / "sessions"
        self._area.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self.mirror = CatalogMirror(store, self.namespace, self._changed)
        self.files = SessionFiles()
        self._point_files = PointFile(self.mirror, read_path)
        self._flat_extents = self._point_files.flat_extents  # restore-point flat inode -> (point, disk)
        self._disks = SessionDisk(self._overlay, self._let_go)
        self._scratch = ScratchFile(self._fd)
        self._backings: dict[Role, Backing] = {Role.RP_FILE: self._point_files, Role.DISK: self._disks,
                                               Role.SCRATCH: self._scratch}
        self._flat_attributes: dict[int, Attributes] = {}
        self._node_cache: dict[int, Node] = {}
        self._node_epoch = 0

    def close(self) -> None:
        self.files.close()

    @contextlib.contextmanager
    def session_paused(self, name: str) -> Iterator[None]:
        """Let go of a session's files while the serving process commits or removes it.

        Changes to the session are refused with `TryAgain` (NFS clients retry on JUKEBOX)
        and its files are flushed and closed, so the caller sees every acknowledged write
        and no open handle outlives a removal (`SessionFiles.session_paused`). Reads go on.
        """
        try:
            with self.files.session_paused(name):
                yield
        finally:
            self._changed()

    def _let_go(self, node: Node) -> TryAgain:
        return TryAgain(f"session {self._session_name(node)!r} let go of its disks; retry")

    def _check_not_paused(self, node: Node) -> None:
        if self.files.paused and self._session_name(node) in self.files.paused:
            raise paused_error(self._session_name(node))

    # ----- nodes and the restore-point mirror -------------------------------------------

    def _node(self, inode: int) -> Node:
        """A node, from memory when possible: every NFS call and most FUSE calls need one."""
        with self._lock:
            node = self._node_cache.get(inode)
            epoch = self._node_epoch
        if node is not None:
            return node
        with self.store.env.begin() as txn:
            node = self.namespace.node(txn, inode)
        if node is None:
            raise StaleHandle(f"inode {inode} does not exist (removed)")
        with self._lock:
            if self._node_epoch == epoch:  # no change committed since the read began
                self._node_cache[inode] = node
        return node

    def _changed(self, *inodes: int) -> None:
        """After a commit that changed or removed `inodes` (none given: maybe any node).

        Nodes change only through this process while it serves (the datastore lock keeps
        `session delete` out; `session create` only adds), so dropping them here keeps the
        cache exact. The epoch stops a read that began before the commit from caching a
        node it read from the older snapshot.
        """
        with self._lock:
            self._node_epoch += 1
            if inodes:
                for inode in inodes:
                    self._node_cache.pop(inode, None)
            else:
                self._node_cache.clear()

    # ----- where a node's bytes live --------------------------------------------------

    def _session_inode(self, node: Node) -> int:
        return self._session_node(node).inode

    def _session_node(self, node: Node) -> Node:
        while node.role != Role.SESSION:
            node = self._node(node.parent)
        return node

    def _session_name(self, node: Node) -> str:
        """The name of the session `node` belongs to, walked up to once per inode."""
        name = self._session_names.get(node.inode)
        if name is None:
            name = self._session_names[node.inode] = self._session_node(node).ref_text("session")
        return name

    def _fd(self, node: Node) -> int:
        path = scratch_path(self.store, self._session_inode(node), node.inode)
        return self.files.scratch_fd(node.inode, self._session_name(node), path)

    def _overlay(self, node: Node, changing: bool) -> Overlay:
        """The session disk's open overlay, opened if need be (never again for a change to a paused session)."""
        overlay = self.files.overlays.get(node.inode)
        if overlay is not None:
            return overlay
        session = self._node(self._session_inode(node))
        point, disk = self._session_point(session), node.ref_number("disk")
        path = overlay_path(self.store, session.inode, disk)
        return self.files.overlay(node.inode, self._session_name(node), (point.id, disk),
                                  lambda: Overlay.open(path, self.read_path.disk(point, disk)), changing)

    def _session_point(self, session: Node) -> RestorePoint:
        return self.mirror.point(get_session(self.namespace, session.ref_text("session")).point)

    # ----- attributes -------------------------------------------------------------------

    def _backing(self, node: Node) -> Backing:
        backing = self._backings.get(node.role)
        if backing is None:
            raise NotSupported(f"inode {node.inode} has no data")
        return backing

    def _attributes(self, node: Node) -> Attributes:
        backing = self._backings.get(node.role)
        if backing is not None:
            size, used, atime, mtime, ctime = backing.extent(node)
        else:
            size = len(node.ref_text("target").encode()) if node.kind is Kind.SYMLINK else 0
            used, atime, mtime, ctime = 0, node.atime_ns, node.mtime_ns, node.ctime_ns
        return Attributes(
            inode=node.inode,
            generation=node.generation,
            kind=node.kind,
            mode=node.mode,
            nlink=2 if node.kind is Kind.DIRECTORY else 1,
            uid=node.uid,
            gid=node.gid,
            size=size,
            used=used,
            atime_ns=atime,
            mtime_ns=mtime,
            ctime_ns=ctime,
            read_only=node.role.read_only,
        )

    def getattr(self, inode: int) -> Attributes:
        return self._attributes(self._node(inode))

    def lookup(self, parent: int, name: str) -> Attributes:
        directory = self._node(parent)
        if directory.kind is not Kind.DIRECTORY:
            raise NotADirectory(f"inode {parent} is not a directory")
        if name == ".":
            return self._attributes(directory)
        if name == "..":
            return self.getattr(directory.parent)
        if directory.role.mirrors_catalog:
            self.mirror.sync(directory)
        with self.store.env.begin() as txn:
            inode = self.namespace.child(txn, parent, name)
        if inode is None:
            raise NotFound(f"no {name!r} in directory inode {parent}")
        return self.getattr(inode)

    def readdir(self, inode: int, after_cookie: int = 0) -> Iterator[DirEntry]:
        directory = self._node(inode)
        if directory.kind is not Kind.DIRECTORY:
            raise NotADirectory(f"inode {inode} is not a directory")
        if directory.role.mirrors_catalog:
            self.mirror.sync(directory)
        with self.store.env.begin() as txn:
            children = list(self.namespace.children(txn, inode, after_cookie))
        for child, name in children:
            try:
                yield DirEntry(name, self.getattr(child), child)
            except StaleHandle:
                continue  # removed while listing

    # ----- modification -------------------------------------------------------------------

    def _writable_container(self, parent: int) -> Node:
        directory = self._node(parent)
        if directory.role.read_only:
            raise ReadOnly(f"{RESTORE_POINTS} and the datastore root are read-only")
        if directory.role == Role.SESSIONS_ROOT:
            raise PermissionDenied("sessions are made and removed with `appliance session create|delete`")
        if directory.kind is not Kind.DIRECTORY:
            raise NotADirectory(f"inode {parent} is not a directory")
        self._check_not_paused(directory)
        return directory

    def _writable(self, inode: int) -> Node:
        node = self._node(inode)
        if node.role.read_only:
            raise ReadOnly(f"restore point files are read-only (inode {inode})")
        self._check_not_paused(node)
        return node

    def setattr(self, inode: int, changes: AttributeChanges) -> Attributes:
        node = self._writable(inode)
        if node.role == Role.SESSIONS_ROOT and changes != AttributeChanges():
            raise PermissionDenied("/sessions cannot be changed")
        if changes.size is not None:
            if node.kind is Kind.DIRECTORY:
                raise IsADirectory(f"cannot truncate directory inode {inode}")
            self._backing(node).truncate(node, changes.size)
        if node.role == Role.SCRATCH and (changes.atime_ns is not None or changes.mtime_ns is not None):
            self._scratch.set_times(node, changes.atime_ns, changes.mtime_ns)
        fields = {
            key: value
            for key, value in (("mode", changes.mode), ("uid", changes.uid), ("gid", changes.gid),
                               ("atime_ns", changes.atime_ns), ("mtime_ns", changes.mtime_ns))
            if value is not None
        }
        if "mode" in fields:
            fields["mode"] = int(fields["mode"]) & 0o7777
        with self.store.env.begin(write=True) as txn:
            current = self.namespace.node(txn, inode)
            if current is None:
                raise StaleHandle(f"inode {inode} was removed")
            self.namespace.put(txn, current.touched(**fields))
        self._changed(inode)
        return self.getattr(inode)

    def read(self, inode: int, offset: int, length: int) -> bytes:
        node = self._node(inode)
        if node.kind is Kind.DIRECTORY:
            raise IsADirectory(f"inode {inode} is a directory")
        data = self._backing(node).read(node, offset, length)
        if self._session_io is not None and not node.role.read_only:
            self._session_io.session_read(self._session_name(node), len(data))
        return data

    def getattr_nowait(self, inode: int) -> Attributes | None:
        """Attributes from memory alone: restore-point flat extents, and session disks already open."""
        flat = inode in self._flat_extents
        if not flat and inode not in self.files.overlays:
            return None
        node = self._node_cache.get(inode)  # gone when the point or session was removed: the slow path says so
        if node is None:
            return None
        if not flat:
            try:
                return self._attributes(node)
            except (SessionDiskError, TryAgain):  # closed under us by a pause: the slow path says what to do
                return None
        attributes = self._flat_attributes.get(inode)
        if attributes is None:  # a restore point never changes: its attributes are computed once
            attributes = self._flat_attributes[inode] = self._attributes(node)
        return attributes

    def read_nowait(self, inode: int, offset: int, length: int) -> Sequence[bytes | bytearray | memoryview] | None:
        target = self._flat_extents.get(inode)
        if target is not None:
            reader = self.read_path.opened_disk(*target)
            return None if reader is None else reader.read_cached(offset, length)
        base = self.files.bases.get(inode)
        overlay = self.files.overlays.get(inode)
        session = self._session_names.get(inode)  # known once the slow path has read or written it
        if base is None or overlay is None or (session is None and self._session_io is not None):
            return None
        reader = self.read_path.opened_disk(*base)
        data = None if reader is None else overlay.read_nowait(offset, length, reader.read_cached)
        if data is None:
            return None
        if self._session_io is not None and session is not None:
            self._session_io.session_read(session, len(data))
        return (data,)

    def write_nowait(self, inode: int, offset: int, data: bytes | memoryview) -> int | None:
        """`write` on the caller's thread when it needs no more than a page-cache pwrite
        (`Overlay.write_nowait`): session disks whose overlay is open, else None."""
        found = self._writable_disk_nowait(inode)
        if found is None:
            return None
        overlay, session = found
        written = overlay.write_nowait(offset, data)
        if written is not None and self._session_io is not None:
            self._session_io.session_written(session, written)
        return written

    def write_durably_nowait(self, inode: int, offset: int, data: bytes | memoryview,
                             durability: Durability) -> tuple[int, Callable[[], None]] | None:
        """`write_durably`'s write on the caller's thread, for an open session disk's overlay
        (`Overlay.write_durable_nowait`), with what makes it durable; else None.

        Either level goes through the overlay's journal (see `SessionDisk.write_durably`).
        """
        found = self._writable_disk_nowait(inode)
        if found is None:
            return None
        overlay, session = found
        ticket = overlay.write_durable_nowait(offset, data)
        if ticket is None:
            return None
        if self._session_io is not None:
            self._session_io.session_written(session, len(data))
        return len(data), partial(self._make_durable, overlay, ticket)

    def _writable_disk_nowait(self, inode: int) -> tuple[Overlay, str] | None:
        """The open overlay of a session disk and its session, unless the session is paused
        (then `write` answers TryAgain until it resumes)."""
        overlay = self.files.overlays.get(inode)
        session = self._session_names.get(inode)
        if overlay is None or session is None or session in self.files.paused:
            return None
        return overlay, session

    @staticmethod
    def _make_durable(overlay: Overlay, ticket: int) -> None:
        try:
            overlay.make_durable(ticket)
        except OverlayError as exc:
            raise SessionDiskError(str(exc)) from exc

    def write(self, inode: int, offset: int, data: bytes | memoryview) -> int:
        return self._write(inode, offset, data, None)[0]

    def _write(self, inode: int, offset: int, data: bytes | memoryview,
               durability: Durability | None) -> tuple[int, Node]:
        """A write (durable at `durability`, unless None); the bytes written and the node."""
        node = self._writable(inode)
        if node.kind is Kind.DIRECTORY:
            raise IsADirectory(f"inode {inode} is a directory")
        backing = self._backing(node)
        if durability is None:
            written = backing.write(node, offset, data)
        else:
            written = backing.write_durably(node, offset, data, durability)
        if self._session_io is not None:
            self._session_io.session_written(self._session_name(node), written)
        return written, node

    def fsync(self, inode: int, durability: Durability = Durability.FILE) -> None:
        """Make the file's writes durable; a session disk's mtime is its overlay's, so no LMDB commit."""
        node = self._node(inode)
        backing = self._backings.get(node.role)
        if backing is not None:  # a directory or symlink has nothing of its own to sync
            backing.sync(node, durability)

    def write_durably(self, inode: int, offset: int, data: bytes | memoryview,
                      durability: Durability) -> tuple[int, Attributes]:
        """`write`, durable at `durability` when it returns: the bytes written and the attributes after."""
        written, node = self._write(inode, offset, data, durability)
        return written, self._attributes(node)

    def _new_node(self, parent: int, name: str, kind: Kind, role: Role, mode: int, uid: int, gid: int,
                  ref: dict[str, object], exclusive: bool = True) -> Attributes:
        check_component(name)
        directory = self._writable_container(parent)
        session = self._session_inode(directory)
        with self.store.env.begin(write=True) as txn:
            existing = self.namespace.child(txn, parent, name)
            if existing is not None:
                if exclusive or kind is not Kind.FILE:
                    raise AlreadyExists(f"{name!r} already exists")
                found = self.namespace.node(txn, existing)
                if found is not None and found.kind is Kind.DIRECTORY:
                    raise IsADirectory(f"{name!r} is a directory")
                return self.getattr(existing)
            node = self.namespace.add(txn, parent, name, kind, role, mode & 0o7777, uid, gid,
                                      ref=ref)
            if role == Role.SCRATCH:
                path = scratch_path(self.store, session, node.inode)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        return self.getattr(node.inode)

    def create(self, parent: int, name: str, mode: int, uid: int, gid: int, exclusive: bool) -> Attributes:
        return self._new_node(parent, name, Kind.FILE, Role.SCRATCH, mode, uid, gid, {}, exclusive)

    def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Attributes:
        return self._new_node(parent, name, Kind.DIRECTORY, Role.DIR, mode or DIR_MODE, uid, gid, {})

    def symlink(self, parent: int, name: str, target: str, uid: int, gid: int) -> Attributes:
        return self._new_node(parent, name, Kind.SYMLINK, Role.SYMLINK, 0o777, uid, gid, {"target": target})

    def readlink(self, inode: int) -> str:
        node = self._node(inode)
        if node.kind is not Kind.SYMLINK:
            raise InvalidName(f"inode {inode} is not a symbolic link")
        return node.ref_text("target")

    def _drop_data(self, node: Node) -> None:
        """Release and delete the bytes of a node that is no longer linked."""
        overlay = self.files.forget(node.inode)
        session = self._session_inode(node)
        self._session_names.pop(node.inode, None)
        if node.role == Role.SCRATCH:
            scratch_path(self.store, session, node.inode).unlink(missing_ok=True)
        elif node.role == Role.DISK:
            point, disk = self._session_point(self._node(session)), node.ref_number("disk")
            self._disks.discard(node, overlay, lambda: Overlay.open(overlay_path(self.store, session, disk),
                                                                     self.read_path.disk(point, disk)))

    def _unlink_checked(self, parent: int, name: str, want_directory: bool) -> None:
        check_component(name)
        self._writable_container(parent)
        with self.store.env.begin(write=True) as txn:
            inode = self.namespace.child(txn, parent, name)
            node = self.namespace.node(txn, inode) if inode is not None else None
            if inode is None or node is None:
                raise NotFound(f"no {name!r} in directory inode {parent}")
            self._check_removable(txn, name, node, want_directory)
            self.namespace.unlink(txn, parent, name, inode)
            self.namespace.forget(txn, inode)
        self._changed(inode)
        self._drop_data(node)

    def _check_removable(self, txn: lmdb.Transaction, name: str, node: Node, want_directory: bool) -> None:
        """The rules of unlink/rmdir, also for the entry a rename replaces."""
        if want_directory:
            if node.kind is not Kind.DIRECTORY:
                raise NotADirectory(f"{name!r} is not a directory")
            if self.namespace.has_children(txn, node.inode):
                raise NotEmpty(f"directory {name!r} is not empty")
        elif node.kind is Kind.DIRECTORY:
            raise IsADirectory(f"{name!r} is a directory")

    def remove(self, parent: int, name: str) -> None:
        self._unlink_checked(parent, name, want_directory=False)

    def rmdir(self, parent: int, name: str) -> None:
        self._unlink_checked(parent, name, want_directory=True)

    def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str) -> None:
        check_component(old_name)
        check_component(new_name)
        source_dir, target_dir = self._writable_container(old_parent), self._writable_container(new_parent)
        if self._session_inode(source_dir) != self._session_inode(target_dir):
            raise NotSupported("rename between sessions is not supported (EXDEV)")
        replaced: Node | None = None
        with self.store.env.begin(write=True) as txn:
            inode = self.namespace.child(txn, old_parent, old_name)
            node = self.namespace.node(txn, inode) if inode is not None else None
            if inode is None or node is None:
                raise NotFound(f"no {old_name!r} in directory inode {old_parent}")
            ancestor: Node | None = target_dir
            while ancestor is not None and ancestor.role != Role.SESSION:
                if ancestor.inode == inode:
                    raise InvalidName(f"cannot move directory {old_name!r} into itself")
                ancestor = self.namespace.node(txn, ancestor.parent)
            existing = self.namespace.child(txn, new_parent, new_name)
            if existing == inode:
                return
            if existing is not None:
                replaced = self.namespace.node(txn, existing)
                assert replaced is not None
                self._check_removable(txn, new_name, replaced, node.kind is Kind.DIRECTORY)
                self.namespace.unlink(txn, new_parent, new_name, existing)
                self.namespace.forget(txn, existing)
            self.namespace.unlink(txn, old_parent, old_name, inode)
            self.namespace.link(txn, new_parent, new_name, inode)
            self.namespace.put(txn, node.touched(parent=new_parent))
        self._changed(inode, *((replaced.inode,) if replaced is not None else ()))
        if replaced is not None:
            self._drop_data(replaced)

    def statfs(self) -> FsStats:
        info = os.statvfs(self._area)
        return FsStats(
            total_bytes=info.f_blocks * info.f_frsize,
            free_bytes=info.f_bfree * info.f_frsize,
            available_bytes=info.f_bavail * info.f_frsize,
            total_files=info.f_files,
            free_files=info.f_ffree,
            block_size=info.f_frsize,
            name_max=255,
        )


def file_type_bits(kind: Kind) -> int:
    """The S_IF* bits of a kind, for adapters that report st_mode."""
    return {Kind.DIRECTORY: stat.S_IFDIR, Kind.FILE: stat.S_IFREG, Kind.SYMLINK: stat.S_IFLNK}[kind]
