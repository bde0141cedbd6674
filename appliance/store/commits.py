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
from appliance.store.repository import Store


def commit_point(store: Store, manifest: Manifest, packs: Sequence[PackInfo] = (),
                 locations: Mapping[bytes, ChunkLocation] | None = None) -> None:
    """Publish `manifest`, then make the point, its new packs and their chunks visible at once."""
    store.manifests.put(manifest)
    with store.env.begin(write=True) as txn:
        for info in packs:
            store.index.add_pack(txn, info)
        for cid, location in (locations or {}).items():
            store.index.add(txn, cid, location)
        store.catalog.add_point(txn, manifest.point, list(manifest.maps), manifest.files)


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
            if store.catalog.holders(txn, point.id):
                kept.append(manifests[point.id])
            else:
                store.catalog.delete_point(txn, point)
                removed.append(point)
    for manifest in kept:
        store.manifests.put(manifest)
    return removed
