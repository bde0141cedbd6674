"""Files out of a volume: one file to a new local file, or a folder as a tar or zip stream.

Modes and modification times are kept where the file system has them; symbolic links
stay links; a hard-linked file is stored once in a tar and linked to after that.
"""

from __future__ import annotations

import os
import posixpath
import stat
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

from appliance.errors import IsADirectory, OutputRefused
from appliance.flr.browse import walk
from appliance.flr.filesystems import FileNode, FileSystem

COPY_BYTES = 1 << 20
ARCHIVE_FORMATS = ("tar", "zip")

Progress = Callable[[int], None]


def copy_stream(source: BinaryIO, target: IO[bytes], progress: Progress | None = None) -> int:
    copied = 0
    while block := source.read(COPY_BYTES):
        target.write(block)
        copied += len(block)
        if progress is not None:
            progress(len(block))
    return copied


def extract_file(filesystem: FileSystem, node: FileNode, output: Path, progress: Progress | None = None) -> int:
    """Write one file (or recreate one symbolic link) at `output`, which must not exist yet."""
    if node.kind == "dir":
        raise IsADirectory(f"{node.path} is a directory: use `files dump` to fetch a folder")
    if output.exists() or output.is_symlink():
        raise OutputRefused(f"{output} exists: files get only creates a new file")
    if node.kind == "symlink":
        os.symlink(node.target or "", output)
        return 0
    temporary = output.with_name(f".{output.name}.partial")
    try:
        with filesystem.open(node) as source, open(temporary, "xb") as target:
            copied = copy_stream(source, target, progress)
            target.flush()
            os.fsync(target.fileno())
        os.chmod(temporary, node.permissions)
        if node.mtime_ns is not None:
            os.utime(temporary, ns=(node.mtime_ns, node.mtime_ns))
        os.link(temporary, output)
    except OSError as exc:
        raise OutputRefused(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        temporary.unlink(missing_ok=True)
    return copied


def _member_name(top: FileNode, node: FileNode) -> str:
    """The node's path inside the archive: under the folder's own name, never absolute."""
    base = posixpath.basename(top.path) or "root"
    return posixpath.join(base, posixpath.relpath(node.path, top.path)) if node is not top else base


def write_archive(filesystem: FileSystem, top: FileNode, output: IO[bytes], archive: str,
                  progress: Progress | None = None) -> int:
    """Stream `top` (a folder or a file) and everything below it as a tar or zip; returns the members written."""
    nodes = [top, *walk(filesystem, top)] if top.kind == "dir" else [top]
    if archive == "tar":
        return _write_tar(filesystem, top, nodes, output, progress)
    return _write_zip(filesystem, top, nodes, output, progress)


def _write_tar(filesystem: FileSystem, top: FileNode, nodes: list[FileNode], output: IO[bytes],
               progress: Progress | None) -> int:
    first_of_inode: dict[int, str] = {}
    with tarfile.open(fileobj=output, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for node in nodes:
            info = tarfile.TarInfo(_member_name(top, node))
            info.mtime = (node.mtime_ns or 0) / 1e9
            info.mode = node.permissions
            if node.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif node.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, node.target or ""
                tar.addfile(info)
            elif node.kind == "file" and node.inode is not None and node.inode in first_of_inode:
                info.type, info.linkname = tarfile.LNKTYPE, first_of_inode[node.inode]
                tar.addfile(info)
            elif node.kind == "file":
                info.size = node.size
                with filesystem.open(node) as source:
                    tar.addfile(info, _Counted(source, progress))
                if node.inode is not None:
                    first_of_inode[node.inode] = info.name
    return len(nodes)


def _write_zip(filesystem: FileSystem, top: FileNode, nodes: list[FileNode], output: IO[bytes],
               progress: Progress | None) -> int:
    with zipfile.ZipFile(output, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for node in nodes:
            name = _member_name(top, node) + ("/" if node.kind == "dir" else "")
            moment = time.gmtime(max((node.mtime_ns or 0) // 1_000_000_000, 315532800))  # zip starts in 1980
            info = zipfile.ZipInfo(name, date_time=moment[:6])
            kind_bits = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(node.kind, stat.S_IFREG)
            info.external_attr = (kind_bits | node.permissions) << 16
            if node.kind == "symlink":
                archive.writestr(info, node.target or "")
            elif node.kind == "file":
                info.compress_type = zipfile.ZIP_DEFLATED
                with filesystem.open(node) as source, archive.open(info, "w", force_zip64=True) as target:
                    copy_stream(source, target, progress)
            elif node.kind == "dir":
                archive.writestr(info, b"")
    return len(nodes)


class _Counted:
    """A file object that reports what is read from it (tarfile reads members itself)."""

    def __init__(self, source: BinaryIO, progress: Progress | None) -> None:
        self._source, self._progress = source, progress

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        if self._progress is not None:
            self._progress(len(data))
        return data


def copy_to(output: Path | None, write: Callable[[BinaryIO], int]) -> int:
    """Run `write` into a new file at `output`, or into stdout when there is none."""
    if output is None:
        return write(sys.stdout.buffer)
    try:
        target = open(output, "xb")
    except OSError as exc:
        raise OutputRefused(f"cannot create {output}: {exc.strerror or exc}") from None
    try:
        with target:
            return write(target)
    except BaseException:  # a half-written archive is worse than none
        output.unlink(missing_ok=True)
        raise
