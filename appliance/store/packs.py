"""Pack files behind a small storage-backend interface.

A pack is written once, front to back, under a temporary name; `seal` fsyncs it,
renames it into place and fsyncs the directory. Only sealed packs are ever referenced
by the index, so a crash mid-write leaves at most a temporary file that GC removes.
Sealed packs are immutable until GC deletes them whole.

Two backends implement the interface: a local directory (here) and an S3 bucket
(`appliance.store.s3`). Both write a pack to a local temporary file first; only how
`seal` publishes it differs (rename into place, or one conditional PUT).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Protocol

from appliance.durable import create_durably, fsync_directory, write_durably
from appliance.errors import IntegrityError, StoreError
from appliance.store import formats


class PackBackend(Protocol):
    """Where sealed packs live; every method may be called from several threads at once.

    Beside packs, a backend keeps the store's small objects (restore-point manifests, pack
    indexes, gateway records), named by paths relative to the store such as
    ``manifests/<point>.manifest``: they are what rebuilds an index from the packs alone.
    """

    def open_writer(self, pack_id: int) -> "PackWriter": ...
    def read_range(self, pack_id: int, offset: int, length: int) -> bytes: ...
    def pack_size(self, pack_id: int) -> int: ...
    def list_packs(self) -> Iterator[int]: ...
    def list_unsealed(self) -> Iterator[Path]: ...
    def delete(self, pack_id: int) -> None: ...
    def name_of(self, pack_id: int) -> str: ...
    def put_object(self, name: str, data: bytes, create_only: bool = False) -> bool:
        """Store `data` durably under `name`; with `create_only`, False (and nothing written) if it exists."""
        ...
    def get_object(self, name: str) -> bytes | None: ...
    def list_objects(self, under: str) -> list[str]:
        """The names of the objects below the folder `under` (e.g. ``manifests/``), sorted."""
        ...
    def delete_object(self, name: str) -> None: ...
    def close(self) -> None: ...


#: Makes a written temporary pack (open file, its path, its records) the sealed pack; raises if it cannot.
Publish = Callable[[BinaryIO, Path, list[tuple[int, formats.RecordHeader]]], None]


def pack_name(pack_id: int) -> str:
    """`XX/<id:016x>.pack`: fanned out by the id's last byte, which spreads consecutive ids."""
    name = f"{pack_id:016x}"
    return f"{name[-2:]}/{name}.pack"


class PackWriter:
    """Appends records to a new pack in a local temporary file; nothing is visible until `seal`."""

    def __init__(self, temp_path: Path, pack_id: int, publish: Publish) -> None:
        self.pack_id = pack_id
        self._temp_path = temp_path
        self._publish = publish
        self._file = open(temp_path, "xb", buffering=0)
        self._size = 0
        #: (offset, record header) of each record: the pack's index, written beside it where
        #: reading the records back one by one would be slow (`appliance.store.pack_index`).
        self.records: list[tuple[int, formats.RecordHeader]] = []
        self._write(formats.encode_pack_header(pack_id))

    @property
    def size(self) -> int:
        return self._size

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            assert written is not None
            view = view[written:]
        self._size += len(data)

    def append(self, record: bytes) -> int:
        """Append one encoded record; returns its offset in the pack."""
        offset = self._size
        self.records.append((offset, formats.decode_record_header(record, self._temp_path.name)))
        self._write(record)
        return offset

    def seal(self) -> int:
        """Make the pack durable under its final name; returns its size."""
        try:
            self._publish(self._file, self._temp_path, self.records)
        finally:
            self._file.close()
        return self._size

    def abandon(self) -> None:
        """Drop an unsealed pack (ingest failed before commit)."""
        self._file.close()
        self._temp_path.unlink(missing_ok=True)


