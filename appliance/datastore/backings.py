"""Where a file's bytes live: one small backing per role that has bytes.

=============  ==========================================================  ===========
role           backing                                                     writable
=============  ==========================================================  ===========
RP_FILE        `PointFile`: .vmx/.nvram and descriptors from the catalog   no (EROFS)
               mirror, flat extents through the read path (chunks)
DISK           `SessionDisk`: the session disk's copy-on-write overlay     yes
SCRATCH        `ScratchFile`: a plain file in the session's area           yes
=============  ==========================================================  ===========

Every backing answers the same questions (`Backing`): its extent (size, bytes used,
times), read, write, a write that is durable when it returns, sync and truncate. The datastore picks the backing by the node's
role and otherwise knows nothing of where bytes come from; overlay errors become the
VFS's here (`SessionDisk`), nowhere else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Protocol

from appliance.datastore.mirror import CatalogMirror
from appliance.datastore.namespace import Node
from appliance.datastore.vfs import Durability
from appliance.errors import ReadOnly, SessionDiskError, TryAgain
from appliance.store.reader import ReadPath
from overlay import Overlay, OverlayClosed, OverlayError


#: What a backing says of its bytes: size, bytes allocated on disk, atime, mtime, ctime (ns).
#: A plain tuple: built for every attributes call, twice per WRITE answered on the loop.
Extent = tuple[int, int, int, int, int]


class Backing(Protocol):
    """The bytes behind one role's file nodes (see the module's table)."""

    def extent(self, node: Node) -> Extent: ...
    def read(self, node: Node, offset: int, length: int) -> bytes: ...
    def write(self, node: Node, offset: int, data: bytes | memoryview) -> int: ...
    def write_durably(self, node: Node, offset: int, data: bytes | memoryview, durability: Durability) -> int: ...
    def sync(self, node: Node, durability: Durability) -> None: ...
    def truncate(self, node: Node, size: int) -> None: ...


class PointFile:
    """A restore point's file: never changes, so what it learns of flat extents is kept.

    `flat_extents` (inode -> (point id, disk index)) is what lets the datastore answer a
    flat extent's cached reads on the caller's thread.
    """

    def __init__(self, mirror: CatalogMirror, read_path: ReadPath) -> None:
        self.mirror = mirror
        self.read_path = read_path
        self.flat_extents: dict[int, tuple[str, int]] = {}

    def extent(self, node: Node) -> Extent:
        size = self.mirror.disk_size(node) if "disk" in node.ref else len(self.mirror.small_file(node))
        return size, size, node.atime_ns, node.mtime_ns, node.ctime_ns

    def read(self, node: Node, offset: int, length: int) -> bytes:
        if "disk" not in node.ref:
            return self.mirror.small_file(node)[offset : offset + length]
        point, disk = self.mirror.point(node.ref_text("point")), node.ref_number("disk")
        self.flat_extents[node.inode] = (point.id, disk)
        return self.read_path.read(point, disk, offset, length)

    def write(self, node: Node, offset: int, data: bytes | memoryview) -> int:
        raise ReadOnly(f"restore point files are read-only (inode {node.inode})")

    def write_durably(self, node: Node, offset: int, data: bytes | memoryview, durability: Durability) -> int:
        return self.write(node, offset, data)

    def sync(self, node: Node, durability: Durability) -> None:
        """Nothing to do: a restore point is durable from the moment its backup committed."""

    def truncate(self, node: Node, size: int) -> None:
        raise ReadOnly(f"restore point files are read-only (inode {node.inode})")


#: The open overlay of a session disk node; `changing` is True for a change (see `SessionFiles.overlay`).
OverlayOf = Callable[[Node, bool], Overlay]


class SessionDisk:
    """A session disk: its overlay over the restore point's disk; the disk's mtime is the overlay's."""

    def __init__(self, overlay_of: OverlayOf, let_go: Callable[[Node], TryAgain]) -> None:
        self._overlay_of = overlay_of
        self._let_go = let_go

    @contextlib.contextmanager
    def _errors(self, node: Node) -> Iterator[None]:
        """A call that met its overlay closing (a pause began after the call was let in) is
        refused with TryAgain, so the client resends it to the reopened overlay; any other
        overlay failure is a SessionDiskError (EIO / NFS3ERR_IO to clients)."""
        try:
            yield
        except OverlayClosed:
            raise self._let_go(node) from None
        except OverlayError as exc:
            raise SessionDiskError(str(exc)) from exc

    def extent(self, node: Node) -> Extent:
        try:  # `_errors`, written out: this runs twice for every WRITE answered on the loop
            overlay = self._overlay_of(node, False)
            size, used, mtime = overlay.size, overlay.allocated_bytes(), overlay.modified_ns
        except OverlayClosed:
            raise self._let_go(node) from None
        except OverlayError as exc:
            raise SessionDiskError(str(exc)) from exc
        mtime = max(mtime, node.mtime_ns)
        return size, used, node.atime_ns, mtime, max(node.ctime_ns, mtime)

    def read(self, node: Node, offset: int, length: int) -> bytes:
        with self._errors(node):
            return self._overlay_of(node, False).read(offset, length)

    def write(self, node: Node, offset: int, data: bytes | memoryview) -> int:
        with self._errors(node):
            return self._overlay_of(node, True).write(offset, data)

    def write_durably(self, node: Node, offset: int, data: bytes | memoryview, durability: Durability) -> int:
        """Through the overlay's journal, at either level: its record carries the bytes, and
        a replayed write sets the disk's mtime again, so FILE asks nothing more than DATA."""
        with self._errors(node):
            return self._overlay_of(node, True).write_durable(offset, data)

    def sync(self, node: Node, durability: Durability) -> None:
        with self._errors(node):
            self._overlay_of(node, False).flush(metadata=durability is Durability.FILE)

    def truncate(self, node: Node, size: int) -> None:
        with self._errors(node):
            self._overlay_of(node, True).truncate(size)

    def discard(self, node: Node, overlay: Overlay | None, open_overlay: Callable[[], Overlay]) -> None:
        """Delete a removed disk's overlay files (opening it first if nothing held it open)."""
        with self._errors(node):
            (overlay or open_overlay()).discard()


