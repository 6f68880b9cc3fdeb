"""Which priors a prefetch rule takes: the candidates the peer found for the patient, most
recent first, each with its verdict (chosen, or why not: the triggering study itself, too old,
filtered by modality or body part, ``max_studies`` reached). Pure: the peer's series are asked
through a callback, only for the candidates that get that far."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..config.prefetch import PrefetchModel

CHOSEN = "chosen"


@dataclass
class Series:
    """One series of a candidate at the peer."""

    uid: str
    modality: str = ""
    body_part: str = ""
    count: int | None = None


@dataclass
class Candidate:
    """A study of the patient at the peer (its C-FIND or QIDO-RS answer)."""

    uid: str
    date: str = ""  # StudyDate, YYYYMMDD
    time: str = ""
    modalities: tuple[str, ...] = ()  # ModalitiesInStudy, when the peer gave it
    count: int | None = None  # NumberOfStudyRelatedInstances, when given
    accession: str = ""
    description: str = ""
    series: list[Series] | None = field(default=None, repr=False)  # asked when needed

    def describe(self) -> str:
        what = "/".join(self.modalities) or "?"
        date = f"{self.date[:4]}-{self.date[4:6]}-{self.date[6:8]}" if len(self.date) >= 8 \
            else "no date"
        desc = f" {self.description!r}" if self.description else ""
        count = f", {self.count} instance(s)" if self.count is not None else ""
        return f"{self.uid} ({date}, {what}{desc}{count})"


def cutoff(rule: PrefetchModel, now: float) -> str:
    """The oldest StudyDate ``max_age`` lets through ('' : no limit)."""
    if rule.max_age is None:
        return ""
    day = dt.date.fromtimestamp(now) - dt.timedelta(seconds=rule.max_age)
    return day.strftime("%Y%m%d")


def _recent(c: Candidate) -> tuple[str, str]:
    return (c.date or "", c.time or "")


def choose(rule: PrefetchModel, candidates: Sequence[Candidate], exclude_study: str,
           exclude_accession: str, oldest: str,
           series_of: Callable[[Candidate], list[Series]]) -> list[tuple[Candidate, str]]:
    """Every candidate, most recent first, with ``CHOSEN`` or why it is not."""
    out: list[tuple[Candidate, str]] = []
    chosen = 0
    for c in sorted(candidates, key=_recent, reverse=True):
        if exclude_study and c.uid == exclude_study:
            out.append((c, "skipped: the triggering study itself"))
            continue
        if exclude_accession and c.accession == exclude_accession:
            out.append((c, f"skipped: the ordered study itself (AccessionNumber "
                        f"{exclude_accession})"))
            continue
        if oldest and (not c.date or c.date < oldest):
            out.append((c, f"skipped: too old (StudyDate {c.date or 'none'} is before "
                        f"{oldest}, max_age)"))
            continue
        if chosen >= rule.max_studies:
            out.append((c, f"skipped: max_studies ({rule.max_studies}) more recent priors "
                        "already chosen"))
            continue
        why = _filtered(rule, c, series_of)
        if why:
            out.append((c, f"skipped: filtered ({why})"))
            continue
        chosen += 1
        out.append((c, CHOSEN))
    return out


def _filtered(rule: PrefetchModel, c: Candidate,
              series_of: Callable[[Candidate], list[Series]]) -> str:
    """Why the modality or body-part filter refuses the candidate ('' : it passes). The
    series are asked when the study-level answer cannot tell (no ModalitiesInStudy; body
    parts are series attributes)."""
    if rule.modalities:
        mods = set(c.modalities)
        if not mods:
            if c.series is None:
                c.series = series_of(c)
            mods = {s.modality.upper() for s in c.series if s.modality}
            c.modalities = tuple(sorted(mods))
        if not mods & set(rule.modalities):
            return (f"modalities {'/'.join(sorted(mods)) or 'none'}, not "
                    f"{'/'.join(rule.modalities)}")
    if rule.body_parts:
        if c.series is None:
            c.series = series_of(c)
        parts = {s.body_part.strip().upper() for s in c.series if s.body_part.strip()}
        if not parts & set(rule.body_parts):
            return (f"body part {'/'.join(sorted(parts)) or 'none'}, not "
                    f"{'/'.join(rule.body_parts)}")
    return ""


__all__ = ["CHOSEN", "Candidate", "Series", "choose", "cutoff"]
