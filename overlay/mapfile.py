"""The on-disk format of an overlay's map file, defined once.

An overlay directory holds two files (and, once a stable write came, a journal:
`overlay.journal`)::

    data    sparse; overlay block i lives at offset i * block size, always written whole
    map     MapHeader (48 bytes) at offset 0, zero padding up to ENTRIES_OFFSET, then
            one entry byte per block of the virtual size: 0 = the block reads from the
            base (below base limit) or as zeros, 1 = the block reads from `data`

MapHeader::

    magic (8)  version (u32)  block size (u32)  virtual size (u64)  base limit (u64)
    sequence (u64)  xxh3-64 of the preceding 40 bytes

The magic is the first eight bytes of BLAKE3 of a version string, as for every other
file kind of the appliance, so a released magic never changes. The header is far below
one sector, so rewriting it in place is atomic; entries start on their own page so
entry writes never rewrite the header's sector. Entries past the end of the file read
as 0, which lets a fresh map be just a header. `base limit` is the smallest size the
disk was ever truncated to (capped at the base's size): base bytes show only below it,
so a range cut by truncate reads as zeros when the disk grows again. `sequence` counts
header writes, so of two copies of a map the newer one is the one with the higher number.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import blake3
import xxhash

from overlay.errors import OverlayCorrupt, OverlayError

MAGIC: Final = blake3.blake3(b"instant-recovery-appliance overlay map v1").digest()[:8]
FORMAT_VERSION: Final = 1
_HEADER = struct.Struct("<8sIIQQQ")  # magic, version, block size, size, base limit, sequence
HEADER_SIZE: Final = _HEADER.size + 8  # + xxh3-64
ENTRIES_OFFSET: Final = 4096
#: Whole pages keep every block write page-aligned; the upper bound keeps the
#: read-modify-write buffer of a sub-block write small.
MIN_BLOCK_SIZE: Final = 4096
MAX_BLOCK_SIZE: Final = 16 << 20


@dataclass(frozen=True, slots=True)
class MapHeader:
    block_size: int
    size: int
    base_limit: int
    sequence: int

    @property
    def blocks(self) -> int:
        """How many map entries are meaningful: the blocks that cover `size`."""
        return -(-self.size // self.block_size)

    def encode(self) -> bytes:
        fields = _HEADER.pack(
            MAGIC, FORMAT_VERSION, self.block_size, self.size, self.base_limit, self.sequence
        )
        digest: bytes = xxhash.xxh3_64_digest(fields)
        return fields + digest


def check_block_size(block_size: int, where: str) -> None:
    """Raise OverlayError unless `block_size` is one this format allows."""
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise OverlayError(
            f"{where}: block size {block_size} is not a power of two between "
            f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )


def decode_header(data: bytes, where: str) -> MapHeader:
    """Parse and verify a map header; raise OverlayCorrupt unless it is sound."""
    if len(data) < HEADER_SIZE:
        raise OverlayCorrupt(f"{where}: map header truncated ({len(data)} bytes)")
    fields, digest = data[: _HEADER.size], data[_HEADER.size : HEADER_SIZE]
    magic, version, block_size, size, base_limit, sequence = _HEADER.unpack(fields)
    if magic != MAGIC:
        raise OverlayCorrupt(f"{where}: not an overlay map (bad magic)")
    if xxhash.xxh3_64_digest(fields) != digest:
        raise OverlayCorrupt(f"{where}: map header checksum mismatch")
    if version != FORMAT_VERSION:
        raise OverlayCorrupt(f"{where}: unsupported overlay map version {version}")
    try:
        check_block_size(block_size, where)
    except OverlayError as exc:
        raise OverlayCorrupt(str(exc)) from None
    if base_limit > size:
        raise OverlayCorrupt(f"{where}: map header base limit {base_limit} exceeds size {size}")
    return MapHeader(block_size, size, base_limit, sequence)


def check_entries(entries: bytes | bytearray, where: str) -> None:
    """Raise OverlayCorrupt if any entry is neither 0 nor 1 (checked at C speed)."""
    if entries.translate(None, b"\x00\x01"):
        bad = next(i for i, value in enumerate(entries) if value > 1)
        raise OverlayCorrupt(
            f"{where}: map entry of block {bad} is {entries[bad]}, not 0 or 1 "
            f"(map offset {ENTRIES_OFFSET + bad})"
        )
