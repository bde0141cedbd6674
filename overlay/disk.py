"""A writable disk made of a read-only base image and a copy-on-write overlay.

Every write lands in the overlay's `data` file, block-wise; the base is only ever read.
A block that is not in the overlay reads from the base below the base limit and as
zeros above it (see `overlay.mapfile` for the files and the meaning of the limit). A
sub-block write to a block not yet in the overlay first fills the block from the
merged view (read-modify-write).

Stable writes (`write_durable`) also go to the journal, whose one fdatasync makes them
durable (`overlay.journal`), unless they rewrite blocks already durable in place
(`overlay.stable`); opening an overlay replays what a crash left there. The files and
their durability rules are `overlay.storage`.

Concurrency: reads of the base, which may decompress or go to the network, happen
outside the lock; they stay correct because base bytes never change and the base
limit only ever decreases. The `*_nowait` calls are for an event loop: they do only
what needs no waiting (a free lock, page-cache writes, bytes in memory) or decline.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator, Self, Sequence

from overlay.errors import OverlayError
from overlay.fileio import OsErrors, pwrite_all
from overlay.journal import Journal
from overlay.storage import BaseImage, OverlayStorage

#: VMFS caps a disk at 62 TB; the bound keeps a stray offset from sizing the in-memory
#: map (one byte per block) beyond what the machine has.
MAX_SIZE = 64 << 40

__all__ = ["BaseImage", "Overlay", "MAX_SIZE"]


class Overlay(OverlayStorage):
    """A session disk: reads merge overlay and base, writes go only to the overlay."""

    @classmethod
    def open(cls, directory: Path, base: BaseImage) -> Self:
        """Open an overlay as its last flush and its journal left it.

        Writes nothing to disk unless the journal holds stable writes that were not yet
        flushed in place (the process died): those are applied again, and flushed.
        """
        overlay = super().open(directory, base)
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
        merged view (`_write_filled`).
        """
        view = self._checked_write(offset, data)
        if view.nbytes:
            self._write_filled(offset, view, None)
        return view.nbytes

    def _write_filled(self, offset: int, view: memoryview, journal: Journal | None) -> int:
        """Write `view` at `offset`; with `journal`, as a stable write (`_write_stable_locked`)
        whose ticket it returns (0 without).

        The base part of a partly written block's fill is read without the lock and the
        lock is retaken to write, so writers to other blocks never wait on the base. A
        journal that has no room for a record the write needs is flushed in place and
        started over first.
        """
        fetched: dict[int, bytes] = {}
        while True:
            with self._lock:
                self._check_changeable()
                wanted = self._fills_wanted(offset, offset + view.nbytes, fetched)
                if not wanted:
                    if journal is None:
                        self._write_locked(offset, view, fetched)
                        return 0
                    ticket = self._write_stable_locked(offset, view, fetched, journal)
                    if ticket is not None:
                        return ticket
                limit = self._base_limit
            if not wanted:
                self._start_journal_over(view.nbytes)
            for block in wanted:
                start = block * self._block
                fetched[block] = self._read_base(start, min(self._block, limit - start))

    def _write_stable_locked(self, offset: int, view: memoryview, fetched: dict[int, bytes],
                             journal: Journal) -> int | None:
        """A stable write under the lock: its ticket for `_sync_stable`, or None (nothing done)
        when it needs a journal record and the journal is full.

        Into settled blocks it goes in place alone; else in place and as a journal record,
        and its blocks are unsettled until a flush in place (`overlay.stable`).
        """
        block, end = self._block, offset + view.nbytes
        first, last = offset // block, (end - 1) // block
        if (end <= self._size and end <= self._stable.durable_size and not self._stable.journal_due()
                and self._map.find(0, first, last + 1) == -1 and self._stable.settled(first, last)):
            self._write_locked(offset, view, fetched)
            return self._stable.issue(in_place=True)
        if not journal.fits(view.nbytes):
            return None
        self._write_locked(offset, view, fetched)
        journal.append(offset, view)
        self._stable.unsettle(first, last)
        return self._stable.issue(in_place=False)

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
        lock, to the journal (`overlay.journal`) unless every block they cover is settled
        (`overlay.stable`); one sync then covers every stable write done before it:
        concurrent stable writes share it (group commit).
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
        self._sync_stable(self._write_filled(offset, view, self._journal_of()))
        return view.nbytes

    def write_durable_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> int | None:
        """`write_durable`'s write, for an event loop: its ticket, or None if it cannot be done
        at once (see `write_nowait`; also before the journal exists, or when it is full).

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
            return self._write_stable_locked(offset, view, {}, journal)
        except OverlayError:
            return None
        finally:
            self._lock.release()

    def make_durable(self, ticket: int) -> None:
        """Return once the stable write `ticket` (from `write_durable_nowait`) is durable.

        A sync that keeps the caller waiting long (a slow disk) counts as a stall: after
        enough of them `write_durable_nowait` declines for a while, and stable writes wait
        in worker threads instead of on the caller's event loop. So it does after a sync
        that failed: the ordinary path meets the failure again and answers it as an error.
        """
        started = time.monotonic()
        try:
            self._sync_stable(ticket)
        except BaseException:
            self.stalls.back_off()  # the client resends; the ordinary path then reports the failure
            raise
        self.stalls.timed(started)

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
                self._mapstate.resize(-(-size // self._block))
                self._changed()
            self._flush_locked()
            with self._lock, OsErrors(self._where, "data truncate", size):
                os.ftruncate(self._data_fd, len(self._map) * self._block)
                self._allocated = None

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
        if self._mapstate.mark(first, last):
            self._allocated = None
            self._stable.unsettle(first, last)

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
        self._mapstate.resize(-(-size // block))
        self._size = size
