"""Windows of local time in which scheduled work may start (replication today; backups next)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Local hours in which scheduled jobs may start, e.g. 22:00-06:00 (crossing midnight)."""

    start: datetime.time
    end: datetime.time

    def holds(self, moment: datetime.time) -> bool:
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


def parse_window(text: str) -> Window:
    """`HH:MM-HH:MM`; ValueError names what is wrong."""
    try:
        first, second = text.split("-")
        window = Window(datetime.time.fromisoformat(first.strip()), datetime.time.fromisoformat(second.strip()))
    except ValueError:
        raise ValueError(f'"{text}" is not a window of local hours like "22:00-06:00"') from None
    if window.start == window.end:
        raise ValueError(f'"{text}" is an empty window: its start and end are the same')
    return window
