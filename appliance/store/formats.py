"""Every on-disk format of the store, defined once.

Each file kind starts with an 8-byte magic derived from a version string (the first
eight bytes of BLAKE3 of that string), so a released magic never changes and a new
version gets a new one. Headers are fixed-size little-endian structs.

Pack file (``packs/XX/<pack-id:016x>.pack``)::

    PackHeader  (32 bytes)  magic, format version, pack id, creation time, xxh3 of the above
    Record*                 appended back to back, never rewritten

Record::

    RecordHeader (56 bytes) kind, compression, reserved, raw length, stored length,
                            chunk id (32 bytes), xxh3-64 over header fields + payload
    payload                 `stored length` bytes (zstd frame or raw bytes)

The record checksum covers every byte of the record except itself, and the pack
header carries its own checksum, so every committed byte of a pack is covered.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Callable, Final

import blake3
import xxhash

from appliance.errors import IntegrityError


def magic_for(version_string: str) -> bytes:
    """Derive an 8-byte magic from a human-readable version string."""
    return blake3.blake3(version_string.encode()).digest()[:8]


PACK_MAGIC: Final = magic_for("instant-recovery-appliance pack v1")
STORE_MAGIC: Final = magic_for("instant-recovery-appliance store v1")
PACK_FORMAT_VERSION: Final = 1
STORE_FORMAT_VERSION: Final = 1

#: Chunk IDs are BLAKE3-256 of the uncompressed chunk: cryptographic, so a guest cannot
#: plant bytes that another VM's backup later dedups onto. Recorded in the store config.
CHUNK_ID_SCHEME: Final = "blake3-256"
CHUNK_ID_SIZE: Final = 32
#: The chunk map entry of an all-zero chunk; such chunks are never stored.
ZERO_CHUNK_ID: Final = bytes(CHUNK_ID_SIZE)

RECORD_KIND_CHUNK: Final = 1
COMPRESSION_NONE: Final = 0
COMPRESSION_ZSTD: Final = 1

_PACK_HEADER = struct.Struct("<8sIIQQ")  # magic, version, reserved, pack id, created(ns)
PACK_HEADER_SIZE: Final = _PACK_HEADER.size + 8  # + xxh3-64
_RECORD_FIELDS = struct.Struct("<BBHII32s")  # kind, compression, reserved, raw, stored, id
RECORD_HEADER_SIZE: Final = _RECORD_FIELDS.size + 8  # + xxh3-64


def chunk_id(data: bytes | bytearray | memoryview) -> bytes:
    """The content address of a chunk's uncompressed bytes."""
    return blake3.blake3(data).digest()


def encode_pack_header(pack_id: int) -> bytes:
    fields = _PACK_HEADER.pack(PACK_MAGIC, PACK_FORMAT_VERSION, 0, pack_id, time.time_ns())
    return fields + xxhash.xxh3_64_digest(fields)


def check_pack_header(data: bytes, pack_id: int, where: str) -> None:
    """Raise IntegrityError unless `data` is a sound header of pack `pack_id`."""
    if len(data) < PACK_HEADER_SIZE:
        raise IntegrityError(f"{where}: pack header truncated ({len(data)} bytes)")
    fields, digest = data[: _PACK_HEADER.size], data[_PACK_HEADER.size : PACK_HEADER_SIZE]
    if xxhash.xxh3_64_digest(fields) != digest:
        raise IntegrityError(f"{where}: pack header checksum mismatch")
    magic, version, _, found_id, _ = _PACK_HEADER.unpack(fields)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"{where}: not a pack file (bad magic)")
    if version != PACK_FORMAT_VERSION:
        raise IntegrityError(f"{where}: unsupported pack format version {version}")
    if found_id != pack_id:
        raise IntegrityError(f"{where}: header names pack {found_id:016x}")


def pack_created(data: bytes, pack_id: int, where: str) -> float:
    """When a pack was begun (UNIX seconds), from its checked header."""
    check_pack_header(data, pack_id, where)
    return float(_PACK_HEADER.unpack_from(data)[4]) / 1e9


@dataclass(frozen=True, slots=True)
class RecordHeader:
    kind: int
    compression: int
    raw_length: int
    stored_length: int
    chunk_id: bytes


def encode_record(chunk: bytes, compression: int, payload: bytes, raw_length: int) -> bytes:
    """A complete record (header + payload) ready to append to a pack."""
    fields = _RECORD_FIELDS.pack(
        RECORD_KIND_CHUNK, compression, 0, raw_length, len(payload), chunk
    )
    hasher = xxhash.xxh3_64(fields)
    hasher.update(payload)
    return b"".join((fields, hasher.digest(), payload))


def record_of(chunk: bytes, data: bytes, compress: Callable[[bytes], bytes]) -> bytes:
    """The record a store keeps for `data`: compressed when that is smaller, else raw."""
    compressed = compress(data)
    if len(compressed) < len(data):
        return encode_record(chunk, COMPRESSION_ZSTD, compressed, len(data))
    return encode_record(chunk, COMPRESSION_NONE, data, len(data))


def decode_record_header(data: bytes | memoryview, where: str) -> RecordHeader:
    """Parse a record header; the checksum is checked by `check_record`."""
    if len(data) < RECORD_HEADER_SIZE:
        raise IntegrityError(f"{where}: record header truncated")
    kind, compression, _, raw, stored, cid = _RECORD_FIELDS.unpack_from(data)
    if kind != RECORD_KIND_CHUNK or compression not in (COMPRESSION_NONE, COMPRESSION_ZSTD):
        raise IntegrityError(f"{where}: unknown record kind {kind} / compression {compression}")
    return RecordHeader(kind, compression, raw, stored, cid)


def check_record(record: bytes | memoryview, where: str) -> RecordHeader:
    """Verify a whole record's checksum and return its header.

    `record` must hold exactly header + payload.
    """
    header = decode_record_header(record, where)
    if len(record) != RECORD_HEADER_SIZE + header.stored_length:
        raise IntegrityError(f"{where}: record truncated")
    view = memoryview(record)
    hasher = xxhash.xxh3_64(view[: _RECORD_FIELDS.size])
    hasher.update(view[RECORD_HEADER_SIZE:])
    if hasher.digest() != bytes(view[_RECORD_FIELDS.size : RECORD_HEADER_SIZE]):
        raise IntegrityError(f"{where}: record checksum mismatch")
    return header
