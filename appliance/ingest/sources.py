"""Disk images opened for ingest, whatever their container format.

Ingest only ever sees a `DiskSource`: a flat byte space plus a cheap "is this range
known to be zeros" probe that lets it skip reading holes. `open_source` decides
the container from the file's contents, never from its name, because operators
routinely hand over `.vmdk` files that are really descriptors, flat extents or raw.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
from typing import Protocol, Self

from appliance.errors import SourceError
from appliance.ingest.closing import ClosedOnExit, OwnsFd
from appliance.ingest.vmdk import SECTOR, SPARSE_MAGIC, Extent, SparseExtent, parse_descriptor

# Descriptor files are a few hundred bytes; a bigger file is never one.
DESCRIPTOR_LIMIT = 64 * 1024
_DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"

# Containers that would otherwise be ingested as a "raw" disk full of garbage.
_FOREIGN_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"QFI\xfb", "a qcow2 image"),
    (b"conectix", "a dynamic VHD image"),
    (b"vhdxfile", "a VHDX image"),
    (b"COWD", "an ESXi VMFSSPARSE (COWD) delta extent"),
    (b"\xbe\xba\xfe\xca\x00\x00\x00\x00", "an ESXi SESparse extent"),
)
_FLAT_KINDS = ("FLAT", "VMFS")


class DiskSource(Protocol):
    """A disk image opened for ingest: a flat byte space of `size` bytes."""

    path: str  # what the user gave (for messages)
    format: str  # "raw" | "vmdk-flat" | "vmdk-sparse" | "vmdk-stream"
    size: int  # virtual disk size in bytes

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes; unallocated areas read as zeros; ValueError past `size`."""
        ...

    def is_unallocated(self, offset: int, length: int) -> bool:
        """True only if the range is known to be zeros without reading it; False when unsure."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info: object) -> None: ...


class _Extent(Protocol):
    """A piece of a descriptor-described disk, addressed from its own start."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def is_unallocated(self, offset: int, length: int) -> bool: ...

    def close(self) -> None: ...


class RawSource(OwnsFd):
    """`size` bytes of an open file starting at byte `base`: a raw image or a flat extent."""

    def __init__(self, path: str, fd: int, base: int, size: int, format: str) -> None:
        """Take ownership of `fd`; the caller has checked that the file holds base+size bytes."""
        self.path = path
        self.format = format
        self.size = size
        self._fd = fd
        self._base = base

    def read(self, offset: int, length: int) -> bytes:
        """One pread straight into the returned bytes: this is ingest's hot path."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.path}: range of {length} bytes at offset {offset} is outside the {self.size}-byte disk"
            )
        data = self._pread(length, offset)
        if len(data) == length:
            return data
        parts = [data]
        done = len(data)
        while done < length:
            more = self._pread(length - done, offset + done)
            if not more:
                raise SourceError(
                    f"{self.path} is truncated: no data at offset {self._base + offset + done} "
                    "(file shrank while open?)"
                )
            parts.append(more)
            done += len(more)
        return b"".join(parts)

    def _pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, length, self._base + offset)
        except OSError as exc:
            if self._fd < 0:
                raise ValueError(f"{self.path}: read from a closed source") from exc
            raise SourceError(
                f"{self.path}: read error at offset {self._base + offset}: {exc.strerror}"
            ) from exc

    def is_unallocated(self, offset: int, length: int) -> bool:
        """Ask the file system for holes; file systems without SEEK_DATA report no holes."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.path}: range of {length} bytes at offset {offset} is outside the {self.size}-byte disk"
            )
        if length == 0:
            return True
        start = self._base + offset
        try:
            data_at = os.lseek(self._fd, start, os.SEEK_DATA)
        except OSError as exc:
            # ENXIO: no data at or after `start`, i.e. a hole running to end of file.
            return exc.errno == errno.ENXIO
        return data_at >= start + length


