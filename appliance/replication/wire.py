"""What replication sends, byte for byte: chunk-ID lists, record streams and point manifests.

- A chunk-ID list is the IDs back to back (32 bytes each), at most `MAX_IDS` a message.
- A request for chunks is (chunk ID, base ID) pairs back to back (64 bytes each): the
  base is the chunk the target holds for the same slot of the same disk in its newest
  point of that VM, or 32 zero bytes when there is none.
- A chunk stream is frames back to back: a base ID (32 bytes), then a pack record
  (`appliance.store.formats`), whose header gives its length. With a zero base the
  record is the chunk exactly as stored (still compressed, with its checksum); with a
  base it is a delta: zstd with the base chunk's bytes as its dictionary, so the blocks
  the two share cost almost nothing.
- A manifest is a restore point with everything but its chunks::

      u32 (big-endian)  length of the JSON document
      JSON              {"point": RestorePoint.to_json(), "files": [names]}
      maps              one chunk map per disk, in disk order (32 bytes per chunk)
      files             each named file, u32 length then its bytes, in the JSON's order

  The maps' lengths follow from the point's disks (`chunks` entries each), so a manifest
  whose sizes disagree with its point is refused as a whole.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Iterator

from appliance.errors import IntegrityError, InvalidRequest
from appliance.store import formats
from appliance.store.catalog import RestorePoint, referenced_chunks

MAX_IDS = 16384
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class StoreIdentity:
    """What two stores must agree on before a chunk can move between them."""

    store_id: str
    chunk_size: int
    chunk_id: str

    def to_json(self) -> dict[str, object]:
        return {"store_id": self.store_id, "chunk_size": self.chunk_size, "chunk_id": self.chunk_id}


@dataclass(frozen=True)
class Manifest:
    """A restore point, its chunk maps and its small files: everything but the chunks."""

    point: RestorePoint
    maps: tuple[bytes, ...]
    files: dict[str, bytes]

    def chunk_ids(self) -> set[bytes]:
        """The distinct stored chunks the point needs (zero slots need none)."""
        found: set[bytes] = set()
        for chunk_map in self.maps:
            found |= referenced_chunks(chunk_map)
        return found


def encode_ids(ids: list[bytes]) -> bytes:
    return b"".join(ids)


def decode_ids(body: bytes) -> list[bytes]:
    size = formats.CHUNK_ID_SIZE
    if len(body) % size:
        raise InvalidRequest(f"a chunk-ID list of {len(body)} bytes is not a whole number of {size}-byte IDs")
    if len(body) // size > MAX_IDS:
        raise InvalidRequest(f"a chunk-ID list of {len(body) // size} IDs is over the limit of {MAX_IDS}")
    return [body[start : start + size] for start in range(0, len(body), size)]


def encode_pairs(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(chunk + base for chunk, base in pairs)


def decode_pairs(body: bytes) -> list[tuple[bytes, bytes]]:
    pair = 2 * formats.CHUNK_ID_SIZE
    if len(body) % pair or len(body) > MAX_IDS * formats.CHUNK_ID_SIZE:
        raise InvalidRequest(f"a request of {len(body)} bytes is not a list of at most {MAX_IDS // 2} "
                             "(chunk ID, base ID) pairs")
    ids = decode_ids(body)
    return list(zip(ids[0::2], ids[1::2]))


def split_frames(body: bytes | memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """Each (base ID, record) of a chunk stream; IntegrityError at the first malformed or truncated one."""
    view = memoryview(body)
    offset = 0
    while offset < len(view):
        base = bytes(view[offset : offset + formats.CHUNK_ID_SIZE])
        start = offset + formats.CHUNK_ID_SIZE
        header = formats.decode_record_header(view[start:], f"chunk stream offset {offset}")
        end = start + formats.RECORD_HEADER_SIZE + header.stored_length
        if end > len(view):
            raise IntegrityError(f"chunk stream offset {offset}: record truncated")
        yield base, view[start:end]
        offset = end


def encode_manifest(manifest: Manifest) -> bytes:
    names = sorted(manifest.files)
    doc = json.dumps({"point": manifest.point.to_json(), "files": names}).encode()
    parts = [_LENGTH.pack(len(doc)), doc, *manifest.maps]
    for name in names:
        parts += [_LENGTH.pack(len(manifest.files[name])), manifest.files[name]]
    return b"".join(parts)


def decode_manifest(body: bytes) -> Manifest:
    """The manifest in `body`; any disagreement between its parts is an InvalidRequest."""
    try:
        (length,) = _LENGTH.unpack_from(body)
        doc = json.loads(body[4 : 4 + length])
        point = RestorePoint.from_json(doc["point"])
        names = [str(name) for name in doc["files"]]
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest(f"not a restore point manifest: {type(exc).__name__}: {exc}") from None
    offset = 4 + length
    maps = []
    for disk in point.disks:
        size = disk.chunks * formats.CHUNK_ID_SIZE
        maps.append(body[offset : offset + size])
        offset += size
        if len(maps[-1]) != size:
            raise InvalidRequest(f"manifest of point {point.id}: the map of disk {disk.name!r} is truncated")
    files = {}
    for name in names:
        if offset + 4 > len(body):
            raise InvalidRequest(f"manifest of point {point.id}: file {name!r} is truncated")
        (size,) = _LENGTH.unpack_from(body, offset)
        files[name] = body[offset + 4 : offset + 4 + size]
        offset += 4 + size
        if len(files[name]) != size:
            raise InvalidRequest(f"manifest of point {point.id}: file {name!r} is truncated")
    if offset != len(body):
        raise InvalidRequest(f"manifest of point {point.id}: {len(body) - offset} bytes after its last part")
    if sorted(names) != sorted(point.files):
        raise InvalidRequest(f"manifest of point {point.id}: its files {names} are not the point's {list(point.files)}")
    return Manifest(point, tuple(maps), files)
