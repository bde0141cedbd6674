"""One replication job: the points a target lacks, with only the chunks it lacks.

Per VM, the points to send are those newer than the newest point the target holds, so
the target's own retention (which may keep fewer points) is never undone by the next
run. For each point, oldest first:

1. its manifest is read from the source;
2. the target is asked which of the point's chunks it lacks, in batches, skipping
   chunks this job already knows the target holds (the job-wide seen set, seeded with
   the chunks of the target's newest point of that VM);
3. the lacking chunks travel in batches over parallel streams: each as a delta against
   the chunk the target holds for the same slot (in its newest point, or the point this
   job sent before) when that is smaller, else as its stored record;
4. the point is committed. If the target has meanwhile lost a chunk (its GC dropped
   one that no point referenced yet), it refuses with ChunksMissing and the point is
   sent again from step 2, without deltas, at most `COMMIT_ATTEMPTS` times.

With `remove_vanished`, the target then deletes its points the source no longer has
(`vanished`); points a session holds there stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from appliance.errors import ChunksMissing, RemoteRefused
from appliance.replication.ends import SourceEnd, TargetEnd
from appliance.replication.local import LocalSource, LocalTarget
from appliance.replication.remote import Link, RemoteAppliance, RemoteSettings
from appliance.replication.wire import MAX_IDS
from appliance.store.catalog import RestorePoint, map_entries
from appliance.store.formats import ZERO_CHUNK_ID
from appliance.store.manifests import Manifest
from appliance.store.repository import Store

COMMIT_ATTEMPTS = 3
T = TypeVar("T")
BATCH_BYTES = 16 << 20


@dataclass
class ReplicationReport:
    points_sent: list[str] = field(default_factory=list)
    points_skipped: int = 0  # already at the target, or older than its newest point of that VM
    points_removed: list[str] = field(default_factory=list)  # vanished at the source, deleted at the target
    chunks_sent: int = 0
    chunk_bytes_sent: int = 0  # bytes of the chunk streams sent (stored records and deltas)
    logical_bytes: int = 0  # the disk bytes of the points sent
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {"points_sent": self.points_sent, "points_skipped": self.points_skipped,
                "points_removed": self.points_removed,
                "chunks_sent": self.chunks_sent, "chunk_bytes_sent": self.chunk_bytes_sent,
                "logical_bytes": self.logical_bytes, "seconds": round(self.seconds, 3)}


def check_compatible(source: SourceEnd, target: TargetEnd) -> None:
    """Refuse stores whose chunks cannot be shared, with the reason."""
    mine, theirs = source.identity(), target.identity()
    if mine.store_id == theirs.store_id:
        raise RemoteRefused(f"source and target are the same store ({mine.store_id})")
    if mine.chunk_id != theirs.chunk_id:
        raise RemoteRefused(f"the source names chunks by {mine.chunk_id}, the target by {theirs.chunk_id}: "
                            "their chunks cannot be shared")
    if mine.chunk_size != theirs.chunk_size:
        raise RemoteRefused(f"the source's chunk size is {mine.chunk_size} bytes, the target's {theirs.chunk_size}: "
                            "replication needs stores made with the same --chunk-size")


def points_to_send(source_points: list[RestorePoint], target_points: list[RestorePoint]) -> list[RestorePoint]:
    """The source's points newer than the target's newest of the same VM, oldest first."""
    newest: dict[str, float] = {}
    for point in target_points:
        newest[point.vm] = max(newest.get(point.vm, point.created), point.created)
    held = {point.id for point in target_points}
    return [point for point in source_points
            if point.id not in held and point.created > newest.get(point.vm, float("-inf"))]


def vanished(source_points: list[RestorePoint], target_points: list[RestorePoint]) -> list[str]:
    """The target's points of VMs the source still has points of, that the source no longer has.

    A VM the source has no point of at all is left alone: an empty selection or a source
    that lost a VM whole is more likely a mistake than a retention decision.
    """
    kept = {point.id for point in source_points}
    vms = {point.vm for point in source_points}
    return [point.id for point in target_points if point.vm in vms and point.id not in kept]


def delta_bases(maps: tuple[bytes, ...], base_maps: tuple[bytes, ...]) -> dict[bytes, bytes]:
    """For each chunk of `maps`, the chunk the base point had in the same slot (where it had a different one)."""
    bases: dict[bytes, bytes] = {}
    for chunk_map, base_map in zip(maps, base_maps):
        for new, old in zip(map_entries(chunk_map), map_entries(base_map)):
            if new != old and ZERO_CHUNK_ID not in (new, old):
                bases.setdefault(new, old)
    return bases


def _batches(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Replication:
    """One job's state across its points: the ends, the seen set and the figures."""

    def __init__(self, source: SourceEnd, target: TargetEnd, chunk_size: int, streams: int,
                 on_point: Callable[[RestorePoint, ReplicationReport], None] | None = None,
                 checkpoint: Callable[[], None] | None = None) -> None:
        self._source, self._target = source, target
        self._checkpoint = checkpoint or (lambda: None)
        self._streams = streams
        self._ids_per_batch = max(1, BATCH_BYTES // chunk_size)
        self._on_point = on_point
        self.seen: set[bytes] = set()
        #: Per VM, the chunk maps of the newest point the target holds: each slot's chunk is its delta base.
        self._base_maps: dict[str, tuple[bytes, ...]] = {}
        self.report = ReplicationReport()

    def _lacking(self, wanted: set[bytes]) -> list[bytes]:
        unknown = sorted(wanted - self.seen)
        lacking: list[bytes] = []
        for batch in _batches(unknown, MAX_IDS):
            lacking += self._target.missing(batch)
        self.seen.update(set(unknown) - set(lacking))
        return lacking

    def _carry(self, pairs: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        self._checkpoint()
        frames = self._source.records(pairs)
        self._target.store(frames)
        return len(pairs), len(frames)

    def _send_point(self, manifest: Manifest) -> None:
        wanted = manifest.chunk_ids()
        bases = delta_bases(manifest.maps, self._base_maps.get(manifest.point.vm, ()))
        for attempt in range(COMMIT_ATTEMPTS):
            lacking = self._lacking(wanted)
            pairs = [(cid, bases.get(cid, ZERO_CHUNK_ID)) for cid in lacking]
            try:
                with ThreadPoolExecutor(max_workers=self._streams) as pool:
                    for chunks, size in pool.map(self._carry, _batches(pairs, self._ids_per_batch)):
                        self.report.chunks_sent += chunks
                        self.report.chunk_bytes_sent += size
                self.seen.update(lacking)
                self._target.commit(manifest)
                break
            except ChunksMissing:  # a chunk or delta base the target had is gone (its GC or prune)
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise
                self.seen -= wanted
                bases = {}
        self._base_maps[manifest.point.vm] = manifest.maps

    def _seed(self, point: RestorePoint, source_ids: set[str]) -> None:
        """Count the chunks of the target's newest point of this VM as held, and its maps as delta bases.

        Only when the source still has that point: the target's maps never travel back.
        """
        if point.id in source_ids:
            manifest = self._source.manifest(point.id)
            self.seen |= manifest.chunk_ids()
            self._base_maps[point.vm] = manifest.maps

    def run(self, vms: list[str] | None, remove_vanished: bool = False) -> ReplicationReport:
        started = time.monotonic()
        source_points = self._source.points(vms)
        target_points = self._target.points(vms)
        sending = points_to_send(source_points, target_points)
        self.report.points_skipped = len(source_points) - len(sending)
        source_ids = {point.id for point in source_points}
        for vm in sorted({point.vm for point in sending}):
            held = [point for point in target_points if point.vm == vm]
            if held:
                self._seed(max(held, key=lambda point: (point.created, point.id)), source_ids)
        for point in sending:
            self._checkpoint()
            self._send_point(self._source.manifest(point.id))
            self.report.points_sent.append(point.id)
            self.report.logical_bytes += sum(disk.size for disk in point.disks)
            if self._on_point is not None:
                self._on_point(point, self.report)
        if remove_vanished:
            self.report.points_removed = self._target.remove(vanished(source_points, target_points))
        self.report.seconds = time.monotonic() - started
        return self.report


def replicate(store: Store, remote: RemoteSettings, direction: str, vms: list[str] | None, link: Link,
              on_point: Callable[[RestorePoint, ReplicationReport], None] | None = None,
              checkpoint: Callable[[], None] | None = None, remove_vanished: bool = False) -> ReplicationReport:
    """Push this store's points to `remote`, or pull its points here; `link` meters what crosses the network."""
    other = RemoteAppliance(remote, link)
    try:
        with store.reader_lock():
            if direction == "push":
                source: SourceEnd = LocalSource(store)
                target: TargetEnd = other
            else:
                source, target = other, LocalTarget(store)
            check_compatible(source, target)
            replication = Replication(source, target, store.config.chunk_size, remote.streams, on_point, checkpoint)
            return replication.run(vms, remove_vanished)
    finally:
        other.close()