class _ZeroExtent:
    """A descriptor ZERO extent: no file behind it, every byte reads as zero."""

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def is_unallocated(self, offset: int, length: int) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release."""


class DescriptorSource(ClosedOnExit):
    """A disk described by a VMDK descriptor: its extents laid end to end."""

    def __init__(self, path: str, format: str, extents: list[_Extent]) -> None:
        """Take ownership of `extents`."""
        self.path = path
        self.format = format
        self._extents = extents
        self._starts: list[int] = []
        self.size = 0
        for extent in extents:
            self._starts.append(self.size)
            self.size += extent.size

    def _pieces(self, offset: int, length: int) -> list[tuple[_Extent, int, int]]:
        """Split a disk range into (extent, offset in extent, length) pieces."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.path}: range of {length} bytes at offset {offset} is outside the {self.size}-byte disk"
            )
        pieces: list[tuple[_Extent, int, int]] = []
        index = bisect.bisect_right(self._starts, offset) - 1
        within = offset - self._starts[index]
        while length > 0:
            extent = self._extents[index]
            count = min(extent.size - within, length)
            pieces.append((extent, within, count))
            length -= count
            index += 1
            within = 0
        return pieces

    def read(self, offset: int, length: int) -> bytes:
        parts = [extent.read(within, count) for extent, within, count in self._pieces(offset, length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def is_unallocated(self, offset: int, length: int) -> bool:
        return all(
            extent.is_unallocated(within, count) for extent, within, count in self._pieces(offset, length)
        )

    def close(self) -> None:
        for extent in self._extents:
            extent.close()


def open_source(path: str) -> DiskSource:
    """Open a disk image for ingest, choosing the reader from the file's first bytes."""
    fd, size = _open_file(path, path)
    try:
        try:
            head = os.pread(fd, DESCRIPTOR_LIMIT, 0)
        except OSError as exc:
            raise SourceError(f"{path}: cannot read: {exc.strerror}") from exc
        if head.startswith(SPARSE_MAGIC):
            return SparseExtent(path, fd)
        if not head.startswith(_DESCRIPTOR_MAGIC):
            _refuse_foreign(path, head)
            return RawSource(path, fd, 0, size, "raw")
        if size >= DESCRIPTOR_LIMIT:
            raise SourceError(
                f"{path} starts like a VMDK descriptor but is {size} bytes; descriptors are under {DESCRIPTOR_LIMIT}"
            )
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return _open_descriptor(path, head)


def _open_file(path: str, named_by: str) -> tuple[int, int]:
    """Open read-only and return (fd, size); block devices are accepted as raw disks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        where = path if named_by == path else f"{path} (named by {named_by})"
        raise SourceError(f"{where}: cannot open: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise SourceError(f"{path} is not a regular file or block device")
        return fd, os.lseek(fd, 0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        raise


def _refuse_foreign(path: str, head: bytes) -> None:
    for magic, what in _FOREIGN_MAGIC:
        if head.startswith(magic):
            raise SourceError(f"{path} is {what}, not a raw or VMDK disk; convert it to raw or VMDK first")


def _open_descriptor(path: str, data: bytes) -> DescriptorSource:
    """Open every extent a descriptor names; extent paths are relative to its directory."""
    text = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    directory = os.path.dirname(path)
    extents: list[_Extent] = []
    try:
        for extent in parse_descriptor(text, path):
            extents.append(_open_extent(path, directory, extent))
    except BaseException:
        for opened in extents:
            opened.close()
        raise
    sparse = [extent.format for extent in extents if isinstance(extent, SparseExtent)]
    return DescriptorSource(path, sparse[0] if sparse else "vmdk-flat", extents)


def _open_extent(descriptor: str, directory: str, extent: Extent) -> _Extent:
    where = f"{descriptor}: line {extent.line}"
    if extent.access == "NOACCESS":
        raise SourceError(f"{where}: NOACCESS extent cannot be read")
    size = extent.sectors * SECTOR
    if extent.kind == "ZERO":
        return _ZeroExtent(size)
    if extent.kind not in (*_FLAT_KINDS, "SPARSE"):
        raise SourceError(
            f"{where}: {extent.kind} extents are not supported; convert the disk to monolithicFlat or streamOptimized"
        )
    assert extent.filename is not None  # parse_descriptor guarantees it for non-ZERO extents
    file = os.path.join(directory, extent.filename)
    fd, file_size = _open_file(file, descriptor)
    opened: _Extent
    try:
        if extent.kind == "SPARSE":
            opened = SparseExtent(file, fd)
        else:
            base = extent.offset * SECTOR
            if file_size < base + size:
                raise SourceError(
                    f"{file} is truncated: descriptor declares {base + size} bytes, file has {file_size}"
                )
            opened = RawSource(file, fd, base, size, "vmdk-flat")
    except BaseException:
        os.close(fd)
        raise
    if opened.size != size:
        opened.close()
        raise SourceError(f"{file}: sparse extent holds {opened.size} bytes but {where} declares {size}")
    return opened
