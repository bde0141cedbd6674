"""The catalog: VMs, their restore points, each disk's chunk map, and VM config files.

A chunk map is the list of chunk IDs of a disk, one per chunk-size slot from offset 0;
an all-zero slot is `ZERO_CHUNK_ID`. Maps are stored whole (32 bytes per chunk: 32 KiB
per GiB of disk at 1 MiB chunks), so a point never depends on its parent's map and
pruning a parent never breaks a child.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import lmdb

from appliance.errors import AlreadyExists, NotFound
from appliance.names import POINT_REF, VM_NAME
from appliance.store.formats import CHUNK_ID_SIZE, ZERO_CHUNK_ID

_DISK_KEY = struct.Struct(">H")
_VOLUME_KEY = struct.Struct(">II")  # file-index key: point id "/" disk, partition [+ "VG/LV" of an LV]


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """One disk of a restore point."""

    name: str  # ESXi-style: "<vm>" for disk 0, "<vm>_N" after
    size: int  # bytes
    source_format: str  # raw | vmdk-flat | vmdk-sparse | vmdk-stream
    chunks: int


@dataclass(frozen=True, slots=True)
class RestorePoint:
    id: str
    vm: str
    created: float  # UNIX time, seconds
    parent: str | None
    disks: tuple[DiskInfo, ...]
    files: tuple[str, ...] = ()  # names of stored VM config files (.vmx, .nvram)
    stats: dict[str, float] = field(default_factory=dict)
    #: Where the point came from, kept so the next backup can build on it: for a vSphere backup its
    #: consistency ("application" or "crash"), each disk's CBT changeId and the snapshot it was read from.
    origin: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc["created_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "RestorePoint":
        return cls(
            id=str(doc["id"]),
            vm=str(doc["vm"]),
            created=float(doc["created"]),
            parent=doc.get("parent"),
            disks=tuple(DiskInfo(**d) for d in doc["disks"]),
            files=tuple(doc.get("files", ())),
            stats=dict(doc.get("stats", {})),
            origin=dict(doc.get("origin", {})),
        )


def new_point_id(now: float) -> str:
    """Time-ordered, human-readable, unique enough: 20261122T032050Z-3fa1."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + os.urandom(2).hex()


def disk_name(vm: str, index: int) -> str:
    return vm if index == 0 else f"{vm}_{index}"


