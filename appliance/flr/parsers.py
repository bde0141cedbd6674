"""The one door to the dissect.* parsers: partition tables and volume views.

They are an optional extra (`pip install '.[flr]'`, AGPL-3.0-or-later), so they are
imported here, on first use, with an error that says how to install them rather than an
ImportError from deep inside a command.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, BinaryIO, Protocol

from appliance.errors import ApplianceError, DamagedFileSystem

#: MBR partition types that only contain other partitions.
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})


class Source(Protocol):
    """What a parser reads from: a seekable byte source (a disk of a restore point, or a slice of one)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


class ParsersMissing(ApplianceError):
    """File-level recovery needs the optional dissect.* parsers."""


def dissect(module: str) -> ModuleType:
    """`dissect.<module>`, or a one-line error naming the extra that provides it."""
    try:
        return importlib.import_module(f"dissect.{module}")
    except ImportError:
        raise ParsersMissing(f"file-level recovery needs the dissect.{module} parser: install the appliance with "
                             "its flr extra (pip install '.[flr]', AGPL-3.0-or-later; see the README)") from None


def partition_table(disk: Source) -> tuple[str, list[tuple[int, int, int, str]]] | None:
    """("gpt" | "mbr", [(number, offset, size, type name)]) of the disk, or None when it has no table."""
    disk_module = dissect("volume.disk")
    disk.seek(0)
    try:
        parsed: Any = disk_module.Disk(disk)
    except Exception:  # dissect raises DiskError, or a struct error on garbage: no table either way
        return None
    scheme = type(parsed.scheme).__name__.lower()
    if scheme not in ("gpt", "mbr"):
        return None
    found = []
    for partition in parsed.partitions:
        if scheme == "mbr" and partition.type in EXTENDED_TYPES:
            continue
        type_name = partition.type_str if isinstance(partition.type_str, str) else str(partition.type)
        size = int(partition.size)
        if scheme == "gpt":  # dissect counts last LBA - first LBA sectors; the last LBA is the partition's too
            size += int(parsed.scheme.sector_size)
        found.append((int(partition.number), int(partition.offset), size, type_name))
    return scheme, found


def volume_stream(disk: Source, offset: int, size: int) -> BinaryIO:
    """A file object of `size` bytes at `offset` of the disk."""
    stream: BinaryIO = dissect("util.stream").RangeStream(disk, offset, size)
    return stream


def parse(what: str, build: Any, *args: Any) -> Any:
    """`build(*args)`, a parser's failure on damaged structures turned into one clear error."""
    try:
        return build(*args)
    except ApplianceError:
        raise
    except Exception as exc:  # the parsers raise whatever their structures make them raise
        raise DamagedFileSystem(f"{what}: {type(exc).__name__}: {exc}") from None
