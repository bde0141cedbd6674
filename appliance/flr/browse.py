"""A restore point's files: its disks, each disk's volumes, each volume's file system.

Everything is opened lazily and read through the store's read path: listing a volume
parses only its superblock and the directories walked, extracting a file reads only its
extents. `chunks_read` says how many distinct chunks that took.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from appliance.errors import NotFound, UnreadableVolume, UsageError
from appliance.flr.diskfile import DiskFile
from appliance.flr.filesystems import FileNode, FileSystem, normal_path, open_filesystem
from appliance.flr.volumes import Volume, find_volumes, open_volume, pick_volume
from appliance.store.catalog import RestorePoint
from appliance.store.reader import ReadPath


@dataclass(frozen=True)
class Found:
    """A match of `PointFiles.find`: where it is and what it is."""

    point: str
    disk: int
    partition: int | str  # as `Volume.ref` spells it
    node: FileNode

    def to_json(self) -> dict[str, object]:
        return {"point": self.point, "disk": self.disk, "partition": self.partition, **self.node.to_json()}


class PointFiles:
    """The files of one restore point."""

    def __init__(self, read_path: ReadPath, point: RestorePoint) -> None:
        self.point = point
        self._read_path = read_path
        self._disks: dict[int, DiskFile] = {}
        self._volumes: dict[int, list[Volume]] = {}
        self._filesystems: dict[tuple[int, str], FileSystem] = {}

    @property
    def chunks_read(self) -> int:
        return sum(len(disk.chunks_read) for disk in self._disks.values())

    def disk(self, number: int) -> DiskFile:
        if not 0 <= number < len(self.point.disks):
            raise NotFound(f"restore point {self.point.id} of VM {self.point.vm!r} has no disk {number} "
                           f"(it has {len(self.point.disks)})")
        if number not in self._disks:
            self._disks[number] = DiskFile(self._read_path.scan_disk(self.point, number), self._read_path.chunk_size)
        return self._disks[number]

    def volumes(self, disk: int) -> list[Volume]:
        if disk not in self._volumes:
            self._volumes[disk] = find_volumes(self.disk(disk), self.disk(disk).size)
        return self._volumes[disk]

    def filesystem(self, disk: int, partition: str | None) -> tuple[Volume, FileSystem]:
        """The file system of a volume ("2", or "2/vg0/root" for an LV); `partition` None picks the disk's only one."""
        volume = pick_volume(self.volumes(disk), partition)
        key = (disk, volume.name)
        if key not in self._filesystems:
            where = f"VM {self.point.vm!r} point {self.point.id} disk {disk} partition {volume.name}"
            self._filesystems[key] = open_filesystem(volume.format, open_volume(self.disk(disk), volume), where)
        return volume, self._filesystems[key]

    def locate(self, disk: int, partition: str | None, path: str) -> tuple[FileSystem, FileNode]:
        """The file system of a volume and the node at `path` in it (never above its root)."""
        _, filesystem = self.filesystem(disk, partition)
        return filesystem, filesystem.node(normal_path(path))

    def find(self, pattern: str, on_volume: Callable[[int, Volume], None] | None = None) -> Iterator[Found]:
        """Every node whose name matches the glob `pattern`, on every readable volume of every disk."""
        for disk in range(len(self.point.disks)):
            for volume in self.volumes(disk):
                try:
                    _, filesystem = self.filesystem(disk, volume.name)
                except UnreadableVolume:  # encrypted volumes, LVM PVs, refused LVs and foreign ones have no files
                    continue
                if on_volume is not None:
                    on_volume(disk, volume)
                for node in walk(filesystem, filesystem.node("/")):
                    if fnmatch.fnmatchcase(node.name, pattern):
                        yield Found(self.point.id, disk, volume.ref, node)


def newest_points(points: list[RestorePoint], which: str) -> list[RestorePoint]:
    """The points a search covers: "all", "latest", or the newest N (points are oldest first)."""
    if which == "all":
        return points
    if which == "latest":
        return points[-1:]
    if not which.isdigit() or int(which) < 1:
        raise UsageError(f"points must be all, latest or a number of newest points, not {which!r}")
    return points[-int(which):]


def walk(filesystem: FileSystem, top: FileNode) -> Iterator[FileNode]:
    """`top`'s descendants, depth first, parents before their children (symbolic links not followed)."""
    pending = [top]
    while pending:
        directory = pending.pop()
        children = filesystem.children(directory)
        yield from children
        pending.extend(reversed([child for child in children if child.kind == "dir"]))


