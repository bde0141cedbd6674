"""NFS version 3 protocol types (RFC 1813), named as in the RFC.

Arguments decode with `<NAME>.decode(decoder)`; results encode with `.encode(encoder)`.
The nfsstat3 discriminant of each result union is written by the dispatcher in
`nfs_export.nfs3`, so a `*resok` type here holds only what follows NFS3_OK.

These are plain slotted dataclasses, not frozen ones: several are built for every call,
and a frozen dataclass's constructor costs four times as much (about 0.5 µs for six
fields against 0.12 µs), which showed in the time of a 4 KiB READ.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.datastore.vfs import Attributes, Kind
from nfs_export.xdr import Decoder, Encoder, XdrError

NFS_PROGRAM = 100003
NFS_V3 = 3
NFS3_FHSIZE = 64
NFS3_COOKIEVERFSIZE = 8
NFS3_CREATEVERFSIZE = 8
NFS3_WRITEVERFSIZE = 8
#: Longest name or path accepted on the wire; longer names are garbage, not NAMETOOLONG.
MAX_PATH = 4096

FSF3_SYMLINK = 0x0002
FSF3_HOMOGENEOUS = 0x0008
FSF3_CANSETTIME = 0x0010


class nfsstat3(enum.IntEnum):
    NFS3_OK = 0
    NFS3ERR_PERM = 1
    NFS3ERR_NOENT = 2
    NFS3ERR_IO = 5
    NFS3ERR_NXIO = 6
    NFS3ERR_ACCES = 13
    NFS3ERR_EXIST = 17
    NFS3ERR_XDEV = 18
    NFS3ERR_NODEV = 19
    NFS3ERR_NOTDIR = 20
    NFS3ERR_ISDIR = 21
    NFS3ERR_INVAL = 22
    NFS3ERR_FBIG = 27
    NFS3ERR_NOSPC = 28
    NFS3ERR_ROFS = 30
    NFS3ERR_MLINK = 31
    NFS3ERR_NAMETOOLONG = 63
    NFS3ERR_NOTEMPTY = 66
    NFS3ERR_DQUOT = 69
    NFS3ERR_STALE = 70
    NFS3ERR_REMOTE = 71
    NFS3ERR_BADHANDLE = 10001
    NFS3ERR_NOT_SYNC = 10002
    NFS3ERR_BAD_COOKIE = 10003
    NFS3ERR_NOTSUPP = 10004
    NFS3ERR_TOOSMALL = 10005
    NFS3ERR_SERVERFAULT = 10006
    NFS3ERR_BADTYPE = 10007
    NFS3ERR_JUKEBOX = 10008


class ftype3(enum.IntEnum):
    NF3REG = 1
    NF3DIR = 2
    NF3BLK = 3
    NF3CHR = 4
    NF3LNK = 5
    NF3SOCK = 6
    NF3FIFO = 7


class stable_how(enum.IntEnum):
    UNSTABLE = 0
    DATA_SYNC = 1
    FILE_SYNC = 2


#: stable_how by value, indexed: an enum lookup by value costs ten times as much, in every WRITE.
_STABLE_HOW = tuple(stable_how)


class createmode3(enum.IntEnum):
    UNCHECKED = 0
    GUARDED = 1
    EXCLUSIVE = 2


class time_how(enum.IntEnum):
    DONT_CHANGE = 0
    SET_TO_SERVER_TIME = 1
    SET_TO_CLIENT_TIME = 2


FTYPE = {Kind.FILE: ftype3.NF3REG, Kind.DIRECTORY: ftype3.NF3DIR, Kind.SYMLINK: ftype3.NF3LNK}
_NS = 1_000_000_000
_NFSTIME3 = struct.Struct(">II")
#: The first time nfstime3 cannot hold (its seconds are 32 bits).
_NFSTIME3_END = (1 << 32) * _NS
#: type, mode, nlink, uid, gid; size, used, rdev, fsid, fileid; atime, mtime, ctime.
_FATTR3 = struct.Struct(">5I5Q6I")
#: size, then mtime and ctime as nfstime3 (wcc_attr).
_WCC_ATTR = struct.Struct(">Q4I")
#: count3 and eof (READ3resok), before the data.
_READ_COUNTS = struct.Struct(">2I")
#: offset3 then count3, as READ, WRITE and COMMIT arguments carry them.
_OFFSET_COUNT = struct.Struct(">QI")
#: ... and stable_how after them (WRITE).
_OFFSET_COUNT_STABLE = struct.Struct(">QII")


def nfstime3(ns: int) -> tuple[int, int]:
    """(seconds, nseconds) of a time in nanoseconds, clamped to what nfstime3 holds."""
    if 0 <= ns < _NFSTIME3_END:  # every real time: no clamping to do (this runs for each reply)
        return divmod(ns, _NS)
    seconds, nanoseconds = divmod(max(ns, 0), _NS)
    return min(seconds, 0xFFFF_FFFF), nanoseconds


def encode_nfstime3(encoder: Encoder, ns: int) -> None:
    encoder.fixed(_NFSTIME3.pack(*nfstime3(ns)))


def decode_nfstime3(decoder: Decoder) -> int:
    seconds, nanoseconds = decoder.uint32(), decoder.uint32()
    if nanoseconds >= _NS:
        raise XdrError(f"nfstime3 with {nanoseconds} nanoseconds")
    return seconds * _NS + nanoseconds


def nfs_fh3(decoder: Decoder) -> bytes:
    return decoder.opaque(NFS3_FHSIZE)


def filename3(decoder: Decoder) -> str:
    return decoder.string(MAX_PATH)


@dataclass(slots=True)
class wcc_attr:
    size: int
    mtime_ns: int
    ctime_ns: int

    def encode(self, encoder: Encoder) -> None:
        encoder.data += _WCC_ATTR.pack(self.size, *nfstime3(self.mtime_ns), *nfstime3(self.ctime_ns))


def _packed_fattr3(a: Attributes, fsid: int) -> bytes:
    """In one pack: every NFS reply carries these 84 bytes, most of them twice."""
    return _FATTR3.pack(FTYPE[a.kind], a.mode & 0o7777, a.nlink, a.uid, a.gid, a.size, a.used,
                        0, fsid, a.inode,  # rdev: specdata3 {0, 0}; no device files
                        *nfstime3(a.atime_ns), *nfstime3(a.mtime_ns), *nfstime3(a.ctime_ns))


#: A restore point's files answer with the same attributes every time: packed once. A
#: session's change with every write, so remembering them would only evict those.
_remembered_fattr3 = functools.lru_cache(maxsize=4096)(_packed_fattr3)


@dataclass(slots=True)
class fattr3:
    """What every reply says about a file; `fsid` is fixed per store."""

    attributes: Attributes
    fsid: int

    def encode(self, encoder: Encoder) -> None:
        pack = _remembered_fattr3 if self.attributes.read_only else _packed_fattr3
        encoder.data += pack(self.attributes, self.fsid)

    def wcc(self) -> wcc_attr:
        return wcc_attr(self.attributes.size, self.attributes.mtime_ns, self.attributes.ctime_ns)


def encode_post_op_attr(encoder: Encoder, item: fattr3 | wcc_attr | None) -> None:
    """An optional item that encodes itself (post_op_attr, pre_op_attr).

    `Encoder.optional` written out, without its callback: nearly every reply has one or two.
    """
    encoder.bool(item is not None)
    if item is not None:
        item.encode(encoder)


def encode_post_op_fh3(encoder: Encoder, handle: bytes | None) -> None:
    encoder.optional(handle, Encoder.opaque)


@dataclass(slots=True)
class wcc_data:
    before: wcc_attr | None = None
    after: fattr3 | None = None

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_attr(encoder, self.before)
        encode_post_op_attr(encoder, self.after)


@dataclass(slots=True)
class sattr3:
    """Attributes a client asks to set; None means "leave it". Times: None or ns or SERVER."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: int | time_how | None = None
    mtime: int | time_how | None = None

    @classmethod
    def decode(cls, decoder: Decoder) -> sattr3:
        mode = decoder.optional(Decoder.uint32)
        uid = decoder.optional(Decoder.uint32)
        gid = decoder.optional(Decoder.uint32)
        size = decoder.optional(Decoder.uint64)
        return cls(mode, uid, gid, size, _set_time(decoder), _set_time(decoder))


