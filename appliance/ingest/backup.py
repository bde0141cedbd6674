"""Ingest: disk images in, one atomic restore point out.

The pipeline per disk: the calling thread reads chunk-size slots in disk order and
hands them to a worker pool that detects zeros, hashes (BLAKE3) and, for chunks the
store does not hold yet, compresses (zstd); both release the GIL. Results come back in
order and new chunks are appended to a pack being written.

Atomicity: packs are written under temporary names and sealed (fsync + rename) before
the single LMDB transaction that adds their chunks, the packs and the restore point.
A crash or an error before that commit leaves no trace in the index; sealed packs of
the failed ingest are deleted at once, or by the next GC if the process died.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import zstandard

from appliance.errors import SourceError, UsageError
from appliance.ingest.changed_areas import chunks_touched, load_changed_areas
from appliance.ingest.sources import open_source
from appliance.names import VM_NAME
from appliance.store import formats
from appliance.store.catalog import DiskInfo, RestorePoint, disk_name, new_point_id
from appliance.store.commits import commit_point
from appliance.store.index import ChunkLocation
from appliance.store.manifests import Manifest
from appliance.store.repository import Store
from appliance.store.writer import PackSink

ProgressCallback = Callable[[int, int], None]
#: Hears the bytes of each chunk slot read from a source (metrics: ingest throughput).
ReadCounter = Callable[[int], None]


class IngestSource(Protocol):
    """What ingest reads: a disk image file, or a session's merged disk."""

    path: str
    format: str
    size: int

    def read(self, offset: int, length: int) -> bytes: ...
    def is_unallocated(self, offset: int, length: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class _Processed:
    """A worker's verdict on one slot: its id, and the record when it must be stored."""

    index: int
    cid: bytes
    record: bytes | None


class _ChunkProcessor:
    """Zero check, hash and compress one slot; runs in worker threads."""

    def __init__(self, store: Store, chunk_size: int, pending: dict[bytes, ChunkLocation]) -> None:
        self._store = store
        self._zeros = bytes(chunk_size)
        self._pending = pending
        self._level = store.config.compression_level
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(
                level=self._level, write_content_size=True
            )
        return compressor

    def _known(self, cid: bytes) -> bool:
        if cid in self._pending:
            return True
        with self._store.env.begin() as txn:
            return self._store.index.lookup(txn, cid) is not None

    def __call__(self, index: int, data: bytes) -> _Processed:
        if data == self._zeros[: len(data)]:
            return _Processed(index, formats.ZERO_CHUNK_ID, None)
        cid = formats.chunk_id(data)
        if self._known(cid):
            return _Processed(index, cid, None)
        return _Processed(index, cid, formats.record_of(cid, data, self._compressor().compress))


def _ingest_disk(
    source: IngestSource,
    slots: list[int],
    chunk_map: bytearray,
    chunk_size: int,
    pool: ThreadPoolExecutor,
    depth: int,
    process: _ChunkProcessor,
    sink: PackSink,
    progress: Callable[[int, bool], None],
) -> None:
    """Read `slots` of `source`, filling `chunk_map` and storing new chunks in `sink`."""
    window: deque[Future[_Processed]] = deque()

    def drain_one() -> None:
        done = window.popleft().result()
        slot = done.index * formats.CHUNK_ID_SIZE
        chunk_map[slot : slot + formats.CHUNK_ID_SIZE] = done.cid
        if done.record is not None and done.cid not in sink.locations:
            raw_length = min(chunk_size, source.size - done.index * chunk_size)
            sink.add(done.cid, done.record, raw_length)

    for index in slots:
        offset = index * chunk_size
        length = min(chunk_size, source.size - offset)
        if source.is_unallocated(offset, length):
            chunk_map[index * formats.CHUNK_ID_SIZE : (index + 1) * formats.CHUNK_ID_SIZE] = formats.ZERO_CHUNK_ID
            progress(length, False)
        else:
            window.append(pool.submit(process, index, source.read(offset, length)))
            if len(window) >= depth:
                drain_one()
            progress(length, True)
    while window:
        drain_one()


def _slots_to_read(
    source: IngestSource,
    chunk_size: int,
    parent_map: bytes | None,
    parent_size: int,
    changed: list[tuple[int, int]] | None,
) -> tuple[bytearray, list[int]]:
    """The new disk's map pre-filled from the parent, and the slots that must be read."""
    count = -(-source.size // chunk_size)
    chunk_map = bytearray(count * formats.CHUNK_ID_SIZE)
    if parent_map is None or changed is None:
        return chunk_map, list(range(count))
    inherited = min(count, parent_size // chunk_size)  # whole chunks the parent has
    chunk_map[: inherited * formats.CHUNK_ID_SIZE] = parent_map[: inherited * formats.CHUNK_ID_SIZE]
    touched = chunks_touched(changed, chunk_size) | set(range(inherited, count))
    return chunk_map, sorted(touched)


def _read_config_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read VM config file {path}: {exc.strerror}") from None


def backup(
    store: Store,
    vm: str,
    disks: list[Path],
    config_files: dict[str, Path] | None = None,
    parent_ref: str | None = None,
    changed_areas: list[Path] | None = None,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    count_read: ReadCounter | None = None,
) -> RestorePoint:
    """Ingest disk image files as a new restore point of `vm`; returns it once committed.

    `config_files` maps a suffix (".vmx", ".nvram") to the file kept as `<vm><suffix>`.
    """
    VM_NAME.check(vm)
    if changed_areas is not None and len(changed_areas) != len(disks):
        raise UsageError(f"got {len(changed_areas)} --changed-areas files for {len(disks)} disks; give one per disk")
    files = {f"{vm}{suffix}": _read_config_file(path) for suffix, path in (config_files or {}).items()}
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(open_source(str(path))) for path in disks]
        changed = None
        if changed_areas is not None:
            changed = [load_changed_areas(path, source.size) for path, source in zip(changed_areas, sources)]
        return ingest(store, vm, sources, files, parent_ref, changed, progress, workers, count_read)


def ingest(
    store: Store,
    vm: str,
    sources: Sequence[IngestSource],
    files: dict[str, bytes],
    parent_ref: str | None = None,
    changed: list[list[tuple[int, int]]] | None = None,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    count_read: ReadCounter | None = None,
    origin: dict[str, Any] | None = None,
) -> RestorePoint:
    """Ingest open disk sources as a new restore point of `vm`.

    With `changed` (one list of (start, length) ranges per disk), only the chunks those
    ranges touch are read; the rest is inherited from the parent point. `count_read`
    hears every slot read from a source as it is read, so a serving process's metrics
    show ingest throughput while it runs (the point's `read_bytes` is the total).
    `origin` is kept with the point (see `RestorePoint.origin`), committed with it or not at all.
    """
    VM_NAME.check(vm)
    if not sources:
        raise UsageError("backup needs at least one disk image")
    if changed is not None and parent_ref is None:
        raise UsageError("changed areas need a parent restore point (--parent)")
    chunk_size = store.config.chunk_size
    started = time.monotonic()
    with store.writer_lock():
        parent = None
        plans = []
        with store.env.begin() as txn:
            if parent_ref is not None:
                parent = store.catalog.resolve(txn, vm, parent_ref)
            for number, source in enumerate(sources):
                parent_map, parent_size = None, 0
                if parent is not None and number < len(parent.disks):
                    parent_map = store.catalog.chunk_map(txn, parent, number)
                    parent_size = parent.disks[number].size
                disk_changes = changed[number] if changed is not None else None
                plans.append(_slots_to_read(source, chunk_size, parent_map, parent_size, disk_changes))
            if parent is not None:
                for name in parent.files:
                    files.setdefault(name, store.catalog.file(txn, parent, name))
        total = sum(len(slots) for _, slots in plans) * chunk_size
        scanned = read = 0

        def advance(length: int, was_read: bool) -> None:
            nonlocal scanned, read
            scanned += length
            if was_read:
                read += length
                if count_read is not None:
                    count_read(length)
            if progress is not None:
                progress(scanned, total)

        sink = PackSink(store)
        processor = _ChunkProcessor(store, chunk_size, sink.locations)
        try:
            workers = workers or os.cpu_count() or 2
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for source, (chunk_map, slots) in zip(sources, plans):
                    _ingest_disk(
                        source, slots, chunk_map, chunk_size, pool, 2 * (workers + 1), processor, sink, advance
                    )
            sink.seal()
            now = time.time()
            point = RestorePoint(
                id=new_point_id(now),
                vm=vm,
                created=now,
                parent=parent.id if parent else None,
                disks=tuple(
                    DiskInfo(disk_name(vm, n), s.size, s.format, len(m) // formats.CHUNK_ID_SIZE)
                    for n, (s, (m, _)) in enumerate(zip(sources, plans))
                ),
                files=tuple(sorted(files)),
                stats={
                    "scanned_bytes": float(scanned),  # slots visited, holes included
                    "read_bytes": float(read),  # bytes actually read from the source
                    "new_chunks": float(len(sink.locations)),
                    "new_stored_bytes": float(sum(p.size for p in sink.sealed)),
                    "seconds": round(time.monotonic() - started, 3),
                },
                origin=dict(origin or {}),
            )
            commit_point(store, Manifest(point, tuple(bytes(m) for m, _ in plans), files),
                         sink.sealed, sink.locations)
            return point
        except BaseException:
            sink.discard()
            raise
