"""Space accounting: what the store holds, and what dedup and compression saved."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from appliance.store.catalog import map_entries
from appliance.store.formats import ZERO_CHUNK_ID
from appliance.store.repository import Store


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


def store_statistics(store: Store) -> StoreStatistics:
    with store.env.begin() as txn:
        raw_lengths = {cid: loc.raw_length for cid, loc in store.index.chunks(txn)}
        points = store.catalog.points(txn)
        referenced = 0
        for _, _, chunk_map in store.catalog.chunk_maps(txn):
            referenced += sum(raw_lengths.get(cid, 0) for cid in map_entries(chunk_map) if cid != ZERO_CHUNK_ID)
        packs = store.index.packs(txn)
        return StoreStatistics(
            vms=len(store.catalog.vms(txn)),
            points=len(points),
            logical_bytes=sum(d.size for p in points for d in p.disks),
            referenced_bytes=referenced,
            unique_bytes=sum(raw_lengths.values()),
            stored_bytes=sum(p.size for p in packs),
            chunks=len(raw_lengths),
            packs=len(packs),
        )
