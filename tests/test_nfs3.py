"""NFSv3 procedures over real TCP against the in-memory VFS, one RFC 1813 rule per test.

`NfsClient` here is a deliberately small raw client (arguments encoded by hand, replies
parsed as far as a test needs); the other NFS test modules import it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio

from nfs_export import Export, NfsService, parse_networks, serve_nfs
from nfs_export.handles import FileHandle, HandleCodec
from nfs_export.nfs3 import PROCEDURES
from nfs_export.rpc import AuthFlavor, Credential
from nfs_export.rpc_tcp import RpcClient, open_rpc_client
from nfs_export.xdr import Decoder, Encoder
from appliance.datastore.vfs import Durability
from tests.memory_vfs import MemoryVfs

pytestmark = pytest.mark.trio
SECRET = b"s" * 32
ROOT = Credential(AuthFlavor.AUTH_SYS, 0, 0, (), "test")
USER = Credential(AuthFlavor.AUTH_SYS, 1000, 1000, (1000,), "test")
NFS, MOUNT = (100003, 3), (100005, 3)
OK, PERM, NOENT, ACCES, EXIST, NOTDIR, ISDIR, INVAL = 0, 1, 2, 13, 17, 20, 21, 22
FBIG, ROFS, NAMETOOLONG, NOTEMPTY, STALE = 27, 30, 63, 66, 70
BADHANDLE, NOT_SYNC, BAD_COOKIE, NOTSUPP, TOOSMALL = 10001, 10002, 10003, 10004, 10005
(NULL, GETATTR, SETATTR, LOOKUP, ACCESS, READLINK, READ, WRITE, CREATE, MKDIR, SYMLINK, MKNOD, REMOVE, RMDIR,
 RENAME, LINK, READDIR, READDIRPLUS, FSSTAT, FSINFO, PATHCONF, COMMIT) = range(22)
UNSTABLE, DATA_SYNC, FILE_SYNC = 0, 1, 2
UNCHECKED, GUARDED, EXCLUSIVE = 0, 1, 2


# ----- a raw NFSv3 client ---------------------------------------------------------------


def fattr(d: Decoder) -> dict[str, int]:
    names = ("type", "mode", "nlink", "uid", "gid")
    values = {name: d.uint32() for name in names}
    values.update(size=d.uint64(), used=d.uint64(), rdev=d.uint64(), fsid=d.uint64(), fileid=d.uint64())
    for name in ("atime", "mtime", "ctime"):
        values[name] = d.uint32() * 1_000_000_000 + d.uint32()
    return values


def post_op(d: Decoder) -> dict[str, int] | None:
    return fattr(d) if d.bool() else None


def wcc(d: Decoder) -> tuple[tuple[int, int, int] | None, dict[str, int] | None]:
    before = (d.uint64(), d.uint32() * 10**9 + d.uint32(), d.uint32() * 10**9 + d.uint32()) if d.bool() else None
    return before, post_op(d)


def sattr(e: Encoder, mode: int | None = None, uid: int | None = None, gid: int | None = None,
          size: int | None = None, mtime_ns: int | None = None) -> None:
    for value in (mode, uid, gid):
        e.optional(value, Encoder.uint32)
    e.optional(size, Encoder.uint64)
    e.uint32(0)  # atime: DONT_CHANGE
    if mtime_ns is None:
        e.uint32(0)
    else:
        e.uint32(2)
        e.uint32(mtime_ns // 10**9)
        e.uint32(mtime_ns % 10**9)


def fixed(data: bytes) -> Callable[[Encoder], None]:
    """A fixed-size opaque argument (verifiers)."""
    return lambda e: e.fixed(data)


def args(*items: bytes | str | int | tuple[str, int] | Callable[[Encoder], None]) -> bytes:
    """Encode handles/opaque (bytes), names (str), uint32 (int), ("u64", n) and custom parts."""
    e = Encoder()
    for item in items:
        if isinstance(item, bytes):
            e.opaque(item)
        elif isinstance(item, str):
            e.string(item)
        elif isinstance(item, int):
            e.uint32(item)
        elif isinstance(item, tuple):
            e.uint64(item[1])
        else:
            item(e)
    return bytes(e.data)


@dataclass
class NfsClient:
    nfs: RpcClient
    mount: RpcClient

    async def mnt(self, path: str = "/") -> tuple[int, bytes]:
        reply = await self.mount.call(*MOUNT, 1, args(path))
        status = reply.uint32()
        return status, reply.opaque() if status == 0 else b""

    async def root(self) -> bytes:
        status, handle = await self.mnt("/")
        assert status == 0
        return handle

    async def call(self, procedure: int, *items: bytes | str | int | tuple[str, int] | Callable[[Encoder], None]
                   ) -> tuple[int, Decoder]:
        reply = await self.nfs.call(*NFS, procedure, args(*items))
        return reply.uint32(), reply

    async def ok(self, procedure: int, *items: bytes | str | int | tuple[str, int] | Callable[[Encoder], None]
                 ) -> Decoder:
        status, reply = await self.call(procedure, *items)
        assert status == OK, f"procedure {procedure} answered {status}"
        return reply

    async def getattr(self, handle: bytes) -> dict[str, int]:
        return fattr(await self.ok(GETATTR, handle))

    async def create(self, directory: bytes, name: str, how: int = UNCHECKED, **attributes: int) -> bytes:
        reply = await self.ok(CREATE, directory, name, how, lambda e: sattr(e, **attributes))
        assert reply.bool()
        return reply.opaque()

    async def mkdir(self, directory: bytes, name: str, mode: int = 0o755) -> bytes:
        reply = await self.ok(MKDIR, directory, name, lambda e: sattr(e, mode=mode))
        assert reply.bool()
        return reply.opaque()

    async def write(self, handle: bytes, offset: int, data: bytes, stable: int = FILE_SYNC) -> Decoder:
        return await self.ok(WRITE, handle, ("u64", offset), len(data), stable, data)

    async def read(self, handle: bytes, offset: int, count: int) -> tuple[bytes, bool]:
        reply = await self.ok(READ, handle, ("u64", offset), count)
        post_op(reply)
        reply.uint32()
        eof = reply.bool()
        return reply.opaque(), eof

    async def lookup(self, directory: bytes, name: str) -> bytes:
        return (await self.ok(LOOKUP, directory, name)).opaque()

    async def readdir(self, directory: bytes, count: int, plus: bool = False) -> list[tuple[str, int, bytes | None]]:
        """Every entry, page by page: (name, cookie, handle for READDIRPLUS)."""
        entries: list[tuple[str, int, bytes | None]] = []
        cookie, verifier = 0, bytes(8)
        while True:
            sizes = (count, count) if plus else (count,)
            reply = await self.ok(READDIRPLUS if plus else READDIR, directory, ("u64", cookie),
                                  fixed(verifier), *sizes)
            post_op(reply)
            verifier = reply.fixed(8)
            while reply.bool():
                reply.uint64()
                name, cookie = reply.string(), reply.uint64()
                handle = None
                if plus:
                    post_op(reply)
                    handle = reply.opaque() if reply.bool() else None
                entries.append((name, cookie, handle))
            if reply.bool():
                return entries


ServerFactory = Callable[..., Awaitable[tuple[NfsClient, MemoryVfs]]]


@pytest.fixture
async def start(nursery: trio.Nursery) -> AsyncIterator[ServerFactory]:
    """Start a server over a fresh MemoryVfs with the given export; returns a connected client."""
    clients: list[RpcClient] = []

    async def make(export: Export | None = None, credential: Credential = ROOT,
                   vfs: MemoryVfs | None = None) -> tuple[NfsClient, MemoryVfs]:
        vfs = vfs or MemoryVfs()
        service: NfsService = await nursery.start(partial(serve_nfs, vfs, handle_secret=SECRET, export=export,
                                                          nfs_port=0, mount_port=0, register_portmap=False))
        nfs = await open_rpc_client("127.0.0.1", service.nfs_port, credential=credential)
        mount = await open_rpc_client("127.0.0.1", service.mount_port, credential=credential)
        clients.extend((nfs, mount))
        return NfsClient(nfs, mount), vfs

    yield make
    for client in clients:
        await client.aclose()


# ----- the procedures -------------------------------------------------------------------


async def test_root_attributes_and_filesystem_information(start: ServerFactory) -> None:
    client, vfs = await start()
    root = await client.root()
    attributes = await client.getattr(root)
    assert (attributes["type"], attributes["fileid"], attributes["mode"]) == (2, vfs.root_inode, 0o755)
    info = await client.ok(FSINFO, root)
    post_op(info)
    rtmax, rtpref, _, wtmax, wtpref, _, _ = (info.uint32() for _ in range(7))
    assert rtmax == rtpref == wtmax == wtpref == 1 << 20
    assert info.uint64() == (1 << 63) - 1
    assert (info.uint32(), info.uint32()) == (0, 1)  # time_delta: 1 ns
    assert info.uint32() == 0x2 | 0x8 | 0x10  # SYMLINK | HOMOGENEOUS | CANSETTIME, no LINK
    stat = await client.ok(FSSTAT, root)
    post_op(stat)
    assert stat.uint64() == vfs.statfs().total_bytes
    pathconf = await client.ok(PATHCONF, root)
    post_op(pathconf)
    assert (pathconf.uint32(), pathconf.uint32()) == (1, 255)
    assert [pathconf.bool() for _ in range(4)] == [True, True, False, True]


async def test_write_stability_and_commit(start: ServerFactory) -> None:
    client, vfs = await start()
    handle = await client.create(await client.root(), "vm.log", how=UNCHECKED)
    reply = await client.write(handle, 0, b"hello", stable=UNSTABLE)
    before, after = wcc(reply)
    assert before is not None and before[0] == 0 and after is not None and after["size"] == 5
    assert (reply.uint32(), reply.uint32()) == (5, UNSTABLE)
    verifier = reply.fixed(8)
    assert vfs.syncs == []
    commit = await client.ok(COMMIT, handle, ("u64", 0), 0)
    wcc(commit)
    assert commit.fixed(8) == verifier and vfs.syncs == [Durability.FILE]
    reply = await client.write(handle, 5, b" world", stable=FILE_SYNC)
    wcc(reply)
    assert (reply.uint32(), reply.uint32(), reply.fixed(8)) == (6, FILE_SYNC, verifier)
    reply = await client.write(handle, 11, b"!", stable=DATA_SYNC)
    wcc(reply)
    assert (reply.uint32(), reply.uint32(), reply.fixed(8)) == (1, DATA_SYNC, verifier)  # as asked, no more
    assert vfs.syncs == [Durability.FILE, Durability.FILE, Durability.DATA]
    assert await client.read(handle, 0, 100) == (b"hello world!", True)
    assert await client.read(handle, 0, 5) == (b"hello", False)
    assert await client.read(handle, 12, 5) == (b"", True)
    status, _ = await client.call(WRITE, handle, ("u64", 0), 10, FILE_SYNC, b"short")
    assert status == INVAL


async def test_unstable_writes_are_answered_on_the_loop_like_the_others(start: ServerFactory) -> None:
    """Writes skip the worker thread, with the same reply as through it; errors go through it."""
    client, vfs = await start()
    handle = await client.create(await client.root(), "disk-flat.vmdk")
    verifiers, chunks = [], [os.urandom(65536) for _ in range(3)]
    for stable, offset, chunk in zip((UNSTABLE, FILE_SYNC, UNSTABLE), (0, 65536, 131072), chunks):
        before = await client.getattr(handle)
        reply = await client.write(handle, offset, chunk, stable=stable)
        assert wcc(reply) == ((before["size"], before["mtime"], before["ctime"]), await client.getattr(handle))
        assert (reply.uint32(), reply.uint32()) == (65536, stable)
        verifiers.append(reply.fixed(8))
    assert verifiers[0] == verifiers[1] == verifiers[2]
    # FILE_SYNC too is written on the loop, and its reply waits for its sync
    assert (vfs.nowait_writes, vfs.durable_nowait_writes, vfs.syncs) == (2, 1, [Durability.FILE])
    status, reply = await client.call(WRITE, handle, ("u64", 0), 10, UNSTABLE, b"short")
    assert status == INVAL and wcc(reply)[1] is not None  # the failure body of the ordinary path
    status, reply = await client.call(WRITE, handle, ("u64", (1 << 63) - 2), 5, UNSTABLE, b"large")
    assert status == FBIG
    status, _ = await client.call(WRITE, await client.root(), ("u64", 0), 1, UNSTABLE, b"x")
    assert status == ISDIR and vfs.nowait_writes == 2
    assert await client.read(handle, 0, 3 << 16) == (b"".join(chunks), True)


async def test_exclusive_create_survives_a_retransmission(start: ServerFactory) -> None:
    client, _ = await start()
    root = await client.root()
    verifier = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    first = await client.ok(CREATE, root, "x.lck", EXCLUSIVE, fixed(verifier))
    first.bool()
    handle = first.opaque()
    again = await client.ok(CREATE, root, "x.lck", EXCLUSIVE, fixed(verifier))
    again.bool()
    assert again.opaque() == handle
    status, _ = await client.call(CREATE, root, "x.lck", EXCLUSIVE, fixed(b"another!"))
    assert status == EXIST
    status, _ = await client.call(CREATE, root, "x.lck", GUARDED, lambda e: sattr(e))
    assert status == EXIST
    await client.write(handle, 0, b"data")
    reopened = await client.create(root, "x.lck", how=UNCHECKED, size=0)
    assert reopened == handle and (await client.getattr(handle))["size"] == 0


async def test_setattr_guard_size_mode_and_times(start: ServerFactory) -> None:
    client, _ = await start()
    handle = await client.create(await client.root(), "f")
    await client.write(handle, 0, b"0123456789")
    ctime = (await client.getattr(handle))["ctime"]

    def guarded(ctime_ns: int) -> Callable[[Encoder], None]:
        def encode(e: Encoder) -> None:
            for word in (1, ctime_ns // 10**9, ctime_ns % 10**9):
                e.uint32(word)
        return encode

    status, reply = await client.call(SETATTR, handle, lambda e: sattr(e, size=2), guarded(ctime + 1))
    assert status == NOT_SYNC
    wcc(reply)
    reply = await client.ok(SETATTR, handle, lambda e: sattr(e, size=2, mode=0o600, mtime_ns=1_234_000_000_005),
                            guarded(ctime))
    before, after = wcc(reply)
    assert before is not None and before[0] == 10
    assert after is not None and (after["size"], after["mode"], after["mtime"]) == (2, 0o600, 1_234_000_000_005)


async def test_namespace_operations_and_their_errors(start: ServerFactory) -> None:
    client, _ = await start()
    root = await client.root()
    folder = await client.mkdir(root, "d")
    file = await client.create(folder, "a")
    assert await client.lookup(root, "d") == folder
    assert await client.lookup(folder, "..") == root
    status, reply = await client.call(LOOKUP, root, "missing")
    assert status == NOENT and post_op(reply) is not None  # the directory's attributes
    expectations: list[tuple[tuple[Any, ...], int]] = [
        ((LOOKUP, file, "x"), NOTDIR),
        ((REMOVE, root, "d"), ISDIR),
        ((RMDIR, root, "d"), NOTEMPTY),
        ((RMDIR, folder, "a"), NOTDIR),
        ((MKDIR, root, "d", lambda e: sattr(e)), EXIST),
        ((CREATE, root, "n" * 256, UNCHECKED, lambda e: sattr(e)), NAMETOOLONG),
        ((MKNOD, root, "fifo", 7, lambda e: sattr(e)), NOTSUPP),
        ((LINK, file, root, "hard"), NOTSUPP),
        ((READ, folder, ("u64", 0), 10), ISDIR),
        ((READLINK, file), INVAL),
    ]
    for call, expected in expectations:
        status, _ = await client.call(*call)
        assert status == expected, call[0]
    reply = await client.ok(SYMLINK, folder, "link", lambda e: sattr(e), "../target")
    assert reply.bool()
    link = reply.opaque()
    readlink = await client.ok(READLINK, link)
    post_op(readlink)
    assert readlink.string() == "../target"
    rename = await client.ok(RENAME, folder, "a", root, "b")
    (_, from_after), (_, to_after) = wcc(rename), wcc(rename)
    assert from_after is not None and to_after is not None and from_after["fileid"] != to_after["fileid"]
    assert await client.lookup(root, "b") == file
    await client.ok(REMOVE, folder, "link")
    await client.ok(RMDIR, root, "d")
    status, _ = await client.call(GETATTR, folder)
    assert status == STALE


@pytest.mark.parametrize("plus", [False, True], ids=["READDIR", "READDIRPLUS"])
async def test_readdir_pages_through_a_directory_that_changes(start: ServerFactory, plus: bool) -> None:
    client, _ = await start()
    root = await client.root()
    folder = await client.mkdir(root, "many")
    names = [f"file-{i:03d}-{'x' * (i % 17)}" for i in range(60)]
    for name in names:
        await client.create(folder, name)
    entries = await client.readdir(folder, 1024 if plus else 400, plus)
    assert [e[0] for e in entries] == [".", "..", *names]
    assert [e[1] for e in entries] == sorted({e[1] for e in entries})
    if plus:
        handles = {name: handle for name, _, handle in entries}
        assert handles["."] == folder and handles[".."] == root
        assert (await client.getattr(handles[names[5]] or b""))["type"] == 1
    # a listing resumes after a removed entry, and new entries show up at the end
    resume_after = entries[10][1]
    await client.ok(REMOVE, folder, entries[10][0])
    await client.create(folder, "late")
    reply = await client.ok(READDIR, folder, ("u64", resume_after), fixed(bytes(8)), 100_000)
    post_op(reply)
    reply.fixed(8)
    rest = []
    while reply.bool():
        reply.uint64()
        rest.append(reply.string())
        reply.uint64()
    assert rest == [*names[9:], "late"]


async def test_readdir_limits_and_cookie_verifier(start: ServerFactory) -> None:
    client, _ = await start()
    root = await client.root()
    await client.create(root, "a")
    status, _ = await client.call(READDIR, root, ("u64", 0), fixed(bytes(8)), 50)
    assert status == TOOSMALL
    reply = await client.ok(READDIR, root, ("u64", 0), fixed(bytes(8)), 4096)
    post_op(reply)
    verifier = reply.fixed(8)
    reply = await client.ok(READDIR, root, ("u64", 2), fixed(verifier), 4096)
    status, _ = await client.call(READDIR, root, ("u64", 2), fixed(b"12345678"), 4096)
    assert status == BAD_COOKIE


async def test_forged_and_stale_handles(start: ServerFactory) -> None:
    client, _ = await start()
    root = await client.root()
    gone = await client.create(root, "gone")
    await client.ok(REMOVE, root, "gone")
    tampered = bytearray(root)
    tampered[12] ^= 1
    other_secret = HandleCodec(b"t" * 32).encode(FileHandle(1, 1, 1))
    for handle, expected in ((gone, STALE), (bytes(tampered), BADHANDLE), (other_secret, BADHANDLE),
                             (b"", BADHANDLE), (os.urandom(25), BADHANDLE), (root + b"x", BADHANDLE)):
        status, _ = await client.call(GETATTR, handle)
        assert status == expected
    assert len(root) <= 56
    renewed = HandleCodec(SECRET).encode(FileHandle(1, 1, (await client.getattr(root))["fileid"] + 1))
    status, _ = await client.call(GETATTR, renewed)
    assert status in (STALE, BADHANDLE)


async def test_read_only_subtree_answers_rofs(start: ServerFactory) -> None:
    client, vfs = await start()
    root = await client.root()
    folder = await client.mkdir(root, "restore-point")
    file = await client.create(folder, "disk-flat.vmdk")
    await client.write(file, 0, b"backup bytes")
    vfs.freeze(vfs.lookup(vfs.root_inode, "restore-point").inode)
    for call in ((WRITE, file, ("u64", 0), 1, FILE_SYNC, b"x"), (WRITE, file, ("u64", 0), 1, UNSTABLE, b"x"),
                 (SETATTR, file, lambda e: sattr(e, size=0), 0),
                 (CREATE, folder, "new", UNCHECKED, lambda e: sattr(e)),
                 (MKDIR, folder, "new", lambda e: sattr(e)),
                 (REMOVE, folder, "disk-flat.vmdk"),
                 (RENAME, folder, "disk-flat.vmdk", root, "stolen")):
        status, _ = await client.call(*call)
        assert status == ROFS, call[0]
    assert await client.read(file, 0, 100) == (b"backup bytes", True)
    access = await client.ok(ACCESS, file, 0x3F)
    post_op(access)
    assert access.uint32() == 0x1  # READ only: no MODIFY/EXTEND on a restore point


async def test_read_only_export(start: ServerFactory) -> None:
    vfs = MemoryVfs()
    vfs.create(vfs.root_inode, "f", 0o644, 0, 0, exclusive=True)
    client, _ = await start(Export(read_only=True), vfs=vfs)
    root = await client.root()
    file = await client.lookup(root, "f")
    for call in ((WRITE, file, ("u64", 0), 1, FILE_SYNC, b"x"), (WRITE, file, ("u64", 0), 1, UNSTABLE, b"x"),
                 (CREATE, root, "g", UNCHECKED, lambda e: sattr(e)), (COMMIT, file, ("u64", 0), 0)):
        status, _ = await client.call(*call)
        assert status == ROFS
    assert await client.read(file, 0, 10) == (b"", True)


async def test_client_outside_the_export_networks_is_refused(start: ServerFactory) -> None:
    client, vfs = await start(Export(allow=parse_networks(["10.9.9.0/24"])))
    assert (await client.mnt("/"))[0] == ACCES
    forged = HandleCodec(SECRET).encode(FileHandle(1, vfs.root_inode, vfs.getattr(vfs.root_inode).generation))
    status, reply = await client.call(GETATTR, forged)
    assert status == ACCES
    status, reply = await client.call(LOOKUP, forged, "x")
    assert status == ACCES and post_op(reply) is None  # no attributes for a refused client
    file = vfs.create(vfs.root_inode, "f", 0o666, 0, 0, exclusive=True)
    forged_file = HandleCodec(SECRET).encode(FileHandle(1, file.inode, file.generation))
    status, reply = await client.call(WRITE, forged_file, ("u64", 0), 1, UNSTABLE, b"x")
    assert status == ACCES and wcc(reply) == (None, None) and vfs.read(file.inode, 0, 1) == b""


async def test_root_squash_and_permission_bits(start: ServerFactory) -> None:
    vfs = MemoryVfs()
    vfs.mkdir(vfs.root_inode, "home", 0o755, 1000, 1000)
    squashed, _ = await start(Export(root_squash=True), credential=ROOT, vfs=vfs)
    user, _ = await start(Export(root_squash=True), credential=USER, vfs=vfs)
    root = await squashed.root()
    status, _ = await squashed.call(CREATE, root, "root-file", UNCHECKED, lambda e: sattr(e))
    assert status == ACCES  # root became nobody, and / is 0755 root
    user_home = await user.lookup(await user.root(), "home")
    private = await user.create(user_home, "private", mode=0o444)
    assert (await user.getattr(private))["uid"] == 1000
    await user.write(private, 0, b"owner may write a 0444 file it created")
    await user.write(private, 0, b"O", stable=UNSTABLE)
    for stable in (FILE_SYNC, UNSTABLE):
        status, _ = await squashed.call(WRITE, private, ("u64", 0), 1, stable, b"x")
        assert status == ACCES
    assert (await user.read(private, 0, 5))[0] == b"Owner"
    status, _ = await user.call(SETATTR, private, lambda e: sattr(e, uid=0), 0)
    assert status == PERM
    access = await squashed.ok(ACCESS, private, 0x3F)
    post_op(access)
    assert access.uint32() == 0x1  # others may read a 0444 file, nothing more


def _views_in(value: object) -> bool:
    """Whether a decoded argument structure holds a memoryview anywhere (a view of its record)."""
    if isinstance(value, memoryview):
        return True
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_views_in(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (tuple, list)):
        return any(_views_in(item) for item in value)
    return False


async def test_only_write_arguments_are_views_of_their_record() -> None:
    """The transport keeps a record's bytes only for WRITE (`keeps_views`): every other procedure's
    decoded arguments must be copies, or a reused receive buffer would change them under the handler."""
    handle, name, verifier = b"h" * 25, "disk-flat.vmdk", fixed(bytes(8))
    no_attrs = lambda e: sattr(e)  # noqa: E731
    samples: dict[str, bytes] = {
        "GETATTR": args(handle), "SETATTR": args(handle, no_attrs, 0), "LOOKUP": args(handle, name),
        "ACCESS": args(handle, 0x3F), "READLINK": args(handle), "READ": args(handle, ("u64", 0), 4096),
        "WRITE": args(handle, ("u64", 0), 5, FILE_SYNC, b"hello"), "CREATE": args(handle, name, UNCHECKED, no_attrs),
        "MKDIR": args(handle, name, no_attrs), "SYMLINK": args(handle, name, no_attrs, "target"),
        "MKNOD": args(handle, name, 7, no_attrs), "REMOVE": args(handle, name), "RMDIR": args(handle, name),
        "RENAME": args(handle, name, handle, "new"), "LINK": args(handle, handle, name),
        "READDIR": args(handle, ("u64", 0), verifier, 4096), "READDIRPLUS": args(handle, ("u64", 0), verifier, 4096, 8192),
        "FSSTAT": args(handle), "FSINFO": args(handle), "PATHCONF": args(handle), "COMMIT": args(handle, ("u64", 0), 0),
    }
    holding = set()
    for procedure in PROCEDURES.values():
        decoded = procedure.decode(Decoder(memoryview(bytearray(samples[procedure.name]))))
        if _views_in(decoded):
            holding.add(procedure.name)
    assert holding == {"WRITE"}
