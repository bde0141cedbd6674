"""VMDK descriptors and hosted sparse extents (monolithicSparse, streamOptimized).

Layouts follow VMware's "Virtual Disk Format 5.0" specification. Everything a
read depends on (header, grain directory, grain tables) is loaded and bounds-checked
once at open, so a malformed file is refused before ingest starts instead of
failing (or, worse, yielding wrong bytes) hours into a copy. Compressed grains can
only be checked when inflated, so those checks happen on read.
"""

from __future__ import annotations

import array
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass

from appliance.errors import SourceError
from appliance.ingest.closing import OwnsFd

SECTOR = 512
SPARSE_MAGIC = b"KDMV"
# gdOffset value meaning "the real header is in the footer" (streamOptimized).
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF

# SparseExtentHeader up to compressAlgorithm; the rest of its sector is padding.
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_GRAIN_MARKER = struct.Struct("<QI")  # lba, compressed size; the deflate data follows
_MARKER = struct.Struct("<QII")  # value, size (0 for metadata markers), type
_MARKER_FOOTER = 3

_FLAG_NEWLINE_TEST = 1 << 0
_FLAG_COMPRESSED = 1 << 16
_NEWLINE_CHARS = b"\n \r\n"
_COMPRESSION_DEFLATE = 1
_SUPPORTED_VERSIONS = (1, 2, 3)
# Bounds a grain's inflated size (64 MiB), so a hostile header cannot make one
# read allocate gigabytes; VMware and qemu use 128 sectors.
_MAX_GRAIN_SECTORS = 1 << 17

# Entries below this are not file offsets: 0 = unallocated, 1 = zeroed grain.
_FIRST_REAL_SECTOR = 2

_ACCESS_WORD = re.compile(r"(RW|RDONLY|NOACCESS)\s", re.IGNORECASE)
_EXTENT_LINE = re.compile(
    r'(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?',
    re.IGNORECASE,
)
_NO_PARENT_CID = "ffffffff"


@dataclass(frozen=True)
class Extent:
    """One descriptor extent line; `line` is kept so errors can point at it."""

    line: int
    access: str  # "RW" | "RDONLY" | "NOACCESS"
    sectors: int
    kind: str  # "FLAT", "VMFS", "ZERO", "SPARSE", ... (upper case)
    filename: str | None  # None only for ZERO extents
    offset: int  # sectors into `filename` where this extent's data starts


def parse_descriptor(text: str, where: str) -> tuple[Extent, ...]:
    """Parse a descriptor's extent lines; `where` names it in error messages.

    Delta (snapshot child) disks are refused here because every caller would read
    their unwritten areas as zeros, when those areas really live in the parent.
    """
    extents = check_not_delta(text, where)
    if not extents:
        raise SourceError(f"{where}: descriptor declares no extents")
    return extents


def check_not_delta(text: str, where: str) -> tuple[Extent, ...]:
    """Parse every line and refuse a delta disk, allowing no extents: the embedded
    descriptor of a sparse extent may be empty, but must not name a parent."""
    extents: list[Extent] = []
    fields: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _EXTENT_LINE.fullmatch(line)
        if match is None and "=" in line and not _ACCESS_WORD.match(line):
            key, _, value = line.partition("=")
            fields[key.strip()] = value.strip().strip('"')
            continue
        if match is None:
            raise SourceError(f"{where}: line {lineno} is not a valid extent line: {line!r}")
        access, sectors, kind, filename, offset = match.groups()
        kind = kind.upper()
        if int(sectors) == 0:
            raise SourceError(f"{where}: line {lineno} declares an extent of 0 sectors")
        if filename is None and kind != "ZERO":
            raise SourceError(f"{where}: line {lineno}: {kind} extent names no file")
        extents.append(
            Extent(lineno, access.upper(), int(sectors), kind, filename, int(offset or 0))
        )
    if fields.get("parentCID", _NO_PARENT_CID).lower() != _NO_PARENT_CID:
        parent = fields.get("parentFileNameHint", "unknown")
        raise SourceError(
            f"{where} is a delta (snapshot) disk of parent {parent!r}; its unwritten areas "
            "live in the parent, so consolidate the snapshots or ingest the base disk"
        )
    return tuple(extents)


