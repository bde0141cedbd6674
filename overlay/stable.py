"""Which stable writes need the journal, and the group commit that makes stable writes durable.

Why: a journal record copies the write's bytes, and a journal that fills up must be
flushed in place and started over. A rewrite of a block that is already durably in the
overlay changes nothing on disk but the block's bytes, so an fdatasync of the data file
alone makes it durable, and its bytes are written once. A write that allocates a block
still goes through the journal: making the allocation durable in place would cost the
data file's sync an ext4 journal commit, where the journal's preallocated blocks need none.

A block is *settled* when its map entry is durable in the map file, the durable map header
covers it, and no journal record that a replay would apply covers it. Only a stable write
whose blocks are all settled goes in place alone: a replay writes a record's bytes over the
data file, so a record still live for the block would undo the in-place write after a
crash, and a block whose entry is only in memory (allocated by an unstable write) would
read from the base again. A block stops being settled when a write allocates it or a
journal record covers it; it is settled again once a flush in place that saw it has
made its entry durable and let go of the records before it (`OverlayStorage._flush_locked`).

Group commit: every stable write gets a ticket, in the order the writes were done. One
sync makes every ticket handed out before it durable: an fdatasync of the data file if an
in-place write is among them, and of the journal if a journaled one is. The two sets of
writes cover disjoint blocks (a block with a live record is never written in place), so
the two syncs need no order between them.
"""

from __future__ import annotations

import threading
from typing import Callable


class StableWrites:
    """The settled state of one overlay's blocks and the tickets of its stable writes.

    The overlay's lock guards the block sets and `issue`; `sync_through` runs without it.
    """

    def __init__(self, durable_size: int) -> None:
        #: The disk size the map file's durable header holds; a write that ends past it
        #: would need a new header, so it is never done in place alone.
        self.durable_size = durable_size
        self._unsettled: set[int] = set()
        self._settling: set[int] = set()  # unsettled blocks a flush in progress will settle
        self._issued = 0  # the last ticket handed out
        self._last_in_place = 0  # the last ticket of a write made durable by the data file's sync
        self._last_journaled = 0  # ... and by the journal's
        self._durable = 0  # every ticket up to this one is durable
        #: One sync at a time (the writers behind it wait and reuse it); `close` takes it, so
        #: no sync runs on a descriptor that is closed and may name another file by now.
        self.lock = threading.Lock()

    def settled(self, first: int, last: int) -> bool:
        """Whether none of blocks first..last was unsettled (the caller checked they are in the overlay)."""
        if first == last:
            return first not in self._unsettled and first not in self._settling
        blocks = range(first, last + 1)
        return self._unsettled.isdisjoint(blocks) and self._settling.isdisjoint(blocks)

    def journal_due(self) -> bool:
        """Whether a journaled write awaits a sync: a settled write then joins the journal too,
        so the sync that covers both needs the journal's fdatasync alone."""
        return self._last_journaled > self._durable

    def unsettle(self, first: int, last: int) -> None:
        """Blocks first..last were allocated, or a journal record covers them."""
        self._unsettled.update(range(first, last + 1))

    def start_settling(self) -> int:
        """A flush took its snapshot: the blocks unsettled so far settle when it ends; the last ticket it covers."""
        self._settling |= self._unsettled
        self._unsettled = set()
        return self._issued

    def end_settling(self, done: bool) -> None:
        """The flush ended: its blocks are settled if it succeeded, else unsettled again."""
        if not done:
            self._unsettled |= self._settling
        self._settling = set()

    def issue(self, in_place: bool) -> int:
        """The ticket of a stable write just done (in place alone, or also in the journal)."""
        ticket = self._issued + 1
        if in_place:
            self._last_in_place = ticket
        else:
            self._last_journaled = ticket
        self._issued = ticket  # after the kind's mark: a sync that sees the ticket sees its kind too
        return ticket

    def sync_through(self, ticket: int, sync_data: Callable[[], None], sync_journal: Callable[[], None]) -> None:
        """Return once stable write `ticket` is durable, syncing unless a sync or flush covered it."""
        if self._durable >= ticket:
            return
        with self.lock:
            if self._durable >= ticket:
                return
            last = self._issued
            if self._last_in_place > self._durable:
                sync_data()
            if self._last_journaled > self._durable:
                sync_journal()
            self._durable = max(self._durable, last)

    def note_durable(self, last: int) -> None:
        """Stable writes up to ticket `last` were made durable in place (a flush): no sync is owed for them."""
        with self.lock:
            self._durable = max(self._durable, last)
