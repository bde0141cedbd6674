"""The datastore: one VFS over restore points and sessions, served by FUSE and NFS.

Every node has a role, and each role has one place where its bytes come from:

=============  ==================================================  ==========
role           bytes                                               writable
=============  ==================================================  ==========
root, rp-*     directories mirroring the catalog (made on demand)  no (EROFS)
rp-file        .vmx/.nvram from the catalog, a generated            no (EROFS)
               descriptor, or the flat extent via the read path
session, dir   directories in the namespace                        yes
scratch        a plain file in the session's area                  yes
disk           the session disk's copy-on-write overlay            yes
symlink        the target kept in the node                         yes
=============  ==================================================  ==========

Bytes read from and written to a session's files are reported to an optional
`SessionIo` (metrics), named by session: only the datastore knows which session an
inode belongs to.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from typing import Iterator, Protocol, Sequence

import lmdb

from appliance.datastore.layout import (
    DIR_MODE,
    READ_ONLY_DIR_MODE,
    READ_ONLY_FILE_MODE,
    RESTORE_POINTS,
    SESSIONS,
    ensure_tree,
    overlay_path,
    scratch_path,
)
from appliance.datastore.namespace import ROOT_INODE, Namespace, Node
from appliance.datastore.sessions import get_session, point_files
from appliance.datastore.vfs import Attributes, AttributeChanges, DirEntry, Durability, FsStats, Kind
from appliance.datastore.vmdk_files import descriptor_text
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
    SessionBusy,
    StaleHandle,
    TryAgain,
)
from appliance.names import check_component
from appliance.store.catalog import RestorePoint
from appliance.store.reader import ReadPath
from appliance.store.repository import Store
from overlay import Overlay, OverlayClosed, OverlayError

_READ_ONLY_ROLES = frozenset({"root", "rp-root", "rp-vm", "rp-point", "rp-file"})
_CONTAINER_ROLES = frozenset({"session", "dir"})


class SessionIo(Protocol):
    """Hears the bytes each read or write moved in a session's files (worker threads)."""

    def session_read(self, session: str, size: int) -> None: ...
    def session_written(self, session: str, size: int) -> None: ...


