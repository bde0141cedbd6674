"""One view of ext2/3/4, XFS, NTFS, FAT and exFAT: nodes with a name, kind, size, mode and mtime.

Each file system's parser has its own names for the same things; an adapter per file
system turns them into `FileNode`s, so listing, extraction and archives are written once.
Paths are absolute inside the volume, '/'-separated; '.' and '..' entries and NTFS's
own metadata files ($MFT, ...) are not listed.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, BinaryIO, Protocol

from appliance.errors import NotFound
from appliance.flr.exfat import Entry, ExfatVolume
from appliance.flr.parsers import dissect, parse


#: Mode bits of a node whose file system keeps none.
DEFAULT_FILE_MODE, DEFAULT_DIR_MODE = 0o644, 0o755


@dataclass(frozen=True)
class FileNode:
    """A file, directory or symbolic link of a volume; `mode` and `inode` where the file system has them."""

    path: str
    kind: str  # "file" | "dir" | "symlink" | "other"
    size: int
    mtime_ns: int | None
    mode: int | None
    target: str | None
    inode: int | None

    @property
    def permissions(self) -> int:
        """The node's mode bits, or what a file system without modes (FAT, NTFS) is shown with."""
        if self.mode is not None:
            return self.mode
        return DEFAULT_DIR_MODE if self.kind == "dir" else DEFAULT_FILE_MODE

    @property
    def name(self) -> str:
        return posixpath.basename(self.path) or "/"

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "name": self.name, "kind": self.kind, "size": self.size, "mtime_ns": self.mtime_ns,
                "mode": None if self.mode is None else oct(self.mode), "target": self.target, "inode": self.inode}


class FileSystem(Protocol):
    """What every adapter offers."""

    kind: str

    def node(self, path: str) -> FileNode: ...

    def children(self, directory: FileNode) -> list[FileNode]: ...

    def open(self, node: FileNode) -> BinaryIO: ...