@dataclass(frozen=True)
class SparseHeader:
    """The fields of a hosted sparse extent header; offsets and sizes in sectors."""

    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    compress_algorithm: int

    @property
    def compressed(self) -> bool:
        """Whether grains are stored deflated behind a grain marker."""
        return bool(self.flags & _FLAG_COMPRESSED)


def parse_sparse_header(data: bytes, path: str, offset: int) -> SparseHeader:
    """Decode and sanity-check the header sector read from `offset` of `path`."""
    where = f"{path}: sparse header at offset {offset}"
    if len(data) < SECTOR:
        raise SourceError(f"{where} is truncated ({len(data)} of {SECTOR} bytes)")
    (magic, version, flags, capacity, grain_size, desc_offset, desc_size, gtes_per_gt,
     rgd_offset, gd_offset, overhead, _unclean, newline_chars, algorithm) = _HEADER.unpack_from(data)
    if magic != SPARSE_MAGIC:
        raise SourceError(f"{where} has bad magic {magic!r} (expected {SPARSE_MAGIC!r})")
    if version not in _SUPPORTED_VERSIONS:
        raise SourceError(f"{where} has unsupported version {version}")
    if flags & _FLAG_NEWLINE_TEST and newline_chars != _NEWLINE_CHARS:
        raise SourceError(f"{where} fails its newline check: the file was damaged by a text-mode transfer")
    if not 0 < grain_size <= _MAX_GRAIN_SECTORS or grain_size & (grain_size - 1):
        raise SourceError(f"{where} has invalid grain size {grain_size} sectors")
    if gtes_per_gt == 0:
        raise SourceError(f"{where} declares 0 entries per grain table")
    if flags & _FLAG_COMPRESSED and algorithm != _COMPRESSION_DEFLATE:
        raise SourceError(f"{where} uses unsupported compression algorithm {algorithm}")
    return SparseHeader(version, flags, capacity, grain_size, desc_offset, desc_size,
                        gtes_per_gt, rgd_offset, gd_offset, overhead, algorithm)


