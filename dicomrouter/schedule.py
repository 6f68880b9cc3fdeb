"""Delivery windows: ``deliver_between: "20:00-06:00"`` and ``days: [mon, ...]`` on a
destination, in the router's local time zone or ``timezone``.

A window may wrap midnight; ``days`` are the days a window *opens* on (so Friday's
20:00-06:00 window runs into Saturday morning). Outside its window a destination's jobs wait in
the queue (``status`` shows "scheduled until ..."); the clock is a parameter for tests.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .values import ConfigError, show

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Window:
    start: dt.time
    end: dt.time
    days: frozenset[int]  # 0 = Monday
    tz: str | None = None  # None: the router's local time zone

    def _local(self, ts: float) -> dt.datetime:
        zone = ZoneInfo(self.tz) if self.tz else None
        return dt.datetime.fromtimestamp(ts, zone) if zone else dt.datetime.fromtimestamp(ts)

    def _opening(self, day: dt.date, like: dt.datetime) -> dt.datetime:
        return dt.datetime.combine(day, self.start, like.tzinfo)

    def is_open(self, ts: float) -> bool:
        now = self._local(ts)
        t = now.time()
        wraps = self.end <= self.start
        if not wraps:
            return self.start <= t < self.end and now.weekday() in self.days
        if t >= self.start:
            return now.weekday() in self.days
        if t < self.end:  # the part after midnight belongs to yesterday's window
            return (now.weekday() - 1) % 7 in self.days
        return False

    def next_open(self, ts: float) -> float:
        """When the window is (or next becomes) open: ``ts`` itself if open now."""
        if self.is_open(ts):
            return ts
        now = self._local(ts)
        for ahead in range(0, 8):
            day = now.date() + dt.timedelta(days=ahead)
            if day.weekday() not in self.days:
                continue
            opening = self._opening(day, now)
            if opening > now:
                return opening.timestamp()
        return ts + 86400.0  # unreachable with at least one day

    def describe(self) -> str:
        days = "every day" if len(self.days) == 7 else \
            ", ".join(DAYS[d] for d in sorted(self.days))
        return (f"{self.start:%H:%M}-{self.end:%H:%M} {days}"
                + (f" ({self.tz})" if self.tz else " (local time)"))


def parse_window(between: str | None, days: list[str] | None, tz: str | None,
                 key: str = "") -> Window | None:
    """The Window of a destination's keys, or None when it has no ``deliver_between``."""
    if between is None:
        if days:
            raise ConfigError(f"{key}days" if key else "days", "needs deliver_between")
        return None
    m = _WINDOW.match(str(between))
    if not m or int(m.group(1)) > 23 or int(m.group(3)) > 23 or int(m.group(2)) > 59 \
            or int(m.group(4)) > 59:
        raise ConfigError("deliver_between", f"expected HH:MM-HH:MM (e.g. 20:00-06:00), got "
                          f"{show(between)}")
    start = dt.time(int(m.group(1)), int(m.group(2)))
    end = dt.time(int(m.group(3)), int(m.group(4)))
    if start == end:
        raise ConfigError("deliver_between", "start and end are the same time")
    wanted: set[int] = set(range(7))
    if days is not None:
        if not isinstance(days, list) or not days:
            raise ConfigError("days", f"expected a list of {', '.join(DAYS)}")
        wanted = set()
        for i, d in enumerate(days):
            name = str(d).strip().lower()[:3]
            if name not in DAYS:
                raise ConfigError(f"days[{i}]", f"{show(d)} is not one of {', '.join(DAYS)}")
            wanted.add(DAYS.index(name))
    if tz is not None:
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError("timezone", f"unknown time zone {show(tz)} (e.g. "
                              "Europe/Brussels, America/New_York, UTC)") from None
    return Window(start, end, frozenset(wanted), tz)
