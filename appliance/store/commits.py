"""Adding and removing restore points: the manifest object and the catalog, in the order that keeps both true.

A point is added by publishing its manifest (after its packs are sealed) and then
committing packs, chunk locations and the point in one LMDB transaction. It is removed by
deleting its manifest first and then the catalog entry. Either way a crash between the
two steps leaves the bucket's view (the manifests) a step ahead of this gateway's
catalog, which the next refresh (`appliance.store.refresh`) brings level; never a
manifest that names chunks no pack holds.

Callers hold the store's writer lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from appliance.store.catalog import RestorePoint
from appliance.store.index import ChunkLocation, PackInfo
from appliance.store.manifests import Manifest, manifest_of
from appliance.store.gateways import condemned_packs
from appliance.store.repository import Store
from appliance.store.writer import PackSink, copy_records

#: Set in the `meta` table once every point committed before manifests existed has one.
_PUBLISHED_KEY = b"manifests-published"


def publish_missing_manifests(store: Store) -> int:
    """Write the manifest of every point that has none (points committed before manifests existed); once."""
    meta = store.env.open_db(b"meta")
    with store.env.begin(db=meta) as txn:
        if txn.get(_PUBLISHED_KEY) is not None:
            return 0
        points = store.catalog.points(txn)
    published = store.manifests.point_ids()
    count = 0
    for point in points:
        if point.id not in published:
            with store.env.begin() as txn:
                manifest = manifest_of(txn, store.catalog, point.id)
            store.manifests.put(manifest)
            count += 1
    with store.env.begin(write=True, db=meta) as txn:
        txn.put(_PUBLISHED_KEY, b"1")
    return count


def commit_point(store: Store, manifest: Manifest, packs: Sequence[PackInfo] = (),
                 locations: Mapping[bytes, ChunkLocation] | None = None) -> None:
    """Publish `manifest`, then make the point, its new packs and their chunks visible at once."""
    publish_missing_manifests(store)
    packs, locations = list(packs), dict(locations or {})
    rescued = _rescue_condemned(store, manifest, locations)
    packs += rescued.sealed
    locations.update(rescued.locations)
    store.manifests.put(manifest)
    with store.env.begin(write=True) as txn:
        for info in packs:
            store.index.add_pack(txn, info)
        for cid, location in locations.items():
            store.index.add(txn, cid, location)
        store.catalog.add_point(txn, manifest.point, list(manifest.maps), manifest.files)


def _rescue_condemned(store: Store, manifest: Manifest, locations: dict[bytes, ChunkLocation]) -> PackSink:
    """Copy the chunks this point would read from packs another gateway's GC has condemned.

    Checked just before the manifest is published: a collection that condemned a pack
    after this check deletes it a grace period later, by when it sees this manifest.
    """
    sink = PackSink(store)
    if store.config.backend != "s3":
        return sink
    doomed = condemned_packs(store.packs)
    if not doomed:
        return sink
    with store.env.begin() as txn:
        at_risk = []
        for cid in sorted(manifest.chunk_ids()):
            location = locations.get(cid) or store.index.lookup(txn, cid)
            if location is not None and location.pack_id in doomed:
                at_risk.append((cid, location))
    try:
        copy_records(store, sink, at_risk)
        sink.seal()
    except BaseException:
        sink.discard()
        raise
    return sink


def remove_points(store: Store, points: list[RestorePoint]) -> list[RestorePoint]:
    """Remove the points no one holds; returns those removed.

    A hold can be taken between the caller's choice and this transaction (a session
    started meanwhile): such a point is kept, and its manifest published again.
    """
    with store.env.begin() as txn:
        manifests = {point.id: manifest_of(txn, store.catalog, point.id) for point in points
                     if store.catalog.has_point(txn, point.id)}
    for point_id in manifests:
        store.manifests.delete(point_id)
    removed, kept = [], []
    with store.env.begin(write=True) as txn:
        for point in points:
            if point.id not in manifests:
                continue
            if store.catalog.holders(txn, point.id) or store.held_elsewhere(point.id):
                kept.append(manifests[point.id])
            else:
                store.catalog.delete_point(txn, point)
                removed.append(point)
    for manifest in kept:
        store.manifests.put(manifest)
    return removed
