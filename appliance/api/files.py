"""File-level recovery as API resources: a point's volumes, folders, files, archives, and search.

A file downloads as a stream with `Content-Disposition` and single byte-range support
(`Range: bytes=...`, 206 with `Content-Range`), so a browser or curl can resume; a folder
streams as a tar or zip archive made while it is sent. Everything reads through the
serving appliance's own read path and chunk cache.
"""

from __future__ import annotations

import io
import queue
import re
import threading
from collections.abc import Callable, Iterator
from typing import IO, Annotated, Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, Header, Query
from fastapi.responses import Response, StreamingResponse

from appliance import errors
from appliance.api.access import PREFIX
from appliance.api.models import PointRef, VmName, VolumeRef
from appliance.api.responses import documented, error_response
from appliance.control import Control
from appliance.flr.browse import PointFiles, newest_points
from appliance.flr.extract import COPY_BYTES, write_archive
from appliance.flr.index import search
from appliance.flr.filesystems import FileNode, FileSystem

Disk = Annotated[int, Query(ge=0, description="disk number, 0 first")]
Partition = Annotated[VolumeRef | None, Query(description="partition number, or an LVM2 logical volume as "
                                                         "PARTITION/VG/LV (default: the disk's only file system)")]
VolumePath = Annotated[str, Query(description="a path inside the volume ('..' never climbs above its root)")]
ARCHIVE_TYPES = {"tar": "application/x-tar", "zip": "application/zip"}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def point_files(control: Control, vm: str, point: str) -> PointFiles:
    return PointFiles(control.datastore.read_path, control.resolve(vm, point))


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (start, end) a single-range `Range` header asks for; None for the whole file.

    Several ranges are answered with the whole file (RFC 9110 lets a server ignore Range);
    a range that starts past the end raises RangeNotSatisfiable.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), size if last == "" else min(size, int(last) + 1)
    if start >= size or start >= end:
        raise errors.RangeNotSatisfiable(f"range {header!r} is outside the file's {size} bytes")
    return start, end


def _read_range(filesystem: FileSystem, node: FileNode, start: int, end: int) -> Iterator[bytes]:
    with filesystem.open(node) as source:
        source.seek(start)
        left = end - start
        while left > 0:
            block = source.read(min(COPY_BYTES, left))
            if not block:
                raise errors.DamagedFileSystem(f"{node.path} ended {left} bytes early")
            left -= len(block)
            yield block


def attachment(name: str) -> str:
    """A Content-Disposition that keeps any file name (RFC 6266: an ASCII fallback and the UTF-8 name)."""
    fallback = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


class _Pipe(io.RawIOBase):
    """The writing end of a bounded queue: an archive made in one thread, sent from another."""

    def __init__(self, blocks: queue.Queue[bytes | BaseException | None], abandoned: threading.Event) -> None:
        super().__init__()
        self._blocks, self._abandoned = blocks, abandoned

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._abandoned.is_set():
            raise BrokenPipeError("the client went away")
        block = bytes(data)
        self._blocks.put(block)
        return len(block)


def streamed(write: Callable[[IO[bytes]], object]) -> Iterator[bytes]:
    """What `write` writes, as it writes it; a client that goes away stops the writer."""
    blocks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=16)
    abandoned = threading.Event()

    def produce() -> None:
        try:
            write(io.BufferedWriter(_Pipe(blocks, abandoned), COPY_BYTES))
            blocks.put(None)
        except BaseException as exc:  # handed to the sender, which raises it there
            blocks.put(exc)

    threading.Thread(target=produce, name="archive", daemon=True).start()
    try:
        while (block := blocks.get()) is not None:
            if isinstance(block, BaseException):
                raise block
            yield block
    finally:
        abandoned.set()
        while not blocks.empty():  # unblock a writer waiting on a full queue
            blocks.get_nowait()


def _archive_writer(filesystem: FileSystem, top: FileNode, kind: str) -> Callable[[IO[bytes]], object]:
    def write(target: IO[bytes]) -> None:
        with target:
            write_archive(filesystem, top, target, kind)

    return write


