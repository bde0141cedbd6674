"""The volumes of a disk: its partitions (GPT or MBR), or the whole disk when it has no table.

Each volume's contents are recognised by their own signatures, not by the partition
type, which operators and installers set carelessly: a file system the parsers read, an
encrypted volume (named, so an operator knows why it cannot be browsed), or LVM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from appliance.errors import NotFound, UnreadableVolume
from appliance.flr.parsers import Source, partition_table, volume_stream

#: Formats a volume can hold, as `format_of` names them.
FILE_SYSTEMS = ("ext", "xfs", "ntfs", "fat", "exfat")
ENCRYPTED = {"luks": "LUKS (dm-crypt)", "bitlocker": "BitLocker"}


@dataclass(frozen=True)
class Volume:
    """A partition (number 1 and up) or the whole disk (number 0, scheme "none")."""

    number: int
    offset: int
    size: int
    scheme: str
    type_name: str
    format: str

    def to_json(self) -> dict[str, object]:
        return {"partition": self.number, "offset": self.offset, "size": self.size, "scheme": self.scheme,
                "type": self.type_name, "format": self.format}


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
        return [Volume(0, 0, size, "none", "", whole)]
    scheme, partitions = table
    return [Volume(number, offset, length, scheme, type_name, format_of(_read_head(disk, offset)))
            for number, offset, length, type_name in partitions]


def pick_volume(volumes: list[Volume], number: int | None) -> Volume:
    """The volume an operator named, or the only file system when they named none."""
    if number is not None:
        found = [volume for volume in volumes if volume.number == number]
        if not found:
            listed = ", ".join(str(volume.number) for volume in volumes) or "none"
            raise NotFound(f"no partition {number} (partitions: {listed})")
        return found[0]
    readable = [volume for volume in volumes if volume.format in FILE_SYSTEMS]
    if len(readable) == 1:
        return readable[0]
    described = "; ".join(f"{volume.number}: {volume.format}" for volume in volumes)
    raise UnreadableVolume(f"name a partition with --partition ({described})" if readable
                           else f"no file system this appliance reads on the disk ({described})")


def open_volume(disk: Source, volume: Volume) -> BinaryIO:
    """The volume's bytes as a file object, refused with the reason when it cannot be browsed."""
    if volume.format in ENCRYPTED:
        raise UnreadableVolume(f"partition {volume.number} is encrypted ({ENCRYPTED[volume.format]}): its files "
                               "cannot be read without the key; restore the whole disk instead")
    if volume.format == "lvm2":
        raise UnreadableVolume(f"partition {volume.number} is an LVM2 physical volume: logical volumes are not "
                               "browsed yet; restore the whole disk instead")
    if volume.format not in FILE_SYSTEMS:
        raise UnreadableVolume(f"partition {volume.number} holds no file system this appliance reads "
                               f"({volume.format}; it reads {', '.join(FILE_SYSTEMS)})")
    return volume_stream(disk, volume.offset, volume.size)
