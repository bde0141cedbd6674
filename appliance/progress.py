"""Progress lines for long operations: bytes, rate and ETA on a terminal, silence elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A callable (done, total) that redraws one status line at most 5 times a second."""

    INTERVAL = 0.2

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self._label = label
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self._enabled or now - self._last_draw < self.INTERVAL:
            return
        self._last_draw = now
        elapsed = max(now - self._started, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0
        percent = 100 * done / total if total else 100
        self._stream.write(
            f"\r{self._label}: {human_bytes(done)} / {human_bytes(total)} ({percent:.0f}%)  "
            f"{human_bytes(rate)}/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}   "
        )
        self._stream.flush()
        self._drawn = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
