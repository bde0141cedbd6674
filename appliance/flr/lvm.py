"""LVM2: the logical volumes of a physical volume, each readable as a volume of its own.

dissect.volume parses the VG's metadata text into its VGs, PVs, LVs and segments, and
dissect.util's MappingStream reads an LV's linear segments from the PV, lazily, through the
store's read path like any partition. The rest is done here, so damage is an error and
never a wrong map: LVM's own
integrity checks (the label's CRC, the metadata area header's CRC and magic, the metadata
text's CRC), the second metadata area when the first is damaged (as LVM falls back),
VG and LV names checked against LVM's rule (they become path parts), and every LV whose
bytes are not a plain concatenation of extents of this PV refused by name: thin, snapshot,
RAID and mirror LVs need a device-mapper target's own metadata to read; striped ones are
mapped wrongly by dissect (one stripe-size run per PV, not interleaved); and extents on
another PV of the VG are not on this disk.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

from appliance.errors import DamagedFileSystem
from appliance.flr.parsers import Source, dissect, parse

SECTOR = 512
LABEL_SECTORS = 4
FMTT_MAGIC = b" LVM2 x[5A%r0N*>"
INITIAL_CRC = 0xF597A6CF
RAW_LOCN_IGNORED = 1
#: LVM's rule for VG and LV names: no '/', nothing a shell or a path would mangle, at most 127 characters.
LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
LINEAR = ("striped", "linear")

_LABEL = struct.Struct("<8sQII8s")
_LOCN = struct.Struct("<QQ")
_MDA_HEADER = struct.Struct("<I16sIQQ")
_RAW_LOCN = struct.Struct("<QQII")


def lvm_crc(data: bytes) -> int:
    """LVM's CRC-32: zlib's polynomial from INITIAL_CRC without the final inversion (zlib inverts in and out)."""
    return zlib.crc32(data, INITIAL_CRC ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


@dataclass(frozen=True)
class LogicalVolume:
    """A visible LV: its names, size and segment types, and why it cannot be read ("" when it can).

    `runs` maps it onto its PV of `pv_size` bytes: (offset in the LV, length, offset in the PV).
    """

    vg: str
    name: str
    size: int
    types: str
    refusal: str
    damaged: bool
    runs: tuple[tuple[int, int, int], ...]
    pv_size: int

    def open(self, pv: BinaryIO) -> BinaryIO:
        stream: BinaryIO = dissect("util.stream").MappingStream()
        for offset, length, pv_offset in self.runs:
            stream.add(offset, length, pv, pv_offset)  # type: ignore[attr-defined]
        return stream


@dataclass(frozen=True)
class _Label:
    uuid: str
    data_areas: list[tuple[int, int]]
    metadata_areas: list[tuple[int, int]]


def _read(pv: Source, offset: int, size: int) -> bytes:
    pv.seek(offset)
    return pv.read(size)


def _locations(data: bytes, start: int) -> tuple[list[tuple[int, int]], int]:
    """A zero-terminated list of (offset, size) from `start` of the label sector, and where it ends."""
    found: list[tuple[int, int]] = []
    while start + _LOCN.size <= len(data):
        offset, size = _LOCN.unpack_from(data, start)
        start += _LOCN.size
        if offset == 0:
            return found, start
        found.append((offset, size))
    raise DamagedFileSystem("LVM2 PV header: its area lists run off its sector")


def _label(pv: Source) -> _Label:
    for sector in range(LABEL_SECTORS):
        label = _read(pv, sector * SECTOR, SECTOR)
        if label[:8] == b"LABELONE":
            break
    else:
        raise DamagedFileSystem("no LVM2 label in the PV's first 4 sectors")
    _, where, crc, header_at, kind = _LABEL.unpack_from(label)
    if where != sector or kind != b"LVM2 001" or lvm_crc(label[20:]) != crc or not 32 <= header_at < SECTOR - 40:
        raise DamagedFileSystem(f"the LVM2 label in sector {sector} is damaged (CRC, sector or type)")
    data_areas, end = _locations(label, header_at + 40)
    metadata_areas, _ = _locations(label, end)
    return _Label(label[header_at : header_at + 32].decode("ascii", "replace"), data_areas, metadata_areas)


def _metadata_text(pv: Source, size: int, areas: list[tuple[int, int]]) -> str | None:
    """The VG metadata of the PV's first intact metadata area; None for a PV in no VG."""
    faults = []
    for offset, length in areas:
        try:
            text = _area_text(pv, size, offset, length)
        except DamagedFileSystem as exc:
            faults.append(f"LVM2 metadata area at byte {offset}: {exc}")
            continue
        if text is not None:
            return text
    if faults:
        raise DamagedFileSystem("; ".join(faults))
    return None


