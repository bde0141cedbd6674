"""A session leaves the datastore: as a new restore point (commit) or as a disk file (export).

Both read the session's disks through their overlays, so they need the session's files
let go of: offline by taking the datastore lock (`commit_session`, `export_session_disk`,
which fail at once while a server holds it), or inside the serving process while
`Datastore.session_paused` holds the session (`commit_released_session`,
`export_released_session_disk`, called by the control plane). A commit is an ingest:
the new point is an incremental child of the session's base point that reads only the
overlays' changed ranges; everything else is the parent's chunks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from appliance.datastore.layout import overlay_path, scratch_path
from appliance.datastore.namespace import Namespace
from appliance.datastore.sessions import SessionInfo, datastore_lock, get_session
from appliance.errors import NotFound, OutputRefused
from appliance.ingest.backup import ingest
from appliance.store.catalog import RestorePoint
from appliance.store.reader import ReadPath
from appliance.store.repository import Store
from overlay import Overlay, export_disk


class OverlaySource:
    """A session disk as an ingest source: the merged view of base and overlay."""

    def __init__(self, label: str, overlay: Overlay) -> None:
        self.path = label
        self.format = "session"
        self.size = overlay.size
        self._overlay = overlay

    def read(self, offset: int, length: int) -> bytes:
        return self._overlay.read(offset, length)

    def is_unallocated(self, offset: int, length: int) -> bool:
        return False

    def close(self) -> None:
        self._overlay.close()


def _open_overlays(store: Store, namespace: Namespace, read_path: ReadPath, info: SessionInfo,
                   stack: contextlib.ExitStack) -> tuple[RestorePoint, list[Overlay]]:
    with store.env.begin() as txn:
        point = store.catalog.get_point(txn, info.point)
        missing = [n for n, inode in enumerate(info.disks) if namespace.node(txn, inode) is None]
    if missing:
        raise NotFound(f"session {info.name!r} no longer has disk {missing[0]} (its flat extent was deleted)")
    overlays = []
    for index in range(len(info.disks)):
        overlay = Overlay.open(overlay_path(store, info.inode, index), read_path.disk(point, index))
        stack.callback(overlay.close)
        overlays.append(overlay)
    return point, overlays


def commit_session(store: Store, namespace: Namespace, read_path: ReadPath, name: str) -> RestorePoint:
    """Store a session's disks as a new restore point while no process serves the datastore."""
    with datastore_lock(store, f"commit session {name!r}"):
        return commit_released_session(store, namespace, read_path, name)


def commit_released_session(store: Store, namespace: Namespace, read_path: ReadPath, name: str) -> RestorePoint:
    """Store the session's disks as a new restore point, a child of its base point.

    The caller makes sure nothing writes to the session meanwhile (see
    `remove_released_session`). Only the overlay's changed ranges are read: everything
    else is the parent's chunks. The session's current .vmx/.nvram go with it.
    """
    with contextlib.ExitStack() as stack:
        info = get_session(namespace, name)
        point, overlays = _open_overlays(store, namespace, read_path, info, stack)
        files = {}
        with store.env.begin() as txn:
            for file_name in (f"{info.vm}.vmx", f"{info.vm}.nvram"):
                inode = namespace.child(txn, info.inode, file_name)
                if inode is not None:
                    files[file_name] = scratch_path(store, info.inode, inode).read_bytes()
        sources = [OverlaySource(f"session {name} disk {n}", overlay) for n, overlay in enumerate(overlays)]
        changed = [overlay.changed_ranges() for overlay in overlays]
        return ingest(store, info.vm, sources, files, parent_ref=point.id, changed=changed)


def export_session_disk(store: Store, namespace: Namespace, read_path: ReadPath, name: str, disk: int,
                        output: Path) -> None:
    """Write a session disk's merged view to a new sparse file while no process serves the datastore."""
    with datastore_lock(store, f"export session {name!r}"):
        export_released_session_disk(store, namespace, read_path, name, disk, output)


def export_released_session_disk(store: Store, namespace: Namespace, read_path: ReadPath, name: str, disk: int,
                                 output: Path) -> None:
    """Write the session's merged view of one disk to a new sparse file (see `remove_released_session`)."""
    with contextlib.ExitStack() as stack:
        info = get_session(namespace, name)
        if not 0 <= disk < len(info.disks):
            raise NotFound(f"session {name!r} has no disk {disk}")
        _, overlays = _open_overlays(store, namespace, read_path, info, stack)
        if output.exists() or output.is_symlink():
            raise OutputRefused(f"cannot export to {output}: it exists (an export only creates a new file)")
        try:
            export_disk(overlays[disk], output)
        except OSError as exc:
            raise OutputRefused(f"cannot export to {output}: {exc.strerror or exc}") from None
