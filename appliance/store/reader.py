"""The read path: bytes of a restore point's disk, synthesized from chunks.

`ReadPath.read(point, disk, offset, length)` is what the FUSE and NFS fronts call
(from worker threads: it blocks on I/O and decompression). Decompressed chunks are
kept in a bounded cache shared by all points, so chunks that many points or VMs share
are decompressed once. A disk read sequentially gets read-ahead: the next chunks are
fetched and decompressed by a small thread pool while the caller consumes the current
one; zstd and pread release the GIL, so this uses every core. With a hydrated tier
(`hydrated.HydratedTier`) a chunk missing from memory is looked for on the local disk
before the store, and what the store gives is queued for the tier.
"""

from __future__ import annotations

import logging

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from appliance.errors import IntegrityError
from appliance.events import event
from appliance.store.cache import CacheStatistics, ChunkCache, MemoryChunkCache
from appliance.store.catalog import RestorePoint
from appliance.store.chunks import ChunkLoader, LoaderStatistics
from appliance.store.formats import CHUNK_ID_SIZE, ZERO_CHUNK_ID
from appliance.store.hydrated import HydratedTier, TierStatistics
from appliance.store.repository import Store

DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_READAHEAD_BYTES = 16 << 20
#: Read-ahead chunks loaded by one task: neighbours in a pack come in one request, and the
#: window still spreads over both workers.
READAHEAD_BATCH_CHUNKS = 8


