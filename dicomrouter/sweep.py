"""The sweep: re-evaluate the studies the spool holds against the current routing table and
route what now matches and has not gone there yet (``sweep: {at: "02:00"}`` or
``sweep: {every: 1h}``).

A routing table changed after studies arrived (a new AI node, a fixed rule) reaches them at the
next sweep instead of only new studies; destinations a study already has a job for are left
alone (delivered studies are not sent twice). Only studies still in the spool can be swept
(``keep_after_delivery`` or ``retention``).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from .values import ConfigError, parse_duration, show

_AT = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class SweepPlan:
    at: dt.time | None = None  # daily, local time
    every: float = 0.0  # seconds

    def next_after(self, ts: float) -> float:
        """The first sweep time strictly after ``ts``."""
        if self.every:
            return ts + self.every
        assert self.at is not None
        now = dt.datetime.fromtimestamp(ts)
        candidate = dt.datetime.combine(now.date(), self.at)
        if candidate.timestamp() <= ts:
            candidate += dt.timedelta(days=1)
        return candidate.timestamp()

    def describe(self) -> str:
        return f"every {self.every:g} s" if self.every else f"daily at {self.at:%H:%M}"


def parse(raw: object, key: str = "sweep") -> SweepPlan | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in ("at", "every"):
        raise ConfigError(key, 'expected {at: "HH:MM"} or {every: <duration>}')
    (kind, value), = raw.items()
    at = f"{key}.{kind}" if key else kind
    if kind == "every":
        seconds = parse_duration(value, at)
        if seconds < 1:
            raise ConfigError(at, "at least 1s")
        return SweepPlan(every=seconds)
    m = _AT.match(str(value))
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ConfigError(at, f"expected HH:MM, got {show(value)}")
    return SweepPlan(at=dt.time(int(m.group(1)), int(m.group(2))))