class ScratchFile:
    """A plain file in the session's area, whatever a hypervisor creates; its times are the file's."""

    def __init__(self, fd_of: Callable[[Node], int]) -> None:
        self._fd_of = fd_of

    def extent(self, node: Node) -> Extent:
        info = os.fstat(self._fd_of(node))
        return (info.st_size, info.st_blocks * 512, info.st_atime_ns, info.st_mtime_ns,
                max(node.ctime_ns, info.st_ctime_ns))

    def read(self, node: Node, offset: int, length: int) -> bytes:
        return os.pread(self._fd_of(node), length, offset)

    def write(self, node: Node, offset: int, data: bytes | memoryview) -> int:
        return os.pwrite(self._fd_of(node), data, offset)

    def write_durably(self, node: Node, offset: int, data: bytes | memoryview, durability: Durability) -> int:
        written = self.write(node, offset, data)
        self.sync(node, durability)
        return written

    def sync(self, node: Node, durability: Durability) -> None:
        (os.fsync if durability is Durability.FILE else os.fdatasync)(self._fd_of(node))

    def truncate(self, node: Node, size: int) -> None:
        os.ftruncate(self._fd_of(node), size)

    def set_times(self, node: Node, atime_ns: int | None, mtime_ns: int | None) -> None:
        """A plain file's times are its file's: SETATTR of them goes to the file itself."""
        fd = self._fd_of(node)
        info = os.fstat(fd)
        os.utime(fd, ns=(atime_ns if atime_ns is not None else info.st_atime_ns,
                         mtime_ns if mtime_ns is not None else info.st_mtime_ns))
