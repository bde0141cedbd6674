"""The volumes of a disk: its partitions (GPT or MBR), or the whole disk when it has no table,
and the logical volumes of every LVM2 physical volume among them.

Each volume's contents are recognised by their own signatures, not by the partition
type, which operators and installers set carelessly: a file system the parsers read, an
encrypted volume (named, so an operator knows why it cannot be browsed), or an LVM2 PV,
whose LVs are listed after it as volumes of their own. An operator names a partition by
its number ("2") and an LV by its partition, VG and LV ("2/vg0/root"; "0/vg0/root" for a
PV on a whole disk): `Volume.name`, spelt the same in the CLI's --partition, the API's
`partition` and the JSON listings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from appliance.errors import ApplianceError, DamagedFileSystem, NotFound, UnreadableVolume
from appliance.flr.lvm import LogicalVolume, logical_volumes
from appliance.flr.parsers import Source, partition_table, volume_stream

#: Formats a volume can hold, as `format_of` names them.
FILE_SYSTEMS = ("ext", "xfs", "ntfs", "fat", "exfat")
ENCRYPTED = {"luks": "LUKS (dm-crypt)", "bitlocker": "BitLocker"}


def partition_ref(number: int, lv: str) -> int | str:
    """What JSON calls a volume: a partition by its number (as it always has), an LV as "2/vg0/root"."""
    return f"{number}/{lv}" if lv else number


@dataclass(frozen=True)
class Volume:
    """A partition (number 1 and up), the whole disk (number 0, scheme "none"), or an LV of the PV there.

    An LV (`lv` "VG/LV", scheme "lvm2", type its segment types) has its PV's offset and its
    own size. `fault` is why it cannot be opened when that is known from the listing: a
    damaged PV's metadata, or an LV of a kind not read here.
    """

    number: int
    offset: int
    size: int
    scheme: str
    type_name: str
    format: str
    lv: str = ""
    fault: ApplianceError | None = field(default=None, compare=False)
    logical: LogicalVolume | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return str(partition_ref(self.number, self.lv))

    @property
    def ref(self) -> int | str:
        return partition_ref(self.number, self.lv)

    def to_json(self) -> dict[str, object]:
        """A partition's "partition" stays its number; an LV's is its name, with its VG, LV and any refusal."""
        doc: dict[str, object] = {"partition": self.ref, "offset": self.offset,
                                  "size": self.size, "scheme": self.scheme, "type": self.type_name,
                                  "format": self.format}
        if self.lv:
            vg, lv = self.lv.split("/")
            doc.update(vg=vg, lv=lv, refused=None if self.fault is None else str(self.fault))
        elif self.fault is not None:
            doc["error"] = str(self.fault)
        return doc

    @property
    def browsable(self) -> bool:
        """Shown in /files: a file system, or a damaged volume, whose fault then shows when it is opened."""
        return (self.format in FILE_SYSTEMS and self.fault is None) or isinstance(self.fault, DamagedFileSystem)


def format_of(head: bytes) -> str:
    """What a volume holds, from its first 64 KiB (its signatures live there)."""

    def at(offset: int, magic: bytes) -> bool:
        return head[offset : offset + len(magic)] == magic

    if at(0, b"LUKS\xba\xbe") or at(0, b"SKUL\xba\xbe"):
        return "luks"
    if at(3, b"-FVE-FS-"):
        return "bitlocker"
    if at(3, b"NTFS    "):
        return "ntfs"
    if at(3, b"EXFAT   "):
        return "exfat"
    if at(0, b"XFSB"):
        return "xfs"
    if len(head) >= 0x43A and struct.unpack_from("<H", head, 0x438)[0] == 0xEF53:
        return "ext"
    if at(512, b"LABELONE") and at(512 + 24, b"LVM2 001"):
        return "lvm2"
    if at(4086, b"SWAPSPACE2"):
        return "swap"
    if at(510, b"\x55\xaa") and (at(0x36, b"FAT") or at(0x52, b"FAT32")):
        return "fat"
    return "unknown"


HEAD_BYTES = 64 << 10


def _read_head(disk: Source, offset: int) -> bytes:
    disk.seek(offset)
    return disk.read(HEAD_BYTES)


def find_volumes(disk: Source, size: int) -> list[Volume]:
    """Every volume of the disk, in partition order; the whole disk if it has no partition table."""
    whole = format_of(_read_head(disk, 0))
    table = None if whole in FILE_SYSTEMS or whole in ENCRYPTED else partition_table(disk)
    if table is None or not table[1]:  # a FAT boot sector passes for an MBR with no partitions
        volumes = [Volume(0, 0, size, "none", "", whole)]
    else:
        scheme, partitions = table
        volumes = [Volume(number, offset, length, scheme, type_name, format_of(_read_head(disk, offset)))
                   for number, offset, length, type_name in partitions]
    return [found for volume in volumes for found in _with_logical_volumes(disk, volume)]


def _with_logical_volumes(disk: Source, volume: Volume) -> list[Volume]:
    """The volume, and after an LVM2 PV its LVs; a PV whose metadata is damaged keeps the fault to report."""
    if volume.format != "lvm2":
        return [volume]
    pv = volume_stream(disk, volume.offset, volume.size)
    try:
        found = logical_volumes(pv, volume.size)
    except DamagedFileSystem as exc:
        return [replace(volume, fault=DamagedFileSystem(f"partition {volume.number}: {exc}"))]
    listed = [volume]
    for lv in found:
        name = f"{volume.number}/{lv.vg}/{lv.name}"
        fault = None if not lv.refusal else (DamagedFileSystem if lv.damaged else UnreadableVolume)(
            f"logical volume {name} cannot be browsed: {lv.refusal}")
        kind = "unknown" if fault else format_of(_read_head(lv.open(pv), 0))
        listed.append(Volume(volume.number, volume.offset, lv.size, "lvm2", lv.types, kind, f"{lv.vg}/{lv.name}",
                             fault, lv))
    return listed


def pick_volume(volumes: list[Volume], name: str | None) -> Volume:
    """The volume an operator named ("2" or "2/vg0/root"), or the only file system when they named none."""
    if name is not None:
        number, slash, lv = name.partition("/")
        name = str(int(number)) + slash + lv if number.isdigit() else name  # "02" names partition 2, as it did
        found = [volume for volume in volumes if volume.name == name]
        if found:
            return found[0]
        faults = [volume.fault for volume in volumes if volume.fault is not None and volume.name == name.split("/")[0]]
        if faults and "/" in name:
            raise faults[0]
        listed = ", ".join(volume.name for volume in volumes) or "none"
        raise NotFound(f"no partition {name} (partitions: {listed})")
    readable = [volume for volume in volumes if volume.format in FILE_SYSTEMS and volume.fault is None]
    if len(readable) == 1:
        return readable[0]
    described = "; ".join(f"{volume.name}: {volume.format}" for volume in volumes)
    raise UnreadableVolume(f"name a partition with --partition ({described})" if readable
                           else f"no file system this appliance reads on the disk ({described})")


def open_volume(disk: Source, volume: Volume) -> BinaryIO:
    """The volume's bytes as a file object, refused with the reason when it cannot be browsed."""
    if volume.fault is not None:
        raise type(volume.fault)(str(volume.fault))
    if volume.format in ENCRYPTED:
        raise UnreadableVolume(f"partition {volume.number} is encrypted ({ENCRYPTED[volume.format]}): its files "
                               "cannot be read without the key; restore the whole disk instead")
    if volume.format == "lvm2":
        raise UnreadableVolume(f"partition {volume.number} is an LVM2 physical volume: name one of its logical "
                               f"volumes as {volume.number}/VG/LV (files ls lists them)")
    if volume.format not in FILE_SYSTEMS:
        raise UnreadableVolume(f"partition {volume.name} holds no file system this appliance reads "
                               f"({volume.format}; it reads {', '.join(FILE_SYSTEMS)})")
    if volume.logical is not None:
        return volume.logical.open(volume_stream(disk, volume.offset, volume.logical.pv_size))
    return volume_stream(disk, volume.offset, volume.size)