def _set_time(decoder: Decoder) -> int | time_how | None:
    how = time_how(decoder.enum(range(3)))
    if how is time_how.SET_TO_CLIENT_TIME:
        return decode_nfstime3(decoder)
    return None if how is time_how.DONT_CHANGE else how


@dataclass(slots=True)
class diropargs3:
    dir: bytes
    name: str

    @classmethod
    def decode(cls, decoder: Decoder) -> diropargs3:
        return cls(nfs_fh3(decoder), filename3(decoder))


# ----- arguments ----------------------------------------------------------------------


@dataclass(slots=True)
class FH3args:
    """The arguments of GETATTR, READLINK, FSSTAT, FSINFO and PATHCONF: one handle."""

    object: bytes

    @classmethod
    def decode(cls, decoder: Decoder) -> FH3args:
        return cls(nfs_fh3(decoder))


@dataclass(slots=True)
class SETATTR3args:
    object: bytes
    new_attributes: sattr3
    guard_ctime_ns: int | None

    @classmethod
    def decode(cls, decoder: Decoder) -> SETATTR3args:
        return cls(nfs_fh3(decoder), sattr3.decode(decoder), decoder.optional(decode_nfstime3))


@dataclass(slots=True)
class ACCESS3args:
    object: bytes
    access: int

    @classmethod
    def decode(cls, decoder: Decoder) -> ACCESS3args:
        return cls(nfs_fh3(decoder), decoder.uint32())


