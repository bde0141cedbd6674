"""Keeping restore points hydrated: their chunks decompressed in the local tier before anyone boots them.

Which points: the newest of every VM (`[cache] hydrate = "newest"`), or the newest of the
VMs whose backup policy says `hydrate = true` ("policies"). A policy's VMs named in its
`vms` are known from the configuration; those it selects by folder, tag or `all` are
learnt from each round of backup discovery (`mark`). The chunks of the chosen points are
pinned in the tier, so the previous points' chunks are the first to be evicted.

When: at start, after each backup commits (`request`, from the backup service's hook), and
every `RESCAN_SECONDS` for points that arrive otherwise (replication, a committed session,
a backup by another process).

How hard: one thread, one chunk at a time, in disk order (a boot reads a disk's start
first), through the store's verified loader; it waits while any reader is loading a chunk
from the store, so it never competes with an NFS read that missed, only with idle time.
A new request abandons the round and plans again from the catalog.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from appliance.config import PolicyConfig
from appliance.errors import ApplianceError
from appliance.events import event
from appliance.store.catalog import RestorePoint, map_entries
from appliance.store.chunks import ChunkLoader
from appliance.store.formats import ZERO_CHUNK_ID
from appliance.store.hydrated import HydratedTier
from appliance.store.reader import ReadPath
from appliance.store.repository import Store

#: How often the catalog is looked at again without a request.
RESCAN_SECONDS = 60.0
#: How long hydration sleeps before looking again whether readers still wait on the store.
YIELD_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class VmHydration:
    point: str  # the point kept hydrated
    done: int  # its distinct chunks in the tier
    pending: int  # its distinct chunks still to load


class Hydrator:
    """The background hydration of one serving appliance; `start` once, `close` at shutdown."""

    def __init__(self, store: Store, read_path: ReadPath, tier: HydratedTier, mode: str,
                 marked: Iterable[str] = ()) -> None:
        if mode not in ("newest", "policies"):
            raise ValueError(f"hydration mode {mode!r}")
        self._store, self._read_path, self._tier, self._mode = store, read_path, tier, mode
        self._loader = ChunkLoader(store)
        self._marks: dict[str, bool] = {vm: True for vm in marked}
        self._progress: dict[str, VmHydration] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._full_reported = False
        self._thread = threading.Thread(target=self._run, name="hydration", daemon=True)

    def start(self) -> None:
        self._wake.set()
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def request(self) -> None:
        """Plan again soon: a point was committed (thread-safe, returns at once)."""
        self._wake.set()

    def mark(self, marks: Mapping[str, bool]) -> None:
        """Which VMs their policy wants hydrated, as the last discovery found them ("policies" mode)."""
        with self._lock:
            changed = any(self._marks.get(vm) != wanted for vm, wanted in marks.items())
            self._marks.update(marks)
        if changed and self._mode == "policies":
            self.request()

    def progress(self) -> dict[str, VmHydration]:
        """Per VM kept hydrated: its point and how many of its chunks are done and pending."""
        with self._lock:
            return dict(self._progress)

    def _run(self) -> None:
        while True:
            self._wake.wait(RESCAN_SECONDS)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._round()
            except ApplianceError as exc:  # the catalog changed under us: the next round plans again
                event("hydration.failed", logging.WARNING, reason=str(exc))

    def _chosen(self, points: list[RestorePoint]) -> list[RestorePoint]:
        """The newest point of each VM to hydrate, from the catalog's points (oldest first)."""
        newest: dict[str, RestorePoint] = {}
        for point in points:
            newest[point.vm] = point
        with self._lock:
            marks = dict(self._marks)
        return [point for vm, point in sorted(newest.items()) if self._mode == "newest" or marks.get(vm, False)]

    def _plan(self) -> list[tuple[RestorePoint, list[bytes]]]:
        """Each chosen point with its distinct stored chunks in disk order."""
        store = self._store
        with store.env.begin() as txn:
            chosen = self._chosen(store.catalog.points(txn))
            plan = []
            for point in chosen:
                chunks: dict[bytes, None] = {}
                for disk in range(len(point.disks)):
                    chunks.update(dict.fromkeys(map_entries(store.catalog.chunk_map(txn, point, disk))))
                chunks.pop(ZERO_CHUNK_ID, None)
                plan.append((point, list(chunks)))
        return plan

    def _round(self) -> None:
        plan = self._plan()
        self._tier.pin({cid for _, chunks in plan for cid in chunks})
        missing = {point.vm: [cid for cid in chunks if not self._tier.contains(cid)] for point, chunks in plan}
        with self._lock:
            self._progress = {point.vm: VmHydration(point.id, len(chunks) - len(missing[point.vm]),
                                                    len(missing[point.vm])) for point, chunks in plan}
        for point, _ in plan:
            for cid in missing[point.vm]:
                if self._wake.is_set():
                    return  # a request or shutdown: plan again
                if not self._tier.contains(cid) and not self._hydrate(point, cid):
                    return
                if self._tier.contains(cid):  # not after a failed load: that chunk stays pending
                    with self._lock:
                        step = self._progress[point.vm]
                        self._progress[point.vm] = VmHydration(step.point, step.done + 1, step.pending - 1)
            if missing[point.vm]:
                event("hydration.done", vm=point.vm, point=point.id, chunks=self._progress[point.vm].done,
                      pending=self._progress[point.vm].pending)
        self._full_reported = False

    def _hydrate(self, point: RestorePoint, cid: bytes) -> bool:
        """Load one chunk into the tier once no reader waits on the store; False ends the round."""
        while self._read_path.store_loads() and not self._wake.is_set():
            time.sleep(YIELD_SECONDS)
        if self._wake.is_set():
            return False
        try:
            data = self._loader.load(cid)
        except ApplianceError as exc:  # damage is the reader's and verify's to report; hydration goes on
            event("hydration.chunk_failed", logging.WARNING, vm=point.vm, point=point.id, chunk=cid.hex()[:16],
                  reason=str(exc))
            return True
        if self._tier.store(cid, data):
            return True
        if not self._full_reported:
            self._full_reported = True
            event("hydration.tier_full", logging.WARNING, vm=point.vm, point=point.id,
                  reason="every slot of the hydrated tier holds a pinned chunk: raise [cache] hydrated_gib")
        return False


@contextlib.contextmanager
def hydrated_tier(store: Store, directory: Path | None, capacity_bytes: int) -> Iterator[HydratedTier | None]:
    """The store's hydrated tier in `directory`, open for the block (None without a directory)."""
    if directory is None:
        yield None
        return
    started = time.monotonic()
    with HydratedTier(directory, capacity_bytes, store.config.chunk_size, store.config.store_id) as tier:
        held = tier.statistics()
        event("hydrated.opened", directory=str(directory), chunks=held.entries, bytes=held.bytes,
              capacity=held.capacity, seconds=round(time.monotonic() - started, 3))
        yield tier


@contextlib.contextmanager
def hydrating(store: Store, read_path: ReadPath, tier: HydratedTier | None, mode: str,
              policies: Iterable[PolicyConfig]) -> Iterator[Hydrator | None]:
    """Background hydration for the block, as `mode` says (None without a tier or with mode "off")."""
    if tier is None or mode == "off":
        yield None
        return
    hydrator = Hydrator(store, read_path, tier, mode,
                        marked=[vm for policy in policies if policy.hydrate for vm in policy.vms])
    hydrator.start()
    try:
        yield hydrator
    finally:
        hydrator.close()
