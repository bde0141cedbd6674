"""exFAT read one directory at a time, on dissect.fat's boot-sector structure and dissect's streams.

Why not dissect.fat.exfat.ExFAT: it parses every directory of the volume when it is opened
(listing one folder costs the whole tree), reads a contiguous (NoFatChain) directory as its
first cluster only (Windows writes directories that way: past one cluster the whole volume
fails to open), and follows a FAT chain until it ends, which a damaged FAT (a loop, a free
cluster) never does. Here a directory is read when it is listed; a chain is followed for
as many clusters as its length needs, once each, inside the cluster heap; entry sets are
checked against their checksums. What does not fit raises ValueError, which the adapter
turns into a DamagedFileSystem: never other bytes than the file's.

Directory entries are read with `struct` (the layout is Microsoft's exFAT specification):
dissect's cstruct takes ~80 us per file, `struct` ~1 us.
"""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO

from appliance.flr.parsers import dissect

ENTRY_BYTES = 32
FILE_ENTRY, STREAM_ENTRY, NAME_ENTRY, UPCASE_ENTRY, END_OF_DIRECTORY = 0x85, 0xC0, 0xC1, 0x82, 0x00
NAME_UNITS_PER_ENTRY = 15
READ_ONLY, DIRECTORY = 0x01, 0x10
NO_FAT_CHAIN = 0x02
END_OF_CHAIN = 0xFFFFFFFF
FAT_ENTRIES_PER_BLOCK = 16384  # the FAT is read 64 KiB at a time
CACHED_FAT_BLOCKS, CACHED_DIRECTORIES = 64, 256
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: A file entry's type, secondary count, set checksum, attributes, modified time, its 10 ms increment and
#: its UTC offset (the created and accessed times around them are skipped).
FILE_LAYOUT = struct.Struct("<BBHH2x4xI4x1xB1xB")
#: A stream extension entry: type, flags, reserved, name length, name hash, reserved, valid data length,
#: reserved, first cluster, data length.
STREAM_LAYOUT = struct.Struct("<BBxBH2xQ4xIQ")


@dataclass(frozen=True)
class Entry:
    """A file or directory: `length` is its size (DataLength); bytes past `valid_length` read as zeros."""

    name: str
    directory: bool
    read_only: bool
    length: int
    valid_length: int
    first_cluster: int
    contiguous: bool
    mtime_ns: int | None


def set_checksum(entries: bytes) -> int:
    """The entry set checksum of the specification (bytes 2 and 3, the checksum itself, skipped)."""
    checksum = 0
    for index, byte in enumerate(entries):
        if index not in (2, 3):
            checksum = (((checksum & 1) << 15) + (checksum >> 1) + byte) & 0xFFFF
    return checksum


def timestamp_ns(stamp: int, centiseconds: int, utc_offset: int) -> int | None:
    """A DOS date and time with exFAT's 10 ms increment and UTC offset (15-minute units, bit 7 "valid").

    Without a valid offset the time is local time the disk does not name; it is taken as UTC, as FAT's is.
    """
    try:
        moment = datetime(1980 + (stamp >> 25), (stamp >> 21) & 0x0F, (stamp >> 16) & 0x1F, (stamp >> 11) & 0x1F,
                          (stamp >> 5) & 0x3F, (stamp & 0x1F) * 2, tzinfo=timezone.utc)
    except ValueError:  # a zero or out-of-range field: no time recorded
        return None
    if utc_offset & 0x80:
        quarters = utc_offset & 0x7F
        moment -= timedelta(minutes=15 * (quarters - 0x80 if quarters & 0x40 else quarters))
    return (moment - EPOCH) // timedelta(seconds=1) * 1_000_000_000 + min(centiseconds, 199) * 10_000_000


