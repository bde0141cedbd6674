"""The fixed top of the datastore tree and where session data lives on disk.

``/restore-points/<vm>/<point>/`` (read-only) and ``/sessions/<name>/`` (writable) sit
directly under the root, so one NFS export or one FUSE mount shows both.
"""

from __future__ import annotations

from pathlib import Path

from appliance.datastore.namespace import ROOT_INODE, Namespace
from appliance.datastore.roles import Role
from appliance.datastore.vfs import Kind
from appliance.store.repository import Store

RESTORE_POINTS = "restore-points"
SESSIONS = "sessions"
FILE_MODE = 0o644
DIR_MODE = 0o755
READ_ONLY_FILE_MODE = 0o444
READ_ONLY_DIR_MODE = 0o555


def ensure_tree(namespace: Namespace) -> dict[str, int]:
    """Create the root, /restore-points and /sessions once; returns their inodes."""
    with namespace.env.begin() as txn:
        found = {name: namespace.child(txn, ROOT_INODE, name) for name in (RESTORE_POINTS, SESSIONS)}
        if namespace.node(txn, ROOT_INODE) is not None and all(found.values()):
            return {name: inode for name, inode in found.items() if inode is not None}
    with namespace.env.begin(write=True) as txn:
        if namespace.node(txn, ROOT_INODE) is None:
            namespace.add(txn, ROOT_INODE, "", Kind.DIRECTORY, Role.ROOT, READ_ONLY_DIR_MODE, inode=ROOT_INODE)
        tops = {RESTORE_POINTS: (Role.RP_ROOT, READ_ONLY_DIR_MODE), SESSIONS: (Role.SESSIONS_ROOT, DIR_MODE)}
        result = {}
        for name, (role, mode) in tops.items():
            inode = namespace.child(txn, ROOT_INODE, name)
            result[name] = inode if inode is not None else namespace.add(
                txn, ROOT_INODE, name, Kind.DIRECTORY, role, mode).inode
        return result


def area_of(store: Store, session_inode: int) -> Path:
    """A session's data directory, named by its (never reused) directory inode."""
    return store.path / "sessions" / str(session_inode)


def scratch_path(store: Store, session_inode: int, inode: int) -> Path:
    return area_of(store, session_inode) / "files" / str(inode)


def overlay_path(store: Store, session_inode: int, disk: int) -> Path:
    return area_of(store, session_inode) / "disks" / str(disk)

