"""READDIR and READDIRPLUS: paging a directory into replies of a client-chosen size.

Cookies: the VFS gives every entry a stable cookie (>= 1) that resumes the listing
after it. NFS clients also expect "." and "..", which the VFS does not list, so they get
cookies 1 and 2 and a VFS cookie c travels as c + 2. Because VFS cookies stay valid
while entries come and go (and across restarts), the cookie verifier is a constant per
store; a cookie that comes back with some other non-zero verifier was issued by
someone else and is BAD_COOKIE.

Sizes follow RFC 1813: `count` (READDIR) and `maxcount` (READDIRPLUS) bound the whole
reply, `dircount` bounds the bytes of names, fileids and cookies alone (a hint: like
knfsd, a first entry is sent even past it). A reply whose `count`/`maxcount` cannot
hold even one entry is NFS3ERR_TOOSMALL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from appliance.datastore.vfs import Attributes, Vfs
from nfs_export.nfs3_types import (
    encode_post_op_attr,
    encode_post_op_fh3,
    fattr3,
    nfsstat3,
)
from nfs_export.xdr import Encoder, padding

DOT_COOKIE = 1
DOTDOT_COOKIE = 2
COOKIE_BIAS = 2
#: status, post_op_attr dir_attributes (present), cookieverf, the end of list and eof.
_REPLY_OVERHEAD = 4 + 4 + 84 + 8 + 4 + 4
#: value_follows, fileid, name length, cookie (the name bytes and padding come on top).
_ENTRY_FIXED = 4 + 8 + 4 + 8
#: name_attributes (present) and name_handle (present, its length word).
_PLUS_FIXED = 4 + 84 + 4 + 4


class ReaddirError(Exception):
    def __init__(self, status: nfsstat3) -> None:
        super().__init__(status.name)
        self.status = status


@dataclass(frozen=True, slots=True)
class entry3:
    """An entry of READDIR, or of READDIRPLUS when `handle` is set."""

    fileid: int
    name: str
    cookie: int
    attributes: fattr3 | None = None
    handle: bytes | None = None

    def encode(self, encoder: Encoder, plus: bool) -> None:
        encoder.bool(True)  # value_follows
        encoder.uint64(self.fileid)
        encoder.string(self.name)
        encoder.uint64(self.cookie)
        if plus:
            encode_post_op_attr(encoder, self.attributes)
            encode_post_op_fh3(encoder, self.handle)


@dataclass(frozen=True, slots=True)
class READDIR3resok:
    """READDIR3resok or READDIRPLUS3resok, as `plus` says."""

    dir_attributes: fattr3 | None
    cookieverf: bytes
    entries: list[entry3]
    eof: bool
    plus: bool

    def encode(self, encoder: Encoder) -> None:
        encode_post_op_attr(encoder, self.dir_attributes)
        encoder.fixed(self.cookieverf)
        for entry in self.entries:
            entry.encode(encoder, self.plus)
        encoder.bool(False)
        encoder.bool(self.eof)


def _listing(vfs: Vfs, directory: Attributes, cookie: int) -> Iterator[tuple[str, Attributes | None, int]]:
    """(name, attributes or None for "..", nfs cookie) from after `cookie` on."""
    if cookie < DOT_COOKIE:
        yield ".", directory, DOT_COOKIE
    if cookie < DOTDOT_COOKIE:
        yield "..", None, DOTDOT_COOKIE
    for entry in vfs.readdir(directory.inode, max(cookie - COOKIE_BIAS, 0)):
        yield entry.name, entry.attributes, entry.cookie + COOKIE_BIAS


def read_directory(
    vfs: Vfs,
    directory: Attributes,
    args_cookie: int,
    args_verifier: bytes,
    verifier: bytes,
    dircount: int,
    maxcount: int,
    plus: bool,
    describe: Callable[[Attributes], tuple[fattr3, bytes]],
) -> READDIR3resok:
    """One page of `directory` after `args_cookie`; `describe` gives fattr3 and handle."""
    if args_cookie and args_verifier != verifier and any(args_verifier):
        raise ReaddirError(nfsstat3.NFS3ERR_BAD_COOKIE)
    dir_attributes, _ = describe(directory)
    entries: list[entry3] = []
    used, names_used = _REPLY_OVERHEAD, 0
    eof = True
    for name, attributes, cookie in _listing(vfs, directory, args_cookie):
        if attributes is None:
            attributes = vfs.lookup(directory.inode, "..")
        size = len(name.encode("utf-8", "surrogateescape"))
        entry_bytes = _ENTRY_FIXED + size + padding(size)
        if plus:
            fattr, handle = describe(attributes)
            plus_bytes = _PLUS_FIXED + len(handle) + padding(len(handle))
        else:
            fattr, handle, plus_bytes = None, None, 0
        too_big = used + entry_bytes + plus_bytes > maxcount
        if too_big and not entries:
            raise ReaddirError(nfsstat3.NFS3ERR_TOOSMALL)
        if too_big or (plus and entries and names_used + entry_bytes > dircount):
            eof = False
            break
        used += entry_bytes + plus_bytes
        names_used += entry_bytes
        entries.append(entry3(attributes.inode, name, cookie, fattr, handle))
    return READDIR3resok(dir_attributes, verifier, entries, eof, plus)