def _paused(session: str) -> TryAgain:
    """What a change to a session that is being committed or removed gets: clients retry."""
    return TryAgain(f"session {session!r} is being committed or removed; retry")


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
        self._points: dict[str, RestorePoint] = {}
        self._small_files: dict[tuple[str, str], bytes] = {}
        self._overlays: dict[int, Overlay] = {}
        self._fds: dict[int, int] = {}
        self._flat_extents: dict[int, tuple[str, int]] = {}  # restore-point flat inode -> (point, disk)
        self._flat_attributes: dict[int, Attributes] = {}
        self._session_disks: dict[int, tuple[str, int]] = {}  # session flat inode -> its base (point, disk)
        self._node_cache: dict[int, Node] = {}
        self._node_epoch = 0
        self._paused: set[str] = set()  # sessions the control plane is committing or removing

    def close(self) -> None:
        with self._lock:
            overlays, self._overlays = list(self._overlays.values()), {}
            fds, self._fds = list(self._fds.values()), {}
        for overlay in overlays:
            overlay.flush()
            overlay.close()
        for fd in fds:
            os.close(fd)

    @contextlib.contextmanager
    def session_paused(self, name: str) -> Iterator[None]:
        """Let go of a session's files while the serving process commits or removes it.

        Changes to the session are refused with `TryAgain` (NFS clients retry on JUKEBOX)
        and its overlays are flushed and closed, so the caller sees every acknowledged
        write and no open handle outlives a removal. Reads go on.
        """
        with self._lock:
            if name in self._paused:
                raise SessionBusy(f"session {name!r} is already being committed or removed")
            self._paused.add(name)
        try:
            self._release_session(name)
            yield
        finally:
            try:
                self._release_session(name)  # overlays reads opened meanwhile: none outlives a removal
            finally:
                with self._lock:
                    self._paused.discard(name)
                self._changed()

    def _release_session(self, name: str) -> None:
        with self._lock:
            held = set(self._overlays) | set(self._fds)
        for inode in held:
            try:
                if self._session_name(self._node(inode)) != name:
                    continue
            except StaleHandle:
                pass
            with self._lock:
                overlay = self._overlays.pop(inode, None)
                fd = self._fds.pop(inode, None)
            if overlay is not None:
                overlay.flush()
                overlay.close()
            if fd is not None:
                os.fsync(fd)
                os.close(fd)

    @contextlib.contextmanager
    def _released_retried(self, node: Node) -> Iterator[None]:
        """A call that met its overlay closing (a pause began after the call was let in) is
        refused with TryAgain, so the client resends it to the reopened overlay."""
        try:
            yield
        except OverlayClosed:
            raise self._let_go(node) from None

    def _let_go(self, node: Node) -> TryAgain:
        return TryAgain(f"session {self._session_name(node)!r} let go of its disks; retry")

    def _check_not_paused(self, node: Node) -> None:
        if self._paused and self._session_name(node) in self._paused:
            raise _paused(self._session_name(node))

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

    def _point(self, point_id: str) -> RestorePoint:
        point = self._points.get(point_id)
        if point is None:
            with self.store.env.begin() as txn:
                point = self.store.catalog.get_point(txn, point_id)
            self._points[point_id] = point
        return point

    def _sync_mirror(self, directory: Node) -> None:
        """Make /restore-points (or one VM's directory) match the catalog."""
        with self.store.env.begin() as txn:
            if directory.role == "rp-root":
                wanted = set(self.store.catalog.vms(txn))
            else:
                wanted = {p.id for p in self.store.catalog.points(txn, str(directory.ref["vm"]))}
            present = {name: inode for inode, name in self.namespace.children(txn, directory.inode)}
        if wanted == present.keys():
            return
        with self.store.env.begin(write=True) as txn:
            for name in present.keys() - wanted:
                self._forget_subtree(txn, directory.inode, name, present[name])
            for name in sorted(wanted - present.keys()):
                if self.namespace.child(txn, directory.inode, name) is not None:
                    continue
                if directory.role == "rp-root":
                    self.namespace.add(txn, directory.inode, name, Kind.DIRECTORY, "rp-vm", READ_ONLY_DIR_MODE,
                                       ref={"vm": name})
                else:
                    self._add_point_dir(txn, directory.inode, self.store.catalog.get_point(txn, name))
        self._changed()

    def _add_point_dir(self, txn: lmdb.Transaction, parent: int, point: RestorePoint) -> None:
        folder = self.namespace.add(txn, parent, point.id, Kind.DIRECTORY, "rp-point", READ_ONLY_DIR_MODE,
                                    ref={"point": point.id})
        entries: list[tuple[str, dict[str, object]]] = [
            (name, {"point": point.id, "file": name}) for name in sorted(point_files(self.store, txn, point))
        ]
        for index, disk in enumerate(point.disks):
            entries.append((f"{disk.name}.vmdk", {"point": point.id, "descriptor": index}))
            entries.append((f"{disk.name}-flat.vmdk", {"point": point.id, "disk": index}))
        for name, ref in entries:
            self.namespace.add(txn, folder.inode, name, Kind.FILE, "rp-file", READ_ONLY_FILE_MODE, ref=ref)

    def _forget_subtree(self, txn: lmdb.Transaction, parent: int, name: str, inode: int) -> None:
        for child, child_name in list(self.namespace.children(txn, inode)):
            self._forget_subtree(txn, inode, child_name, child)
        self.namespace.unlink(txn, parent, name, inode)
        self.namespace.forget(txn, inode)

    # ----- where a node's bytes live --------------------------------------------------

    def _session_inode(self, node: Node) -> int:
        return self._session_node(node).inode

    def _session_node(self, node: Node) -> Node:
        while node.role != "session":
            node = self._node(node.parent)
        return node

    def _session_name(self, node: Node) -> str:
        """The name of the session `node` belongs to, walked up to once per inode."""
        name = self._session_names.get(node.inode)
        if name is None:
            name = self._session_names[node.inode] = str(self._session_node(node).ref["session"])
        return name

    def _fd(self, node: Node) -> int:
        with self._lock:
            fd = self._fds.get(node.inode)
        if fd is None:
            path = scratch_path(self.store, self._session_inode(node), node.inode)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            with self._lock:
                existing = self._fds.setdefault(node.inode, fd)
            if existing != fd:
                os.close(fd)
                fd = existing
        return fd

    def _overlay(self, node: Node, *, changing: bool = False) -> Overlay:
        """The session disk's open overlay, opened if need be.

        For a change, a paused session's overlay is not opened again (TryAgain): the check
        and the registration happen under one lock, so no change slips in after the pause
        released the overlays.
        """
        overlay = self._overlays.get(node.inode)  # one dict read is atomic; registering takes the lock
        if overlay is None:
            session = self._node(self._session_inode(node))
            info_point = self._session_point(session)
            disk = int(node.ref["disk"])  # type: ignore[call-overload]
            base = self.read_path.disk(info_point, disk)
            overlay = Overlay.open(overlay_path(self.store, session.inode, disk), base)
            self._session_disks[node.inode] = (info_point.id, disk)
            name = self._session_name(node)  # known before the overlay is: `write_nowait` checks for a pause by name
            with self._lock:
                refused = changing and name in self._paused
                existing = overlay if refused else self._overlays.setdefault(node.inode, overlay)
            if refused:
                overlay.close()
                raise _paused(name)
            if existing is not overlay:
                overlay.close()
                overlay = existing
        return overlay

    def _session_point(self, session: Node) -> RestorePoint:
        return self._point(get_session(self.namespace, str(session.ref["session"])).point)

    def _small_file(self, node: Node) -> bytes:
        point = self._point(str(node.ref["point"]))
        key = (point.id, str(node.ref.get("file", node.ref.get("descriptor"))))
        data = self._small_files.get(key)
        if data is None:
            if "descriptor" in node.ref:
                index = int(node.ref["descriptor"])  # type: ignore[call-overload]
                disk = point.disks[index]
                data = descriptor_text(disk.name, disk.size, f"{point.id}/{index}")
            else:
                with self.store.env.begin() as txn:
                    data = point_files(self.store, txn, point)[str(node.ref["file"])]
            self._small_files[key] = data
        return data

    # ----- attributes -------------------------------------------------------------------

    def _attributes(self, node: Node) -> Attributes:
        size = used = 0
        atime, mtime, ctime = node.atime_ns, node.mtime_ns, node.ctime_ns
        if node.role == "scratch":
            info = os.fstat(self._fd(node))
            size, used = info.st_size, info.st_blocks * 512
            atime, mtime, ctime = info.st_atime_ns, info.st_mtime_ns, max(ctime, info.st_ctime_ns)
        elif node.role == "disk":
            try:  # `_released_retried`, written out: this runs twice for every WRITE answered on the loop
                overlay = self._overlay(node)
                size, used = overlay.size, overlay.allocated_bytes()
            except OverlayClosed:
                raise self._let_go(node) from None
            mtime = max(mtime, overlay.modified_ns)
            ctime = max(ctime, mtime)
        elif node.role == "rp-file":
            if "disk" in node.ref:
                size = self._point(str(node.ref["point"])).disks[int(node.ref["disk"])].size  # type: ignore[call-overload]
            else:
                size = len(self._small_file(node))
            used = size
        elif node.kind is Kind.SYMLINK:
            size = len(str(node.ref["target"]).encode())
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
            read_only=node.role in _READ_ONLY_ROLES,
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
        if directory.role in ("rp-root", "rp-vm"):
            self._sync_mirror(directory)
        with self.store.env.begin() as txn:
            inode = self.namespace.child(txn, parent, name)
        if inode is None:
            raise NotFound(f"no {name!r} in directory inode {parent}")
        return self.getattr(inode)

    def readdir(self, inode: int, after_cookie: int = 0) -> Iterator[DirEntry]:
        directory = self._node(inode)
        if directory.kind is not Kind.DIRECTORY:
            raise NotADirectory(f"inode {inode} is not a directory")
        if directory.role in ("rp-root", "rp-vm"):
            self._sync_mirror(directory)
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
        if directory.role in _READ_ONLY_ROLES:
            raise ReadOnly(f"{RESTORE_POINTS} and the datastore root are read-only")
        if directory.role == "sessions-root":
            raise PermissionDenied("sessions are made and removed with `appliance session create|delete`")
        if directory.kind is not Kind.DIRECTORY:
            raise NotADirectory(f"inode {parent} is not a directory")
        self._check_not_paused(directory)
        return directory

    def _writable(self, inode: int) -> Node:
        node = self._node(inode)
        if node.role in _READ_ONLY_ROLES:
            raise ReadOnly(f"restore point files are read-only (inode {inode})")
        self._check_not_paused(node)
        return node

    def setattr(self, inode: int, changes: AttributeChanges) -> Attributes:
        node = self._writable(inode)
        if node.role == "sessions-root" and changes != AttributeChanges():
            raise PermissionDenied("/sessions cannot be changed")
        if changes.size is not None:
            if node.kind is Kind.DIRECTORY:
                raise IsADirectory(f"cannot truncate directory inode {inode}")
            if node.role == "scratch":
                os.ftruncate(self._fd(node), changes.size)
            elif node.role == "disk":
                with self._released_retried(node):
                    self._overlay(node, changing=True).truncate(changes.size)
        if node.role == "scratch" and (changes.atime_ns is not None or changes.mtime_ns is not None):
            info = os.fstat(self._fd(node))
            os.utime(self._fd(node), ns=(changes.atime_ns if changes.atime_ns is not None else info.st_atime_ns,
                                         changes.mtime_ns if changes.mtime_ns is not None else info.st_mtime_ns))
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
        if node.role == "rp-file":
            if "disk" in node.ref:
                point, disk = self._point(str(node.ref["point"])), int(node.ref["disk"])  # type: ignore[call-overload]
                self._flat_extents[inode] = (point.id, disk)  # immutable: safe to remember
                return self.read_path.read(point, disk, offset, length)
            return self._small_file(node)[offset : offset + length]
        if node.role == "disk":
            with self._released_retried(node):
                data = self._overlay(node).read(offset, length)
        elif node.role == "scratch":
            data = os.pread(self._fd(node), length, offset)
        else:
            raise NotSupported(f"inode {inode} has no data")
        if self._session_io is not None:
            self._session_io.session_read(self._session_name(node), len(data))
        return data

    def getattr_nowait(self, inode: int) -> Attributes | None:
        """Attributes from memory alone: restore-point flat extents, and session disks already open."""
        flat = inode in self._flat_extents
        if not flat and inode not in self._overlays:
            return None
        node = self._node_cache.get(inode)  # gone when the point or session was removed: the slow path says so
        if node is None:
            return None
        if not flat:
            try:
                return self._attributes(node)
            except (OverlayError, TryAgain):  # closed under us by a pause: the slow path says what to do
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
        base = self._session_disks.get(inode)
        overlay = self._overlays.get(inode)
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
        (`Overlay.write_nowait`): session disks whose overlay is open, else None.

        A paused session is left to `write`, which answers TryAgain until it resumes.
        """
        overlay = self._overlays.get(inode)
        session = self._session_names.get(inode)
        if inode not in self._session_disks or overlay is None or session is None or session in self._paused:
            return None
        written = overlay.write_nowait(offset, data)
        if written is not None and self._session_io is not None:
            self._session_io.session_written(session, written)
        return written

    def write(self, inode: int, offset: int, data: bytes | memoryview) -> int:
        node = self._writable(inode)
        if node.kind is Kind.DIRECTORY:
            raise IsADirectory(f"inode {inode} is a directory")
        if node.role == "disk":
            with self._released_retried(node):
                written = self._overlay(node, changing=True).write(offset, data)
        elif node.role == "scratch":
            written = os.pwrite(self._fd(node), data, offset)
        else:
            raise NotSupported(f"inode {inode} cannot be written")
        if self._session_io is not None:
            self._session_io.session_written(self._session_name(node), written)
        return written

    def fsync(self, inode: int, durability: Durability = Durability.FILE) -> None:
        """Make the file's writes durable; a session disk's mtime is its overlay's, so no LMDB commit."""
        node = self._node(inode)
        if node.role == "disk":
            with self._released_retried(node):
                self._overlay(node).flush(metadata=durability is Durability.FILE)
        elif node.role == "scratch":
            (os.fsync if durability is Durability.FILE else os.fdatasync)(self._fd(node))

    def write_durably(self, inode: int, offset: int, data: bytes | memoryview,
                      durability: Durability) -> tuple[int, Attributes]:
        """`write`, then `fsync` at `durability`: the bytes written and the attributes after both."""
        written = self.write(inode, offset, data)
        self.fsync(inode, durability)
        return written, self.getattr(inode)

    def _new_node(self, parent: int, name: str, kind: Kind, role: str, mode: int, uid: int, gid: int,
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
            if role == "scratch":
                path = scratch_path(self.store, session, node.inode)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        return self.getattr(node.inode)

    def create(self, parent: int, name: str, mode: int, uid: int, gid: int, exclusive: bool) -> Attributes:
        return self._new_node(parent, name, Kind.FILE, "scratch", mode, uid, gid, {}, exclusive)

    def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Attributes:
        return self._new_node(parent, name, Kind.DIRECTORY, "dir", mode or DIR_MODE, uid, gid, {})

    def symlink(self, parent: int, name: str, target: str, uid: int, gid: int) -> Attributes:
        return self._new_node(parent, name, Kind.SYMLINK, "symlink", 0o777, uid, gid, {"target": target})

    def readlink(self, inode: int) -> str:
        node = self._node(inode)
        if node.kind is not Kind.SYMLINK:
            raise InvalidName(f"inode {inode} is not a symbolic link")
        return str(node.ref["target"])

    def _drop_data(self, node: Node) -> None:
        """Release and delete the bytes of a node that is no longer linked."""
        with self._lock:
            fd = self._fds.pop(node.inode, None)
            overlay = self._overlays.pop(node.inode, None)
        self._session_names.pop(node.inode, None)
        if fd is not None:
            os.close(fd)
        session = self._session_inode(node)
        if node.role == "scratch":
            scratch_path(self.store, session, node.inode).unlink(missing_ok=True)
        elif node.role == "disk":
            if overlay is None:
                overlay = self._overlay_for_drop(node, session)
            overlay.discard()

    def _overlay_for_drop(self, node: Node, session: int) -> Overlay:
        point = self._session_point(self._node(session))
        disk = int(node.ref["disk"])  # type: ignore[call-overload]
        return Overlay.open(overlay_path(self.store, session, disk), self.read_path.disk(point, disk))

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
            while ancestor is not None and ancestor.role != "session":
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