def _kind_of_mode(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _join(directory: str, name: str) -> str:
    return posixpath.join(directory, name)


def _ns(moment: datetime) -> int:
    """A parser's naive datetime is UTC (FAT keeps local time, which the disk does not name)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


class _InodeFileSystem:
    """ext and XFS: inodes with a POSIX mode, listed by name; the parsers share their shape."""

    def __init__(self, kind: str, parsed: Any) -> None:
        self.kind = kind
        self._fs = parsed

    def _node(self, path: str, inode: Any) -> FileNode:
        mode = int(inode.inode.i_mode if self.kind == "ext" else inode.inode.di_mode)
        kind = _kind_of_mode(mode)
        target = parse(f"{self.kind} {path}", lambda: inode.link) if kind == "symlink" else None
        return FileNode(path, kind, int(inode.size), int(inode.mtime_ns), stat.S_IMODE(mode), target, int(inode.inum))

    def node(self, path: str) -> FileNode:
        return self._node(path, self._lookup(path))

    def _lookup(self, path: str) -> Any:
        try:
            return self._fs.get(path)
        except Exception as exc:  # the parsers raise FileNotFoundError or their own kind
            raise NotFound(f"no {path!r} in this {self.kind} file system ({type(exc).__name__})") from None

    def _of(self, node: FileNode) -> Any:
        """The parser's inode of a node already found: by number, without walking its path again."""
        return self._fs.get(node.inode) if node.inode is not None else self._lookup(node.path)

    def children(self, directory: FileNode) -> list[FileNode]:
        entries = parse(f"{self.kind} {directory.path}", lambda: self._of(directory).listdir())
        return [parse(f"{self.kind} {_join(directory.path, name)}", self._node, _join(directory.path, name), inode)
                for name, inode in sorted(entries.items()) if name not in (".", "..")]

    def open(self, node: FileNode) -> BinaryIO:
        stream: BinaryIO = parse(f"{self.kind} {node.path}", lambda: self._of(node).open())
        return stream


class _NtfsFileSystem:
    kind = "ntfs"

    def __init__(self, parsed: Any) -> None:
        self._fs = parsed

    def _lookup(self, path: str) -> Any:
        try:
            return self._fs.mft.get(path)
        except Exception as exc:
            raise NotFound(f"no {path!r} in this ntfs file system ({type(exc).__name__})") from None

    def _node(self, path: str, record: Any) -> FileNode:
        information = record.attributes[0x10][0].attribute
        mtime = int(information.last_modification_time_ns)
        if record.is_symlink():
            return FileNode(path, "symlink", 0, mtime, None, str(record.reparse_point_substitute_name), int(record.segment))
        if record.is_dir():
            return FileNode(path, "dir", 0, mtime, None, None, int(record.segment))
        return FileNode(path, "file", int(record.size()), mtime, None, None, int(record.segment))

    def node(self, path: str) -> FileNode:
        return parse(f"ntfs {path}", self._node, path, self._lookup(path))

    def _of(self, node: FileNode) -> Any:
        """The MFT record of a node already found: by segment number, without walking its path again."""
        return self._fs.mft.get(node.inode) if node.inode is not None else self._lookup(node.path)

    def children(self, directory: FileNode) -> list[FileNode]:
        entries = parse(f"ntfs {directory.path}", lambda: self._of(directory).listdir())
        found = []
        for name, entry in sorted(entries.items()):
            if name in (".", "..") or (directory.path == "/" and name.startswith("$")):
                continue
            path = _join(directory.path, name)
            found.append(parse(f"ntfs {path}", lambda e=entry, p=path: self._node(p, e.dereference())))
        return found

    def open(self, node: FileNode) -> BinaryIO:
        stream: BinaryIO = parse(f"ntfs {node.path}", lambda: self._of(node).open())
        return stream


class _FatFileSystem:
    """FAT names are found case-insensitively, as FAT finds them, and shown as Windows shows them:
    a short name without a long one is lowercased where the entry's NT flags say so."""

    kind = "fat"

    def __init__(self, parsed: Any) -> None:
        self._fs = parsed

    @staticmethod
    def _name(entry: Any) -> str:
        if entry.ldirents:
            return str(entry.name)
        base, _, extension = str(entry.short_name).partition(".")
        flags = int(entry.dirent.DIR_NTRes)
        base = base.lower() if flags & 0x08 else base
        extension = extension.lower() if flags & 0x10 else extension
        return f"{base}.{extension}" if extension else base

    def _entries(self, directory: Any) -> list[Any]:
        return [entry for entry in directory.iterdir() if entry.name not in (".", "..")]

    def _lookup(self, path: str) -> Any:
        entry = self._fs.root
        for part in [part for part in path.split("/") if part]:
            wanted = part.casefold()
            found = [child for child in parse(f"fat {path}", self._entries, entry) if self._name(child).casefold() == wanted]
            if not found:
                raise NotFound(f"no {path!r} in this fat file system")
            entry = found[0]
        return entry

    def _node(self, path: str, entry: Any) -> FileNode:
        directory = bool(entry.is_directory())
        return FileNode(path, "dir" if directory else "file", 0 if directory else int(entry.size), _ns(entry.mtime),
                        None, None, None)

    def node(self, path: str) -> FileNode:
        if path == "/":
            return FileNode("/", "dir", 0, None, None, None, None)
        return parse(f"fat {path}", self._node, path, self._lookup(path))

    def children(self, directory: FileNode) -> list[FileNode]:
        entries = parse(f"fat {directory.path}", self._entries, self._lookup(directory.path))
        return sorted((parse(f"fat {directory.path}", self._node, _join(directory.path, self._name(entry)), entry)
                       for entry in entries), key=lambda node: node.path)

    def open(self, node: FileNode) -> BinaryIO:
        stream: BinaryIO = parse(f"fat {node.path}", self._lookup(node.path).open)
        return stream


class _ExfatFileSystem:
    """exFAT keeps no modes: a read-only attribute takes the write bits off the defaults. Names are found
    through the volume's up-case table, as exFAT finds them."""

    kind = "exfat"

    def __init__(self, volume: BinaryIO) -> None:
        self._volume = ExfatVolume(volume)

    def _lookup(self, path: str) -> Entry:
        entry = self._volume.root
        for part in [part for part in path.split("/") if part]:
            found = parse(f"exfat {path}", self._volume.child, entry, part) if entry.directory else None
            if found is None:
                raise NotFound(f"no {path!r} in this exfat file system")
            entry = found
        return entry

    @staticmethod
    def _node(path: str, entry: Entry) -> FileNode:
        kind = "dir" if entry.directory else "file"
        mode = None
        if entry.read_only:
            mode = (DEFAULT_DIR_MODE if entry.directory else DEFAULT_FILE_MODE) & ~0o222
        return FileNode(path, kind, 0 if entry.directory else entry.length, entry.mtime_ns, mode, None, None)

    def node(self, path: str) -> FileNode:
        return self._node(path, self._lookup(path))

    def children(self, directory: FileNode) -> list[FileNode]:
        entries = parse(f"exfat {directory.path}", self._volume.children, self._lookup(directory.path))
        return sorted((self._node(_join(directory.path, entry.name), entry) for entry in entries),
                      key=lambda node: node.path)

    def open(self, node: FileNode) -> BinaryIO:
        stream: BinaryIO = parse(f"exfat {node.path}", self._volume.open, self._lookup(node.path))
        return stream


def _opener(kind: str) -> Callable[[BinaryIO], FileSystem]:
    if kind == "ext":
        return lambda fh: _InodeFileSystem("ext", dissect("extfs").ExtFS(fh))
    if kind == "xfs":
        return lambda fh: _InodeFileSystem("xfs", dissect("xfs").XFS(fh))
    if kind == "ntfs":
        return lambda fh: _NtfsFileSystem(dissect("ntfs").NTFS(fh))
    if kind == "exfat":
        return _ExfatFileSystem
    return lambda fh: _FatFileSystem(dissect("fat.fat").FATFS(fh))


def open_filesystem(kind: str, volume: BinaryIO, where: str) -> FileSystem:
    """Parse the file system of `kind` on `volume`; a damaged one is a DamagedFileSystem naming `where`."""
    return parse(f"{where}: {kind} file system", _opener(kind), volume)


def normal_path(path: str) -> str:
    """An absolute path inside a volume, without '.', '..' or repeated '/' (never above the root)."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)