def file_routes(app: FastAPI, control: Control) -> None:
    """Add the file-level recovery resources to the API."""
    point_path = f"{PREFIX}/vms/{{vm}}/points/{{point}}"
    unreadable = (errors.NotFound, errors.UnreadableVolume)

    @app.get(f"{point_path}/volumes", responses=documented(errors.NotFound))
    def volumes(vm: VmName, point: PointRef) -> dict[str, list[dict[str, object]]]:
        """Each disk's partitions (or the whole disk) and the file system found on each, an LVM2 PV's LVs after it."""
        files = point_files(control, vm, point)
        return {str(disk): [volume.to_json() for volume in files.volumes(disk)] for disk in range(len(files.point.disks))}

    @app.get(f"{point_path}/files", responses=documented(*unreadable))
    def listing(vm: VmName, point: PointRef, path: VolumePath = "/", disk: Disk = 0,
                partition: Partition = None) -> list[dict[str, object]]:
        """A folder's entries, or the one entry a file's path names."""
        filesystem, node = point_files(control, vm, point).locate(disk, partition, path)
        return [entry.to_json() for entry in (filesystem.children(node) if node.kind == "dir" else [node])]

    @app.get(f"{point_path}/files/content", response_class=StreamingResponse,
             responses={**documented(*unreadable, errors.IsADirectory, errors.RangeNotSatisfiable),
                        200: {"content": {"application/octet-stream": {}}, "description": "the whole file"},
                        206: {"content": {"application/octet-stream": {}}, "description": "the range asked for"}})
    def content(vm: VmName, point: PointRef, path: VolumePath, disk: Disk = 0, partition: Partition = None,
                range: Annotated[str | None, Header(description="bytes=START-END (one range)")] = None) -> Response:
        """A file's bytes, streamed; one byte range on request."""
        filesystem, node = point_files(control, vm, point).locate(disk, partition, path)
        if node.kind != "file":
            raise errors.IsADirectory(f"{node.path} is a {node.kind}, not a file: list it, or fetch it as an archive")
        headers = {"Content-Disposition": attachment(node.name), "Accept-Ranges": "bytes"}
        try:
            wanted = byte_range(range, node.size)
        except errors.RangeNotSatisfiable as exc:
            return error_response(exc, headers={**headers, "Content-Range": f"bytes */{node.size}"})
        start, end = wanted if wanted is not None else (0, node.size)
        headers["Content-Length"] = str(end - start)
        if wanted is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{node.size}"
        return StreamingResponse(_read_range(filesystem, node, start, end), status_code=206 if wanted else 200,
                                 headers=headers, media_type="application/octet-stream")

    @app.get(f"{point_path}/files/archive", response_class=StreamingResponse,
             responses={**documented(*unreadable),
                        200: {"content": {media: {} for media in ARCHIVE_TYPES.values()}, "description": "the archive"}})
    def archive(vm: VmName, point: PointRef, path: VolumePath = "/", disk: Disk = 0, partition: Partition = None,
                format: Literal["tar", "zip"] = "tar") -> Response:
        """A folder (or one file) and everything below it, as a tar or zip made while it is sent."""
        filesystem, top = point_files(control, vm, point).locate(disk, partition, path)
        name = f"{top.name if top.path != '/' else 'root'}.{format}"
        return StreamingResponse(streamed(_archive_writer(filesystem, top, format)), media_type=ARCHIVE_TYPES[format],
                                 headers={"Content-Disposition": attachment(name)})

    @app.get(f"{PREFIX}/vms/{{vm}}/files", responses=documented(errors.NotFound))
    def find(vm: VmName, name: Annotated[str, Query(min_length=1, description="a glob of file names, e.g. *.conf")],
             points: Annotated[str, Query(pattern="^(all|latest|[1-9][0-9]{0,5})$")] = "all") -> list[dict[str, object]]:
        """Files whose name matches, in every readable volume of the VM's points (newest last)."""
        chosen = newest_points(control.points(vm), points)
        return [hit.to_json() for hit in search(control.store, control.datastore.read_path, chosen, name)]
