"""The decompressed-chunk cache.

An interface so that a local SSD tier can sit behind RAM later (keeping the newest
restore point of a VM hydrated for boot storms). Keys are chunk IDs: a chunk shared by
many points or VMs is cached once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    hits: int
    misses: int
    entries: int
    bytes: int
    capacity: int


class ChunkCache(Protocol):
    def get(self, chunk_id: bytes) -> bytes | None: ...
    def peek(self, chunk_id: bytes) -> bytes | None:
        """`get` without counting a hit or a miss: a read from memory that may give up and
        ask again the ordinary way counts its chunks once, with `count_hits` or `get`."""
        ...
    def count_hits(self, count: int) -> None: ...
    def count_misses(self, count: int) -> None:
        """Chunks a read found missing and had loaded together, before asking for each (`ReadPath.load_together`)."""
        ...
    def put(self, chunk_id: bytes, data: bytes) -> None: ...
    def contains(self, chunk_id: bytes) -> bool: ...
    def statistics(self) -> CacheStatistics: ...


class MemoryChunkCache:
    """A thread-safe LRU bounded by the bytes it holds."""

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, chunk_id: bytes) -> bytes | None:
        with self._lock:
            data = self._entries.get(chunk_id)
            if data is None:
                self._misses += 1
                return None
            self._entries.move_to_end(chunk_id)
            self._hits += 1
            return data

    def peek(self, chunk_id: bytes) -> bytes | None:
        with self._lock:
            data = self._entries.get(chunk_id)
            if data is not None:
                self._entries.move_to_end(chunk_id)
            return data

    def count_hits(self, count: int) -> None:
        with self._lock:
            self._hits += count

    def count_misses(self, count: int) -> None:
        with self._lock:
            self._misses += count

    def contains(self, chunk_id: bytes) -> bool:
        """Presence without counting a hit or miss (read-ahead planning)."""
        with self._lock:
            return chunk_id in self._entries

    def put(self, chunk_id: bytes, data: bytes) -> None:
        if len(data) > self._capacity:
            return
        with self._lock:
            old = self._entries.pop(chunk_id, None)
            if old is not None:
                self._bytes -= len(old)
            self._entries[chunk_id] = data
            self._bytes += len(data)
            while self._bytes > self._capacity:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= len(evicted)

    def statistics(self) -> CacheStatistics:
        with self._lock:
            return CacheStatistics(self._hits, self._misses, len(self._entries), self._bytes, self._capacity)
