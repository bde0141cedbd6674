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

A store in S3 may be shared by several gateways, whose readers no lock here reaches
(`appliance.store.gateways`). There a collection holds the bucket's lease, starts by
refreshing (so every gateway's points count as live), and step 4 becomes two phases:
the packs it no longer needs are condemned before it repacks, and deleted by a later
collection once the grace period has passed, after any chunk a newer point still needs
only from them is copied out.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace

import lmdb

from appliance.errors import StoreBusy
from appliance.names import VM_NAME
from appliance.protection.retention import Retention, dropped
from appliance.store.catalog import RestorePoint, referenced_chunks
from appliance.store.commits import remove_points
from appliance.store.formats import PACK_HEADER_SIZE, pack_created
from appliance.store.gateways import (
    Condemned,
    condemn,
    condemned,
    condemned_packs,
    forget_condemned,
    gateway_of,
    release_gc_lease,
    take_gc_lease,
)
from appliance.store.refresh import refresh
from appliance.store.index import ChunkLocation
from appliance.store.repository import Store
from appliance.store.writer import PackSink, copy_records

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
    grace = store.config.gc_grace_seconds
    if store.config.backend != "s3":
        return _collect_once(store, set(), grace)
    lease = take_gc_lease(store.packs, store.config.gateway)
    try:
        refresh(store)
        deleted, reclaimed = _delete_condemned(store, grace)
        report = _collect_once(store, condemned_packs(store.packs), grace)
        # With no grace period (a bucket no other gateway reads), this run's condemned packs go now.
        now_deleted, now_reclaimed = _delete_condemned(store, grace)
        return replace(report, deleted_packs=deleted + now_deleted,
                       reclaimed_bytes=reclaimed + now_reclaimed + _delete_unsealed(store),
                       deferred_packs=len(condemned_packs(store.packs)))
    finally:
        release_gc_lease(store.packs, lease)


def _collect_once(store: Store, already_condemned: set[int], grace: float) -> GcReport:
    """Steps 1-3, then deletion now (a store of its own) or condemnation (a shared one)."""
    with store.env.begin() as txn:
        live = _live_chunks(store, txn)
        by_pack: dict[int, list[tuple[bytes, ChunkLocation]]] = defaultdict(list)
        dead: list[bytes] = []
        for cid, location in store.index.chunks(txn):
            if cid in live:
                by_pack[location.pack_id].append((cid, location))
            else:
                dead.append(cid)
        packs = [info for info in store.index.packs(txn) if info.pack_id not in already_condemned]

    emptied = [p for p in packs if p.pack_id not in by_pack and not _maybe_being_written(store, p.pack_id, grace)]
    sparse = [
        p
        for p in packs
        if p.pack_id in by_pack
        and sum(loc.record_length for _, loc in by_pack[p.pack_id]) < REPACK_BELOW_LIVE_FRACTION * p.size
    ]
    if store.config.backend == "s3":
        # Before the copies exist: a gateway that sees a copy then always sees its source condemned.
        condemn(store.packs, store.config.gateway, {p.pack_id for p in emptied + sparse})
    _relocate(store, [item for info in sparse for item in by_pack[info.pack_id]], dead,
              [p.pack_id for p in emptied + sparse])
    if store.config.backend == "s3":
        return GcReport(len(dead), len(sparse), 0, 0, len(emptied) + len(sparse))
    deleted, reclaimed, deferred = _delete_unlisted_packs(store)
    return GcReport(len(dead), len(sparse), deleted, reclaimed, deferred)


def _relocate(store: Store, moved: list[tuple[bytes, ChunkLocation]], dead: list[bytes],
              dropped_packs: list[int]) -> None:
    """Copy `moved` chunks into new packs, then in one transaction point them there, forget `dead`
    chunks and unlist `dropped_packs` (whose files are deleted later, once no one can read them)."""
    sink = PackSink(store)
    try:
        copy_records(store, sink, moved)
        sink.seal()
        with store.env.begin(write=True) as txn:
            for new_pack in sink.sealed:
                store.index.add_pack(txn, new_pack)
            for cid, location in sink.locations.items():
                store.index.add(txn, cid, location)
            for cid in dead:
                store.index.remove(txn, cid)
            for pack_id in dropped_packs:
                store.index.remove_pack(txn, pack_id)
    except BaseException:
        sink.discard()
        raise


def _live_chunks(store: Store, txn: lmdb.Transaction) -> set[bytes]:
    """Every chunk some point's map references."""
    live: set[bytes] = set()
    for _, _, chunk_map in store.catalog.chunk_maps(txn):
        live |= referenced_chunks(chunk_map)
    return live


def _delete_unsealed(store: Store) -> int:
    """Delete the temporaries of crashed ingests (the writer lock is held: no ingest is running here)."""
    reclaimed = 0
    for temp in store.packs.list_unsealed():
        reclaimed += temp.stat().st_size
        temp.unlink()
    return reclaimed


def _maybe_being_written(store: Store, pack_id: int, grace: float) -> bool:
    """Another gateway's unreferenced pack younger than the grace period may be an ingest not yet committed."""
    if store.config.backend != "s3" or gateway_of(pack_id) == store.config.gateway:
        return False
    header = store.packs.read_range(pack_id, 0, PACK_HEADER_SIZE)
    return time.time() - pack_created(header, pack_id, store.packs.name_of(pack_id)) < grace


def _delete_condemned(store: Store, grace: float) -> tuple[int, int]:
    """Phase 2: delete the packs condemned a grace period ago, after copying out what a newer point needs."""
    deleted = reclaimed = 0
    for record in condemned(store.packs):
        if time.time() - record.when < grace:
            continue
        try:
            with store.gc_lock():
                deleted_now, reclaimed_now = _delete_condemned_record(store, record)
        except StoreBusy:
            continue  # this gateway's readers hold packs open: the next collection deletes them
        deleted += deleted_now
        reclaimed += reclaimed_now
    return deleted, reclaimed


def _delete_condemned_record(store: Store, record: Condemned) -> tuple[int, int]:
    """Copy out what live points still read only from the record's packs, then delete them."""
    with store.env.begin() as txn:
        live = _live_chunks(store, txn)
        inside = [(cid, location) for cid, location in store.index.chunks(txn) if location.pack_id in record.packs]
    _relocate(store, [(cid, location) for cid, location in inside if cid in live],
              [cid for cid, _ in inside if cid not in live], sorted(record.packs))
    deleted = reclaimed = 0
    for pack_id in sorted(record.packs & set(store.packs.list_packs())):
        reclaimed += store.packs.pack_size(pack_id)
        store.packs.delete(pack_id)
        deleted += 1
    forget_condemned(store.packs, record)
    return deleted, reclaimed


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
            return len(unlisted), reclaimed + _delete_unsealed(store), 0
    except StoreBusy:
        return 0, 0, len(unlisted)