class SparseExtent(OwnsFd):
    """A hosted sparse extent: monolithicSparse, or streamOptimized when compressed."""

    def __init__(self, path: str, fd: int) -> None:
        """Take ownership of `fd` (open on `path`) only if the extent is valid."""
        self.path = path
        self._fd = fd
        self._file_size = os.lseek(fd, 0, os.SEEK_END)
        header = parse_sparse_header(self._pread(0, min(SECTOR, self._file_size)), path, 0)
        if header.gd_offset == GD_AT_END:
            header = self._footer_header()
        self._check_embedded_descriptor(header)
        self.header = header
        self.format = "vmdk-stream" if header.compressed else "vmdk-sparse"
        self.size = header.capacity * SECTOR
        self._grain_bytes = header.grain_size * SECTOR
        self._gtes = header.gtes_per_gt
        self._tables = self._load_tables()
        self._cached: tuple[int, bytes] = (-1, b"")

    # -- open-time loading and validation ------------------------------------

    def _pread(self, offset: int, length: int) -> bytes:
        """Read metadata that the caller has already bounds-checked against the file."""
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            if self._fd < 0:
                raise ValueError(f"{self.path}: read from a closed source") from exc
            raise SourceError(f"{self.path}: read error at offset {offset}: {exc.strerror}") from exc
        if len(data) != length:
            raise SourceError(
                f"{self.path} is truncated: wanted {length} bytes at offset {offset}, got {len(data)}"
            )
        return data

    def _sectors(self) -> int:
        return self._file_size // SECTOR

    def _footer_header(self) -> SparseHeader:
        """streamOptimized writers only know the GD location at the end of the stream."""
        marker_at = self._file_size - 3 * SECTOR
        if marker_at < SECTOR:
            raise SourceError(f"{self.path}: streamOptimized file of {self._file_size} bytes has no room for a footer")
        _, size, kind = _MARKER.unpack(self._pread(marker_at, _MARKER.size))
        if size != 0 or kind != _MARKER_FOOTER:
            raise SourceError(
                f"{self.path}: no streamOptimized footer marker at offset {marker_at} (file truncated?)"
            )
        if any(self._pread(self._file_size - SECTOR, _MARKER.size)):
            raise SourceError(f"{self.path}: no end-of-stream marker after the footer (file truncated?)")
        footer_at = marker_at + SECTOR
        footer = parse_sparse_header(self._pread(footer_at, SECTOR), self.path, footer_at)
        if footer.gd_offset == GD_AT_END:
            raise SourceError(f"{self.path}: footer at offset {footer_at} does not locate the grain directory")
        return footer

    def _check_embedded_descriptor(self, header: SparseHeader) -> None:
        """Refuse delta disks, whose unallocated grains are not zeros but the parent's data."""
        if header.descriptor_offset == 0 or header.descriptor_size == 0:
            return
        end = (header.descriptor_offset + header.descriptor_size) * SECTOR
        if end > self._file_size:
            raise SourceError(
                f"{self.path}: embedded descriptor (sectors {header.descriptor_offset}+{header.descriptor_size}) "
                f"extends past end of file ({self._sectors()} sectors)"
            )
        raw = self._pread(header.descriptor_offset * SECTOR, header.descriptor_size * SECTOR)
        text = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        check_not_delta(text, f"{self.path} (embedded descriptor)")

    def _load_tables(self) -> list[array.array[int] | None]:
        """Load every grain table; None stands for a table whose grains are all unallocated."""
        grains = -(-self.header.capacity // self.header.grain_size)
        n_tables = -(-grains // self._gtes)
        gd_offset = self.header.gd_offset
        if (gd_offset * SECTOR) + n_tables * 4 > self._file_size:
            raise SourceError(
                f"{self.path}: grain directory (sector {gd_offset}, {n_tables} entries) "
                f"extends past end of file ({self._sectors()} sectors)"
            )
        directory = _u32s(self._pread(gd_offset * SECTOR, n_tables * 4))
        tables: list[array.array[int] | None] = []
        for number, sector in enumerate(directory):
            if sector == 0:
                tables.append(None)
                continue
            if sector * SECTOR + self._gtes * 4 > self._file_size:
                raise SourceError(
                    f"{self.path}: grain directory entry {number} points past end of file "
                    f"(sector {sector}, file has {self._sectors()} sectors)"
                )
            used = min(self._gtes, grains - number * self._gtes)
            table = _u32s(self._pread(sector * SECTOR, used * 4))
            self._check_table(number, table)
            tables.append(table)
        return tables

    def _check_table(self, number: int, table: array.array[int]) -> None:
        """Refuse entries whose grain (or, if compressed, grain marker) lies past EOF."""
        if self.header.compressed:
            limit = (self._file_size - _GRAIN_MARKER.size) // SECTOR
        else:
            limit = self._sectors() - self.header.grain_size
        if max(table, default=0) <= limit:
            return
        for index, sector in enumerate(table):
            if sector >= _FIRST_REAL_SECTOR and not self._grain_fits(number * self._gtes + index, sector):
                raise SourceError(
                    f"{self.path}: grain table entry {index} of table {number} points past end of file "
                    f"(sector {sector}, file has {self._sectors()} sectors)"
                )

    def _grain_fits(self, grain: int, sector: int) -> bool:
        """Precise check: only the part of the last grain inside the disk must be stored."""
        if self.header.compressed:
            return sector * SECTOR + _GRAIN_MARKER.size <= self._file_size
        needed = min(self._grain_bytes, self.size - grain * self._grain_bytes)
        return sector * SECTOR + needed <= self._file_size

    # -- reads ----------------------------------------------------------------

    def _entry(self, grain: int) -> int:
        table = self._tables[grain // self._gtes]
        return 0 if table is None else table[grain % self._gtes]

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.path}: range of {length} bytes at offset {offset} is outside the {self.size}-byte disk"
            )

    def read(self, offset: int, length: int) -> bytes:
        """Coalesce runs of zeros and of file-contiguous grains, so a sequential read of
        a qemu- or VMware-written monolithicSparse extent is a single pread."""
        self._check_range(offset, length)
        # Pending pieces: (file offset, length), with offset -1 for zeros, or inflated data.
        pieces: list[tuple[int, int] | memoryview] = []
        position, end = offset, offset + length
        while position < end:
            grain, within = divmod(position, self._grain_bytes)
            count = min(self._grain_bytes - within, end - position)
            sector = self._entry(grain)
            if sector >= _FIRST_REAL_SECTOR and self.header.compressed:
                pieces.append(memoryview(self._inflate(grain, sector))[within:within + count])
            else:
                start = sector * SECTOR + within if sector >= _FIRST_REAL_SECTOR else -1
                last = pieces[-1] if pieces else None
                if isinstance(last, tuple) and (
                    last[0] == start == -1 or last[0] >= 0 and last[0] + last[1] == start
                ):
                    pieces[-1] = (last[0], last[1] + count)
                else:
                    pieces.append((start, count))
            position += count
        parts = [self._materialise(piece) for piece in pieces]
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def _materialise(self, piece: tuple[int, int] | memoryview) -> bytes | memoryview:
        if isinstance(piece, memoryview):
            return piece
        start, count = piece
        return bytes(count) if start < 0 else self._pread(start, count)

    def _inflate(self, grain: int, sector: int) -> bytes:
        """Inflate one grain, remembering it: an unaligned sequential read needs it twice."""
        cached_grain, cached_data = self._cached
        if cached_grain == grain:
            return cached_data
        table, index = divmod(grain, self._gtes)
        entry = f"grain table entry {index} of table {table}"
        marker_at = sector * SECTOR
        lba, compressed_size = _GRAIN_MARKER.unpack(self._pread(marker_at, _GRAIN_MARKER.size))
        expected_lba = grain * self.header.grain_size
        if compressed_size == 0:
            raise SourceError(f"{self.path}: {entry} points at a metadata marker, not a grain (sector {sector})")
        if lba != expected_lba:
            raise SourceError(
                f"{self.path}: grain at sector {sector} holds LBA {lba}, but {entry} maps it to LBA {expected_lba}"
            )
        data_at = marker_at + _GRAIN_MARKER.size
        if data_at + compressed_size > self._file_size:
            raise SourceError(
                f"{self.path}: grain at LBA {lba} ({entry}, sector {sector}, {compressed_size} bytes) "
                f"extends past end of file ({self._sectors()} sectors)"
            )
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(self._pread(data_at, compressed_size), self._grain_bytes + 1)
        except zlib.error as exc:
            raise SourceError(f"{self.path}: grain at LBA {lba} (sector {sector}) fails to inflate: {exc}") from exc
        if not inflater.eof and len(data) <= self._grain_bytes:
            raise SourceError(f"{self.path}: grain at LBA {lba} (sector {sector}) has a truncated deflate stream")
        # qemu stores only the in-disk part of a partial last grain; VMware a whole grain.
        in_disk = min(self._grain_bytes, self.size - grain * self._grain_bytes)
        if len(data) not in (self._grain_bytes, in_disk):
            shown = f"more than {self._grain_bytes}" if len(data) > self._grain_bytes else str(len(data))
            raise SourceError(
                f"{self.path}: grain at LBA {lba} (sector {sector}) inflates to {shown} bytes, expected {in_disk}"
            )
        self._cached = (grain, data)
        return data

    def is_unallocated(self, offset: int, length: int) -> bool:
        """Answer from the grain tables alone; zeroed grains count as unallocated."""
        self._check_range(offset, length)
        if length == 0:
            return True
        first = offset // self._grain_bytes
        last = (offset + length - 1) // self._grain_bytes
        return all(self._entry(grain) < _FIRST_REAL_SECTOR for grain in range(first, last + 1))


def _u32s(data: bytes) -> array.array[int]:
    """Little-endian u32 array, compact enough to hold every grain table of a large disk."""
    values = array.array("I", data)
    if sys.byteorder != "little":
        values.byteswap()
    return values
