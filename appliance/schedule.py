"""When scheduled work may start: windows of local hours (replication, backups) and cron lines (backups)."""

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


#: The five fields of a crontab line: (name, lowest, highest, names that stand for numbers).
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {name: number for number, name in enumerate(_MONTHS, 1)}),
    ("day of week", 0, 7, {name: number for number, name in enumerate(_DAYS)}),
)
#: The longest gap between two days a valid line matches: "29 feb" skips 2100 (8 years).
_SEARCH_DAYS = 366 * 9


@dataclass(frozen=True)
class Cron:
    """A crontab schedule ("m h dom mon dow"), matched against local minutes.

    Day of month and day of week follow cron's rule: when both are restricted (neither
    starts with "*") a day matching either one is a match, otherwise both must match.
    """

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 is Sunday; a 7 in the line is stored as 0
    days_restricted: bool
    weekdays_restricted: bool

    def holds(self, moment: datetime.datetime) -> bool:
        """Whether the minute `moment` falls in is one the line names."""
        return moment.minute in self.minutes and moment.hour in self.hours and self._day(moment.date())

    def next_after(self, moment: datetime.datetime) -> datetime.datetime:
        """The first minute strictly after `moment` that the line names (naive local time, like `moment`)."""
        start = moment.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
        day = start.date()
        for _ in range(_SEARCH_DAYS):
            if self._day(day):
                earliest = start.time() if day == start.date() else datetime.time(0, 0)
                found = self._first_time(earliest)
                if found is not None:
                    return datetime.datetime.combine(day, found, tzinfo=moment.tzinfo)
            day += datetime.timedelta(days=1)
        raise ValueError("this schedule names no minute in the next nine years")

    def _day(self, day: datetime.date) -> bool:
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return by_date or by_weekday
        return by_date and by_weekday

    def _first_time(self, earliest: datetime.time) -> datetime.time | None:
        for hour in sorted(h for h in self.hours if h >= earliest.hour):
            first_minute = earliest.minute if hour == earliest.hour else 0
            minute = min((m for m in self.minutes if m >= first_minute), default=None)
            if minute is not None:
                return datetime.time(hour, minute)
        return None


def parse_cron(text: str) -> Cron:
    """Five fields of `*`, numbers, names, ranges `a-b`, steps `/n` and lists `,`; ValueError says what is wrong."""
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f'"{text}" has {len(parts)} fields, not the 5 of "minute hour day-of-month month '
                         'day-of-week" (e.g. "30 2 * * *")')
    values = [_cron_field(part, *spec) for part, spec in zip(parts, _FIELDS)]
    weekdays = frozenset(day % 7 for day in values[4])
    minutes, hours, days, months = values[:4]
    cron = Cron(minutes, hours, days, months, weekdays, not parts[2].startswith("*"), not parts[4].startswith("*"))
    if not cron.weekdays_restricted and not any(
            day <= _longest_month(month) for month in cron.months for day in cron.days):
        raise ValueError(f'"{text}" names no day that exists (e.g. 31 in a month of 30 days)')
    return cron


def _longest_month(month: int) -> int:
    return 29 if month == 2 else 30 if month in (4, 6, 9, 11) else 31


def _cron_field(text: str, name: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    found: set[int] = set()
    for item in text.split(","):
        span, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f'{name}: "{item}" has a step that is not a positive number')
            step = int(step_text)
        if span == "*":
            first, last = low, high
        elif "-" in span:
            start_text, _, end_text = span.partition("-")
            first, last = _cron_value(start_text, name, low, high, names), _cron_value(end_text, name, low, high, names)
            if first > last:
                raise ValueError(f'{name}: "{item}" is a range that ends before it starts')
        else:
            first = _cron_value(span, name, low, high, names)
            last = high if slash else first  # "5/15" is cron's "5-59/15"
        found.update(range(first, last + 1, step))
    return frozenset(found)


def _cron_value(text: str, name: str, low: int, high: int, names: dict[str, int]) -> int:
    value = names.get(text.lower()) if names else None
    if value is None:
        if not text.isdigit():
            raise ValueError(f'{name}: "{text}" is not a number{" or a name" if names else ""}')
        value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name}: {value} is out of range {low}..{high}")
    return value
