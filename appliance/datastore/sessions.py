"""Sessions: writable views of a restore point, each disk behind a copy-on-write overlay.

A session lives in three places, created and removed in an order that makes a crash at
any moment harmless (leftovers are unreferenced files, never dangling references):

- ``STORE/sessions/<dir-inode>/``: ``disks/<n>/`` overlays and ``files/<inode>`` data of
  every plain file a hypervisor creates (logs, swap, locks) and of the .vmx/.nvram and
  descriptors, which ESXi rewrites.
- The namespace: a directory under ``/sessions`` with the point's files.
- The ``sessions`` LMDB table: name -> what the session was made from.

Sessions are created while the datastore is served (LMDB serialises the writers), but
commit and delete need the session's files let go of: offline by taking
``datastore.lock`` (a serving process holds it), or inside the serving process through
``Datastore.session_paused``. Storing a session as a restore point or a disk file is
application work above the datastore (`appliance.session_commit`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import lmdb

from appliance.datastore.layout import (
    DIR_MODE,
    FILE_MODE,
    SESSIONS,
    area_of,
    ensure_tree,
    overlay_path,
    scratch_path,
)
from appliance.datastore.namespace import Namespace
from appliance.datastore.roles import Role
from appliance.datastore.vfs import Kind
from appliance.datastore.vmdk_files import descriptor_text, minimal_vmx, session_vmx
from appliance.durable import write_durably
from appliance.errors import AlreadyExists, NotFound, SessionBusy
from appliance.names import SESSION_NAME
from appliance.store.catalog import RestorePoint
from appliance.store.reader import ReadPath
from appliance.store.repository import Store
from overlay import Overlay

@dataclass(frozen=True, slots=True)
class SessionInfo:
    name: str
    vm: str
    point: str
    created: float
    inode: int  # the session directory; also names its area on disk
    disks: tuple[int, ...]  # inode of each disk's flat extent, in disk order
    expires: float | None = None  # epoch seconds after which a serving appliance ends it


class SessionTable:
    def __init__(self, namespace: Namespace) -> None:
        self._db = namespace.sessions_table

    def get(self, txn: lmdb.Transaction, name: str) -> SessionInfo | None:
        raw = txn.get(SESSION_NAME.check(name).encode(), db=self._db)
        if raw is None:
            return None
        doc = json.loads(bytes(raw))
        doc["disks"] = tuple(doc["disks"])
        return SessionInfo(**doc)

    def put(self, txn: lmdb.Transaction, info: SessionInfo) -> None:
        txn.put(info.name.encode(), json.dumps(asdict(info)).encode(), db=self._db)

    def delete(self, txn: lmdb.Transaction, name: str) -> None:
        txn.delete(name.encode(), db=self._db)

    def all(self, txn: lmdb.Transaction) -> list[SessionInfo]:
        with txn.cursor(db=self._db) as cursor:
            names = [bytes(key).decode() for key in cursor.iternext(keys=True, values=False)]
        return [info for name in names if (info := self.get(txn, name)) is not None]


def point_files(store: Store, txn: lmdb.Transaction, point: RestorePoint) -> dict[str, bytes]:
    """The .vmx (as backed up, or a minimal one) and .nvram of a point."""
    files = {name: store.catalog.file(txn, point, name) for name in point.files}
    files.setdefault(f"{point.vm}.vmx", minimal_vmx(point.vm, [d.name for d in point.disks]))
    return files


def create_session(store: Store, namespace: Namespace, read_path: ReadPath, vm: str, point_ref: str,
                   name: str, expires: float | None = None) -> SessionInfo:
    """Make a writable session of a restore point; usable at once by a running server."""
    SESSION_NAME.check(name)
    table = SessionTable(namespace)
    sessions_root = ensure_tree(namespace)[SESSIONS]
    with store.env.begin(write=True) as txn:
        point = store.catalog.resolve(txn, vm, point_ref)
        if table.get(txn, name) is not None or namespace.child(txn, sessions_root, name) is not None:
            raise AlreadyExists(f"session {name!r} already exists")
        directory = namespace.add(txn, sessions_root, name, Kind.DIRECTORY, Role.SESSION, DIR_MODE,
                                  ref={"session": name})
        area = area_of(store, directory.inode)
        (area / "files").mkdir(parents=True)
        (area / "disks").mkdir()
        disk_names = [disk.name for disk in point.disks]
        for file_name, content in point_files(store, txn, point).items():
            if file_name.endswith(".vmx"):
                content = session_vmx(content, point.vm, disk_names)
            node = namespace.add(txn, directory.inode, file_name, Kind.FILE, Role.SCRATCH, FILE_MODE,
                                 ref={"session": name})
            write_durably(scratch_path(store, directory.inode, node.inode), content)
        disks = []
        for index, disk in enumerate(point.disks):
            descriptor = namespace.add(txn, directory.inode, f"{disk.name}.vmdk", Kind.FILE, Role.SCRATCH, FILE_MODE,
                                       ref={"session": name})
            write_durably(scratch_path(store, directory.inode, descriptor.inode),
                           descriptor_text(disk.name, disk.size, f"{name}/{point.id}/{index}"))
            flat = namespace.add(txn, directory.inode, f"{disk.name}-flat.vmdk", Kind.FILE, Role.DISK, FILE_MODE,
                                 ref={"session": name, "disk": index})
            target = overlay_path(store, directory.inode, index)
            target.mkdir()
            Overlay.create(target, read_path.disk(point, index)).close()
            disks.append(flat.inode)
        info = SessionInfo(name, vm, point.id, time.time(), directory.inode, tuple(disks), expires)
        table.put(txn, info)
        store.share_hold(point.id, _holder(name))
        store.catalog.add_hold(txn, point.id, _holder(name))
    return info


def list_sessions(namespace: Namespace) -> list[SessionInfo]:
    with namespace.env.begin() as txn:
        return sorted(SessionTable(namespace).all(txn), key=lambda s: s.created)


def get_session(namespace: Namespace, name: str) -> SessionInfo:
    with namespace.env.begin() as txn:
        info = SessionTable(namespace).get(txn, name)
    if info is None:
        raise NotFound(f"unknown session {name!r}")
    return info


@contextlib.contextmanager
def datastore_lock(store: Store, exclusive_for: str | None = None) -> Iterator[None]:
    """Held by a serving process; commit/delete take it to be sure nothing is open.

    With `exclusive_for` (an operation's name), fail at once if a server holds it.
    """
    fd = os.open(store.path / "datastore.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            what = exclusive_for or "serve"
            raise SessionBusy(
                f"cannot {what}: the datastore of {store.path} is being served (mount/serve is running)"
            ) from None
        yield
    finally:
        os.close(fd)


def delete_session(store: Store, namespace: Namespace, name: str) -> None:
    """Drop a session while no process serves the datastore."""
    with datastore_lock(store, f"delete session {name!r}"):
        remove_released_session(store, namespace, name)


def remove_released_session(store: Store, namespace: Namespace, name: str) -> None:
    """Drop a session nothing holds open: the datastore lock, or `Datastore.session_paused`."""
    info = get_session(namespace, name)
    with store.env.begin(write=True) as txn:
        _forget_tree(namespace, txn, info.inode)
        node = namespace.node(txn, info.inode)
        if node is not None:
            namespace.unlink(txn, node.parent, name, info.inode)
            namespace.forget(txn, info.inode)
        SessionTable(namespace).delete(txn, name)
        store.catalog.release_hold(txn, info.point, _holder(name))
    store.unshare_hold(info.point, _holder(name))
    shutil.rmtree(area_of(store, info.inode), ignore_errors=True)


def _forget_tree(namespace: Namespace, txn: lmdb.Transaction, directory: int) -> None:
    for inode, child_name in list(namespace.children(txn, directory)):
        _forget_tree(namespace, txn, inode)
        namespace.unlink(txn, directory, child_name, inode)
        namespace.forget(txn, inode)


def _holder(name: str) -> str:
    return f"session:{name}"