@dataclass(slots=True)
class READ3args:
    file: bytes
    offset: int
    count: int

    @classmethod
    def decode(cls, decoder: Decoder) -> READ3args:
        file = nfs_fh3(decoder)
        return cls(file, *decoder.unpack(_OFFSET_COUNT))


@dataclass(slots=True)
class WRITE3args:
    file: bytes
    offset: int
    count: int
    stable: stable_how
    data: memoryview

    @classmethod
    def decode(cls, decoder: Decoder) -> WRITE3args:
        file = nfs_fh3(decoder)
        offset, count, stable = decoder.unpack(_OFFSET_COUNT_STABLE)
        if stable > stable_how.FILE_SYNC:
            raise XdrError(f"enum value {stable} is not defined")
        return cls(file, offset, count, _STABLE_HOW[stable], decoder.opaque_view())


@dataclass(slots=True)
class CREATE3args:
    where: diropargs3
    mode: createmode3
    obj_attributes: sattr3
    verf: bytes | None  # EXCLUSIVE only

    @classmethod
    def decode(cls, decoder: Decoder) -> CREATE3args:
        where = diropargs3.decode(decoder)
        mode = createmode3(decoder.enum(range(3)))
        if mode is createmode3.EXCLUSIVE:
            return cls(where, mode, sattr3(), decoder.fixed(NFS3_CREATEVERFSIZE))
        return cls(where, mode, sattr3.decode(decoder), None)


@dataclass(slots=True)
class MKDIR3args:
    where: diropargs3
    attributes: sattr3

    @classmethod
    def decode(cls, decoder: Decoder) -> MKDIR3args:
        return cls(diropargs3.decode(decoder), sattr3.decode(decoder))


@dataclass(slots=True)
class SYMLINK3args:
    where: diropargs3
    symlink_attributes: sattr3
    symlink_data: str

    @classmethod
    def decode(cls, decoder: Decoder) -> SYMLINK3args:
        return cls(diropargs3.decode(decoder), sattr3.decode(decoder), decoder.string(MAX_PATH))


@dataclass(slots=True)
class MKNOD3args:
    where: diropargs3
    type: ftype3

    @classmethod
    def decode(cls, decoder: Decoder) -> MKNOD3args:
        where = diropargs3.decode(decoder)
        kind = ftype3(decoder.enum(range(1, 8)))
        if kind in (ftype3.NF3CHR, ftype3.NF3BLK):
            sattr3.decode(decoder)
            decoder.uint32()  # specdata3
            decoder.uint32()
        elif kind in (ftype3.NF3SOCK, ftype3.NF3FIFO):
            sattr3.decode(decoder)
        return cls(where, kind)


@dataclass(slots=True)
class RENAME3args:
    from_: diropargs3
    to: diropargs3

    @classmethod
    def decode(cls, decoder: Decoder) -> RENAME3args:
        return cls(diropargs3.decode(decoder), diropargs3.decode(decoder))


@dataclass(slots=True)
class LINK3args:
    file: bytes
    link: diropargs3

    @classmethod
    def decode(cls, decoder: Decoder) -> LINK3args:
        return cls(nfs_fh3(decoder), diropargs3.decode(decoder))


@dataclass(slots=True)
class READDIR3args:
    """READDIR and READDIRPLUS: for READDIR `dircount` is unused and `maxcount` is count."""

    dir: bytes
    cookie: int
    cookieverf: bytes
    dircount: int
    maxcount: int

    @classmethod
    def decode(cls, decoder: Decoder) -> READDIR3args:
        handle, cookie = nfs_fh3(decoder), decoder.uint64()
        verifier, count = decoder.fixed(NFS3_COOKIEVERFSIZE), decoder.uint32()
        return cls(handle, cookie, verifier, count, count)

    @classmethod
    def decode_plus(cls, decoder: Decoder) -> READDIR3args:
        handle, cookie, verifier = nfs_fh3(decoder), decoder.uint64(), decoder.fixed(NFS3_COOKIEVERFSIZE)
        return cls(handle, cookie, verifier, decoder.uint32(), decoder.uint32())


@dataclass(slots=True)
class COMMIT3args:
    file: bytes
    offset: int
    count: int

    @classmethod
    def decode(cls, decoder: Decoder) -> COMMIT3args:
        file = nfs_fh3(decoder)
        return cls(file, *decoder.unpack(_OFFSET_COUNT))


# ----- results (the part after NFS3_OK) -------------------------------------------------


@dataclass(slots=True)
class GETATTR3resok:
    obj_attributes: fattr3

    def encode(self, encoder: Encoder) -> None:
        self.obj_attributes.encode(encoder)