def unsealed_path(temp_dir: Path, pack_id: int) -> Path:
    """Where a pack is written before `seal`: on local disk for every backend, so GC finds crashed ones."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    return temp_dir / f"{pack_id:016x}.pack.tmp"


def unsealed_in(temp_dir: Path) -> Iterator[Path]:
    """Packs left unsealed by a crashed or failed writer: what GC deletes."""
    if temp_dir.is_dir():
        yield from sorted(temp_dir.iterdir())


class LocalPackDirectory:
    """Packs as files under `root/XX/<id:016x>.pack`, temporaries under `root/tmp`.

    Bytes only: checking headers and records is the caller's job (ChunkLoader, verify).

    Read file descriptors are cached (bounded) and shared by threads: `os.pread`
    needs no seek, so one descriptor serves concurrent readers.
    """

    MAX_OPEN_FILES = 128

    def __init__(self, root: Path) -> None:
        self.root = root
        self._objects = root.parent
        self._temp_dir = root / "tmp"
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    def path_of(self, pack_id: int) -> Path:
        return self.root / pack_name(pack_id)

    def name_of(self, pack_id: int) -> str:
        return str(self.path_of(pack_id))

    def open_writer(self, pack_id: int) -> PackWriter:
        final_path = self.path_of(pack_id)

        def publish(file: BinaryIO, temp_path: Path, records: list[tuple[int, formats.RecordHeader]]) -> None:
            os.fsync(file.fileno())
            final_path.parent.mkdir(parents=True, exist_ok=True)
            os.rename(temp_path, final_path)
            fsync_directory(final_path.parent)

        return PackWriter(unsealed_path(self._temp_dir, pack_id), pack_id, publish)

    def _fd(self, pack_id: int) -> int:
        with self._lock:
            fd = self._fds.get(pack_id)
            if fd is not None:
                self._fds.move_to_end(pack_id)
                return fd
        path = self.path_of(pack_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise IntegrityError(f"pack {path} is missing") from None
        except OSError as exc:
            raise StoreError(f"cannot open pack {path}: {exc.strerror}") from None
        with self._lock:
            existing = self._fds.get(pack_id)
            if existing is not None:
                os.close(fd)
                return existing
            self._fds[pack_id] = fd
            while len(self._fds) > self.MAX_OPEN_FILES:
                _, old = self._fds.popitem(last=False)
                os.close(old)
        return fd

    def read_range(self, pack_id: int, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(pack_id), length, offset)
        if len(data) != length:
            raise IntegrityError(
                f"pack {self.path_of(pack_id)} is truncated: wanted {length} bytes at offset {offset}"
            )
        return data

    def pack_size(self, pack_id: int) -> int:
        try:
            return self.path_of(pack_id).stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"pack {self.path_of(pack_id)} is missing") from None

    def list_packs(self) -> Iterator[int]:
        for fan in sorted(self.root.iterdir()):
            if fan.is_dir() and fan.name != "tmp":
                for path in sorted(fan.glob("*.pack")):
                    yield int(path.stem, 16)

    def list_unsealed(self) -> Iterator[Path]:
        return unsealed_in(self._temp_dir)

    def _forget(self, pack_id: int) -> None:
        with self._lock:
            fd = self._fds.pop(pack_id, None)
        if fd is not None:
            os.close(fd)

    def delete(self, pack_id: int) -> None:
        self._forget(pack_id)
        path = self.path_of(pack_id)
        path.unlink(missing_ok=True)
        fsync_directory(path.parent)

    def _object_path(self, name: str) -> Path:
        if name.startswith(("/", "index/", "packs/tmp/")) or name.endswith(".pack") or ".." in name.split("/"):
            raise StoreError(f"{name!r} is not a name for a store object")
        return self._objects / name

    def put_object(self, name: str, data: bytes, create_only: bool = False) -> bool:
        path = self._object_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if create_only:
            return create_durably(path, data, 0o644) or path.read_bytes() == data
        write_durably(path, data)
        return True

    def get_object(self, name: str) -> bytes | None:
        try:
            return self._object_path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self._object_path(name)}: {exc.strerror}") from None

    def list_objects(self, under: str) -> list[str]:
        folder = self._object_path(under)
        if not folder.is_dir():
            return []
        return sorted(str(path.relative_to(self._objects)) for path in folder.rglob("*")
                      if path.is_file() and not path.name.endswith(".tmp"))

    def delete_object(self, name: str) -> None:
        path = self._object_path(name)
        path.unlink(missing_ok=True)
        fsync_directory(path.parent)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), OrderedDict()
        for fd in fds:
            os.close(fd)