class DiskReader:
    """Reads one disk of one restore point; safe to share between threads."""

    def __init__(self, path: "ReadPath", point: RestorePoint, disk: int, chunk_map: bytes) -> None:
        self.point = point
        self.disk = disk
        self.size = point.disks[disk].size
        self._path = path
        self._map = chunk_map
        self._chunk_size = path.chunk_size
        self._next_offset = -1
        #: Chunks before this index have had their read-ahead started in the current
        #: sequential run, so the next read plans only the window's new end.
        self._planned = 0

    def chunk_id_at(self, index: int) -> bytes:
        return self._map[index * CHUNK_ID_SIZE : (index + 1) * CHUNK_ID_SIZE]

    def chunk_length(self, index: int) -> int:
        return min(self._chunk_size, self.size - index * self._chunk_size)

    def _chunk(self, index: int) -> bytes:
        cid = self.chunk_id_at(index)
        if cid == ZERO_CHUNK_ID:
            return self._path.zeros(self.chunk_length(index))
        try:
            return self._path.fetch(cid)
        except IntegrityError as exc:
            event("checksum.failed", logging.ERROR, vm=self.point.vm, point=self.point.id, disk=self.disk,
                  offset=index * self._chunk_size, reason=str(exc))
            raise IntegrityError(
                f"restore point {self.point.id} of VM {self.point.vm!r}, disk {self.disk}, "
                f"offset {index * self._chunk_size}: {exc}"
            ) from None

    def _read(self, offset: int, length: int, chunk_of: Callable[[int], bytes | None]) -> list[memoryview] | None:
        """The bytes at `offset`, as views of the chunks that hold them, in order."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset {offset} or length {length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        first, last = offset // self._chunk_size, (end - 1) // self._chunk_size
        if offset == self._next_offset:
            self._planned = self._path.prefetch(self, last + 1, self._planned)
        else:
            self._planned = 0
        parts: list[memoryview] = []
        for index in range(first, last + 1):
            chunk = chunk_of(index)
            if chunk is None:
                return None
            base = index * self._chunk_size
            parts.append(memoryview(chunk)[max(offset, base) - base : min(end, base + len(chunk)) - base])
        self._next_offset = end
        return parts

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`; short only at the end of the disk."""
        loaded: dict[bytes, bytes] = {}
        if length > self._chunk_size and 0 <= offset < self.size:
            last = (min(offset + length, self.size) - 1) // self._chunk_size
            loaded = self._path.load_together([self.chunk_id_at(index)
                                               for index in range(offset // self._chunk_size, last + 1)])

        def chunk(index: int) -> bytes:
            """A chunk loaded together above (its miss counted there), else the ordinary way."""
            return loaded.get(self.chunk_id_at(index)) or self._chunk(index)

        parts = self._read(offset, length, chunk)
        assert parts is not None
        return b"".join(parts)

    def read_cached(self, offset: int, length: int) -> list[memoryview] | None:
        """Like `read` when every chunk needed is decompressed in memory, else None.

        Never blocks on I/O or decompression, so an event loop may call it directly
        and skip the hop to a worker thread for cache hits. The bytes come as views of
        the cached chunks, so an NFS reply sends them without a copy.
        """
        cache, found = self._path.cache, 0

        def cached_chunk(index: int) -> bytes | None:
            nonlocal found
            cid = self.chunk_id_at(index)
            if cid == ZERO_CHUNK_ID:
                return self._path.zeros(self.chunk_length(index))
            data = cache.peek(cid)
            found += data is not None
            return data

        parts = self._read(offset, length, cached_chunk)
        if parts is not None and found:  # one that gave up is counted by the ordinary read that follows
            cache.count_hits(found)
        return parts


@dataclass(frozen=True, slots=True)
class ReadStatistics:
    cache: CacheStatistics
    loads: LoaderStatistics
    tier: TierStatistics | None  # None without a hydrated tier


class ReadPath:
    """Shared cache, read-ahead pool and open disk readers of one store."""

    def __init__(
        self,
        store: Store,
        cache: ChunkCache | None = None,
        readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
        workers: int = 2,
        tier: HydratedTier | None = None,
    ) -> None:
        self.store = store
        self.tier = tier
        self.chunk_size = store.config.chunk_size
        self.cache: ChunkCache = cache if cache is not None else MemoryChunkCache(DEFAULT_CACHE_BYTES)
        self._loader = ChunkLoader(store)
        self._readahead_chunks = max(1, readahead_bytes // self.chunk_size)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="readahead")
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._readers: dict[tuple[str, int], DiskReader] = {}
        self._zeros = bytes(self.chunk_size)
        self._store_loads = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def statistics(self) -> ReadStatistics:
        """The cache's and the chunk loader's counters: what serving metrics report."""
        return ReadStatistics(self.cache.statistics(), self._loader.statistics(),
                              None if self.tier is None else self.tier.statistics())

    def store_loads(self) -> int:
        """Chunks being loaded from the store for readers right now: background hydration waits while any are."""
        return self._store_loads

    def __enter__(self) -> "ReadPath":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def zeros(self, length: int) -> bytes:
        return self._zeros if length == self.chunk_size else bytes(length)

    def disk(self, point: RestorePoint, disk: int) -> DiskReader:
        """The reader of a disk that is served: opened once and kept for the life of the read path,
        so `opened_disk` finds it on every READ."""
        key = (point.id, disk)
        with self._lock:
            reader = self._readers.get(key)
        if reader is None:
            reader = self._open(point, disk)
            with self._lock:
                reader = self._readers.setdefault(key, reader)
        return reader

    def scan_disk(self, point: RestorePoint, disk: int) -> DiskReader:
        """A reader for one pass over a disk (indexing its files, browsing them): the served one if
        there is one, else a new one that goes with its user.

        Kept readers keep their chunk maps (128 KiB per GiB of disk at 256 KiB chunks): a
        background pass over every restore point through `disk` would keep every map of the
        catalog in memory.
        """
        return self._readers.get((point.id, disk)) or self._open(point, disk)

    def _open(self, point: RestorePoint, disk: int) -> DiskReader:
        with self.store.env.begin() as txn:
            chunk_map = self.store.catalog.chunk_map(txn, point, disk)
        return DiskReader(self, point, disk, chunk_map)

    def read(self, point: RestorePoint, disk: int, offset: int, length: int) -> bytes:
        return self.disk(point, disk).read(offset, length)

    def opened_disk(self, point_id: str, disk: int) -> DiskReader | None:
        """A disk reader already opened by `disk`, without touching LMDB (nor the lock: one
        dict read is atomic, and this runs for every READ answered on the loop)."""
        return self._readers.get((point_id, disk))

    def _load(self, cid: bytes) -> bytes:
        """A chunk missing from memory: from the hydrated tier, else from the store (then queued for the tier)."""
        if self.tier is not None:
            data = self.tier.get(cid)
            if data is not None:
                return data
        with self._lock:
            self._store_loads += 1
        try:
            data = self._loader.load(cid)
        finally:
            with self._lock:
                self._store_loads -= 1
        if self.tier is not None:
            self.tier.put(cid, data)
        return data

    def _prefetch_batch(self, batch: list[tuple[bytes, Future[bytes]]]) -> None:
        """Load a run of chunks (read-ahead, or one read's): from the tier, else from the store in as
        few requests as the packs allow (`ChunkLoader.load_many`); each future gets its bytes or its error."""
        try:
            found: dict[bytes, bytes | IntegrityError] = {}
            missing = []
            for cid, _ in batch:
                data = None if self.tier is None else self.tier.get(cid)
                if data is None:
                    missing.append(cid)
                else:
                    found[cid] = data
            if missing:
                with self._lock:
                    self._store_loads += len(missing)
                try:
                    loaded = self._loader.load_many(missing)
                finally:
                    with self._lock:
                        self._store_loads -= len(missing)
                for cid, result in loaded.items():
                    if self.tier is not None and isinstance(result, bytes):
                        self.tier.put(cid, result)
                found.update(loaded)
            for cid, future in batch:
                result = found[cid]
                if isinstance(result, IntegrityError):
                    future.set_exception(result)
                else:
                    self.cache.put(cid, result)
                    future.set_result(result)
        except BaseException as exc:  # a store error (S3 unreachable...): every waiting reader hears it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            with self._lock:
                for cid, _ in batch:
                    self._inflight.pop(cid, None)

    def fetch(self, cid: bytes) -> bytes:
        """A chunk's bytes: from the cache, from a read-ahead in flight, or loaded now."""
        data = self.cache.get(cid)
        if data is not None:
            return data
        with self._lock:
            future = self._inflight.get(cid)
        if future is not None:
            return future.result()
        data = self._load(cid)
        self.cache.put(cid, data)
        return data

    def load_together(self, cids: list[bytes]) -> dict[bytes, bytes]:
        """Load, on this thread and as one batch, the chunks of one read that are neither in memory nor
        on their way, so neighbours in a pack come in one request; returns those it loaded, each
        counted as a cache miss. A chunk that failed is left out: asked for again, it says why."""
        missing = [cid for cid in dict.fromkeys(cids) if cid != ZERO_CHUNK_ID and not self.cache.contains(cid)]
        if len(missing) < 2:
            return {}
        batch = self._claim(missing)
        self._prefetch_batch(batch)
        self.cache.count_misses(len(batch))
        return {cid: future.result() for cid, future in batch if future.exception() is None}

    def _claim(self, cids: list[bytes]) -> list[tuple[bytes, Future[bytes]]]:
        """Futures for the chunks no one is loading yet, registered so that other readers wait for them."""
        batch: list[tuple[bytes, Future[bytes]]] = []
        with self._lock:
            for cid in cids:
                if cid not in self._inflight:
                    future = self._inflight[cid] = Future()
                    batch.append((cid, future))
        return batch

    def prefetch(self, reader: DiskReader, first_index: int, planned: int = 0) -> int:
        """Start loading the chunks after a sequential read, up to the read-ahead window;
        returns the index the window ends at, the `planned` of the next read in the run.

        Chunks below `planned` were planned by the run's earlier reads. Checking the whole
        window again on every read (64 cache look-ups for 16 MiB of 256 KiB chunks) took a
        tenth of a warm 1 MiB NFS READ's time on the event loop.
        """
        last = min(first_index + self._readahead_chunks, -(-reader.size // self.chunk_size))
        wanted = [cid for cid in map(reader.chunk_id_at, range(max(first_index, planned), last))
                  if cid != ZERO_CHUNK_ID and not self.cache.contains(cid)]
        batch = self._claim(wanted)
        for start in range(0, len(batch), READAHEAD_BATCH_CHUNKS):
            self._pool.submit(self._prefetch_batch, batch[start : start + READAHEAD_BATCH_CHUNKS])
        return last
