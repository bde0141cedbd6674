"""Retention (prune) and garbage collection.

GC never breaks a surviving point because it only ever removes what no chunk map
references, and it orders its steps so that a crash at any moment is harmless:

1. Under the writer lock (no ingest can add references meanwhile), mark every chunk
   that any chunk map references.
2. Copy the live records of sparse packs (live bytes below a threshold) into new
   packs, verifying each record's checksum on the way; seal the new packs.
3. One LMDB transaction: point moved chunks at their new packs, drop dead chunks,
   drop emptied and repacked packs from the pack table.
4. Under the GC lock (no reader may hold a pack open), delete pack files that the
   table no longer lists, and temporaries of crashed ingests.

A crash before 3 leaves new packs that no table lists; a crash after 3 leaves old
packs that no table lists; step 4 of the next GC removes both.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from appliance.errors import StoreBusy
from appliance.names import VM_NAME
from appliance.protection.retention import Retention, dropped
from appliance.store.catalog import RestorePoint, referenced_chunks
from appliance.store.chunks import ChunkLoader
from appliance.store.commits import remove_points
from appliance.store.index import ChunkLocation
from appliance.store.repository import Store
from appliance.store.writer import PackSink

REPACK_BELOW_LIVE_FRACTION = 0.5


@dataclass(frozen=True, slots=True)
class GcReport:
    removed_chunks: int
    repacked_packs: int
    deleted_packs: int
    reclaimed_bytes: int
    deferred_packs: int  # unlisted packs left for a later GC because readers were active


def prune(store: Store, vm: str, rule: Retention) -> tuple[list[RestorePoint], GcReport]:
    """Delete the points of `vm` that `rule` does not keep (`remove_points`), then collect garbage.

    Points with holders (sessions running from them, replication) are kept whatever the
    rule says; the rule counts them like any other point, so holding one keeps no more.
    """
    VM_NAME.check(vm)
    with store.writer_lock():
        with store.env.begin() as txn:
            points = store.catalog.vm_points(txn, vm)
            doomed = [p for p in dropped(points, rule) if not store.catalog.holders(txn, p.id)]
        return remove_points(store, doomed), _collect(store)


def collect_garbage(store: Store) -> GcReport:
    with store.writer_lock():
        return _collect(store)


def _collect(store: Store) -> GcReport:
    with store.env.begin() as txn:
        live: set[bytes] = set()
        for _, _, chunk_map in store.catalog.chunk_maps(txn):
            live |= referenced_chunks(chunk_map)
        by_pack: dict[int, list[tuple[bytes, ChunkLocation]]] = defaultdict(list)
        dead: list[bytes] = []
        for cid, location in store.index.chunks(txn):
            if cid in live:
                by_pack[location.pack_id].append((cid, location))
            else:
                dead.append(cid)
        packs = store.index.packs(txn)

    emptied = [p for p in packs if p.pack_id not in by_pack]
    sparse = [
        p
        for p in packs
        if p.pack_id in by_pack
        and sum(loc.record_length for _, loc in by_pack[p.pack_id]) < REPACK_BELOW_LIVE_FRACTION * p.size
    ]
    sink = PackSink(store)
    loader = ChunkLoader(store)
    try:
        for info in sparse:
            for cid, location in by_pack[info.pack_id]:
                header, record = loader.load_record(cid, location)
                sink.add(cid, record, header.raw_length)
        sink.seal()
        with store.env.begin(write=True) as txn:
            for new_pack in sink.sealed:
                store.index.add_pack(txn, new_pack)
            for cid, location in sink.locations.items():
                store.index.add(txn, cid, location)
            for cid in dead:
                store.index.remove(txn, cid)
            for old_pack in emptied + sparse:
                store.index.remove_pack(txn, old_pack.pack_id)
    except BaseException:
        sink.discard()
        raise
    deleted, reclaimed, deferred = _delete_unlisted_packs(store)
    return GcReport(len(dead), len(sparse), deleted, reclaimed, deferred)


def _delete_unlisted_packs(store: Store) -> tuple[int, int, int]:
    """Delete pack files the table does not list, if no reader is active."""
    with store.env.begin() as txn:
        listed = {p.pack_id for p in store.index.packs(txn)}
    unlisted = [pack_id for pack_id in store.packs.list_packs() if pack_id not in listed]
    try:
        with store.gc_lock():
            reclaimed = 0
            for pack_id in unlisted:
                reclaimed += store.packs.pack_size(pack_id)
                store.packs.delete(pack_id)
            for temp in store.packs.list_unsealed():
                reclaimed += temp.stat().st_size
                temp.unlink()
            return len(unlisted), reclaimed, 0
    except StoreBusy:
        return 0, 0, len(unlisted)
