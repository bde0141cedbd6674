"""MOUNT v3: which paths give a root handle, the mount list and the export list."""

from __future__ import annotations

import pytest

from nfs_export import Export, parse_networks
from nfs_export.rpc import AuthFlavor
from nfs_export.xdr import Decoder
from tests import test_nfs3
from tests.memory_vfs import MemoryVfs
from tests.test_nfs3 import MOUNT, ServerFactory, args

pytestmark = pytest.mark.trio
MNT, DUMP, UMNT, UMNTALL, EXPORT = 1, 2, 3, 4, 5
MNT3_OK, MNT3ERR_NOENT, MNT3ERR_NOTDIR = 0, 2, 20
start = test_nfs3.start  # the fixture that starts a server over a MemoryVfs


def tree() -> tuple[MemoryVfs, int]:
    vfs = MemoryVfs()
    sessions = vfs.mkdir(vfs.root_inode, "sessions", 0o755, 0, 0)
    s1 = vfs.mkdir(sessions.inode, "s1", 0o755, 0, 0)
    vfs.create(s1.inode, "vm1.vmx", 0o644, 0, 0, exclusive=True)
    return vfs, s1.inode


def linked_list(reply: Decoder, fields: int) -> list[tuple[str, ...]]:
    items = []
    while reply.bool():
        items.append(tuple(reply.string() for _ in range(fields)))
    return items


@pytest.mark.parametrize(("path", "status", "names"), [
    ("/", MNT3_OK, []),
    ("/datastore", MNT3_OK, []),
    ("/datastore/", MNT3_OK, []),
    ("/datastore/sessions/s1", MNT3_OK, ["sessions", "s1"]),
    ("/sessions/s1", MNT3_OK, ["sessions", "s1"]),
    ("/sessions/./s1/../s1", MNT3_OK, ["sessions", "s1"]),
    ("/datastore/missing", MNT3ERR_NOENT, None),
    ("/sessions/s1/vm1.vmx", MNT3ERR_NOTDIR, None),
])
async def test_mnt_resolves_paths_below_the_export(start: ServerFactory, path: str, status: int,
                                                   names: list[str] | None) -> None:
    vfs, _ = tree()
    client, _ = await start(Export(path="/datastore"), vfs=vfs)
    reply = await client.mount.call(*MOUNT, MNT, args(path))
    assert reply.uint32() == status
    if names is None:
        return
    handle = reply.opaque()
    assert reply.array(Decoder.uint32) == [AuthFlavor.AUTH_SYS, AuthFlavor.AUTH_NONE]
    inode = vfs.root_inode
    for name in names:
        inode = vfs.lookup(inode, name).inode
    assert (await client.getattr(handle))["fileid"] == inode


async def test_mount_list_and_export_list(start: ServerFactory) -> None:
    client, _ = await start(Export(path="/datastore", allow=parse_networks(["127.0.0.0/8", "10.1.0.0/16"])))
    for path in ("/datastore", "/"):
        assert (await client.mnt(path))[0] == MNT3_OK
    assert linked_list(await client.mount.call(*MOUNT, DUMP), 2) == [("127.0.0.1", "/"),
                                                                      ("127.0.0.1", "/datastore")]
    await client.mount.call(*MOUNT, UMNT, args("/"))
    assert linked_list(await client.mount.call(*MOUNT, DUMP), 2) == [("127.0.0.1", "/datastore")]
    await client.mount.call(*MOUNT, UMNTALL)
    assert linked_list(await client.mount.call(*MOUNT, DUMP), 2) == []
    exports = await client.mount.call(*MOUNT, EXPORT)
    assert exports.bool() and exports.string() == "/datastore"
    assert linked_list(exports, 1) == [("127.0.0.0/8",), ("10.1.0.0/16",)]
    assert not exports.bool()
