"""The NFS version 3 program (RFC 1813) over a `Vfs`.

Every procedure is one row of `PROCEDURES`: how its arguments decode, the handler, the
body a failure carries, and whether it changes anything. `Nfs3Server._answer` does the
common part once: export check, read-only export, running the handler in a worker thread
(the VFS blocks; `nfs_export.workers`), mapping exceptions to nfsstat3 through `ERRORS`, and building the
failure body (post-op attributes / wcc_data, which clients use to keep caches right).
READ and UNSTABLE WRITE are first offered to the VFS's nowait calls on the event loop
(`_read_from_memory`, `_write_to_page_cache`); only what those decline comes to `_answer`.

Write stability: the verifier is random per server start, so after a restart clients
resend UNSTABLE writes that no COMMIT covered. A DATA_SYNC or FILE_SYNC write is one
`Vfs.write_durably` call (write, sync at that level, post-op attributes) and is answered
with the level it asked for: DATA_SYNC makes the bytes durable, FILE_SYNC the file's
attributes too, as RFC 1813 defines them. ESXi writes FILE_SYNC; concurrent stable
writes share their flushes in the VFS (group commit). COMMIT syncs at FILE level.

EXCLUSIVE create keeps the client's verifier in the new file's mtime/atime seconds (as
Linux knfsd does), so a retransmitted CREATE finds it and succeeds; the client's
following SETATTR then sets real times.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Generic, TypeVar

from appliance import errors
from appliance.datastore.vfs import AttributeChanges, Attributes, Durability, Kind, Vfs
from nfs_export.exports import (
    ACCESS3_LOOKUP,
    ACCESS3_MODIFY,
    ACCESS3_READ,
    CHANGING,
    Export,
    Identity,
)
from nfs_export.handles import BadHandle, FileHandle, HandleCodec
from nfs_export.nfs3_readdir import READDIR3resok, ReaddirError, read_directory
from nfs_export.nfs3_types import (
    FSF3_CANSETTIME,
    FSF3_HOMOGENEOUS,
    FSF3_SYMLINK,
    NFS3_COOKIEVERFSIZE,
    NFS3_WRITEVERFSIZE,
    NFS_PROGRAM,
    NFS_V3,
    ACCESS3args,
    ACCESS3resok,
    COMMIT3args,
    COMMIT3resok,
    CREATE3args,
    CREATE3resok,
    FH3args,
    FSINFO3resok,
    FSSTAT3resok,
    GETATTR3resok,
    LINK3args,
    LINK3res,
    LOOKUP3resok,
    MKDIR3args,
    MKNOD3args,
    PATHCONF3resok,
    POSTOP3res,
    READ3args,
    READ3resok,
    READDIR3args,
    READLINK3resok,
    RENAME3args,
    RENAME3res,
    SETATTR3args,
    SYMLINK3args,
    WCC3res,
    WRITE3args,
    WRITE3resok,
    createmode3,
    diropargs3,
    fattr3,
    nfsstat3,
    sattr3,
    stable_how,
    time_how,
    wcc_data,
)
from nfs_export.rpc import Call, Encodable, HeldResult, Procedure, Program, Void, decode_void
from nfs_export.workers import WorkerPool
from nfs_export.xdr import Decoder, Encoder

log = logging.getLogger(__name__)
A = TypeVar("A")

MAX_TRANSFER = 1 << 20  # rtmax = wtmax = rtpref = wtpref: ESXi uses what FSINFO offers
MAX_FILE_SIZE = (1 << 63) - 1
NAME_MAX = 255
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
_VERIFIER_TIMES = struct.Struct(">II")

#: VFS exceptions -> nfsstat3, first match wins (subclasses before their bases).
ERRORS: tuple[tuple[type[BaseException], nfsstat3], ...] = (
    (BadHandle, nfsstat3.NFS3ERR_BADHANDLE),
    (errors.StaleHandle, nfsstat3.NFS3ERR_STALE),
    (errors.NotFound, nfsstat3.NFS3ERR_NOENT),
    (errors.ReadOnly, nfsstat3.NFS3ERR_ROFS),
    (errors.AlreadyExists, nfsstat3.NFS3ERR_EXIST),
    (errors.NotEmpty, nfsstat3.NFS3ERR_NOTEMPTY),
    (errors.NotADirectory, nfsstat3.NFS3ERR_NOTDIR),
    (errors.IsADirectory, nfsstat3.NFS3ERR_ISDIR),
    (errors.PermissionDenied, nfsstat3.NFS3ERR_ACCES),
    (errors.NotSupported, nfsstat3.NFS3ERR_NOTSUPP),
    (errors.NameTooLong, nfsstat3.NFS3ERR_NAMETOOLONG),
    (errors.InvalidName, nfsstat3.NFS3ERR_INVAL),
    (errors.IntegrityError, nfsstat3.NFS3ERR_IO),
    (errors.TryAgain, nfsstat3.NFS3ERR_JUKEBOX),
    (errors.SessionDiskError, nfsstat3.NFS3ERR_IO),
)
#: OSError errnos a client can act on; every other OSError is NFS3ERR_IO.
OS_ERRORS = {errno.ENOSPC: nfsstat3.NFS3ERR_NOSPC, errno.EDQUOT: nfsstat3.NFS3ERR_DQUOT,
             errno.EFBIG: nfsstat3.NFS3ERR_FBIG}


class NfsError(Exception):
    """A status decided by the NFS layer itself (permissions, bad arguments, ...)."""

    def __init__(self, status: nfsstat3) -> None:
        super().__init__(status.name)
        self.status = status


def nfsstat_for(exc: BaseException) -> nfsstat3 | None:
    """The status for an exception, or None if it is a bug (answered SERVERFAULT)."""
    if isinstance(exc, (NfsError, ReaddirError)):
        return exc.status
    for kind, status in ERRORS:
        if isinstance(exc, kind):
            return status
    if isinstance(exc, OSError):
        return OS_ERRORS.get(exc.errno or 0, nfsstat3.NFS3ERR_IO)
    return None


@dataclass(slots=True)
class NfsResult:
    """A result union: the status, then the OK or failure body."""

    status: nfsstat3
    body: Encodable

    def encode(self, encoder: Encoder) -> None:
        encoder.uint32(self.status)
        self.body.encode(encoder)


AttrsOf = Callable[[bytes], "fattr3 | None"]


@dataclass(frozen=True, slots=True)
class NfsProcedure(Generic[A]):
    name: str
    decode: Callable[[Decoder], A]
    handle: Callable[[Nfs3Server, Identity, A], Encodable]
    failure: Callable[[A, AttrsOf], Encodable]
    modifies: bool = False


def _void_failure(args: object, attrs: AttrsOf) -> Encodable:
    return Void()


def _post_op_failure(handle: Callable[[Any], bytes]) -> Callable[[Any, AttrsOf], Encodable]:
    return lambda args, attrs: POSTOP3res(attrs(handle(args)))


def _wcc_failure(handle: Callable[[Any], bytes]) -> Callable[[Any, AttrsOf], Encodable]:
    return lambda args, attrs: WCC3res(wcc_data(None, attrs(handle(args))))


def _verifier_times(verifier: bytes) -> tuple[int, int]:
    """(atime_ns, mtime_ns) that hold an EXCLUSIVE create verifier, as knfsd stores it."""
    mtime, atime = _VERIFIER_TIMES.unpack(verifier)
    return atime * 1_000_000_000, mtime * 1_000_000_000


def _changes(attributes: sattr3, *, times_only: bool = False) -> AttributeChanges:
    now = time.time_ns()

    def when(value: int | time_how | None) -> int | None:
        return now if value is time_how.SET_TO_SERVER_TIME else value

    if times_only:
        return AttributeChanges(size=attributes.size, atime_ns=when(attributes.atime), mtime_ns=when(attributes.mtime))
    return AttributeChanges(size=attributes.size, mode=attributes.mode, uid=attributes.uid, gid=attributes.gid,
                            atime_ns=when(attributes.atime), mtime_ns=when(attributes.mtime))


class Nfs3Server:
    """NFSv3 over one VFS and one export. Handlers run in worker threads."""

    def __init__(self, vfs: Vfs, export: Export, codec: HandleCodec, workers: WorkerPool) -> None:
        self.vfs = vfs
        self.workers = workers
        self.export = export
        self.codec = codec
        self.fsid = int.from_bytes(codec.derived(b"fsid", 8), "big")
        self.cookie_verifier = codec.derived(b"cookieverf", NFS3_COOKIEVERFSIZE)
        self.write_verifier = os.urandom(NFS3_WRITEVERFSIZE)  # new on every start: clients resend unstable writes

    def program(self) -> Program:
        procedures: dict[int, Procedure[Any]] = {0: Procedure("NULL", decode_void, self._null, keeps_views=False)}
        answered_at_once: dict[Callable[..., Encodable], Callable[[Call, Any], NfsResult | HeldResult | None]] = {
            Nfs3Server.read: self._read_from_memory, Nfs3Server.write: self._write_to_page_cache}
        for number, procedure in PROCEDURES.items():
            nowait = answered_at_once.get(procedure.handle)
            procedures[number] = Procedure(procedure.name, procedure.decode, self._runner(procedure), nowait,
                                           keeps_views=procedure.handle is Nfs3Server.write)
        return Program(NFS_PROGRAM, NFS_V3, "NFS", procedures)

    async def _null(self, call: Call, args: None) -> Encodable:
        return Void()

    def _runner(self, procedure: NfsProcedure[A]) -> Callable[[Call, A], Any]:
        async def run(call: Call, args: A) -> Encodable:
            return await self.workers.run(self._answer, procedure, call, args)

        return run

    def _file_from_memory(self, call: Call, raw: bytes, wanted: int) -> Attributes | None:
        """The file a handle names, if its attributes are in memory and the caller may do
        `wanted` to it (`_answer`'s export check, then `file_refusal`); else None.
        """
        if not self.export.allows(call.client):
            return None
        try:
            handle = self.codec.decode(raw)
        except BadHandle:
            return None
        attributes = self.vfs.getattr_nowait(handle.fileid)
        if attributes is None or self.file_refusal(handle, attributes, self.export.identity(call.credential),
                                                   wanted) is not None:
            return None
        return attributes

    def _read_from_memory(self, call: Call, args: READ3args) -> NfsResult | None:
        """A READ answered on the event loop when attributes and bytes are in memory.

        Anything unusual (a refused client, a bad handle, permissions, a cache miss) goes
        the ordinary way, through a worker thread, so errors are built in one place.
        """
        attributes = self._file_from_memory(call, args.file, ACCESS3_READ)
        if attributes is None:
            return None
        count = min(args.count, MAX_TRANSFER)
        pieces = self.vfs.read_nowait(attributes.inode, args.offset, count) if count else ()
        if pieces is None:
            return None
        return NfsResult(nfsstat3.NFS3_OK, self._read_result(attributes, args.offset, count, pieces))

    def _read_result(self, attributes: Attributes, offset: int, count: int,
                     pieces: Sequence[bytes | bytearray | memoryview]) -> READ3resok:
        got = sum(map(len, pieces))
        return READ3resok(self.fattr(attributes), got < count or offset + got >= attributes.size, got, pieces)

    def _write_to_page_cache(self, call: Call, args: WRITE3args) -> NfsResult | HeldResult | None:
        """A WRITE answered on the event loop when the VFS can take it at once.

        A thread hop costs ten times the page-cache write itself. An UNSTABLE write is
        answered at once; a DATA_SYNC or FILE_SYNC one is written at once and its reply
        held until the transport has read the calls at hand and made them durable with
        one sync (`HeldResult`). Anything unusual (a refused client, a read-only export, a
        bad handle or argument, permissions, a write that could wait) goes the ordinary
        way through a worker thread, where errors are built.
        """
        if self.export.read_only or args.count > len(args.data) or args.offset + args.count > MAX_FILE_SIZE:
            return None
        before = self._file_from_memory(call, args.file, ACCESS3_MODIFY)
        if before is None:
            return None
        data = args.data[: args.count]
        ready = None
        if args.stable is stable_how.UNSTABLE:
            written = self.vfs.write_nowait(before.inode, args.offset, data)
        else:
            durability = Durability.DATA if args.stable is stable_how.DATA_SYNC else Durability.FILE
            started = self.vfs.write_durably_nowait(before.inode, args.offset, data, durability)
            written, ready = (None, None) if started is None else started
        if written is None:
            return None
        after = self.vfs.getattr_nowait(before.inode)  # None only if the node just left memory: no post-op attributes
        file_wcc = wcc_data(self.fattr(before).wcc(), None if after is None else self.fattr(after))
        result = NfsResult(nfsstat3.NFS3_OK, WRITE3resok(file_wcc, written, args.stable, self.write_verifier))
        return result if ready is None else HeldResult(result, ready)

    def _answer(self, procedure: NfsProcedure[A], call: Call, args: A) -> NfsResult:
        allowed = self.export.allows(call.client)
        try:
            if not allowed:
                raise NfsError(nfsstat3.NFS3ERR_ACCES)
            if procedure.modifies and self.export.read_only:
                raise NfsError(nfsstat3.NFS3ERR_ROFS)
            return NfsResult(nfsstat3.NFS3_OK, procedure.handle(self, self.export.identity(call.credential), args))
        except Exception as exc:
            status = nfsstat_for(exc)
            if status is None:
                log.exception("NFS %s from %s failed", procedure.name, call.client)
                status = nfsstat3.NFS3ERR_SERVERFAULT
            elif status is nfsstat3.NFS3ERR_IO:
                log.error("NFS %s from %s: I/O error: %s", procedure.name, call.client, exc)
            return NfsResult(status, procedure.failure(args, self.quiet_attrs if allowed else lambda handle: None))

    # ----- handles and attributes -------------------------------------------------------

    def fattr(self, attributes: Attributes) -> fattr3:
        return fattr3(attributes, self.fsid)

    def handle(self, attributes: Attributes) -> bytes:
        return self.codec.encode(FileHandle(self.export.export_id, attributes.inode, attributes.generation))

    def describe(self, attributes: Attributes) -> tuple[fattr3, bytes]:
        return self.fattr(attributes), self.handle(attributes)

    def resolve(self, raw: bytes) -> Attributes:
        """The current attributes of the object a handle names (BADHANDLE / STALE if none)."""
        handle = self.codec.decode(raw)
        if handle.export_id != self.export.export_id:
            raise NfsError(nfsstat3.NFS3ERR_STALE)
        try:
            attributes = self.vfs.getattr(handle.fileid)
        except (errors.StaleHandle, errors.NotFound):
            raise NfsError(nfsstat3.NFS3ERR_STALE) from None
        if attributes.generation & 0xFFFF_FFFF != handle.generation:
            raise NfsError(nfsstat3.NFS3ERR_STALE)
        return attributes

    def quiet_attrs(self, raw: bytes) -> fattr3 | None:
        """Post-op attributes for a failure reply: whatever can be had, else none."""
        try:
            return self.fattr(self.resolve(raw))
        except (NfsError, BadHandle, errors.ApplianceError, OSError):
            return None

    def directory(self, raw: bytes) -> Attributes:
        attributes = self.resolve(raw)
        if attributes.kind is not Kind.DIRECTORY:
            raise NfsError(nfsstat3.NFS3ERR_NOTDIR)
        return attributes

    def file(self, raw: bytes) -> Attributes:
        attributes = self.resolve(raw)
        if attributes.kind is Kind.DIRECTORY:
            raise NfsError(nfsstat3.NFS3ERR_ISDIR)
        if attributes.kind is not Kind.FILE:
            raise NfsError(nfsstat3.NFS3ERR_INVAL)
        return attributes

    def require(self, attributes: Attributes, who: Identity, wanted: int, *, owner_override: bool = False) -> None:
        refusal = self._refusal(attributes, who, wanted, owner_override)
        if refusal is not None:
            raise NfsError(refusal)

    def _refusal(self, attributes: Attributes, who: Identity, wanted: int, owner_override: bool) -> nfsstat3 | None:
        if self.export.may(attributes, who, wanted, owner_override=owner_override):
            return None
        read_only = wanted & CHANGING and (attributes.read_only or self.export.read_only)
        return nfsstat3.NFS3ERR_ROFS if read_only else nfsstat3.NFS3ERR_ACCES

    def file_refusal(self, handle: FileHandle, attributes: Attributes, who: Identity, wanted: int) -> nfsstat3 | None:
        """Why `who` may not do `wanted` (READ or WRITE) to the file `handle` names, given its
        attributes now; None if it may. What `checked_file` checks, for the loop's nowait paths.
        """
        if handle.export_id != self.export.export_id or attributes.generation & 0xFFFF_FFFF != handle.generation:
            return nfsstat3.NFS3ERR_STALE
        return self._use_refusal(attributes, who, wanted)

    def _use_refusal(self, attributes: Attributes, who: Identity, wanted: int) -> nfsstat3 | None:
        if attributes.kind is not Kind.FILE:
            return nfsstat3.NFS3ERR_ISDIR if attributes.kind is Kind.DIRECTORY else nfsstat3.NFS3ERR_INVAL
        return self._refusal(attributes, who, wanted, True)

    def checked_file(self, raw: bytes, who: Identity, wanted: int) -> Attributes:
        """The file a READ or WRITE names, once `who` may do `wanted` to it (as `file_refusal` says)."""
        attributes = self.resolve(raw)
        refusal = self._use_refusal(attributes, who, wanted)
        if refusal is not None:
            raise NfsError(refusal)
        return attributes

    def wcc(self, before: Attributes, inode: int) -> wcc_data:
        return wcc_data(self.fattr(before).wcc(), self.fattr(self.vfs.getattr(inode)))

    def writable_directory(self, raw: bytes, who: Identity) -> Attributes:
        directory = self.directory(raw)
        self.require(directory, who, ACCESS3_MODIFY | ACCESS3_LOOKUP)
        return directory

    # ----- procedures -------------------------------------------------------------------

    def getattr(self, who: Identity, args: FH3args) -> GETATTR3resok:
        return GETATTR3resok(self.fattr(self.resolve(args.object)))

    def setattr(self, who: Identity, args: SETATTR3args) -> WCC3res:
        before = self.resolve(args.object)
        if args.guard_ctime_ns is not None and args.guard_ctime_ns != before.ctime_ns:
            raise NfsError(nfsstat3.NFS3ERR_NOT_SYNC)
        if before.read_only:
            raise NfsError(nfsstat3.NFS3ERR_ROFS)
        wanted = args.new_attributes
        owner = who.is_root or who.uid == before.uid
        if wanted.uid is not None and wanted.uid != before.uid and not who.is_root:
            raise NfsError(nfsstat3.NFS3ERR_PERM)
        chgrp_allowed = who.is_root or (who.uid == before.uid and wanted.gid is not None and who.in_group(wanted.gid))
        if wanted.gid is not None and wanted.gid != before.gid and not chgrp_allowed:
            raise NfsError(nfsstat3.NFS3ERR_PERM)
        client_times = any(t is not None and not isinstance(t, time_how) for t in (wanted.atime, wanted.mtime))
        if (wanted.mode is not None or client_times) and not owner:
            raise NfsError(nfsstat3.NFS3ERR_PERM)
        if wanted.size is not None or wanted.atime is not None or wanted.mtime is not None:
            self.require(before, who, ACCESS3_MODIFY, owner_override=True)
        after = self.vfs.setattr(before.inode, _changes(wanted))
        return WCC3res(wcc_data(self.fattr(before).wcc(), self.fattr(after)))

    def lookup(self, who: Identity, args: diropargs3) -> LOOKUP3resok:
        directory = self.directory(args.dir)
        self.require(directory, who, ACCESS3_LOOKUP)
        found = self.vfs.lookup(directory.inode, args.name)
        return LOOKUP3resok(self.handle(found), self.fattr(found), self.fattr(directory))

    def access(self, who: Identity, args: ACCESS3args) -> ACCESS3resok:
        attributes = self.resolve(args.object)
        return ACCESS3resok(self.fattr(attributes), self.export.access(attributes, who) & args.access)

    def readlink(self, who: Identity, args: FH3args) -> READLINK3resok:
        attributes = self.resolve(args.object)
        if attributes.kind is not Kind.SYMLINK:
            raise NfsError(nfsstat3.NFS3ERR_INVAL)
        return READLINK3resok(self.fattr(attributes), self.vfs.readlink(attributes.inode))

    def read(self, who: Identity, args: READ3args) -> READ3resok:
        attributes = self.checked_file(args.file, who, ACCESS3_READ)
        count = min(args.count, MAX_TRANSFER)
        data = self.vfs.read(attributes.inode, args.offset, count) if count else b""
        return self._read_result(attributes, args.offset, count, (data,))

    def write(self, who: Identity, args: WRITE3args) -> WRITE3resok:
        before = self.checked_file(args.file, who, ACCESS3_MODIFY)
        if args.count > len(args.data):
            raise NfsError(nfsstat3.NFS3ERR_INVAL)
        if args.offset + args.count > MAX_FILE_SIZE:
            raise NfsError(nfsstat3.NFS3ERR_FBIG)
        data = args.data[: args.count]  # a view of the call's own record
        if args.stable is stable_how.UNSTABLE:
            written = self.vfs.write(before.inode, args.offset, data)
            return WRITE3resok(self.wcc(before, before.inode), written, args.stable, self.write_verifier)
        durability = Durability.DATA if args.stable is stable_how.DATA_SYNC else Durability.FILE
        written, after = self.vfs.write_durably(before.inode, args.offset, data, durability)
        file_wcc = wcc_data(self.fattr(before).wcc(), self.fattr(after))
        return WRITE3resok(file_wcc, written, args.stable, self.write_verifier)

    def create(self, who: Identity, args: CREATE3args) -> CREATE3resok:
        directory = self.writable_directory(args.where.dir, who)
        wanted = args.obj_attributes
        mode = DEFAULT_FILE_MODE if wanted.mode is None else wanted.mode
        uid = who.uid if wanted.uid is None else wanted.uid
        gid = who.gid if wanted.gid is None else wanted.gid
        parent, name = directory.inode, args.where.name
        if args.verf is not None:
            atime_ns, mtime_ns = _verifier_times(args.verf)
            try:
                made = self.vfs.create(parent, name, mode, uid, gid, exclusive=True)
                made = self.vfs.setattr(made.inode, AttributeChanges(atime_ns=atime_ns, mtime_ns=mtime_ns))
            except errors.AlreadyExists:
                made = self.vfs.lookup(parent, name)
                if (made.kind, made.atime_ns, made.mtime_ns) != (Kind.FILE, atime_ns, mtime_ns):
                    raise NfsError(nfsstat3.NFS3ERR_EXIST) from None
        else:
            made = self.vfs.create(parent, name, mode, uid, gid, exclusive=args.mode is createmode3.GUARDED)
            changes = _changes(wanted, times_only=True)
            if changes != AttributeChanges():
                made = self.vfs.setattr(made.inode, changes)
        return CREATE3resok(self.handle(made), self.fattr(made), self.wcc(directory, parent))

    def mkdir(self, who: Identity, args: MKDIR3args) -> CREATE3resok:
        directory = self.writable_directory(args.where.dir, who)
        wanted = args.attributes
        made = self.vfs.mkdir(directory.inode, args.where.name,
                              DEFAULT_DIR_MODE if wanted.mode is None else wanted.mode,
                              who.uid if wanted.uid is None else wanted.uid,
                              who.gid if wanted.gid is None else wanted.gid)
        return CREATE3resok(self.handle(made), self.fattr(made), self.wcc(directory, directory.inode))

    def symlink(self, who: Identity, args: SYMLINK3args) -> CREATE3resok:
        directory = self.writable_directory(args.where.dir, who)
        wanted = args.symlink_attributes
        made = self.vfs.symlink(directory.inode, args.where.name, args.symlink_data,
                                who.uid if wanted.uid is None else wanted.uid,
                                who.gid if wanted.gid is None else wanted.gid)
        return CREATE3resok(self.handle(made), self.fattr(made), self.wcc(directory, directory.inode))

    def mknod(self, who: Identity, args: MKNOD3args) -> CREATE3resok:
        raise NfsError(nfsstat3.NFS3ERR_NOTSUPP)  # no device files, FIFOs or sockets in a datastore

    def remove(self, who: Identity, args: diropargs3) -> WCC3res:
        directory = self.writable_directory(args.dir, who)
        self.vfs.remove(directory.inode, args.name)
        return WCC3res(self.wcc(directory, directory.inode))

    def rmdir(self, who: Identity, args: diropargs3) -> WCC3res:
        directory = self.writable_directory(args.dir, who)
        self.vfs.rmdir(directory.inode, args.name)
        return WCC3res(self.wcc(directory, directory.inode))

    def rename(self, who: Identity, args: RENAME3args) -> RENAME3res:
        source = self.writable_directory(args.from_.dir, who)
        target = self.writable_directory(args.to.dir, who)
        self.vfs.rename(source.inode, args.from_.name, target.inode, args.to.name)
        return RENAME3res(self.wcc(source, source.inode), self.wcc(target, target.inode))

    def link(self, who: Identity, args: LINK3args) -> LINK3res:
        raise NfsError(nfsstat3.NFS3ERR_NOTSUPP)  # FSINFO says so: FSF3_LINK is off

    def readdir(self, who: Identity, args: READDIR3args, plus: bool = False) -> READDIR3resok:
        directory = self.directory(args.dir)
        self.require(directory, who, ACCESS3_READ)
        return read_directory(self.vfs, directory, args.cookie, args.cookieverf, self.cookie_verifier,
                              args.dircount, args.maxcount, plus, self.describe)

    def readdirplus(self, who: Identity, args: READDIR3args) -> READDIR3resok:
        return self.readdir(who, args, plus=True)

    def fsstat(self, who: Identity, args: FH3args) -> FSSTAT3resok:
        attributes = self.resolve(args.object)
        stats = self.vfs.statfs()
        return FSSTAT3resok(self.fattr(attributes), stats.total_bytes, stats.free_bytes, stats.available_bytes,
                            stats.total_files, stats.free_files, stats.free_files)

    def fsinfo(self, who: Identity, args: FH3args) -> FSINFO3resok:
        attributes = self.resolve(args.object)
        return FSINFO3resok(self.fattr(attributes), rtmax=MAX_TRANSFER, rtpref=MAX_TRANSFER, rtmult=4096,
                            wtmax=MAX_TRANSFER, wtpref=MAX_TRANSFER, wtmult=4096, dtpref=64 << 10,
                            maxfilesize=MAX_FILE_SIZE, time_delta_ns=1,
                            properties=FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME)

    def pathconf(self, who: Identity, args: FH3args) -> PATHCONF3resok:
        return PATHCONF3resok(self.fattr(self.resolve(args.object)), linkmax=1, name_max=NAME_MAX)

    def commit(self, who: Identity, args: COMMIT3args) -> COMMIT3resok:
        before = self.file(args.file)
        self.vfs.fsync(before.inode, Durability.FILE)
        return COMMIT3resok(self.wcc(before, before.inode), self.write_verifier)


_object, _file, _dir, _where_dir = attrgetter("object"), attrgetter("file"), attrgetter("dir"), attrgetter("where.dir")


def _rename_failure(args: RENAME3args, attrs: AttrsOf) -> Encodable:
    return RENAME3res(wcc_data(None, attrs(args.from_.dir)), wcc_data(None, attrs(args.to.dir)))


def _link_failure(args: LINK3args, attrs: AttrsOf) -> Encodable:
    return LINK3res(attrs(args.file), wcc_data(None, attrs(args.link.dir)))


#: RFC 1813 procedure numbers (NULL, 0, is answered without a thread in `program`).
PROCEDURES: dict[int, NfsProcedure[Any]] = {
    1: NfsProcedure("GETATTR", FH3args.decode, Nfs3Server.getattr, _void_failure),
    2: NfsProcedure("SETATTR", SETATTR3args.decode, Nfs3Server.setattr, _wcc_failure(_object), modifies=True),
    3: NfsProcedure("LOOKUP", diropargs3.decode, Nfs3Server.lookup, _post_op_failure(_dir)),
    4: NfsProcedure("ACCESS", ACCESS3args.decode, Nfs3Server.access, _post_op_failure(_object)),
    5: NfsProcedure("READLINK", FH3args.decode, Nfs3Server.readlink, _post_op_failure(_object)),
    6: NfsProcedure("READ", READ3args.decode, Nfs3Server.read, _post_op_failure(_file)),
    7: NfsProcedure("WRITE", WRITE3args.decode, Nfs3Server.write, _wcc_failure(_file), modifies=True),
    8: NfsProcedure("CREATE", CREATE3args.decode, Nfs3Server.create, _wcc_failure(_where_dir), modifies=True),
    9: NfsProcedure("MKDIR", MKDIR3args.decode, Nfs3Server.mkdir, _wcc_failure(_where_dir), modifies=True),
    10: NfsProcedure("SYMLINK", SYMLINK3args.decode, Nfs3Server.symlink, _wcc_failure(_where_dir), modifies=True),
    11: NfsProcedure("MKNOD", MKNOD3args.decode, Nfs3Server.mknod, _wcc_failure(_where_dir), modifies=True),
    12: NfsProcedure("REMOVE", diropargs3.decode, Nfs3Server.remove, _wcc_failure(_dir), modifies=True),
    13: NfsProcedure("RMDIR", diropargs3.decode, Nfs3Server.rmdir, _wcc_failure(_dir), modifies=True),
    14: NfsProcedure("RENAME", RENAME3args.decode, Nfs3Server.rename, _rename_failure, modifies=True),
    15: NfsProcedure("LINK", LINK3args.decode, Nfs3Server.link, _link_failure, modifies=True),
    16: NfsProcedure("READDIR", READDIR3args.decode, Nfs3Server.readdir, _post_op_failure(_dir)),
    17: NfsProcedure("READDIRPLUS", READDIR3args.decode_plus, Nfs3Server.readdirplus, _post_op_failure(_dir)),
    18: NfsProcedure("FSSTAT", FH3args.decode, Nfs3Server.fsstat, _post_op_failure(_object)),
    19: NfsProcedure("FSINFO", FH3args.decode, Nfs3Server.fsinfo, _post_op_failure(_object)),
    20: NfsProcedure("PATHCONF", FH3args.decode, Nfs3Server.pathconf, _post_op_failure(_object)),
    21: NfsProcedure("COMMIT", COMMIT3args.decode, Nfs3Server.commit, _wcc_failure(_file), modifies=True),
}
