"""Work on a VM that must never overlap: its backup, and the migration of its instant boot back to production.

A backup snapshots the production VM while a Storage vMotion moves an instant-booted
copy onto production storage; both at once would back up a VM whose identity and disks
are changing under the snapshot. Whoever starts first holds the VM; the other is refused
with TryAgain, naming what holds it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from appliance.errors import TryAgain


class VmActivities:
    def __init__(self) -> None:
        self._busy: dict[str, str] = {}
        self._lock = threading.Lock()

    def claim(self, vm: str, activity: str) -> None:
        """Hold `vm` for `activity` until `release`; TryAgain while something else holds it."""
        with self._lock:
            holder = self._busy.get(vm)
            if holder is not None:
                raise TryAgain(f"VM {vm!r} is busy: {holder}; try again when it ends")
            self._busy[vm] = activity

    def release(self, vm: str) -> None:
        with self._lock:
            self._busy.pop(vm, None)

    @contextlib.contextmanager
    def holding(self, vm: str, activity: str) -> Iterator[None]:
        self.claim(vm, activity)
        try:
            yield
        finally:
            self.release(vm)

    def holder(self, vm: str) -> str | None:
        with self._lock:
            return self._busy.get(vm)
