"""Bring this gateway's index and catalog level with what the packs and manifests say.

The LMDB index is a cache: the packs (with their index objects) say where every chunk
is, the manifests say which points exist. `refresh` makes the local tables agree with
them. The same code serves three cases:
- `appliance store rebuild-index`: from an empty index (a damaged or lost one);
- `appliance init --join`: a new gateway of a store in S3 learns everything;
- `serve` on a store in S3, every few minutes: points and packs that other gateways
  added or removed appear or go.

A point is only ever added when every chunk it names is in a pack that exists, so a
half-written store never yields a point that reads wrong; such a point is reported as
incomplete. A chunk found in several packs is read from one not condemned by garbage
collection (`appliance.store.gateways`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import IntegrityError
from appliance.events import event
from appliance.store.catalog import referenced_chunks
from appliance.store.formats import PACK_HEADER_SIZE
from appliance.store.gateways import condemned_packs, gateway_of
from appliance.store.index import ChunkLocation, PackInfo
from appliance.store.commits import publish_missing_manifests
from appliance.store.pack_index import pack_records
from appliance.store.repository import Store, gc_lock, open_store, writer_lock



@dataclass(slots=True)
class RefreshReport:
    packs_added: int = 0
    packs_dropped: int = 0
    points_added: int = 0
    points_dropped: int = 0
    manifests_published: int = 0
    #: Points whose manifest names chunks no pack holds (a writer still at work, or damage): not added.
    incomplete: list[str] = field(default_factory=list)
    #: Manifests that failed their checks (named with the reason): their points are not added.
    damaged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.points_added} points added, {self.points_dropped} dropped; {self.packs_added} packs added, "
                f"{self.packs_dropped} dropped" + (f"; {self.manifests_published} manifests published"
                                                   if self.manifests_published else "")
                + (f"; incomplete: {', '.join(self.incomplete)}" if self.incomplete else "")
                + (f"; damaged: {'; '.join(self.damaged)}" if self.damaged else ""))


def refresh(store: Store) -> RefreshReport:
    """Make the index and catalog agree with the packs and manifests; the caller holds the writer lock."""
    report = RefreshReport(manifests_published=publish_missing_manifests(store))
    listed = set(store.packs.list_packs())
    condemned = condemned_packs(store.packs)
    with store.env.begin() as txn:
        known = {info.pack_id for info in store.index.packs(txn)}
        local_points = set(store.catalog.point_ids(txn))
    gone = known - listed
    added = {pack_id: pack_records(store.packs, pack_id) for pack_id in sorted(listed - known)}
    published = store.manifests.point_ids()
    arriving = []
    for point_id in sorted(published - local_points):
        try:
            arriving.append(store.manifests.get(point_id))
        except IntegrityError as exc:
            report.damaged.append(str(exc))
    with store.env.begin(write=True) as txn:
        if gone or condemned:
            for cid, location in list(store.index.chunks(txn)):
                if location.pack_id in gone:
                    store.index.remove(txn, cid)
            for pack_id in gone:
                store.index.remove_pack(txn, pack_id)
        for pack_id, records in added.items():
            store.index.add_pack(txn, PackInfo(pack_id, _pack_size(records), len(records)))
            for cid, location in records:
                current = store.index.lookup(txn, cid)
                if current is None or (current.pack_id in condemned and pack_id not in condemned):
                    store.index.add(txn, cid, location)
        for point_id in sorted(local_points - published):
            point = store.catalog.get_point(txn, point_id)
            holders = store.catalog.holders(txn, point_id)
            if holders:
                event("store.refresh_kept_held_point", logging.WARNING, point=point_id, holders=",".join(holders))
                continue
            store.catalog.delete_point(txn, point)
            report.points_dropped += 1
        for manifest in arriving:
            needed = set().union(*(referenced_chunks(chunk_map) for chunk_map in manifest.maps))
            if any(store.index.lookup(txn, cid) is None for cid in needed):
                report.incomplete.append(manifest.point.id)
                continue
            store.catalog.add_point(txn, manifest.point, list(manifest.maps), manifest.files)
            report.points_added += 1
    own = [pack_id for pack_id in listed if gateway_of(pack_id) == store.config.gateway]
    if own:
        store.skip_pack_ids_through(max(own))
    report.packs_added, report.packs_dropped = len(added), len(gone)
    return report


def rebuild_index(path: Path) -> tuple[RefreshReport, Path | None]:
    """Build the store's index afresh from the packs and manifests; the old one (if any) is kept aside.

    Refused while anything else uses the store. What the old index alone held is not
    carried over: sessions (their overlays stay on disk) and file indexes (built again).
    """
    with writer_lock(path), gc_lock(path):
        index = path / "index"
        aside = None
        if index.exists():
            aside = path / f"index.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
            index.rename(aside)
        with open_store(path) as store:
            return refresh(store), aside


def _pack_size(records: list[tuple[bytes, ChunkLocation]]) -> int:
    return max((location.offset + location.record_length for _, location in records), default=PACK_HEADER_SIZE)
