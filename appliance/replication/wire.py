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
- A manifest is a restore point with everything but its chunks, encoded as the store
  keeps it (`appliance.store.manifests.encode_manifest`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from appliance.errors import IntegrityError, InvalidRequest
from appliance.store import formats

MAX_IDS = 16384


@dataclass(frozen=True)
class StoreIdentity:
    """What two stores must agree on before a chunk can move between them."""

    store_id: str
    chunk_size: int
    chunk_id: str

    def to_json(self) -> dict[str, object]:
        return {"store_id": self.store_id, "chunk_size": self.chunk_size, "chunk_id": self.chunk_id}


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
