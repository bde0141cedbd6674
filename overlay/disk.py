"""A writable disk made of a read-only base image and a copy-on-write overlay.

Every write lands in the overlay's `data` file, block-wise; the base is only ever read.
A block that is not in the overlay reads from the base below the base limit and as
zeros above it (see `overlay.mapfile` for the files and the meaning of the limit).

Durability: `flush` syncs `data` before it writes the map entries that point into it,
so a durable entry never points at data that is not. A process killed between flushes
leaves each block written since the last flush either as it was or as written, never
torn between the two: a block enters the overlay only by one whole-block write, and the
map that would make it visible is only written by the next flush. `flush(metadata=False)`
is what NFS calls DATA_SYNC: the bytes and what it takes to read them back (fdatasync);
with metadata (FILE_SYNC, COMMIT, fsync) the data file's modification time is made
durable too (fsync): it is the disk's mtime, so none is kept anywhere else.

Group commit: every change bumps a generation, and a flush records the generation it
covered. A flush that finds, once it holds the flush lock, that another flush already
covered its caller's writes returns at once. So concurrent stable writes to one disk
(a hypervisor keeps many in flight) share their fsyncs: while one flush runs, the
writers behind it queue, and the next flush covers all of them.

Concurrency: one `threading.Lock` guards the state and every use of the two file
descriptors, so a close can never leave another thread reading a reused descriptor.
Reads of the base, which may decompress or go to the network, happen outside it; they
stay correct because base bytes never change and the base limit only ever decreases.
A second lock serialises flushes so map writes reach the file in order.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from overlay import mapfile
from overlay.errors import OverlayClosed, OverlayError
from overlay.fileio import OsErrors, fsync_dir, page_runs, pwrite_all
from overlay.journal import JOURNAL_NAME, RECORDS_OFFSET, Journal
from overlay.mapfile import ENTRIES_OFFSET, MapHeader
from overlay.stalls import WriteStalls

DATA_NAME = "data"
MAP_NAME = "map"
#: VMFS caps a disk at 62 TB; the bound keeps a stray offset from sizing the in-memory
#: map (one byte per block) beyond what the machine has.
MAX_SIZE = 64 << 40
#: Entries per unit of dirty tracking: one page of the map file, so a flush after a
#: single-block write rewrites 4 KiB of map rather than all of it.
_MAP_PAGE = 4096


class BaseImage(Protocol):
    """The read-only disk underneath; `read` is short only at the end of the image."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...


