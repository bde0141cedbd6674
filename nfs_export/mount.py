"""The MOUNT version 3 program (RFC 1813 appendix I): how a client gets the root handle.

There is one export, the VFS root. MNT accepts "/" and the export's configured path
(e.g. "/datastore"), and also a directory below either ("/datastore/sessions/s1"), as
knfsd does; libnfs mounts the parent directory of the file a URL names. The mount list
that DUMP reports is kept in memory only: it is advisory (RFC 1813 says so) and
clients never depend on it across server restarts.
"""

from __future__ import annotations

import enum
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import trio

from appliance import errors
from appliance.datastore.vfs import Kind, Vfs
from appliance.events import event
from nfs_export.exports import Export
from nfs_export.handles import FileHandle, HandleCodec
from nfs_export.rpc import (
    AuthFlavor,
    Call,
    Encodable,
    Procedure,
    Program,
    Void,
    decode_void,
)
from nfs_export.xdr import Decoder, Encoder


MOUNT_PROGRAM = 100005
MOUNT_V3 = 3
MNTPATHLEN = 1024


class mountstat3(enum.IntEnum):
    MNT3_OK = 0
    MNT3ERR_PERM = 1
    MNT3ERR_NOENT = 2
    MNT3ERR_IO = 5
    MNT3ERR_ACCES = 13
    MNT3ERR_NOTDIR = 20
    MNT3ERR_INVAL = 22
    MNT3ERR_NAMETOOLONG = 63
    MNT3ERR_NOTSUPP = 10004
    MNT3ERR_SERVERFAULT = 10006


def dirpath(decoder: Decoder) -> str:
    return decoder.string(MNTPATHLEN)


@dataclass(frozen=True, slots=True)
class mountres3:
    status: mountstat3
    fhandle: bytes = b""

    def encode(self, encoder: Encoder) -> None:
        encoder.uint32(self.status)
        if self.status is mountstat3.MNT3_OK:
            encoder.opaque(self.fhandle)
            encoder.array([AuthFlavor.AUTH_SYS, AuthFlavor.AUTH_NONE], Encoder.uint32)


@dataclass(frozen=True, slots=True)
class mountlist:
    """The DUMP reply: (hostname, directory) pairs as an XDR linked list."""

    mounts: tuple[tuple[str, str], ...]

    def encode(self, encoder: Encoder) -> None:
        for hostname, directory in self.mounts:
            encoder.bool(True)
            encoder.string(hostname)
            encoder.string(directory)
        encoder.bool(False)


@dataclass(frozen=True, slots=True)
class exports:
    """The EXPORT reply: each path with the client groups (networks) allowed to mount it."""

    entries: tuple[tuple[str, tuple[str, ...]], ...]

    def encode(self, encoder: Encoder) -> None:
        for directory, groups in self.entries:
            encoder.bool(True)
            encoder.string(directory)
            for group in groups:
                encoder.bool(True)
                encoder.string(group)
            encoder.bool(False)
        encoder.bool(False)


_MOUNT_ERRORS: tuple[tuple[type[BaseException], mountstat3], ...] = (
    (errors.NotFound, mountstat3.MNT3ERR_NOENT),
    (errors.StaleHandle, mountstat3.MNT3ERR_NOENT),
    (errors.NotADirectory, mountstat3.MNT3ERR_NOTDIR),
    (errors.NameTooLong, mountstat3.MNT3ERR_NAMETOOLONG),
    (errors.InvalidName, mountstat3.MNT3ERR_INVAL),
    (errors.PermissionDenied, mountstat3.MNT3ERR_ACCES),
)


class MountServer:
    """MOUNT v3 for one export of a VFS."""

    def __init__(self, vfs: Vfs, export: Export, codec: HandleCodec) -> None:
        self.vfs = vfs
        self.export = export
        self.codec = codec
        self._mounts: set[tuple[str, str]] = set()

    def program(self) -> Program:
        procedures: dict[int, Procedure[Any]] = {
            0: Procedure("NULL", decode_void, self.null),
            1: Procedure("MNT", dirpath, self.mnt),
            2: Procedure("DUMP", decode_void, self.dump),
            3: Procedure("UMNT", dirpath, self.umnt),
            4: Procedure("UMNTALL", decode_void, self.umntall),
            5: Procedure("EXPORT", decode_void, self.export_list),
        }
        return Program(MOUNT_PROGRAM, MOUNT_V3, "MOUNT", procedures)

    def components(self, path: str) -> list[str]:
        """The names from the VFS root to the directory `path` names.

        The export's own path is stripped first; every other path is taken from "/".
        """
        normal = posixpath.normpath("/" + path.strip()).lstrip("/")
        prefix = posixpath.normpath("/" + self.export.path).lstrip("/")
        if prefix and (normal == prefix or normal.startswith(prefix + "/")):
            normal = normal[len(prefix) :].lstrip("/")
        return normal.split("/") if normal else []

    def _resolve(self, names: list[str]) -> bytes:
        attributes = self.vfs.getattr(self.vfs.root_inode)
        for name in names:
            attributes = self.vfs.lookup(attributes.inode, name)
        if attributes.kind is not Kind.DIRECTORY:
            raise errors.NotADirectory(f"{'/'.join(names)} is not a directory")
        return self.codec.encode(FileHandle(self.export.export_id, attributes.inode, attributes.generation))

    async def null(self, call: Call, args: None) -> Encodable:
        return Void()

    async def mnt(self, call: Call, path: str) -> Encodable:
        if not self.export.allows(call.client):
            event("nfs.mount_refused", logging.WARNING, client=call.client, path=path,
                  reason="client not in the export's allowed networks")
            return mountres3(mountstat3.MNT3ERR_ACCES)
        try:
            handle = await trio.to_thread.run_sync(self._resolve, self.components(path))
        except (errors.ApplianceError, OSError) as exc:
            status = next((s for kind, s in _MOUNT_ERRORS if isinstance(exc, kind)), mountstat3.MNT3ERR_IO)
            event("nfs.mount_refused", logging.WARNING, client=call.client, path=path, status=status.name, reason=str(exc))
            return mountres3(status)
        self._mounts.add((call.client, path))
        event("nfs.client_mounted", client=call.client, path=path)
        return mountres3(mountstat3.MNT3_OK, handle)

    async def dump(self, call: Call, args: None) -> Encodable:
        return mountlist(tuple(sorted(self._mounts)) if self.export.allows(call.client) else ())

    async def umnt(self, call: Call, path: str) -> Encodable:
        self._mounts.discard((call.client, path))
        return Void()

    async def umntall(self, call: Call, args: None) -> Encodable:
        self._mounts = {entry for entry in self._mounts if entry[0] != call.client}
        return Void()

    async def export_list(self, call: Call, args: None) -> Encodable:
        return exports(((self.export.path, tuple(str(network) for network in self.export.allow)),))
