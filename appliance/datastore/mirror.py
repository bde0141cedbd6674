"""/restore-points as a mirror of the catalog, and the bytes of a restore point's small files.

The catalog is the truth about VMs and restore points; the namespace holds inodes for
them so NFS handles and fileids stay stable. A directory that mirrors the catalog
(`Role.mirrors_catalog`: /restore-points and each VM's folder) is brought in line with
it when it is looked into: points added by a backup appear, points pruned disappear
with their subtree. Each point folder holds its .vmx/.nvram (from the catalog), one
descriptor per disk (generated) and one flat extent per disk (read through the read path).

Restore points never change, so what is read of them is kept: the points themselves and
the small files' bytes. A directory found in line with the catalog in one LMDB snapshot is
not compared again until another transaction commits: every NFS LOOKUP in a VM's folder
asks for a sync. Comparing a VM's folder lists the ids of every point of the catalog and
reads only the points it has not seen before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import lmdb

from appliance.datastore.layout import READ_ONLY_DIR_MODE, READ_ONLY_FILE_MODE
from appliance.datastore.namespace import Namespace, Node
from appliance.datastore.roles import Role
from appliance.datastore.sessions import point_files
from appliance.datastore.vfs import Kind
from appliance.datastore.vmdk_files import descriptor_text
from appliance.store.catalog import RestorePoint
from appliance.store.repository import Store


class CatalogMirror:
    """Keeps /restore-points in line with the catalog; `changed` hears of every commit it makes."""

    def __init__(self, store: Store, namespace: Namespace, changed: Callable[[], None]) -> None:
        self.store = store
        self.namespace = namespace
        self._changed = changed
        self._lock = threading.Lock()
        self._points: dict[str, RestorePoint] = {}
        self._small_files: dict[tuple[str, str], bytes] = {}
        #: Directory inode -> the id of the last LMDB snapshot in which it matched the catalog.
        self._in_line: dict[int, int] = {}

    def point(self, point_id: str) -> RestorePoint:
        point = self._points.get(point_id)
        if point is None:
            with self.store.env.begin() as txn:
                point = self._point_in(txn, point_id)
        return point

    def _point_in(self, txn: lmdb.Transaction, point_id: str) -> RestorePoint:
        point = self._points.get(point_id)
        if point is None:
            point = self.store.catalog.get_point(txn, point_id)
            with self._lock:
                self._points[point_id] = point
        return point

    def disk_size(self, node: Node) -> int:
        """The size of a flat extent (an RP_FILE node with a "disk" reference)."""
        return self.point(node.ref_text("point")).disks[node.ref_number("disk")].size

    def small_file(self, node: Node) -> bytes:
        """The bytes of a point's .vmx/.nvram (as backed up) or of a disk's descriptor (generated)."""
        point = self.point(node.ref_text("point"))
        key = (point.id, str(node.ref.get("file", node.ref.get("descriptor"))))
        data = self._small_files.get(key)
        if data is None:
            if "descriptor" in node.ref:
                index = node.ref_number("descriptor")
                disk = point.disks[index]
                data = descriptor_text(disk.name, disk.size, f"{point.id}/{index}")
            else:
                with self.store.env.begin() as txn:
                    data = point_files(self.store, txn, point)[node.ref_text("file")]
            with self._lock:
                self._small_files[key] = data
        return data

    def sync(self, directory: Node) -> None:
        """Make /restore-points (or one VM's directory) match the catalog."""
        with self.store.env.begin() as txn:
            snapshot = txn.id()
            if self._in_line.get(directory.inode) == snapshot:
                return
            if directory.role is Role.RP_ROOT:
                wanted = set(self.store.catalog.vms(txn))
            else:  # the points of every VM are listed, but only those never seen before are read
                vm = directory.ref_text("vm")
                wanted = {p for p in self.store.catalog.point_ids(txn) if self._point_in(txn, p).vm == vm}
            present = {name: inode for inode, name in self.namespace.children(txn, directory.inode)}
        if wanted == present.keys():
            with self._lock:
                self._in_line[directory.inode] = snapshot
            return
        with self.store.env.begin(write=True) as txn:
            for name in present.keys() - wanted:
                self._forget_subtree(txn, directory.inode, name, present[name])
            for name in sorted(wanted - present.keys()):
                if self.namespace.child(txn, directory.inode, name) is not None:
                    continue
                if directory.role is Role.RP_ROOT:
                    self.namespace.add(txn, directory.inode, name, Kind.DIRECTORY, Role.RP_VM, READ_ONLY_DIR_MODE,
                                       ref={"vm": name})
                else:
                    self._add_point_dir(txn, directory.inode, self.store.catalog.get_point(txn, name))
        self._changed()

    def _add_point_dir(self, txn: lmdb.Transaction, parent: int, point: RestorePoint) -> None:
        folder = self.namespace.add(txn, parent, point.id, Kind.DIRECTORY, Role.RP_POINT, READ_ONLY_DIR_MODE,
                                    ref={"point": point.id})
        entries: list[tuple[str, dict[str, object]]] = [
            (name, {"point": point.id, "file": name}) for name in sorted(point_files(self.store, txn, point))
        ]
        for index, disk in enumerate(point.disks):
            entries.append((f"{disk.name}.vmdk", {"point": point.id, "descriptor": index}))
            entries.append((f"{disk.name}-flat.vmdk", {"point": point.id, "disk": index}))
        for name, ref in entries:
            self.namespace.add(txn, folder.inode, name, Kind.FILE, Role.RP_FILE, READ_ONLY_FILE_MODE, ref=ref)

    def _forget_subtree(self, txn: lmdb.Transaction, parent: int, name: str, inode: int) -> None:
        for child, child_name in list(self.namespace.children(txn, inode)):
            self._forget_subtree(txn, inode, child_name, child)
        self.namespace.unlink(txn, parent, name, inode)
        self.namespace.forget(txn, inode)