def upcase_table(table: bytes) -> dict[int, int]:
    """The specification's compressed up-case table as {code unit: its upper case}; 0xFFFF N skips N identities."""
    units = struct.unpack(f"<{len(table) // 2}H", table[: len(table) // 2 * 2])
    mapping, code, index = {}, 0, 0
    while index < len(units):
        if units[index] == 0xFFFF and index + 1 < len(units):
            code += units[index + 1]
            index += 2
            continue
        if units[index] != code:
            mapping[code] = units[index]
        code += 1
        index += 1
    return mapping


class ExfatVolume:
    """The volume's geometry, its root directory and the up-case table names are compared with."""

    def __init__(self, volume: BinaryIO) -> None:
        self._volume = volume
        volume.seek(0)
        boot: Any = dissect("fat.c_exfat").c_exfat.EXFAT_HEADER(volume.read(512))
        volume_bytes = volume.seek(0, io.SEEK_END)
        if boot.fs_name != b"EXFAT   " or boot.boot_signature != 0xAA55:
            raise ValueError("no exFAT boot sector signature")
        if not 9 <= boot.bytes_per_sector_exp <= 12 or boot.bytes_per_sector_exp + boot.sectors_per_cluster_exp > 25:
            raise ValueError(f"sector size 2^{boot.bytes_per_sector_exp}, cluster 2^{boot.sectors_per_cluster_exp} "
                             "sectors: outside the specification")
        self.sector = 1 << boot.bytes_per_sector_exp
        self.cluster = self.sector << boot.sectors_per_cluster_exp
        self._fat = boot.fat_sector * self.sector
        self._heap = boot.cluster_heap_sector * self.sector
        self._clusters = int(boot.cluster_heap_count)
        if self._fat + (self._clusters + 2) * 4 > self._heap or self._heap >= volume_bytes:
            raise ValueError(f"the FAT ({self._clusters} clusters) does not fit before the cluster heap at byte "
                             f"{self._heap}, or that is past the {volume_bytes}-byte volume's end")
        self._volume_bytes = volume_bytes
        self._fat_block = functools.lru_cache(maxsize=CACHED_FAT_BLOCKS)(self._read_fat_block)
        self._listing = functools.lru_cache(maxsize=CACHED_DIRECTORIES)(self._read_directory)
        chain = list(self._follow(int(boot.root_dir_cluster), None))
        self.root = Entry("", True, False, len(chain) * self.cluster, len(chain) * self.cluster,
                          int(boot.root_dir_cluster), False, None)
        self._upper = self._read_upcase_table()

    def _read_fat_block(self, block: int) -> tuple[int, ...]:
        self._volume.seek(self._fat + block * FAT_ENTRIES_PER_BLOCK * 4)
        data = self._volume.read(FAT_ENTRIES_PER_BLOCK * 4)
        return struct.unpack(f"<{len(data) // 4}I", data[: len(data) // 4 * 4])

    def _in_heap(self, cluster: int) -> bool:
        return 2 <= cluster < self._clusters + 2

    def _follow(self, first: int, count: int | None) -> Iterator[int]:
        """`count` clusters of a FAT chain from `first` (to its end when None), each in the heap and seen once."""
        seen: set[int] = set()
        cluster = first
        while count is None or len(seen) < count:
            if cluster == END_OF_CHAIN:
                raise ValueError(f"its cluster chain ends after {len(seen)} of its {count} clusters")
            if not self._in_heap(cluster):
                raise ValueError(f"its cluster chain leaves the cluster heap at {cluster:#x} after {len(seen)} "
                                 f"clusters{'' if count is None else f' of {count}'}")
            if cluster in seen:
                raise ValueError(f"its cluster chain loops back to cluster {cluster} after {len(seen)} clusters")
            seen.add(cluster)
            yield cluster
            block, index = divmod(cluster, FAT_ENTRIES_PER_BLOCK)
            entries = self._fat_block(block)
            cluster = entries[index] if index < len(entries) else 0
            if count is None and cluster == END_OF_CHAIN:
                return

    def _runs(self, entry: Entry) -> list[tuple[int, int]]:
        """The entry's clusters as (first sector, sectors) runs, adjacent clusters merged."""
        count = -(-entry.length // self.cluster)
        if count == 0:
            return []
        if entry.contiguous:
            if not (self._in_heap(entry.first_cluster) and self._in_heap(entry.first_cluster + count - 1)):
                raise ValueError(f"its {count} contiguous clusters from {entry.first_cluster} leave the cluster heap")
            clusters: list[tuple[int, int]] = [(entry.first_cluster, count)]
        else:
            clusters = []
            for cluster in self._follow(entry.first_cluster, count):
                if clusters and clusters[-1][0] + clusters[-1][1] == cluster:
                    clusters[-1] = (clusters[-1][0], clusters[-1][1] + 1)
                else:
                    clusters.append((cluster, 1))
        if max(self._heap + (first + length - 2) * self.cluster for first, length in clusters) > self._volume_bytes:
            raise ValueError(f"its clusters run past the {self._volume_bytes}-byte volume's end")
        per_cluster = self.cluster // self.sector
        return [((self._heap // self.sector) + (first - 2) * per_cluster, length * per_cluster)
                for first, length in clusters]

    def open(self, entry: Entry) -> BinaryIO:
        """The entry's bytes: its clusters up to its valid length, zeros from there to its length."""
        streams = dissect("util.stream")
        data: BinaryIO = streams.RunlistStream(self._volume, self._runs(entry), entry.valid_length, self.sector)
        if entry.valid_length == entry.length:
            return data
        zeros = streams.RunlistStream(None, [(None, -(-(entry.length - entry.valid_length) // self.sector))],
                                      entry.length - entry.valid_length, self.sector)
        mapped: BinaryIO = streams.MappingStream(align=self.sector)
        if entry.valid_length:
            mapped.add(0, entry.valid_length, data)  # type: ignore[attr-defined]
        mapped.add(entry.valid_length, entry.length - entry.valid_length, zeros)  # type: ignore[attr-defined]
        return mapped

    def _contents(self, directory: Entry) -> bytes:
        """The directory's entries up to its end-of-directory marker."""
        with self.open(directory) as stream:
            data = stream.read()
        if len(data) != directory.length:
            raise ValueError(f"the directory reads {len(data)} of its {directory.length} bytes")
        for position in range(0, len(data), ENTRY_BYTES):
            if data[position] == END_OF_DIRECTORY:
                return data[:position]
        return data

    def _read_directory(self, directory: Entry) -> dict[str, Entry]:
        """The directory's files by their up-cased name, in the order they are stored."""
        data = self._contents(directory)
        found: dict[str, Entry] = {}
        position = 0
        while position + ENTRY_BYTES <= len(data):
            if data[position] != FILE_ENTRY:  # a deleted entry, the bitmap, up-case table, label or GUID
                position += ENTRY_BYTES
                continue
            end = position + ENTRY_BYTES * (1 + data[position + 1])
            entry = self._entry(data[position:end], position)
            found.setdefault(self.upper(entry.name), entry)
            position = end
        return found

    @staticmethod
    def _entry(entry_set: bytes, position: int) -> Entry:
        _, secondaries, checksum, attributes, modified, centiseconds, offset = FILE_LAYOUT.unpack_from(entry_set)
        records = [entry_set[start : start + ENTRY_BYTES] for start in range(0, len(entry_set), ENTRY_BYTES)]
        if secondaries < 2 or len(records) != secondaries + 1 or records[1][0] != STREAM_ENTRY:
            raise ValueError(f"the entry set at byte {position} of its directory is cut short")
        if set_checksum(entry_set) != checksum:
            raise ValueError(f"the entry set at byte {position} of its directory fails its checksum")
        _, flags, name_units, _, valid_length, first_cluster, length = STREAM_LAYOUT.unpack(records[1])
        names = [record[2:] for record in records[2:] if record[0] == NAME_ENTRY]
        if not 1 <= name_units <= NAME_UNITS_PER_ENTRY * len(names) or valid_length > length:
            raise ValueError(f"the entry set at byte {position} of its directory has a name of {name_units} units "
                             f"in {len(names)} entries, or {valid_length} valid of {length} bytes")
        name = b"".join(names)[: 2 * name_units].decode("utf-16-le", errors="replace")
        return Entry(name, bool(attributes & DIRECTORY), bool(attributes & READ_ONLY), length, valid_length,
                     first_cluster, bool(flags & NO_FAT_CHAIN), timestamp_ns(modified, centiseconds, offset))

    def _read_upcase_table(self) -> dict[int, int] | None:
        """The root's up-case table; None (names then compare case-folded) when it has none or it does not read:
        it decides only which spellings of a name find a file, not worth refusing the volume over."""
        data = self._contents(self.root)
        for position in range(0, len(data), ENTRY_BYTES):
            if data[position] == UPCASE_ENTRY:
                first_cluster, length = struct.unpack_from("<IQ", data, position + 20)
                table = Entry("", False, False, length, length, first_cluster, False, None)
                try:
                    with self.open(table) as stream:
                        return upcase_table(stream.read())
                except ValueError:
                    return None
        return None

    def upper(self, name: str) -> str:
        """The name as exFAT compares it: each UTF-16 code unit through the volume's up-case table."""
        if self._upper is None:
            return name.casefold()
        return name.translate(self._upper)

    def children(self, directory: Entry) -> list[Entry]:
        return list(self._listing(directory).values())

    def child(self, directory: Entry, name: str) -> Entry | None:
        return self._listing(directory).get(self.upper(name))
