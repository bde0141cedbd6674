"""What a datastore node stands for: its role, stored with the node in the namespace.

A role decides where a node's bytes come from and whether it may change (see the table
in `appliance.datastore.datastore`). The values are the strings the namespace has always
stored, so the on-disk format is unchanged.
"""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    ROOT = "root"  # the datastore's top directory
    RP_ROOT = "rp-root"  # /restore-points
    RP_VM = "rp-vm"  # /restore-points/<vm>
    RP_POINT = "rp-point"  # /restore-points/<vm>/<point>
    RP_FILE = "rp-file"  # a file of a restore point: .vmx/.nvram, a descriptor or a flat extent
    SESSIONS_ROOT = "sessions-root"  # /sessions
    SESSION = "session"  # /sessions/<name>
    DIR = "dir"  # a directory a client made inside a session
    SCRATCH = "scratch"  # a plain file of a session (logs, swap, locks, .vmx, descriptors)
    DISK = "disk"  # a session disk's flat extent: the copy-on-write overlay
    SYMLINK = "symlink"

    @property
    def read_only(self) -> bool:
        """Inside /restore-points, or the fixed top of the tree: EROFS to every client."""
        return self in _READ_ONLY

    @property
    def mirrors_catalog(self) -> bool:
        """A directory whose entries follow the catalog (synced before it is read)."""
        return self in (Role.RP_ROOT, Role.RP_VM)


_READ_ONLY = frozenset({Role.ROOT, Role.RP_ROOT, Role.RP_VM, Role.RP_POINT, Role.RP_FILE})
