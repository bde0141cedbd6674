"""A snapshot's disk as an ingest source: ranged reads over several connections, ahead of ingest.

Ingest asks for one chunk at a time, in disk order. One HTTPS round trip per chunk
on one connection would leave the link idle most of the time, so this source knows
the areas ingest will ask for (the changed areas, or the allocated ones of a full
backup), turns them into requests of up to `RANGE_SIZE` on chunk boundaries (areas
within one chunk, or touching, become one request), and keeps `2 x streams` of them
in flight on `streams` connections. Areas outside the allocated ones are holes:
ingest records them as zero chunks without reading.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from appliance.vsphere.transfer import DatastoreFile, DiskTransport

#: Bytes per request: a few MiB, so each request is long enough to reach full speed.
RANGE_SIZE = 4 * 1024 * 1024


def chunk_ranges(areas: list[tuple[int, int]], size: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, end) requests covering `areas` widened to chunk boundaries, joined where they touch,
    split at `RANGE_SIZE` (rounded to whole chunks), clipped to the disk."""
    step = max(chunk_size, RANGE_SIZE // chunk_size * chunk_size)
    joined: list[list[int]] = []
    for offset, length in sorted(areas):
        start = offset // chunk_size * chunk_size
        end = min(size, -(-(offset + length) // chunk_size) * chunk_size)
        if start >= end:
            continue
        if joined and start <= joined[-1][1]:
            joined[-1][1] = max(joined[-1][1], end)
        else:
            joined.append([start, end])
    return [(start, min(start + step, end)) for start, end in joined for start in range(start, end, step)]


class SnapshotDiskSource:
    """Implements ingest's `IngestSource` for one disk file of a backup snapshot."""

    format = "vmdk-flat"

    def __init__(self, transport: DiskTransport, file: DatastoreFile, size: int, chunk_size: int,
                 wanted: list[tuple[int, int]], allocated: list[tuple[int, int]] | None, streams: int,
                 check_cancelled: Callable[[], None]) -> None:
        self.path = str(file)
        self.size = size
        self._transport, self._file = transport, file
        self._allocated = sorted(allocated) if allocated is not None else None
        self._allocated_starts = [start for start, _ in self._allocated or []]
        self._check_cancelled = check_cancelled
        self._pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="disk-read")
        self._planned = deque(chunk_ranges(wanted if allocated is None else _overlap(wanted, allocated),
                                           size, chunk_size))
        self._window: deque[tuple[int, int, Future[bytes]]] = deque()
        self._depth = 2 * streams
        self._lock = threading.Lock()  # the window (ingest's thread and close)
        self._counted = threading.Lock()  # bytes_read (the readers)
        self.bytes_read = 0

    def is_unallocated(self, offset: int, length: int) -> bool:
        if self._allocated is None:
            return False
        # The last area starting before `offset + length` is the only one that can reach into the range
        # (the areas are disjoint and sorted).
        index = bisect.bisect_left(self._allocated_starts, offset + length) - 1
        return index < 0 or sum(self._allocated[index]) <= offset

    def read(self, offset: int, length: int) -> bytes:
        self._check_cancelled()
        with self._lock:
            self._fill()
            while self._window and self._window[0][1] <= offset:
                self._window.popleft()[2].cancel()
                self._fill()
            if self._window and self._window[0][0] <= offset and offset + length <= self._window[0][1]:
                start, _, future = self._window[0]
                data = future.result()
                return data[offset - start: offset - start + length]
        return self._fetch(offset, offset + length)

    def close(self) -> None:
        with self._lock:
            for _, _, future in self._window:
                future.cancel()
            self._window.clear()
            self._planned.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> SnapshotDiskSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        while self._planned and len(self._window) < self._depth:
            start, end = self._planned.popleft()
            self._window.append((start, end, self._pool.submit(self._fetch, start, end)))

    def _fetch(self, start: int, end: int) -> bytes:
        data = self._transport.read_range(self._file, start, end - start)
        with self._counted:
            self.bytes_read += len(data)
        return data


def _overlap(wanted: list[tuple[int, int]], allocated: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `wanted` that are allocated (both sorted and disjoint): only those are ever read."""
    found = []
    first, second = sorted(wanted), sorted(allocated)
    i = j = 0
    while i < len(first) and j < len(second):
        low = max(first[i][0], second[j][0])
        high = min(sum(first[i]), sum(second[j]))
        if low < high:
            found.append((low, high - low))
        if sum(first[i]) <= sum(second[j]):
            i += 1
        else:
            j += 1
    return found
