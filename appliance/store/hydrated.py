"""The hydrated tier: decompressed chunks on a local disk, behind the chunk cache in RAM.

A hit here costs one pread and one xxh3 pass over the chunk: no pack read, no zstd, no
S3 round trip. Keys are chunk IDs, so a chunk shared by many points or VMs is kept once.

Layout: two files in the tier's directory, whatever the number of chunks, because
hundreds of thousands of small files cost a directory walk at start, an inode and a
dentry each, and an open/close per hit:

- ``chunks.slab``: a sparse file of fixed slots of the store's chunk size; slot `i` is at
  ``i * chunk_size``. Fixed slots never fragment: eviction frees a slot, a fill takes one.
- ``chunks.index``: a header (magic, store ID, chunk size, slot count), then one
  64-byte record per slot: chunk ID, length, xxh3-64 of the bytes, and an xxh3 of the
  record itself. It is read whole at start, so a restart is warm at once: no re-hydration.

A fill writes the slot's bytes, then its record; nothing is fsynced, because a torn or
lost write is found by the checksums: a record whose own digest fails is an empty slot,
and a hit whose bytes do not match the record's digest is dropped and reported as a
miss, so the caller loads the chunk from the store again. Wrong bytes are never served.

Eviction keeps what the hydration policy pinned (`pin`) over what reads merely passed
through: fills from reads go to the least-recently-used end of the unpinned set, and a
slot is only ever taken from that set. A boot storm's hydrated points therefore survive a
one-off restore of an old point reading through the tier; when a new point is pinned, the
chunks only the previous point held become unpinned and go first.

Fills from reads are queued to one writer thread and dropped when the queue is full, so
a reader never waits on the tier's disk; the hydrator stores synchronously on its own thread.
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import xxhash

from appliance.errors import StoreError
from appliance.events import event

SLAB_NAME: Final = "chunks.slab"
INDEX_NAME: Final = "chunks.index"
_MAGIC: Final = b"IRHYDR01"
_HEADER: Final = struct.Struct("<8s36sII12x")  # magic, store id, chunk size, slots -> 64 bytes
_RECORD_FIELDS: Final = struct.Struct("<32sIQ12x")  # chunk id, length, xxh3-64 of the bytes -> 56 bytes
RECORD_SIZE: Final = _RECORD_FIELDS.size + 8  # + xxh3-64 of the fields
_EMPTY_RECORD: Final = bytes(RECORD_SIZE)
#: Fills from reads waiting for the writer thread; past this they are dropped, never waited for.
FILL_QUEUE_CHUNKS: Final = 64


@dataclass(frozen=True, slots=True)
class TierStatistics:
    hits: int
    misses: int
    entries: int
    bytes: int
    capacity: int
    pinned: int  # entries the hydration policy keeps
    dropped_corrupt: int  # entries whose bytes failed their checksum: dropped, loaded again from the store
    fills_skipped: int  # fills from reads not written: the queue was full or every slot is pinned


@dataclass(frozen=True, slots=True)
class _Entry:
    slot: int
    length: int
    digest: int


def _record(cid: bytes, length: int, digest: int) -> bytes:
    fields = _RECORD_FIELDS.pack(cid, length, digest)
    return fields + xxhash.xxh3_64_digest(fields)


class HydratedTier:
    """The tier over one directory; thread-safe. `close` stops the writer thread and closes the files."""

    def __init__(self, directory: Path, capacity_bytes: int, chunk_size: int, store_id: str) -> None:
        self.directory = directory
        self.chunk_size = chunk_size
        self._slots = max(1, capacity_bytes // chunk_size)
        self._store_id = store_id.encode()
        self._lock = threading.Lock()
        self._entries: dict[bytes, _Entry] = {}
        self._loose: OrderedDict[bytes, None] = OrderedDict()  # unpinned entries, least recently used first
        self._pinned: set[bytes] = set()  # what the policy wants kept, present or not
        self._free: list[int] = []
        self._bytes = 0
        self._hits = self._misses = self._corrupt = self._skipped = 0
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self._slab = os.open(directory / SLAB_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            self._index = os.open(directory / INDEX_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"hydrated tier {directory}: cannot open: {exc.strerror}") from None
        self._load_index()
        self._fills: queue.Queue[tuple[bytes, bytes] | None] = queue.Queue(FILL_QUEUE_CHUNKS)
        self._writer = threading.Thread(target=self._write_fills, name="hydrated-fill", daemon=True)
        self._writer.start()

    def close(self) -> None:
        self._fills.put(None)
        self._writer.join()
        os.close(self._slab)
        os.close(self._index)

    def __enter__(self) -> "HydratedTier":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- start ------------------------------------------------------------------------

    def _load_index(self) -> None:
        """Rebuild the in-memory index from the index file; start empty if it is another store's or chunk size."""
        header = os.pread(self._index, _HEADER.size, 0)
        expected = _HEADER.pack(_MAGIC, self._store_id, self.chunk_size, self._slots)
        records = b""
        if len(header) == _HEADER.size:
            magic, store_id, chunk_size, slots = _HEADER.unpack(header)
            if (magic, store_id.rstrip(b"\0"), chunk_size) == (_MAGIC, self._store_id, self.chunk_size):
                records = os.pread(self._index, min(slots, self._slots) * RECORD_SIZE, _HEADER.size)
            elif header.strip(b"\0"):
                event("hydrated.reset", logging.WARNING, directory=str(self.directory),
                      reason="made for another store or chunk size")
        if not records:
            os.ftruncate(self._index, 0)  # another store's records, or none: all slots empty
        os.pwrite(self._index, expected, 0)
        os.ftruncate(self._index, _HEADER.size + self._slots * RECORD_SIZE)  # drops records past a smaller limit
        os.ftruncate(self._slab, self._slots * self.chunk_size)
        self._rebuild(records)

    def _rebuild(self, records: bytes) -> None:
        used = set()
        view = memoryview(records)
        for slot in range(len(records) // RECORD_SIZE):
            record = view[slot * RECORD_SIZE : (slot + 1) * RECORD_SIZE]
            if record == _EMPTY_RECORD:
                continue
            fields = record[: _RECORD_FIELDS.size]
            cid, length, digest = _RECORD_FIELDS.unpack(fields)
            if (xxhash.xxh3_64_digest(fields) != record[_RECORD_FIELDS.size :] or not 0 < length <= self.chunk_size
                    or cid in self._entries):
                self._write_record(slot, _EMPTY_RECORD)
                continue
            self._entries[cid] = _Entry(slot, length, digest)
            self._loose[cid] = None
            self._bytes += length
            used.add(slot)
        self._free = [slot for slot in range(self._slots - 1, -1, -1) if slot not in used]

    # --- reads --------------------------------------------------------------------------

    def contains(self, cid: bytes) -> bool:
        with self._lock:
            return cid in self._entries

    def get(self, cid: bytes) -> bytes | None:
        """The chunk's bytes if the tier holds them and they match their checksum, else None (a miss)."""
        with self._lock:
            entry = self._entries.get(cid)
            if entry is None:
                self._misses += 1
                return None
            if cid in self._loose:
                self._loose.move_to_end(cid)
        data = os.pread(self._slab, entry.length, entry.slot * self.chunk_size)
        if len(data) == entry.length and xxhash.xxh3_64_intdigest(data) == entry.digest:
            with self._lock:
                self._hits += 1
            return data
        with self._lock:
            self._misses += 1
            if self._entries.get(cid) is not entry:
                return None  # evicted and its slot reused while we read: a plain miss
            self._corrupt += 1
            self._drop(cid, entry)
            self._write_record(entry.slot, _EMPTY_RECORD)  # under the lock: no fill has taken the slot yet
        event("hydrated.corrupt", logging.WARNING, chunk=cid.hex()[:16], slot=entry.slot,
              reason=f"{len(data)} bytes that do not match their checksum; loaded again from the store")
        return None

    # --- fills --------------------------------------------------------------------------

    def put(self, cid: bytes, data: bytes) -> None:
        """Queue a chunk a read loaded; never blocks (dropped when the writer is behind)."""
        if len(data) > self.chunk_size or self.contains(cid):
            return
        try:
            self._fills.put_nowait((cid, data))
        except queue.Full:
            with self._lock:
                self._skipped += 1

    def store(self, cid: bytes, data: bytes) -> bool:
        """Write a chunk now (the hydrator's thread); False when every slot holds a pinned chunk."""
        return self._fill(cid, data)

    def _write_fills(self) -> None:
        while (item := self._fills.get()) is not None:
            if not self._fill(*item):
                with self._lock:
                    self._skipped += 1

    def _fill(self, cid: bytes, data: bytes) -> bool:
        with self._lock:
            if cid in self._entries:
                return True
            slot = self._take_slot()
            if slot is None:
                return False
        digest = xxhash.xxh3_64_intdigest(data)
        try:
            os.pwrite(self._slab, data, slot * self.chunk_size)
            self._write_record(slot, _record(cid, len(data), digest))
        except OSError as exc:
            with self._lock:
                self._free.append(slot)
            event("hydrated.write_failed", logging.WARNING, directory=str(self.directory), reason=exc.strerror)
            return False
        with self._lock:
            self._entries[cid] = _Entry(slot, len(data), digest)
            self._bytes += len(data)
            if cid not in self._pinned:
                self._loose[cid] = None
        return True

    def _take_slot(self) -> int | None:
        """A free slot, or the least recently used unpinned entry's (under the lock)."""
        if self._free:
            return self._free.pop()
        if not self._loose:
            return None
        victim = next(iter(self._loose))
        entry = self._entries[victim]
        self._drop(victim, entry)
        return self._free.pop()

    def _drop(self, cid: bytes, entry: _Entry) -> None:
        """Forget an entry and free its slot (under the lock); its record is overwritten by the slot's next fill."""
        del self._entries[cid]
        self._loose.pop(cid, None)
        self._bytes -= entry.length
        self._free.append(entry.slot)

    def _write_record(self, slot: int, record: bytes) -> None:
        os.pwrite(self._index, record, _HEADER.size + slot * RECORD_SIZE)

    # --- the policy's pins ----------------------------------------------------------------

    def pin(self, wanted: set[bytes]) -> None:
        """Keep exactly these chunks (present now or stored later) over everything else."""
        with self._lock:
            for cid in self._pinned - wanted:
                if cid in self._entries:
                    self._loose[cid] = None
                    self._loose.move_to_end(cid, last=False)  # unpinned: the first to go
            for cid in wanted:
                self._loose.pop(cid, None)
            self._pinned = set(wanted)

    def statistics(self) -> TierStatistics:
        with self._lock:
            entries = len(self._entries)
            return TierStatistics(self._hits, self._misses, entries, self._bytes, self._slots * self.chunk_size,
                                  entries - len(self._loose), self._corrupt, self._skipped)