class Overlay:
    """A session disk: reads merge overlay and base, writes go only to the overlay."""

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
        self._sequence = header.sequence
        self._map = entries
        self._data_fd = data_fd
        self._map_fd = map_fd
        #: Entries the durable header covers; entries past it may be stale on disk.
        self._durable_blocks = header.blocks
        self._dirty_pages: set[int] = set()
        self._header_dirty = False
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
        #: The stable-write journal, made at the first `write_durable`; `_durable_ticket` is
        #: its last record known durable (by its own sync, or by a flush in place).
        self._journal: Journal | None = None
        self._durable_ticket = 0
        self._journal_sync_lock = threading.Lock()  # one journal fdatasync at a time: the others wait for it
        #: `write_nowait` backs off for a while once its writes keep waiting on the disk.
        self.stalls = WriteStalls()

    @classmethod
    def create(cls, directory: Path, base: BaseImage, block_size: int = 64 * 1024) -> Overlay:
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
    def open(cls, directory: Path, base: BaseImage) -> Overlay:
        """Open an overlay as its last flush and its journal left it.

        Writes nothing to disk unless the journal holds stable writes that were not yet
        flushed in place (the process died): those are applied again, and flushed.
        """
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
        overlay = cls(directory, base, header, entries, fds[1], fds[0])
        try:
            overlay._replay_journal()
        except BaseException:
            overlay._close_fds()
            raise
        return overlay

    def _replay_journal(self) -> None:
        """Apply the stable writes the journal holds beyond the last flush in place, then flush."""
        found = Journal.open(self._directory, self._where)
        if found is None:
            return
        self._journal, writes = found
        for offset, data in writes:
            self.write(offset, data)
        if writes:
            self.flush()

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

    def read(self, offset: int, length: int) -> bytes:
        """The merged disk; short only at `size`.

        Consecutive blocks from the same side are read with one pread (or one base
        read), so a 1 MiB read costs a handful of calls whatever the block size.
        """
        self._check_range(offset, length)
        block = self._block
        with self._lock:
            self._check_open()
            end = min(offset + length, self._size)
            if end <= offset:
                return b""
            limit = self._base_limit
            parts: list[tuple[int, bytes]] = []
            from_base: list[tuple[int, int]] = []
            for first, stop, in_overlay in self._runs(offset // block, (end - 1) // block + 1):
                low, high = max(offset, first * block), min(end, stop * block)
                if in_overlay:
                    parts.append((low, self._pread(low, high - low)))
                elif low < limit:
                    from_base.append((low, min(high, limit)))
        parts.extend((low, self._read_base(low, high - low)) for low, high in from_base)
        if len(parts) == 1 and len(parts[0][1]) == end - offset:
            return parts[0][1]
        merged = bytearray(end - offset)  # what no part covers reads as zeros
        for low, chunk in parts:
            merged[low - offset : low - offset + len(chunk)] = chunk
        return bytes(merged)

    def read_nowait(self, offset: int, length: int,
                    cached_read: Callable[[int, int], Sequence[bytes | memoryview] | None]) -> bytearray | None:
        """`read`, for an event loop: the merged bytes when they are all in memory, else None.

        Overlay blocks are read with RWF_NOWAIT (only from the page cache) and base bytes
        with `cached_read` (the decompressed-chunk cache, in pieces); anything else, or a writer
        holding the lock, and the caller reads the ordinary way in a worker thread.
        """
        if length <= 0 or offset < 0 or not self._lock.acquire(blocking=False):
            return None
        try:
            end = min(offset + length, self._size)
            if self._closed or end <= offset:
                return None
            block, limit = self._block, self._base_limit
            merged = bytearray(end - offset)  # what no part covers reads as zeros
            for first, stop, in_overlay in self._runs(offset // block, (end - 1) // block + 1):
                low, high = max(offset, first * block), min(end, stop * block)
                view = memoryview(merged)[low - offset : high - offset]
                if in_overlay:
                    try:
                        if os.preadv(self._data_fd, [view], low, os.RWF_NOWAIT) != high - low:
                            return None
                    except OSError:  # EAGAIN: not in the page cache (or any error: the slow path reports it)
                        return None
                elif low < limit:
                    pieces = cached_read(low, min(high, limit) - low)
                    if pieces is None:
                        return None
                    at = 0
                    for piece in pieces:
                        view[at : at + len(piece)] = piece
                        at += len(piece)
            return merged
        finally:
            self._lock.release()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write `data` at `offset`, growing the disk if it ends past `size`.

        A partly written block that is not yet in the overlay is first filled from the
        merged view; the base part of that fill is read without the lock and the lock
        is retaken to write, so writers to other blocks never wait on the base.
        """
        view = self._checked_write(offset, data)
        if not view.nbytes:
            return 0
        fetched: dict[int, bytes] = {}
        while True:
            with self._lock:
                self._check_changeable()
                wanted = self._fills_wanted(offset, offset + view.nbytes, fetched)
                if not wanted:
                    self._write_locked(offset, view, fetched)
                    return view.nbytes
                limit = self._base_limit
            for block in wanted:
                start = block * self._block
                fetched[block] = self._read_base(start, min(self._block, limit - start))

    def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> int | None:
        """`write`, for an event loop: done on the caller's thread when it needs nothing but
        a pwrite into the page cache, else None.

        None when another thread holds the lock, when a partly written block would first
        need a fill from the base, and for a while after writes that stalled
        (`overlay.stalls`). Errors are left to `write`, which meets them again and reports them.
        """
        view = self._locked_for_nowait(offset, data)
        if view is None:
            return None
        try:
            started = time.monotonic()
            try:
                self._write_locked(offset, view, {})
            except OverlayError:
                return None
            self.stalls.timed(started)
            return view.nbytes
        finally:
            self._lock.release()

    def _locked_for_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> memoryview | None:
        """`data` as a view, with the lock taken, when a write on the caller's thread may go
        ahead (not backing off, a valid range, the lock free, not closing, no fill from the
        base); else None, without the lock."""
        if self.stalls.declining():
            return None
        try:
            view = self._checked_write(offset, data)
        except OverlayError:
            return None
        if not view.nbytes or not self._lock.acquire(blocking=False):
            return None
        if self._closing or self._fills_wanted(offset, offset + view.nbytes, {}):
            self._lock.release()
            return None
        return view

    def write_durable(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """`write`, returning only once the write survives a crash (a stable NFS WRITE).

        The bytes go to the overlay as `write` puts them and, in the same step under the
        lock, to the journal (`overlay.journal`), whose one fdatasync then covers every
        record written before it: concurrent stable writes share it (group commit).
        """
        view = self._checked_write(offset, data)
        if not view.nbytes:
            return 0
        if not Journal.can_hold(view.nbytes):
            written = self.write(offset, view)
            self.flush()
            return written
        if self._journal is None:
            self._make_journal()
        fetched: dict[int, bytes] = {}
        while True:
            with self._lock:
                self._check_changeable()
                journal = self._journal
                assert journal is not None
                wanted = self._fills_wanted(offset, offset + view.nbytes, fetched)
                fits = journal.fits(view.nbytes)
                if fits and not wanted:
                    self._write_locked(offset, view, fetched)
                    ticket = journal.append(offset, view)
                    break
                limit = self._base_limit
            if not fits:
                self._start_journal_over(view.nbytes)
            for block in wanted:
                start = block * self._block
                fetched[block] = self._read_base(start, min(self._block, limit - start))
        self._sync_journal(ticket)
        return view.nbytes

    def write_durable_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> int | None:
        """`write_durable`'s write, for an event loop: its journal ticket, or None if it cannot
        be done at once (see `write_nowait`; also before the journal exists, or when it is full).

        The write is not durable until `make_durable(ticket)` returns: the caller answers it
        after that, and may first do every other write it has at hand, so one sync covers all.
        """
        journal = self._journal
        if journal is None:
            return None
        view = self._locked_for_nowait(offset, data)
        if view is None:
            return None
        try:
            if not journal.fits(view.nbytes):
                return None
            try:
                self._write_locked(offset, view, {})
                return journal.append(offset, view)
            except OverlayError:
                return None
        finally:
            self._lock.release()

    def make_durable(self, ticket: int) -> None:
        """Return once the journal record `ticket` (from `write_durable_nowait`) is durable.

        A sync that keeps the caller waiting long (a slow disk) counts as a stall: after
        enough of them `write_durable_nowait` declines for a while, and stable writes wait
        in worker threads instead of on the caller's event loop. So it does after a sync
        that failed: the ordinary path meets the failure again and answers it as an error.
        """
        started = time.monotonic()
        try:
            self._sync_journal(ticket)
        except BaseException:
            self.stalls.back_off()  # the client resends; the ordinary path then reports the failure
            raise
        self.stalls.timed(started)

    def _make_journal(self) -> None:
        with self._flush_lock:
            if self._journal is None:
                journal = Journal.create(self._directory, self._where)
                with self._lock:
                    self._journal, self._allocated = journal, None

    def _sync_journal(self, ticket: int) -> None:
        """Return once the record with `ticket` is durable, syncing the journal if no one did."""
        if self._durable_ticket >= ticket:  # covered already (a flush or another sync): no lock needed
            return
        with self._journal_sync_lock:
            if self._durable_ticket >= ticket:
                return
            with self._lock:
                journal = self._journal
                assert journal is not None
                last = journal.next_ticket - 1  # every record up to it is in the page cache
            journal.sync()
            with self._lock:
                self._durable_ticket = max(self._durable_ticket, last)

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
            except BaseException:
                self._restore(snapshot)
                raise
            journal.mark_durable(journal.next_ticket, RECORDS_OFFSET)
            journal.sync()
            self._durable_ticket = journal.next_ticket - 1

    def truncate(self, size: int) -> None:
        """Shrink or grow the disk; whatever lies past the old end reads as zeros.

        A shrink is made durable at once: only after the shorter header is on disk may
        the blocks past the new end be freed, or a crash could show freed blocks as
        zeros inside the old size.
        """
        if not 0 <= size <= MAX_SIZE:
            raise OverlayError(f"{self._where}: cannot truncate to {size} bytes")
        with self._flush_lock:
            with self._lock:
                self._check_changeable()
                if size >= self._size:
                    if size > self._size:
                        self._grow(size)
                        self._changed()
                    return
                self._size = size
                self._base_limit = min(self._base_limit, size)
                del self._map[-(-size // self._block) :]
                self._header_dirty = True
                self._changed()
            self._flush_locked()
            with self._lock, OsErrors(self._where, "data truncate", size):
                os.ftruncate(self._data_fd, len(self._map) * self._block)
                self._allocated = None

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

    def changed_ranges(self) -> list[tuple[int, int]]:
        """Merged (start, length) ranges that may differ from the base, within `size`.

        Overlay blocks count whole (clipped at `size`); so does everything from the
        base limit on, since it reads as zeros whatever the base holds there.
        """
        block = self._block
        with self._lock:
            self._check_open()
            size, limit, entries = self._size, self._base_limit, self._map
            ranges: list[tuple[int, int]] = []
            first = entries.find(1)
            while first != -1 and first * block < limit:
                stop = entries.find(0, first)
                stop = len(entries) if stop == -1 else stop
                ranges.append((first * block, min(stop * block, size) - first * block))
                first = entries.find(1, stop)
        if limit < size:
            if ranges and sum(ranges[-1]) >= limit:
                ranges[-1] = (ranges[-1][0], size - ranges[-1][0])
            else:
                ranges.append((limit, size - limit))
        return ranges

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

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise OverlayError(f"{self._where}: invalid range at offset {offset}, length {length}")

    def _checked_write(self, offset: int, data: bytes | bytearray | memoryview) -> memoryview:
        """`data` as a byte view, once its range is one a write may cover (else OverlayError)."""
        view = memoryview(data).cast("B")
        self._check_range(offset, view.nbytes)
        if offset + view.nbytes > MAX_SIZE:
            raise OverlayError(
                f"{self._where}: write at offset {offset} ends past the {MAX_SIZE}-byte limit"
            )
        return view

    def _close_fds(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._data_fd)
            os.close(self._map_fd)
            if self._journal is not None:
                self._journal.close()

    def _runs(self, first: int, stop: int) -> Iterator[tuple[int, int, bool]]:
        """Split blocks [first, stop) into runs from the same side: (first, stop, in overlay)."""
        entries = self._map
        while first < stop:
            in_overlay = bool(entries[first])
            end = entries.find(0 if in_overlay else 1, first, stop)
            end = stop if end == -1 else end
            yield first, end, in_overlay
            first = end

    def _pread(self, offset: int, length: int) -> bytes:
        """Overlay bytes; blocks are written whole, so a short read means a damaged `data`."""
        with OsErrors(self._where, "data read", offset):
            data = os.pread(self._data_fd, length, offset)
        if len(data) != length:
            raise OverlayError(
                f"{self._where}: data file ends at offset {offset + len(data)}, inside an "
                f"overlay block the map names (read at offset {offset}, length {length})"
            )
        return data

    def _read_base(self, offset: int, length: int) -> bytes:
        """Base bytes below the base limit; called without the lock."""
        data = self._base.read(offset, length)
        if len(data) != length:
            raise OverlayError(
                f"{self._where}: base image returned {len(data)} of {length} bytes "
                f"at offset {offset}"
            )
        return data

    def _fills_wanted(self, offset: int, end: int, fetched: dict[int, bytes]) -> list[int]:
        """Partly written blocks whose read-modify-write needs base bytes not yet fetched."""
        block, entries = self._block, self._map
        if not offset % block and not end % block:
            return []  # whole blocks (most writes): nothing to fill
        edges = {offset // block} if offset % block else set()
        if end % block:
            edges.add(end // block)
        return [
            index for index in sorted(edges)
            if index < len(entries) and not entries[index]
            and index * block < self._base_limit and index not in fetched
        ]

    def _fill(self, index: int, fetched: dict[int, bytes]) -> bytes:
        """A block's merged content while it is not in the overlay.

        The base part was fetched under an earlier, possibly larger, base limit; cutting
        it at the current one is all a truncate in between requires.
        """
        start = index * self._block
        keep = max(0, min(self._block, self._base_limit - start))
        base = fetched[index][:keep] if keep else b""
        return base + bytes(self._block - len(base))

    def _write_locked(self, offset: int, view: memoryview, fetched: dict[int, bytes]) -> None:
        block = self._block
        end = offset + view.nbytes
        if end > self._size:
            self._grow(end)
        first, last = offset // block, (end - 1) // block
        head = offset - first * block if not self._map[first] else 0
        tail = -end % block if not self._map[last] else 0
        parts: list[bytes | memoryview] = [view]
        if head:
            parts.insert(0, self._fill(first, fetched)[:head])
        if tail:
            parts.append(self._fill(last, fetched)[block - tail :])
        with OsErrors(self._where, "data write", offset):
            pwrite_all(self._data_fd, view if len(parts) == 1 else b"".join(parts), offset - head)
        self._data_dirty = True
        self._changed()
        if self._map.find(0, first, last + 1) != -1:
            self._allocated = None
            self._map[first : last + 1] = b"\x01" * (last + 1 - first)
            self._dirty_pages.update(range(first // _MAP_PAGE, last // _MAP_PAGE + 1))

    def _changed(self) -> None:
        self._generation += 1
        self.modified_ns = time.time_ns()

    def _grow(self, size: int) -> None:
        """Extend the disk to `size`; the new range reads as zeros.

        An overlay block that straddles the old end may hold stale bytes past it (from
        before a shrink, or an unflushed write lost in a crash), so they are zeroed. New
        entries are marked dirty so they overwrite stale entries left on disk by a shrink.
        """
        block, old = self._block, self._size
        if old % block and self._map[old // block]:
            with OsErrors(self._where, "data write", old):
                pwrite_all(self._data_fd, bytes(block - old % block), old)
            self._data_dirty = True
        old_blocks, new_blocks = len(self._map), -(-size // block)
        if new_blocks > old_blocks:
            self._map.extend(bytes(new_blocks - old_blocks))
            pages = range(old_blocks // _MAP_PAGE, (new_blocks - 1) // _MAP_PAGE + 1)
            self._dirty_pages.update(pages)
        self._size = size
        self._header_dirty = True

    def _flush_locked(self, metadata: bool = True) -> None:
        """Flush; the caller holds _flush_lock (not _lock).

        The state is snapshotted under the lock, and the syncs run without it so reads
        and writes go on meanwhile; anything written after the snapshot waits for the
        next flush. Journal records the flush made durable in place are let go of last.
        """
        with self._lock:
            snapshot = self._snapshot()
        try:
            self._write_out(snapshot, metadata)
        except BaseException:
            with self._lock:
                self._restore(snapshot)
            raise
        journal = self._journal
        if journal is None or snapshot.journal_last < journal.first_ticket:
            return
        with self._lock:  # the header is written before any later record: one fdatasync covers both
            if journal.next_ticket == snapshot.journal_last + 1:  # no record since: start over at the front
                journal.mark_durable(journal.next_ticket, RECORDS_OFFSET)
            else:
                journal.mark_durable(snapshot.journal_last + 1, snapshot.journal_head)
        journal.sync()
        with self._lock:
            self._durable_ticket = max(self._durable_ticket, snapshot.journal_last)

    def _snapshot(self) -> _Snapshot:
        """What a flush writes out; the caller holds _lock. Marks it all clean."""
        pages = sorted(self._dirty_pages)
        spans = [(first * _MAP_PAGE, stop * _MAP_PAGE) for first, stop in page_runs(pages)]
        header = None
        if pages or self._header_dirty:
            header = MapHeader(self._block, self._size, self._base_limit, self._sequence + 1)
        journal = self._journal
        snapshot = _Snapshot(self._generation, pages, [(ENTRIES_OFFSET + low, bytes(self._map[low:high]))
                                                       for low, high in spans], header, self._data_dirty,
                             0 if journal is None else journal.head,
                             0 if journal is None else journal.next_ticket - 1)
        self._dirty_pages.clear()
        self._header_dirty = self._data_dirty = False
        return snapshot

    def _restore(self, snapshot: _Snapshot) -> None:
        """A write-out failed: what it was to write is dirty again; the caller holds _lock."""
        self._dirty_pages.update(snapshot.pages)
        self._header_dirty |= snapshot.header is not None
        self._data_dirty |= snapshot.data_dirty

    def _write_out(self, snapshot: _Snapshot, metadata: bool) -> None:
        """Make a snapshot durable in place: data first, then the map entries and header.

        If the map grew, its new entries are made durable before a header that covers
        them, so stale entries from an earlier shrink can never show. The map's own file
        times mean nothing, so it is only ever fdatasynced.
        """
        if metadata and self._synced_metadata < snapshot.generation:
            with OsErrors(self._where, "data fsync"):
                os.fsync(self._data_fd)  # after a DATA_SYNC flush too: its mtime may still be pending
        elif snapshot.data_dirty:
            with OsErrors(self._where, "data fdatasync"):
                os.fdatasync(self._data_fd)
        header = snapshot.header
        if header is not None:
            with OsErrors(self._where, "map write"):
                for offset, chunk in snapshot.chunks:
                    if chunk:
                        pwrite_all(self._map_fd, chunk, offset)
                if header.blocks > self._durable_blocks:
                    os.fdatasync(self._map_fd)
                pwrite_all(self._map_fd, header.encode(), 0)
                os.fdatasync(self._map_fd)
            self._sequence, self._durable_blocks = header.sequence, header.blocks
            self._allocated = None  # the map file may have grown
        self._synced = max(self._synced, snapshot.generation)
        if metadata:
            self._synced_metadata = max(self._synced_metadata, snapshot.generation)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The state a flush makes durable, taken at one moment under the overlay's lock."""

    generation: int
    pages: list[int]  # dirty map pages
    chunks: list[tuple[int, bytes]]  # (map file offset, entries) of those pages, in runs
    header: MapHeader | None  # the new map header, if anything in the map changed
    data_dirty: bool
    journal_head: int  # where the journal's next record was to go
    journal_last: int  # the last journal ticket issued (0: none)
