"""This store as either end of a replication.

The target side is where trust is enforced, because the sender may be damaged or
hostile: every record's checksum is checked, every chunk is decompressed and hashed and
must equal its ID, and a restore point commits only when every chunk it names is held.
A chunk may come as a delta against one this store holds (`appliance.replication.delta`):
it is decoded and hashed like any other and stored in this store's own compression.
Chunks commit batch by batch (so a rerun after a kill resends nothing already here);
the point commits last, in one transaction, so a partial run is never visible.
"""

from __future__ import annotations

import dataclasses
import threading

import zstandard

from appliance.errors import ChunkRefused, ChunksMissing, IntegrityError, InvalidRequest, NotFound
from appliance.names import POINT_REF, VM_NAME
from appliance.replication.delta import WORTH_IT, decode_delta, encode_delta
from appliance.replication.wire import StoreIdentity, split_frames
from appliance.store import formats
from appliance.store.formats import ZERO_CHUNK_ID
from appliance.store.catalog import RestorePoint, disk_name
from appliance.store.chunks import ChunkLoader
from appliance.store.commits import commit_point, remove_points
from appliance.store.manifests import Manifest, manifest_of
from appliance.store.repository import Store
from appliance.store.writer import PackSink


def identity_of(store: Store) -> StoreIdentity:
    return StoreIdentity(store.config.store_id, store.config.chunk_size, store.config.chunk_id)


def points_of(store: Store, vms: list[str] | None) -> list[RestorePoint]:
    """Restore points, oldest first, of `vms` (all when None; a VM never backed up has none)."""
    with store.env.begin() as txn:
        points = store.catalog.points(txn)
    if vms is None:
        return points
    for vm in vms:
        VM_NAME.check(vm)
    return [point for point in points if point.vm in vms]


