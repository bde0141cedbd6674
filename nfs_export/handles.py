"""NFS file handles: export + fileid + generation, sealed with a keyed hash.

Layout (25 bytes; ESXi fails on handles of 64 bytes, the design limit is 56)::

    version u8 | export id u32 | fileid u64 | generation u32 | check 8 bytes

`check` is BLAKE2b-64 keyed with the store's handle secret over the first 17 bytes, so
a client cannot forge a handle to an inode it never looked up (NFS trusts handles as
capabilities). The secret is persisted by the caller: handles of a restarted server
still open the same files, which ESXi needs to ride out a restart without All Paths
Down. A handle that does not parse or seal is BADHANDLE; one that seals but names a
removed inode or an older generation is STALE (decided by the caller, which asks the
VFS).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from dataclasses import dataclass

HANDLE_VERSION = 1
CHECK_BYTES = 8
_BODY = struct.Struct(">BIQI")
HANDLE_SIZE = _BODY.size + CHECK_BYTES
MIN_SECRET_BYTES = 16


class BadHandle(Exception):
    """Bytes that are not a handle this server issued (NFS3ERR_BADHANDLE)."""


@dataclass(frozen=True, slots=True)
class FileHandle:
    export_id: int
    fileid: int
    generation: int


#: Checked handles `HandleCodec.decode` remembers (the most recently used).
OPENED_LIMIT = 4096


class HandleCodec:
    """Seals and opens file handles with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a handle secret needs at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
        self._secret = bytes(secret[:64])  # BLAKE2b keys are at most 64 bytes
        self._open_known = functools.lru_cache(maxsize=OPENED_LIMIT)(self._open)

    def _check(self, body: bytes) -> bytes:
        return hashlib.blake2b(body, digest_size=CHECK_BYTES, key=self._secret).digest()

    def encode(self, handle: FileHandle) -> bytes:
        body = _BODY.pack(HANDLE_VERSION, handle.export_id, handle.fileid, handle.generation & 0xFFFF_FFFF)
        return body + self._check(body)

    def decode(self, raw: bytes | bytearray | memoryview) -> FileHandle:
        """The handle `raw` names; BadHandle if it is not one of ours.

        Handles that passed the check are remembered (a client repeats the same few with
        every call), so the keyed hash runs once per handle, not once per call.
        """
        return self._open_known(bytes(raw))

    def _open(self, raw: bytes) -> FileHandle:
        if len(raw) != HANDLE_SIZE:
            raise BadHandle(f"handle of {len(raw)} bytes (ours have {HANDLE_SIZE})")
        body, check = raw[: _BODY.size], raw[_BODY.size :]
        if not hmac.compare_digest(check, self._check(body)):
            raise BadHandle("handle check does not match (forged, or made with another secret)")
        version, export_id, fileid, generation = _BODY.unpack(body)
        if version != HANDLE_VERSION:
            raise BadHandle(f"handle version {version} (ours is {HANDLE_VERSION})")
        return FileHandle(export_id, fileid, generation)

    def derived(self, purpose: bytes, size: int) -> bytes:
        """Stable bytes for other per-store identities (fsid, cookie verifier)."""
        return hashlib.blake2b(purpose, digest_size=size, key=self._secret, person=b"nfs-export").digest()
