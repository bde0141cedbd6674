"""Noticing a disk that makes page-cache writes wait, so an event loop stops writing to it for a while.

Buffered writes cannot be asked not to block (ext4 refuses RWF_NOWAIT for them), so
`Overlay.write_nowait` times each write it does on the caller's event loop and tells
`WriteStalls`; once slow writes add up, it declines for a while and the writes go to
worker threads, where waiting costs the loop nothing.
"""

from __future__ import annotations

import time

#: A write into the page cache takes microseconds; one that took this long (seconds) waited
#: on the disk (dirty-page throttling, a journal commit, first allocation of new blocks) or
#: on taking the GIL back after the syscall.
STALL_SECONDS = 0.004
#: How much time (seconds) such stalls may take within STALL_WINDOW_SECONDS before
#: `write_nowait` declines. A lone stall is common on a fresh session disk and costs the
#: loop little; stalls that keep coming mean the disk is throttling writes.
STALL_BUDGET_SECONDS = 0.1
STALL_WINDOW_SECONDS = 1.0
#: How long `write_nowait` then declines, so writes wait in worker threads rather than on
#: the caller's event loop while the disk catches up.
STALL_BACKOFF_SECONDS = 1.0


class WriteStalls:
    """Counts slow writes in a window; `declining` says when the caller should stop writing inline.

    `seconds` and `budget` are the thresholds in force (tests set them to 0).
    """

    def __init__(self) -> None:
        self.seconds = STALL_SECONDS
        self.budget = STALL_BUDGET_SECONDS
        self._stalled = 0.0  # seconds stalled in the current window
        self._window_ends = 0.0
        self._resumes = 0.0  # time.monotonic() before which `declining` is True

    def declining(self) -> bool:
        return time.monotonic() < self._resumes

    def timed(self, started: float) -> None:
        """A write that began at `started` (time.monotonic()) has just ended."""
        now = time.monotonic()
        if now - started < self.seconds:
            return
        if now >= self._window_ends:
            self._stalled, self._window_ends = 0.0, now + STALL_WINDOW_SECONDS
        self._stalled += now - started
        if self._stalled >= self.budget:
            self._resumes = now + STALL_BACKOFF_SECONDS

    def back_off(self) -> None:
        """Decline from now on, for a while, whatever the window holds (a write or sync failed)."""
        self._resumes = time.monotonic() + STALL_BACKOFF_SECONDS