class LocalSource:
    """Reads points and records from this store; records are verified before they leave."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._loader = ChunkLoader(store)

    def identity(self) -> StoreIdentity:
        return identity_of(self._store)

    def points(self, vms: list[str] | None) -> list[RestorePoint]:
        return points_of(self._store, vms)

    def manifest(self, point_id: str) -> Manifest:
        with self._store.env.begin() as txn:
            return manifest_of(txn, self._store.catalog, point_id)

    def records(self, pairs: list[tuple[bytes, bytes]]) -> bytes:
        with self._store.env.begin() as txn:
            located = [(cid, base, self._store.index.lookup(txn, cid),
                        None if base == ZERO_CHUNK_ID else self._store.index.lookup(txn, base))
                       for cid, base in pairs]
        frames = []
        for cid, base, location, base_location in located:
            if location is None:
                raise NotFound(f"chunk {cid.hex()[:16]} is not in this store")
            header, record = self._loader.load_record(cid, location)
            delta = None if base_location is None else self._delta(cid, base, header, record)
            frames.append(ZERO_CHUNK_ID + record if delta is None else delta)
        return b"".join(frames)

    def _delta(self, cid: bytes, base: bytes, header: formats.RecordHeader, record: bytes) -> bytes | None:
        """The frame of `cid` as a delta against `base`, or None when the stored record is about as small."""
        where = f"chunk {cid.hex()[:16]}"
        delta = encode_delta(self._loader.load(base), self._loader.decode(header, record, where))
        if formats.RECORD_HEADER_SIZE + len(delta) > WORTH_IT * len(record):
            return None
        return base + formats.encode_record(cid, formats.COMPRESSION_ZSTD, delta, header.raw_length)


class LocalTarget:
    """Receives records and points into this store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._loader = ChunkLoader(store)
        #: Batches from parallel streams take turns at the store's writer lock instead of failing on it.
        self._commit_turn = threading.Lock()
        self._local = threading.local()

    def identity(self) -> StoreIdentity:
        return identity_of(self._store)

    def points(self, vms: list[str] | None) -> list[RestorePoint]:
        return points_of(self._store, vms)

    def missing(self, ids: list[bytes]) -> list[bytes]:
        with self._store.env.begin() as txn:
            return [cid for cid in ids if self._store.index.lookup(txn, cid) is None]

    def _verified(self, frames: bytes) -> list[tuple[bytes, bytes, int]]:
        """(chunk id, record to keep, raw length) of each frame; one bad frame refuses the whole stream."""
        verified = []
        try:
            for number, (base, view) in enumerate(split_frames(frames)):
                verified.append(self._verified_frame(base, view, f"received chunk {number}"))
        except IntegrityError as exc:
            raise ChunkRefused(f"{exc}: the batch is refused, nothing of it is kept") from None
        return verified

    def _verified_frame(self, base: bytes, view: memoryview, where: str) -> tuple[bytes, bytes, int]:
        header = formats.check_record(view, where)
        if header.raw_length > self._store.config.chunk_size:
            raise IntegrityError(f"{where}: a chunk of {header.raw_length} bytes is larger than this store's "
                                 f"chunk size {self._store.config.chunk_size}")
        if base == ZERO_CHUNK_ID:
            data = self._loader.decode(header, bytes(view), where)
        else:
            if header.compression != formats.COMPRESSION_ZSTD:
                raise IntegrityError(f"{where}: a delta must be zstd-compressed")
            if self.missing([base]):
                raise ChunksMissing(f"{where}: its delta base {base.hex()[:16]} is not held here")
            data = decode_delta(self._loader.load(base), view[formats.RECORD_HEADER_SIZE :], header.raw_length, where)
        if formats.chunk_id(data) != header.chunk_id:
            raise IntegrityError(f"{where}: its bytes do not hash to its ID {header.chunk_id.hex()[:16]} "
                                 "(damaged in transit or by the sender)")
        record = bytes(view) if base == ZERO_CHUNK_ID else formats.record_of(header.chunk_id, data, self._compress)
        return header.chunk_id, record, header.raw_length

    def _compress(self, data: bytes) -> bytes:
        """This store's own compression (per thread: the API runs transfers in several)."""
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(
                level=self._store.config.compression_level, write_content_size=True)
        return bytes(compressor.compress(data))

    def store(self, frames: bytes) -> int:
        verified = self._verified(frames)
        with self._commit_turn, self._store.writer_lock():
            absent = set(self.missing([cid for cid, _, _ in verified]))
            new = [entry for entry in verified if entry[0] in absent]
            if not new:
                return 0
            sink = PackSink(self._store)
            try:
                for cid, record, raw_length in new:
                    if cid not in sink.locations:
                        sink.add(cid, record, raw_length)
                sink.seal()
                with self._store.env.begin(write=True) as txn:
                    for info in sink.sealed:
                        self._store.index.add_pack(txn, info)
                    for cid, location in sink.locations.items():
                        self._store.index.add(txn, cid, location)
            except BaseException:
                sink.discard()
                raise
            return len(sink.locations)

    def _check(self, manifest: Manifest) -> None:
        point = manifest.point
        POINT_REF.check(point.id)
        VM_NAME.check(point.vm)
        chunk_size = self._store.config.chunk_size
        for number, disk in enumerate(point.disks):
            if disk.name != disk_name(point.vm, number):
                raise InvalidRequest(f"point {point.id}: disk {number} is named {disk.name!r}, "
                                     f"not {disk_name(point.vm, number)!r}")
            if disk.chunks != -(-disk.size // chunk_size):
                raise InvalidRequest(f"point {point.id}: disk {disk.name!r} of {disk.size} bytes cannot have "
                                     f"{disk.chunks} chunks of {chunk_size} bytes")
        for name in point.files:
            if not name.startswith(point.vm + ".") or "/" in name:
                raise InvalidRequest(f"point {point.id}: file {name!r} is not a config file of VM {point.vm!r}")

    def commit(self, manifest: Manifest) -> bool:
        self._check(manifest)
        point = manifest.point
        needed = manifest.chunk_ids()
        with self._commit_turn, self._store.writer_lock():
            with self._store.env.begin() as txn:
                if self._store.catalog.has_point(txn, point.id):
                    return False
                absent = sum(1 for cid in needed if self._store.index.lookup(txn, cid) is None)
                if absent:
                    raise ChunksMissing(f"restore point {point.id} of VM {point.vm!r} names {absent} chunks this "
                                        "store does not hold: send them, then commit again")
                parent = point.parent
                if parent is not None and not self._store.catalog.has_point(txn, parent):
                    parent = None
            commit_point(self._store, dataclasses.replace(manifest, point=dataclasses.replace(point, parent=parent)))
        return True

    def remove(self, point_ids: list[str]) -> list[str]:
        with self._commit_turn, self._store.writer_lock():
            with self._store.env.begin() as txn:
                points = [self._store.catalog.get_point(txn, point_id) for point_id in point_ids
                          if self._store.catalog.has_point(txn, point_id)]
            return [point.id for point in remove_points(self._store, points)]
