"""The overlay's map in memory, what of it is not yet on disk, and how it gets there.

One entry byte per block (`overlay.mapfile`), and which pages of entries and whether the
header changed since the last write-out. A flush takes the changes (`take`) under the
overlay's lock, writes them (`write_out`) without it, and gives them back (`put_back`)
if the write failed, so the next flush tries again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from overlay.fileio import OsErrors, page_runs, pwrite_all
from overlay.mapfile import ENTRIES_OFFSET, MapHeader

#: Entries per unit of dirty tracking: one page of the map file, so a flush after a
#: single-block write rewrites 4 KiB of map rather than all of it.
MAP_PAGE = 4096


@dataclass(frozen=True, slots=True)
class MapChanges:
    """What a flush writes to the map file, taken at one moment."""

    pages: list[int]  # dirty entry pages
    runs: list[tuple[int, bytes]]  # (map file offset, entries) of those pages, in runs
    header: MapHeader


class MapState:
    """The entries of one overlay and their durable state; the overlay's lock guards it."""

    def __init__(self, header: MapHeader, entries: bytearray) -> None:
        self.entries = entries
        self._sequence = header.sequence
        #: Entries the durable header covers; entries past it may be stale on disk.
        self._durable_blocks = header.blocks
        self._dirty_pages: set[int] = set()
        self._header_dirty = False

    def mark(self, first: int, last: int) -> bool:
        """Blocks first..last are in the overlay now; True if any of them was not."""
        if self.entries.find(0, first, last + 1) == -1:
            return False
        self.entries[first : last + 1] = b"\x01" * (last + 1 - first)
        self._dirty_pages.update(range(first // MAP_PAGE, last // MAP_PAGE + 1))
        return True

    def resize(self, blocks: int) -> None:
        """`blocks` entries from now on: new ones read from the base (or as zeros), cut ones are gone.

        New entries are marked dirty so they overwrite stale entries a shrink left on disk.
        """
        old = len(self.entries)
        if blocks > old:
            self.entries.extend(bytes(blocks - old))
            self._dirty_pages.update(range(old // MAP_PAGE, (blocks - 1) // MAP_PAGE + 1))
        else:
            del self.entries[blocks:]
        self._header_dirty = True

    def take(self, block_size: int, size: int, base_limit: int) -> MapChanges | None:
        """The changes to write out, now marked clean; None if there are none."""
        if not self._dirty_pages and not self._header_dirty:
            return None
        pages = sorted(self._dirty_pages)
        runs = [(ENTRIES_OFFSET + first * MAP_PAGE, bytes(self.entries[first * MAP_PAGE : stop * MAP_PAGE]))
                for first, stop in page_runs(pages)]
        self._dirty_pages.clear()
        self._header_dirty = False
        return MapChanges(pages, runs, MapHeader(block_size, size, base_limit, self._sequence + 1))

    def put_back(self, changes: MapChanges) -> None:
        """A write-out failed: its changes are dirty again."""
        self._dirty_pages.update(changes.pages)
        self._header_dirty = True

    def write_out(self, fd: int, changes: MapChanges, where: str) -> None:
        """Entries first, then the header that covers them, each made durable (fdatasync: the
        map file's own times mean nothing). If the map grew, its new entries are durable
        before a header that covers them, so stale entries from an earlier shrink never show."""
        header = changes.header
        with OsErrors(where, "map write"):
            for offset, run in changes.runs:
                if run:
                    pwrite_all(fd, run, offset)
            if header.blocks > self._durable_blocks:
                os.fdatasync(fd)
            pwrite_all(fd, header.encode(), 0)
            os.fdatasync(fd)
        self._sequence, self._durable_blocks = header.sequence, header.blocks
