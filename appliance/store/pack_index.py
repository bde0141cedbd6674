"""Which chunks a pack holds and where: read from an index object, or from the pack itself.

The chunk index in LMDB is a cache of what the packs say. To build it again (a new
gateway, a lost local disk) each pack's records must be listed. A pack's record headers
already say it all, but reading them back one by one means a request per record; so
where requests are dear (S3), a pack's *index object* is written beside it when it is
sealed: ``packs/XX/<id:016x>.index``::

    magic (8)  count (u32)  entries  xxh3-64 of everything before it (8)
    entry:     chunk id (32)  offset (u64)  record length (u32)  raw length (u32)

A pack without one (a local store, or a crash between the pack and its index) is walked
record by record instead. Either way a chunk's location is only ever taken from a pack
that exists, so a stale or missing index object can cost time, never data.
"""

from __future__ import annotations

import struct
from typing import Final, Iterator

import xxhash

from appliance.errors import IntegrityError
from appliance.store import formats
from appliance.store.index import ChunkLocation
from appliance.store.packs import PackBackend, pack_name

INDEX_MAGIC: Final = formats.magic_for("instant-recovery-appliance pack index v1")
_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<32sQII")
_DIGEST_SIZE = 8


def index_object_name(pack_id: int) -> str:
    return "packs/" + pack_name(pack_id).removesuffix(".pack") + ".index"


def encode_pack_index(records: list[tuple[int, formats.RecordHeader]]) -> bytes:
    body = b"".join([INDEX_MAGIC, _COUNT.pack(len(records))] + [
        _ENTRY.pack(header.chunk_id, offset, formats.RECORD_HEADER_SIZE + header.stored_length, header.raw_length)
        for offset, header in records])
    return body + xxhash.xxh3_64_digest(body)


def decode_pack_index(pack_id: int, data: bytes, where: str) -> list[tuple[bytes, ChunkLocation]]:
    """The (chunk id, location) pairs of an index object; IntegrityError if it is not whole."""
    head = len(INDEX_MAGIC) + _COUNT.size
    if len(data) < head + _DIGEST_SIZE or data[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise IntegrityError(f"{where}: not a pack index")
    if xxhash.xxh3_64_digest(data[:-_DIGEST_SIZE]) != data[-_DIGEST_SIZE:]:
        raise IntegrityError(f"{where}: pack index checksum mismatch")
    (count,) = _COUNT.unpack_from(data, len(INDEX_MAGIC))
    if head + count * _ENTRY.size + _DIGEST_SIZE != len(data):
        raise IntegrityError(f"{where}: pack index holds {len(data)} bytes, not {count} entries")
    found = []
    for n in range(count):
        cid, offset, length, raw = _ENTRY.unpack_from(data, head + n * _ENTRY.size)
        found.append((cid, ChunkLocation(pack_id, offset, length, raw)))
    return found


def walk_pack(packs: PackBackend, pack_id: int) -> Iterator[tuple[bytes, ChunkLocation]]:
    """Each record of a pack read from the pack itself, headers checked; the whole pack once, in one read."""
    where = packs.name_of(pack_id)
    data = packs.read_range(pack_id, 0, packs.pack_size(pack_id))
    formats.check_pack_header(data, pack_id, where)
    offset = formats.PACK_HEADER_SIZE
    while offset < len(data):
        header = formats.decode_record_header(data[offset:offset + formats.RECORD_HEADER_SIZE],
                                              f"{where} offset {offset}")
        length = formats.RECORD_HEADER_SIZE + header.stored_length
        if offset + length > len(data):
            raise IntegrityError(f"{where}: record at offset {offset} runs past the end of the pack")
        yield header.chunk_id, ChunkLocation(pack_id, offset, length, header.raw_length)
        offset += length


def pack_records(packs: PackBackend, pack_id: int) -> list[tuple[bytes, ChunkLocation]]:
    """A pack's records: from its index object when it has a sound one, else from the pack."""
    name = index_object_name(pack_id)
    data = packs.get_object(name)
    if data is not None:
        try:
            return decode_pack_index(pack_id, data, name)
        except IntegrityError:
            pass  # the pack itself is the truth; its index object only saves requests
    return list(walk_pack(packs, pack_id))
