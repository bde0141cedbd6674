"""An overlay's files, and how what is written to them becomes durable.

An overlay directory holds ``data`` (sparse: block i at offset i * block size), ``map``
(`overlay.mapfile`: one entry byte per block) and, once a stable write came,
``journal`` (`overlay.journal`). `OverlayStorage` opens, flushes and closes them; the
merged view of base and overlay, reads and writes, is `overlay.disk.Overlay` on top.

Durability: `flush` syncs `data` before it writes the map entries that point into it,
so a durable entry never points at data that is not. A process killed between flushes
leaves each block written since the last flush either as it was or as written, never
torn between the two: a block enters the overlay only by one whole-block write, and the
map that would make it visible is only written by the next flush. `flush(metadata=False)`
is what NFS calls DATA_SYNC: the bytes and what it takes to read them back (fdatasync);
with metadata (FILE_SYNC, COMMIT, fsync) the data file's modification time is made
durable too (fsync): it is the disk's mtime, so none is kept anywhere else. A flush also
lets go of the journal records it made durable in place, so a replay never undoes a
write that came after them.

Group commit: every change bumps a generation, and a flush records the generation it
covered. A flush that finds, once it holds the flush lock, that another flush already
covered its caller's writes returns at once. So concurrent syncs of one disk share
their fsyncs: while one flush runs, the callers behind it queue, and the next flush
covers all of them. Stable writes share their syncs the same way (`overlay.stable`).

Concurrency: one `threading.Lock` guards the state and every use of the file
descriptors, so a close can never leave another thread reading a reused descriptor.
A second lock serialises flushes so map writes reach the file in order; it is taken
before the first, never after.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

from overlay import mapfile
from overlay.errors import OverlayClosed, OverlayError
from overlay.fileio import OsErrors, fsync_dir, pwrite_all
from overlay.journal import JOURNAL_NAME, RECORDS_OFFSET, Journal
from overlay.mapfile import ENTRIES_OFFSET, MapHeader
from overlay.mapstate import MapChanges, MapState
from overlay.stable import StableWrites
from overlay.stalls import WriteStalls

DATA_NAME = "data"
MAP_NAME = "map"


class BaseImage(Protocol):
    """The read-only disk underneath; `read` is short only at the end of the image."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...