def _area_text(pv: Source, size: int, offset: int, length: int) -> str | None:
    if offset + length > size or length < 2 * SECTOR:
        raise DamagedFileSystem("lies outside the PV")
    header = _read(pv, offset, SECTOR)
    crc, magic, version, start, area_size = _MDA_HEADER.unpack_from(header)
    if crc != lvm_crc(header[4:]) or magic != FMTT_MAGIC or version != 1 or (start, area_size) != (offset, length):
        raise DamagedFileSystem("its header is damaged (CRC, magic, version or place)")
    text_at, text_size, text_crc, flags = _RAW_LOCN.unpack_from(header, _MDA_HEADER.size)
    if text_at == 0 or flags & RAW_LOCN_IGNORED:
        return None
    if text_at < SECTOR or text_at >= length or text_size > length - SECTOR:
        raise DamagedFileSystem("its text location lies outside the area")
    first = min(text_size, length - text_at)  # the text may wrap round to just after the header
    text = _read(pv, offset + text_at, first) + _read(pv, offset + SECTOR, text_size - first)
    if lvm_crc(text) != text_crc:
        raise DamagedFileSystem("its metadata text fails its CRC")
    return text.rstrip(b"\0").decode("utf-8", "replace")


def logical_volumes(pv: Source, size: int) -> list[LogicalVolume]:
    """The visible LVs of the PV's VG, in metadata order; [] for a PV in no VG."""
    label = _label(pv)
    text = _metadata_text(pv, size, label.metadata_areas)
    if text is None:
        return []
    metadata = parse("LVM2 metadata", dissect("volume.lvm.physical").parse_metadata, text)
    groups = [(name, value) for name, value in metadata.items() if isinstance(value, dict)]
    if len(groups) != 1:
        raise DamagedFileSystem(f"LVM2 metadata holds {len(groups)} VGs, not 1")
    group = parse("LVM2 metadata", dissect("volume.lvm.metadata").VolumeGroup.from_dict, groups[0][1], groups[0][0])
    here = [name for name, pv_meta in group.physical_volumes.items() if str(pv_meta.id).replace("-", "") == label.uuid]
    if len(here) != 1:
        raise DamagedFileSystem(f"LVM2 metadata of VG {group.name!r} does not list this PV ({label.uuid})")
    found = []
    for lv in group.logical_volumes.values():
        if not all(LVM_NAME.fullmatch(name) and name not in (".", "..") for name in (group.name, lv.name)):
            raise DamagedFileSystem(f"LVM2 metadata names an LV {group.name!r}/{lv.name!r} outside LVM's name rule")
        if not lv.is_visible:
            continue
        extents = sum(int(segment.extent_count) for segment in lv.segments)
        types = "+".join(dict.fromkeys(_kind(segment) for segment in lv.segments)) or "none"
        refusal, damaged, runs = parse(f"LVM2 LV {group.name}/{lv.name}", _mapping, group, lv, here[0], label, size)
        found.append(LogicalVolume(group.name, lv.name, extents * int(group.extent_size) * SECTOR, types, refusal,
                                   damaged, runs, size))
    return found


def _kind(segment: Any) -> str:
    """A segment's type as lvs shows it: LVM writes a linear segment as "striped" over one PV."""
    return "linear" if segment.type in LINEAR and int(getattr(segment, "stripe_count", 1)) == 1 else str(segment.type)


def _mapping(group: Any, lv: Any, here: str, label: _Label,
             size: int) -> tuple[str, bool, tuple[tuple[int, int, int], ...]]:
    """(why the LV cannot be read or "", whether that is damage, its runs when it can be read)."""
    snapshots = [segment for other in group.logical_volumes.values() for segment in other.segments
                 if segment.type == "snapshot" and lv.name in (segment.cow_store, segment.merging_store)]
    if snapshots:
        return (f"a snapshot of {snapshots[0].origin!r}: its copy-on-write store is read only through device-mapper",
                False, ())
    extent = int(group.extent_size) * SECTOR
    pe_start = int(group.physical_volumes[here].pe_start) * SECTOR
    if not label.data_areas or label.data_areas[0][0] != pe_start:
        return "its PV's first extent is not where the PV header says (damaged metadata)", True, ()
    runs = []
    expected = 0
    for segment in sorted(lv.segments, key=lambda segment: int(segment.start_extent)):
        if segment.type not in LINEAR:
            return f"a {segment.type} LV: only linear LVs are browsed", False, ()
        if int(segment.stripe_count) != 1:
            return f"striped over {segment.stripe_count} PVs: only linear LVs are browsed", False, ()
        (pv_name, pv_extent), = segment.stripes
        if pv_name != here:
            return f"its extents lie on {pv_name}, another PV of VG {group.name!r} that is not on this disk", False, ()
        start, count = int(segment.start_extent), int(segment.extent_count)
        if start != expected or pe_start + (int(pv_extent) + count) * extent > size:
            return f"its segment at extent {start} is out of place or past the PV's end (damaged metadata)", True, ()
        runs.append((start * extent, count * extent, pe_start + int(pv_extent) * extent))
        expected += count
    return "", False, tuple(runs)