class Catalog:
    """Typed access to the `vms`, `points`, `maps`, `files`, `holds` and `file-index` tables."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._vms = env.open_db(b"vms")
        self._points = env.open_db(b"points")
        self._maps = env.open_db(b"maps")
        self._files = env.open_db(b"files")
        self._holds = env.open_db(b"holds")
        self._file_index = env.open_db(b"file-index")

    def add_point(
        self,
        txn: lmdb.Transaction,
        point: RestorePoint,
        maps: list[bytes],
        files: dict[str, bytes],
    ) -> None:
        vm_key = point.vm.encode()
        if txn.get(vm_key, db=self._vms) is None:
            txn.put(vm_key, json.dumps({"created": point.created}).encode(), db=self._vms)
        key = point.id.encode()
        if not txn.put(key, json.dumps(point.to_json()).encode(), db=self._points, overwrite=False):
            raise AlreadyExists(f"restore point {point.id} already exists")  # its maps must not be replaced
        for index, chunk_map in enumerate(maps):
            txn.put(key + b"/" + _DISK_KEY.pack(index), chunk_map, db=self._maps)
        for name, data in files.items():
            txn.put(key + b"/" + name.encode(), data, db=self._files)

    def unused_point_id(self, txn: lmdb.Transaction, now: float) -> str:
        """An id for a point made at `now` that no point has: an id is its second and 16 random bits,
        and a busy appliance commits many points a second."""
        while True:
            point_id = new_point_id(now)
            if txn.get(point_id.encode(), db=self._points) is None:
                return point_id

    def delete_point(self, txn: lmdb.Transaction, point: RestorePoint) -> None:
        key = point.id.encode()
        txn.delete(key, db=self._points)
        for index in range(len(point.disks)):
            txn.delete(key + b"/" + _DISK_KEY.pack(index), db=self._maps)
        for name in point.files:
            txn.delete(key + b"/" + name.encode(), db=self._files)
        self.drop_file_index(txn, point.id)

    def drop_file_index(self, txn: lmdb.Transaction, point_id: str) -> None:
        """Forget a point's file index (it is built again by whoever wants one)."""
        for index_key in list(self._file_index_keys(txn, point_id)):
            txn.delete(index_key, db=self._file_index)

    def _file_index_keys(self, txn: lmdb.Transaction, point_id: str) -> Iterator[bytes]:
        prefix = point_id.encode() + b"/"
        with txn.cursor(db=self._file_index) as cursor:
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not bytes(key).startswith(prefix):
                        return
                    yield bytes(key)

    def put_file_index(self, txn: lmdb.Transaction, point_id: str,
                       volumes: dict[tuple[int, int, str], bytes]) -> bool:
        """Store a point's file index (opaque bytes per (disk, partition, LV or "")); False if the point is gone.

        A marker key says the point is indexed even when it has no readable volume.
        """
        if txn.get(point_id.encode(), db=self._points) is None:
            return False
        prefix = point_id.encode() + b"/"
        txn.put(prefix, b"", db=self._file_index)
        for (disk, partition, lv), blob in volumes.items():
            txn.put(prefix + _VOLUME_KEY.pack(disk, partition) + lv.encode(), blob, db=self._file_index)
        return True

    def has_file_index(self, txn: lmdb.Transaction, point_id: str) -> bool:
        return txn.get(point_id.encode() + b"/", db=self._file_index) is not None

    def file_index(self, txn: lmdb.Transaction, point_id: str) -> dict[tuple[int, int, str], bytes] | None:
        """A point's file index by (disk, partition, LV or ""), or None when it has none yet.

        A partition's key is as it always was, so indexes stored before LVs were browsed still read.
        """
        prefix = point_id.encode() + b"/"
        if not self.has_file_index(txn, point_id):
            return None
        found = {}
        with txn.cursor(db=self._file_index) as cursor:
            for key in self._file_index_keys(txn, point_id):
                if key != prefix and cursor.set_key(key):
                    disk, partition = _VOLUME_KEY.unpack_from(key, len(prefix))
                    found[(disk, partition, key[len(prefix) + _VOLUME_KEY.size :].decode())] = bytes(cursor.value())
        return found

    def add_hold(self, txn: lmdb.Transaction, point_id: str, holder: str) -> None:
        """Keep a point from being pruned while `holder` (e.g. a session) depends on it."""
        txn.put(point_id.encode() + b"\0" + holder.encode(), b"", db=self._holds)

    def release_hold(self, txn: lmdb.Transaction, point_id: str, holder: str) -> None:
        txn.delete(point_id.encode() + b"\0" + holder.encode(), db=self._holds)

    def holders(self, txn: lmdb.Transaction, point_id: str) -> list[str]:
        prefix = point_id.encode() + b"\0"
        with txn.cursor(db=self._holds) as cursor:
            if not cursor.set_range(prefix):
                return []
            found = []
            for key in cursor.iternext(keys=True, values=False):
                if not bytes(key).startswith(prefix):
                    break
                found.append(bytes(key)[len(prefix) :].decode())
            return found

    def vms(self, txn: lmdb.Transaction) -> list[str]:
        with txn.cursor(db=self._vms) as cursor:
            return [bytes(key).decode() for key in cursor.iternext(keys=True, values=False)]

    def points(self, txn: lmdb.Transaction, vm: str | None = None) -> list[RestorePoint]:
        """Restore points, oldest first (optionally of one VM)."""
        with txn.cursor(db=self._points) as cursor:
            found = [RestorePoint.from_json(json.loads(bytes(value))) for _, value in cursor]
        if vm is not None:
            found = [p for p in found if p.vm == vm]
        return sorted(found, key=lambda p: (p.created, p.id))

    def vm_points(self, txn: lmdb.Transaction, vm: str) -> list[RestorePoint]:
        """A known VM's points, oldest first; NotFound for a VM never backed up."""
        if txn.get(VM_NAME.check(vm).encode(), db=self._vms) is None:
            raise NotFound(f"unknown VM {vm!r}")
        return self.points(txn, vm)

    def point_ids(self, txn: lmdb.Transaction) -> list[str]:
        """Every point's id, in no useful order: a scan of keys, with no point read."""
        with txn.cursor(db=self._points) as cursor:
            return [bytes(key).decode() for key in cursor.iternext(keys=True, values=False)]

    def has_point(self, txn: lmdb.Transaction, point_id: str) -> bool:
        return txn.get(POINT_REF.check(point_id).encode(), db=self._points) is not None

    def get_point(self, txn: lmdb.Transaction, point_id: str) -> RestorePoint:
        raw = txn.get(POINT_REF.check(point_id).encode(), db=self._points)
        if raw is None:
            raise NotFound(f"unknown restore point {point_id!r}")
        return RestorePoint.from_json(json.loads(bytes(raw)))

    def resolve(self, txn: lmdb.Transaction, vm: str, ref: str) -> RestorePoint:
        """Find a VM's point by exact id, unique id prefix, or `latest`."""
        POINT_REF.check(ref)
        points = self.vm_points(txn, vm)
        if ref == "latest":
            if not points:
                raise NotFound(f"VM {vm!r} has no restore points")
            return points[-1]
        matches = [p for p in points if p.id == ref] or [p for p in points if p.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(f"VM {vm!r} has no restore point {ref!r}")
        raise NotFound(f"restore point prefix {ref!r} of VM {vm!r} is ambiguous ({len(matches)} matches)")

    def chunk_map(self, txn: lmdb.Transaction, point: RestorePoint, disk: int) -> bytes:
        if not 0 <= disk < len(point.disks):
            raise NotFound(f"restore point {point.id} of VM {point.vm!r} has no disk {disk}")
        raw = txn.get(point.id.encode() + b"/" + _DISK_KEY.pack(disk), db=self._maps)
        if raw is None:
            raise NotFound(f"restore point {point.id} has no chunk map for disk {disk}")
        return bytes(raw)

    def file(self, txn: lmdb.Transaction, point: RestorePoint, name: str) -> bytes:
        raw = txn.get(point.id.encode() + b"/" + name.encode(), db=self._files)
        if raw is None:
            raise NotFound(f"restore point {point.id} has no file {name!r}")
        return bytes(raw)

    def chunk_maps(self, txn: lmdb.Transaction) -> Iterator[tuple[str, int, bytes]]:
        """Every (point id, disk index, map) in the store."""
        with txn.cursor(db=self._maps) as cursor:
            for key, value in cursor:
                key = bytes(key)
                point_id, disk = key[: -_DISK_KEY.size - 1], key[-_DISK_KEY.size :]
                yield point_id.decode(), _DISK_KEY.unpack(disk)[0], bytes(value)


def map_entries(chunk_map: bytes) -> Iterator[bytes]:
    """The chunk IDs of a map, in disk order."""
    for start in range(0, len(chunk_map), CHUNK_ID_SIZE):
        yield chunk_map[start : start + CHUNK_ID_SIZE]


def referenced_chunks(chunk_map: bytes) -> set[bytes]:
    """The distinct stored chunk IDs a map refers to (zero slots excluded)."""
    found = set(map_entries(chunk_map))
    found.discard(ZERO_CHUNK_ID)
    return found