@dataclass(slots=True)
class WCC3res:
    """The body of SETATTR, REMOVE and RMDIR results, and of most failures."""

    wcc: wcc_data

    def encode(self, encoder: Encoder) -> None:
        self.wcc.encode(encoder)


@dataclass(slots=True)
class POSTOP3res:
    """A lone post_op_attr: the failure body of most read-only procedures."""

    attributes: fattr3 | None

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_attr(encoder, self.attributes)


@dataclass(slots=True)
class LOOKUP3resok:
    object: bytes
    obj_attributes: fattr3 | None
    dir_attributes: fattr3 | None

    def encode(self, encoder: Encoder) -> None:
        encoder.opaque(self.object)
        encode_post_op_attr(encoder, self.obj_attributes)
        encode_post_op_attr(encoder, self.dir_attributes)


@dataclass(slots=True)
class ACCESS3resok:
    obj_attributes: fattr3 | None
    access: int

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_attr(encoder, self.obj_attributes)
        encoder.uint32(self.access)


@dataclass(slots=True)
class READLINK3resok:
    symlink_attributes: fattr3 | None
    data: str

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_attr(encoder, self.symlink_attributes)
        encoder.string(self.data)


@dataclass(slots=True)
class READ3resok:
    file_attributes: fattr3 | None
    eof: bool
    count: int
    data: Sequence[bytes | bytearray | memoryview]  # pieces, in order (views of cached chunks)

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_attr(encoder, self.file_attributes)
        encoder.data += _READ_COUNTS.pack(self.count, self.eof)
        encoder.opaque_last(self.data)


@dataclass(slots=True)
class WRITE3resok:
    file_wcc: wcc_data
    count: int
    committed: stable_how
    verf: bytes

    def encode(self, encoder: Encoder) -> None:
        self.file_wcc.encode(encoder)
        encoder.uint32(self.count)
        encoder.uint32(self.committed)
        encoder.fixed(self.verf)


@dataclass(slots=True)
class CREATE3resok:
    """CREATE, MKDIR, SYMLINK and MKNOD answer alike."""

    obj: bytes | None
    obj_attributes: fattr3 | None
    dir_wcc: wcc_data

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_fh3(encoder, self.obj)
        encode_post_op_attr(encoder, self.obj_attributes)
        self.dir_wcc.encode(encoder)


@dataclass(slots=True)
class RENAME3res:
    """Both the OK and the failure body of RENAME."""

    fromdir_wcc: wcc_data
    todir_wcc: wcc_data

    def encode(self, encoder: Encoder) -> None:
        self.fromdir_wcc.encode(encoder)
        self.todir_wcc.encode(encoder)


@dataclass(slots=True)
class LINK3res:
    file_attributes: fattr3 | None
    linkdir_wcc: wcc_data

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_attr(encoder, self.file_attributes)
        self.linkdir_wcc.encode(encoder)


@dataclass(slots=True)
class FSSTAT3resok:
    obj_attributes: fattr3 | None
    tbytes: int
    fbytes: int
    abytes: int
    tfiles: int
    ffiles: int
    afiles: int
    invarsec: int = 0

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_attr(encoder, self.obj_attributes)
        for value in (self.tbytes, self.fbytes, self.abytes, self.tfiles, self.ffiles, self.afiles):
            encoder.uint64(value)
        encoder.uint32(self.invarsec)


@dataclass(slots=True)
class FSINFO3resok:
    obj_attributes: fattr3 | None
    rtmax: int
    rtpref: int
    rtmult: int
    wtmax: int
    wtpref: int
    wtmult: int
    dtpref: int
    maxfilesize: int
    time_delta_ns: int
    properties: int

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_attr(encoder, self.obj_attributes)
        for value in (self.rtmax, self.rtpref, self.rtmult, self.wtmax, self.wtpref, self.wtmult, self.dtpref):
            encoder.uint32(value)
        encoder.uint64(self.maxfilesize)
        encode_nfstime3(encoder, self.time_delta_ns)
        encoder.uint32(self.properties)


@dataclass(slots=True)
class PATHCONF3resok:
    obj_attributes: fattr3 | None
    linkmax: int
    name_max: int
    no_trunc: bool = True
    chown_restricted: bool = True
    case_insensitive: bool = False
    case_preserving: bool = True

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_attr(encoder, self.obj_attributes)
        encoder.uint32(self.linkmax)
        encoder.uint32(self.name_max)
        for flag in (self.no_trunc, self.chown_restricted, self.case_insensitive, self.case_preserving):
            encoder.bool(flag)


@dataclass(slots=True)
class COMMIT3resok:
    file_wcc: wcc_data
    verf: bytes

    def encode(self, encoder: Encoder) -> None:
        self.file_wcc.encode(encoder)
        encoder.fixed(self.verf)