class OverlayStorage:
    """The files of one overlay, their state in memory, and flushes; `Overlay` reads and writes it."""

    def __init__(
        self, directory: Path, base: BaseImage, header: MapHeader, entries: bytearray,
        data_fd: int, map_fd: int,
    ) -> None:
        self._where = f"overlay {directory}"
        self._directory = directory
        self._base = base
        self._block = header.block_size
        self._size = header.size
        self._base_limit = header.base_limit
        self._mapstate = MapState(header, entries)
        self._map = entries  # the same bytearray: read on every read and write
        self._data_fd = data_fd
        self._map_fd = map_fd
        self._data_dirty = False
        #: Bumped by every change; `_synced` and `_synced_metadata` are the generations the last
        #: completed flushes covered (without and with the data file's metadata).
        self._generation = self._synced = self._synced_metadata = 0
        #: The disk's modification time: the data file's at open, then the last change's.
        self.modified_ns = os.fstat(data_fd).st_mtime_ns
        self._closed = False
        #: Set when `close` starts: from then on changes are refused, so none can land after
        #: its last flush and be acknowledged without ever being made durable.
        self._closing = False
        self._lock = threading.Lock()
        #: `allocated_bytes` as last measured; None once a write, truncate or flush may change it.
        self._allocated: int | None = None
        self._flush_lock = threading.Lock()  # taken before _lock, never after
        #: The stable-write journal, made at the first `write_durable`.
        self._journal: Journal | None = None
        #: Which stable writes may skip the journal, and their group commit.
        self._stable = StableWrites(header.size)
        #: `write_nowait` backs off for a while once its writes keep waiting on the disk.
        self.stalls = WriteStalls()

    @classmethod
    def create(cls, directory: Path, base: BaseImage, block_size: int = 64 * 1024) -> Self:
        """Start an empty overlay (the disk reads exactly as the base) in an empty directory.

        The map is written under a temporary name and renamed, so a directory that has
        a `map` always holds a complete overlay, even after a crash during create.
        """
        where = f"overlay {directory}"
        mapfile.check_block_size(block_size, where)
        with OsErrors(where, "create"):
            if any(directory.iterdir()):
                raise OverlayError(f"{where}: directory is not empty")
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            os.close(os.open(directory / DATA_NAME, flags, 0o600))
            temporary = directory / f"{MAP_NAME}.tmp"
            fd = os.open(temporary, flags, 0o600)
            try:
                pwrite_all(fd, MapHeader(block_size, base.size, base.size, 0).encode(), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, directory / MAP_NAME)
            fsync_dir(directory)
        return cls.open(directory, base)

    @classmethod
    def open(cls, directory: Path, base: BaseImage) -> Self:
        """Open an overlay's files as its last flush left them, and its journal if it has one."""
        where = f"overlay {directory}"
        fds: list[int] = []
        try:
            with OsErrors(where, "open"):
                fds.append(os.open(directory / MAP_NAME, os.O_RDWR | os.O_CLOEXEC))
                fds.append(os.open(directory / DATA_NAME, os.O_RDWR | os.O_CLOEXEC))
                raw = os.pread(fds[0], mapfile.HEADER_SIZE, 0)
            header = mapfile.decode_header(raw, where)
            if header.base_limit > base.size:
                raise OverlayError(
                    f"{where}: base image has {base.size} bytes but the overlay shows base "
                    f"bytes up to offset {header.base_limit}; it was made over another base"
                )
            with OsErrors(where, "map read", ENTRIES_OFFSET):
                entries = bytearray(os.pread(fds[0], header.blocks, ENTRIES_OFFSET))
            entries.extend(bytes(header.blocks - len(entries)))
            mapfile.check_entries(entries, where)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(directory, base, header, entries, fds[1], fds[0])

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._block

    @property
    def where(self) -> str:
        """How error messages name this overlay ("overlay <directory>")."""
        return self._where

    def _make_journal(self) -> None:
        with self._flush_lock:
            if self._journal is None:
                journal = Journal.create(self._directory, self._where)
                with self._lock:
                    self._journal, self._allocated = journal, None

    def _journal_of(self) -> Journal:
        """The journal, which a durable write has made before it asks for it."""
        journal = self._journal
        if journal is None:
            raise OverlayError(f"{self._where}: no journal was made for this write")
        return journal

    def _start_journal_over(self, length: int) -> None:
        """The journal is full: flush everything in place and start it over at the front.

        Both locks are held throughout, so no write or record slips in between the flush
        and the journal's new header.
        """
        with self._flush_lock, self._lock:
            self._check_changeable()
            journal = self._journal
            assert journal is not None
            if journal.fits(length):
                return  # another writer started it over meanwhile
            snapshot = self._snapshot()
            try:
                self._write_out(snapshot, metadata=True)
                journal.mark_durable(journal.next_ticket, RECORDS_OFFSET)
                journal.sync()
            except BaseException:
                self._restore(snapshot)
                raise
            self._settled(snapshot)

    def flush(self, metadata: bool = True) -> None:
        """Make every write so far survive a crash (see the module docstring for the order).

        Without `metadata`, the data file's modification time may stay behind (DATA_SYNC).
        Returns at once if a flush that ended meanwhile covered every change made before
        this call (group commit).
        """
        with self._lock:
            self._check_open()
            wanted = self._generation
        with self._flush_lock:
            if (self._synced_metadata if metadata else self._synced) >= wanted:
                return
            with self._lock:
                self._check_open()  # closed meanwhile: its descriptors may already name other files
            self._flush_locked(metadata)

    def allocated_bytes(self) -> int:
        """Bytes the overlay's files (data, map, journal) occupy on disk (allocated, not apparent, size).

        Every NFS reply about a session disk carries it, so it is measured again only
        after something that can change it (a write to a new block, a truncate, a
        flush), not on each call: a rewrite in place allocates nothing.
        """
        known = self._allocated
        if known is not None:
            return known
        with self._lock, OsErrors(self._where, "stat"):
            self._check_open()
            journal = 0 if self._journal is None else self._journal.allocated_bytes()
            self._allocated = journal + sum(os.fstat(fd).st_blocks * 512 for fd in (self._data_fd, self._map_fd))
            return self._allocated

    def discard(self) -> None:
        """Delete the overlay's files, throwing its writes away; the object is dead after.

        The map goes first: a directory without one is no overlay, whatever else remains.
        """
        with self._flush_lock:
            with self._lock:
                self._close_fds()
            with OsErrors(self._where, "discard"):
                for name in (MAP_NAME, DATA_NAME, JOURNAL_NAME):
                    (self._directory / name).unlink(missing_ok=True)

    def close(self) -> None:
        """Flush what is pending (data and metadata) and release the files; a clean overlay writes nothing."""
        with self._flush_lock:
            if self._closed:
                return
            with self._lock:
                self._closing = True
            try:
                self._flush_locked()
            finally:
                with self._lock:
                    self._close_fds()

    # -- internals: callers hold self._lock unless stated otherwise -----------------

    def _check_open(self) -> None:
        if self._closed:
            raise OverlayClosed(f"{self._where}: overlay is closed")

    def _check_changeable(self) -> None:
        if self._closing:
            raise OverlayClosed(f"{self._where}: overlay is closed")

    def _close_fds(self) -> None:
        if not self._closed:
            with self._stable.lock:  # not under a stable-write sync that is running
                self._closed = True
                os.close(self._data_fd)
                os.close(self._map_fd)
                if self._journal is not None:
                    self._journal.close()

    def _sync_stable(self, ticket: int) -> None:
        """Return once stable write `ticket` is durable (`overlay.stable`); a sync covers every write before it."""
        self._stable.sync_through(ticket, self._sync_data, self._journal_of().sync)

    def _sync_data(self) -> None:
        """fdatasync the data file for the stable writes done in place; the caller holds the stable-write lock."""
        self._check_open()  # closed meanwhile: its descriptor may already name another file
        with OsErrors(self._where, "data fdatasync"):
            os.fdatasync(self._data_fd)

    def _changed(self) -> None:
        self._generation += 1
        self.modified_ns = time.time_ns()

    def _flush_locked(self, metadata: bool = True) -> None:
        """Flush; the caller holds _flush_lock (not _lock).

        The state is snapshotted under the lock, and the syncs run without it so reads
        and writes go on meanwhile; anything written after the snapshot waits for the
        next flush. Journal records the flush made durable in place are let go of last,
        and only then are the blocks it saw settled (`overlay.stable`).
        """
        with self._lock:
            snapshot = self._snapshot()
        try:
            self._write_out(snapshot, metadata)
            self._let_go_of_records(snapshot)
        except BaseException:
            with self._lock:
                self._restore(snapshot)
            raise
        with self._lock:
            self._settled(snapshot)

    def _let_go_of_records(self, snapshot: _Snapshot) -> None:
        """The records up to the snapshot's are durable in place: a replay must not apply them again."""
        journal = self._journal
        if journal is None or snapshot.journal_last < journal.first_ticket:
            return
        with self._lock:  # the header is written before any later record: one fdatasync covers both
            if journal.next_ticket == snapshot.journal_last + 1:  # no record since: start over at the front
                journal.mark_durable(journal.next_ticket, RECORDS_OFFSET)
            else:
                journal.mark_durable(snapshot.journal_last + 1, snapshot.journal_head)
        journal.sync()

    def _settled(self, snapshot: _Snapshot) -> None:
        """A flush of `snapshot` ended well: its blocks are settled, its stable writes durable; the caller holds _lock."""
        self._stable.end_settling(True)
        self._stable.note_durable(snapshot.stable_last)

    def _snapshot(self) -> _Snapshot:
        """What a flush writes out; the caller holds _lock. Marks it all clean."""
        journal = self._journal
        snapshot = _Snapshot(self._generation, self._mapstate.take(self._block, self._size, self._base_limit),
                             self._data_dirty, 0 if journal is None else journal.head,
                             0 if journal is None else journal.next_ticket - 1, self._stable.start_settling())
        self._data_dirty = False
        return snapshot

    def _restore(self, snapshot: _Snapshot) -> None:
        """A flush failed: what it was to write is dirty again, its blocks unsettled; the caller holds _lock."""
        if snapshot.map is not None:
            self._mapstate.put_back(snapshot.map)
        self._data_dirty |= snapshot.data_dirty
        self._stable.end_settling(False)

    def _write_out(self, snapshot: _Snapshot, metadata: bool) -> None:
        """Make a snapshot durable in place: the data first, then the map that points into it."""
        if metadata and self._synced_metadata < snapshot.generation:
            with OsErrors(self._where, "data fsync"):
                os.fsync(self._data_fd)  # after a DATA_SYNC flush too: its mtime may still be pending
        elif snapshot.data_dirty:
            with OsErrors(self._where, "data fdatasync"):
                os.fdatasync(self._data_fd)
        if snapshot.map is not None:
            self._mapstate.write_out(self._map_fd, snapshot.map, self._where)
            self._allocated = None  # the map file may have grown
            self._stable.durable_size = snapshot.map.header.size
        self._synced = max(self._synced, snapshot.generation)
        if metadata:
            self._synced_metadata = max(self._synced_metadata, snapshot.generation)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The state a flush makes durable, taken at one moment under the overlay's lock."""

    generation: int
    map: MapChanges | None  # what changed in the map, if anything
    data_dirty: bool
    journal_head: int  # where the journal's next record was to go
    journal_last: int  # the last journal ticket issued (0: none)
    stable_last: int  # the last stable-write ticket issued (`overlay.stable`)
