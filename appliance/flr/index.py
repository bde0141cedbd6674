"""Per-point file indexes: every file's path, kind, size and mtime, so a search needs no parsing.

Searching 30 restore points by walking their file systems parses every directory of
every volume 30 times. An index, built once per point after its backup (`build_index`,
run in the background by a serving appliance), answers the same search from LMDB. It is
stored in the catalog's `file-index` table, one zstd-compressed record per volume, and
goes when the point goes. A record holds the names apart from the rest (the names
NUL-separated, then one JSON line per file), so a search matches names without decoding
the details of the files it does not return. `search` uses a point's index when it has one and walks
the point's file systems when it has not, so the answer is the same either way.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
import time
from collections.abc import Callable, Iterator

import zstandard

from appliance.errors import UnreadableVolume
from appliance.events import event
from appliance.flr.browse import Found, PointFiles, walk
from appliance.flr.filesystems import FileNode
from appliance.flr.volumes import partition_ref
from appliance.store.catalog import RestorePoint
from appliance.store.reader import ReadPath
from appliance.store.repository import Store

COMPRESSION_LEVEL = 3


_NAMES_LENGTH = struct.Struct(">I")


def _encode(nodes: list[FileNode]) -> bytes:
    names = "\0".join(node.name for node in nodes).encode("utf-8", "surrogateescape")
    rows = "\n".join(json.dumps([node.path, node.kind, node.size, node.mtime_ns, node.mode, node.target, node.inode],
                                separators=(",", ":")) for node in nodes).encode()
    return zstandard.ZstdCompressor(level=COMPRESSION_LEVEL).compress(_NAMES_LENGTH.pack(len(names)) + names + rows)


def _matches(blob: bytes, matches: Callable[[str], object]) -> Iterator[FileNode]:
    data = zstandard.ZstdDecompressor().decompress(blob)
    length = _NAMES_LENGTH.unpack_from(data)[0]
    start = _NAMES_LENGTH.size
    names = data[start : start + length].decode("utf-8", "surrogateescape").split("\0") if length else []
    hits = [position for position, name in enumerate(names) if matches(name)]
    if hits:
        rows = data[start + length :].split(b"\n")
        for position in hits:
            yield FileNode(*json.loads(rows[position]))


def build_index(store: Store, read_path: ReadPath, point: RestorePoint) -> int:
    """Walk every readable volume of `point` and store its index; returns the files indexed.

    Unreadable volumes (encrypted, LVM PVs and refused LVs, unknown) are left out, as a search would skip them.
    Nothing is stored if the point was removed meanwhile.
    """
    started = time.monotonic()
    files = PointFiles(read_path, point)
    volumes: dict[tuple[int, int, str], bytes] = {}
    count = 0
    for disk in range(len(point.disks)):
        for volume in files.volumes(disk):
            try:
                _, filesystem = files.filesystem(disk, volume.name)
            except UnreadableVolume:
                continue
            nodes = list(walk(filesystem, filesystem.node("/")))
            volumes[(disk, volume.number, volume.lv)] = _encode(nodes)
            count += len(nodes)
    with store.env.begin(write=True) as txn:
        kept = store.catalog.put_file_index(txn, point.id, volumes)
    if kept:
        event("files.indexed", vm=point.vm, point=point.id, files=count, volumes=len(volumes),
              chunks_read=files.chunks_read, seconds=round(time.monotonic() - started, 3))
    return count


def unindexed(store: Store) -> list[RestorePoint]:
    """Points without an index, newest first (the ones a search is likeliest to ask about)."""
    with store.env.begin() as txn:
        points = store.catalog.points(txn)
        return [point for point in reversed(points) if not store.catalog.has_file_index(txn, point.id)]


def search(store: Store, read_path: ReadPath, points: list[RestorePoint], pattern: str) -> Iterator[Found]:
    """Files whose name matches the glob `pattern` in `points`: from each point's index, or by walking it."""
    matcher = re.compile(fnmatch.translate(pattern)).match
    for point in points:
        with store.env.begin() as txn:
            index = store.catalog.file_index(txn, point.id)
        if index is None:
            yield from PointFiles(read_path, point).find(pattern)
            continue
        for (disk, partition, lv), blob in sorted(index.items()):
            for node in _matches(blob, matcher):
                yield Found(point.id, disk, partition_ref(partition, lv), node)
