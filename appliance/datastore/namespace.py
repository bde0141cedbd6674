"""Persistent inodes and directory entries of the datastore, in the store's LMDB.

Tables:

- ``ns_nodes``: inode -> JSON node (kind, role, mode, owner, times, generation, parent,
  role-specific references such as the restore point or session it stands for).
- ``ns_names``: parent inode + name -> inode (lookup).
- ``ns_children``: parent inode + child inode -> name (readdir in inode order, so a
  child's inode number is a readdir cookie that stays valid while entries come and go).
- ``sessions``: session name -> what it was made from (see `sessions`).
- ``meta`` key ``ns-next-inode``: inode numbers are handed out once and never reused,
  which keeps NFS file handles and ESXi's ``.lck-<fileid>`` names unambiguous forever.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

import lmdb

from appliance.datastore.roles import Role
from appliance.errors import StoreError
from appliance.datastore.vfs import Kind

ROOT_INODE = 1
_U64 = struct.Struct(">Q")
_NEXT_INODE = b"ns-next-inode"


@dataclass(frozen=True, slots=True)
class Node:
    inode: int
    generation: int
    parent: int
    kind: Kind
    role: Role
    mode: int
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    ref: dict[str, object] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        doc["kind"] = self.kind.value
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Node":
        doc = json.loads(raw)
        doc["kind"] = Kind(doc["kind"])
        doc["role"] = Role(doc["role"])
        return cls(**doc)

    def ref_text(self, key: str) -> str:
        """A reference the node's role gives it: a point id, a VM, a session or file name."""
        return str(self.ref[key])

    def ref_number(self, key: str) -> int:
        """A numeric reference (a disk index); the namespace stores it as a JSON integer."""
        value = self.ref[key]
        if not isinstance(value, int):
            raise StoreError(f"namespace node {self.inode}: reference {key!r} is {value!r}, not a number")
        return value

    def touched(self, **changes: object) -> "Node":
        """A copy with `changes` and a new ctime."""
        return replace(self, ctime_ns=time.time_ns(), **changes)  # type: ignore[arg-type]


def _name_key(parent: int, name: str) -> bytes:
    return _U64.pack(parent) + name.encode("utf-8", "surrogateescape")


class Namespace:
    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self._nodes = env.open_db(b"ns_nodes")
        self._names = env.open_db(b"ns_names")
        self._children = env.open_db(b"ns_children")
        self._meta = env.open_db(b"meta")
        #: Opened here, once: opening a table inside a write transaction would deadlock.
        self.sessions_table = env.open_db(b"sessions")

    def node(self, txn: lmdb.Transaction, inode: int) -> Node | None:
        raw = txn.get(_U64.pack(inode), db=self._nodes)
        return None if raw is None else Node.from_bytes(bytes(raw))

    def child(self, txn: lmdb.Transaction, parent: int, name: str) -> int | None:
        raw = txn.get(_name_key(parent, name), db=self._names)
        return None if raw is None else _U64.unpack(raw)[0]

    def children(self, txn: lmdb.Transaction, parent: int, after: int = 0) -> Iterator[tuple[int, str]]:
        """(inode, name) of a directory's entries with inode > `after`, in inode order."""
        prefix = _U64.pack(parent)
        with txn.cursor(db=self._children) as cursor:
            if not cursor.set_range(prefix + _U64.pack(after + 1)):
                return
            for key, value in cursor:
                if key[:8] != prefix:
                    return
                yield _U64.unpack(key[8:])[0], bytes(value).decode("utf-8", "surrogateescape")

    def has_children(self, txn: lmdb.Transaction, parent: int) -> bool:
        return next(self.children(txn, parent), None) is not None

    def put(self, txn: lmdb.Transaction, node: Node) -> None:
        txn.put(_U64.pack(node.inode), node.to_bytes(), db=self._nodes)

    def _allocate(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_NEXT_INODE, db=self._meta)
        inode = ROOT_INODE + 1 if raw is None else _U64.unpack(raw)[0]
        txn.put(_NEXT_INODE, _U64.pack(inode + 1), db=self._meta)
        return inode

    def add(
        self,
        txn: lmdb.Transaction,
        parent: int,
        name: str,
        kind: Kind,
        role: Role,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        ref: dict[str, object] | None = None,
        inode: int | None = None,
    ) -> Node:
        """Create a node and its entry `name` in `parent` (inode given only for the root)."""
        now = time.time_ns()
        node = Node(
            inode=inode if inode is not None else self._allocate(txn),
            generation=int.from_bytes(os.urandom(4), "little") | 1,
            parent=parent,
            kind=kind,
            role=role,
            mode=mode,
            uid=uid,
            gid=gid,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
            ref=ref or {},
        )
        self.put(txn, node)
        if node.inode != parent:
            self.link(txn, parent, name, node.inode)
        return node

    def link(self, txn: lmdb.Transaction, parent: int, name: str, inode: int) -> None:
        txn.put(_name_key(parent, name), _U64.pack(inode), db=self._names)
        txn.put(_U64.pack(parent) + _U64.pack(inode), name.encode("utf-8", "surrogateescape"), db=self._children)

    def unlink(self, txn: lmdb.Transaction, parent: int, name: str, inode: int) -> None:
        txn.delete(_name_key(parent, name), db=self._names)
        txn.delete(_U64.pack(parent) + _U64.pack(inode), db=self._children)

    def forget(self, txn: lmdb.Transaction, inode: int) -> None:
        """Drop a node record; its number is never handed out again."""
        txn.delete(_U64.pack(inode), db=self._nodes)
