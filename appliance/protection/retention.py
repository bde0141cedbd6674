"""Which restore points of a VM a retention rule keeps, counted the way borg and restic do.

Points are taken newest first. `keep_last` keeps the newest N. Then each of daily, weekly
(ISO weeks) and monthly, in that order, keeps the newest point of each of its N most
recent periods that have points at all: a week without backups does not use up one of
the N. As in borg, a point already kept by an earlier rule does not count again: its
period is passed over and the rule reaches one period further back. Periods are
calendar periods in local time, like the schedules.

This module only decides; `appliance.store.gc.prune` deletes (and never a held point).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from appliance.errors import UsageError

#: Each periodic rule's name and the period a point's local time falls in.
_PERIODS: tuple[tuple[str, Callable[[datetime.datetime], tuple[int, ...]]], ...] = (
    ("daily", lambda moment: (moment.year, moment.month, moment.day)),
    ("weekly", lambda moment: moment.isocalendar()[:2]),
    ("monthly", lambda moment: (moment.year, moment.month)),
)


class Dated(Protocol):
    """A restore point as retention sees it (`RestorePoint` is one)."""

    @property
    def id(self) -> str: ...

    @property
    def created(self) -> float: ...


Point = TypeVar("Point", bound=Dated)


@dataclass(frozen=True)
class Retention:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def __post_init__(self) -> None:
        counts = (self.keep_last, self.keep_daily, self.keep_weekly, self.keep_monthly)
        if min(counts) < 0:
            raise UsageError("a --keep-* count cannot be negative")
        if not any(counts):
            raise UsageError("keeps nothing: give --keep-last, --keep-daily, --keep-weekly or --keep-monthly "
                             "of at least 1")

    def periodic(self) -> dict[str, int]:
        return {"daily": self.keep_daily, "weekly": self.keep_weekly, "monthly": self.keep_monthly}


def kept(points: Sequence[Dated], rule: Retention) -> dict[str, str]:
    """The ids of the points `rule` keeps, each with the rule that keeps it ("last", "daily 2", ...)."""
    newest_first = sorted(points, key=lambda point: (point.created, point.id), reverse=True)
    reasons: dict[str, str] = {}
    for position, point in enumerate(newest_first[:rule.keep_last], 1):
        reasons[point.id] = f"last {position}"
    counts = rule.periodic()
    for name, period_of in _PERIODS:
        count, taken = counts[name], 0
        previous: tuple[int, ...] | None = None
        for point in newest_first:
            if taken == count:
                break
            period = period_of(datetime.datetime.fromtimestamp(point.created))
            if period == previous:
                continue
            previous = period
            if point.id not in reasons:
                taken += 1
                reasons[point.id] = f"{name} {taken}"
    return reasons


def dropped(points: Sequence[Point], rule: Retention) -> list[Point]:
    """The points `rule` does not keep, oldest first."""
    keep = kept(points, rule)
    return sorted((point for point in points if point.id not in keep), key=lambda point: (point.created, point.id))
