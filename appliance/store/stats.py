"""Space accounting: what the store holds, and what dedup and compression saved.

The bytes every point references (before dedup) are counted once per point, when it is
committed (`referenced_bytes`, kept in the point's stats), so the figures need no pass
over the chunk maps: 32 bytes per chunk of every disk of every point, 128 MiB of maps
for 1 TiB of logical points at 256 KiB chunks, which a serving appliance's metrics would
otherwise read every time they are refreshed. Points committed before they carried it
have their maps read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from appliance.store.catalog import DiskInfo, map_entries
from appliance.store.formats import CHUNK_ID_SIZE, ZERO_CHUNK_ID
from appliance.store.repository import Store

#: The key of a point's stats that holds `referenced_bytes` of its maps.
REFERENCED_BYTES = "referenced_bytes"


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    vms: int
    points: int
    logical_bytes: int  # sum of every point's disk sizes
    referenced_bytes: int  # non-zero chunk bytes referenced by every point (before dedup)
    unique_bytes: int  # uncompressed bytes of distinct stored chunks
    stored_bytes: int  # bytes of committed packs on disk
    chunks: int
    packs: int

    @property
    def dedup_ratio(self) -> float:
        return self.referenced_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def total_ratio(self) -> float:
        """Logical bytes per stored byte: zeros, dedup and compression together."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def to_json(self) -> dict[str, float]:
        doc: dict[str, float] = asdict(self)
        doc.update(
            dedup_ratio=round(self.dedup_ratio, 3),
            compression_ratio=round(self.compression_ratio, 3),
            total_ratio=round(self.total_ratio, 3),
        )
        return doc


def referenced_bytes(disks: Sequence[DiskInfo], maps: Sequence[bytes], chunk_size: int) -> int:
    """The bytes of the non-zero slots of a point's disks: each a whole chunk but a disk's last, which may be short.

    A chunk's id is the hash of its bytes, so a stored chunk is as long as every slot it fills.
    """
    total = 0
    for disk, chunk_map in zip(disks, maps):
        slots = len(chunk_map) // CHUNK_ID_SIZE
        stored = slots - list(map_entries(chunk_map)).count(ZERO_CHUNK_ID)
        total += stored * chunk_size
        if slots and chunk_map[-CHUNK_ID_SIZE:] != ZERO_CHUNK_ID:
            total -= slots * chunk_size - disk.size
    return total


def store_statistics(store: Store) -> StoreStatistics:
    chunk_size = store.config.chunk_size
    with store.env.begin() as txn:
        raw_lengths = [loc.raw_length for _, loc in store.index.chunks(txn)]
        points = store.catalog.points(txn)
        referenced = 0
        for point in points:
            known = point.stats.get(REFERENCED_BYTES)
            if known is None:
                maps = [store.catalog.chunk_map(txn, point, disk) for disk in range(len(point.disks))]
                known = referenced_bytes(point.disks, maps, chunk_size)
            referenced += int(known)
        packs = store.index.packs(txn)
        return StoreStatistics(
            vms=len(store.catalog.vms(txn)),
            points=len(points),
            logical_bytes=sum(d.size for p in points for d in p.disks),
            referenced_bytes=referenced,
            unique_bytes=sum(raw_lengths),
            stored_bytes=sum(p.size for p in packs),
            chunks=len(raw_lengths),
            packs=len(packs),
        )
