"""A C-FIND/C-MOVE/C-GET identifier as plain data (PS3.4 C.2.2 matching), with no SQL.

``parse`` turns the identifier a peer sent into a ``Query``: the level, one ``Match`` per key
with a value (single value, wildcard, range, list of values) and the keys to return (every key
of the identifier: universal matching is "return this"). ``state`` translates a Query into its
own language over indexed columns; ``scp/qr.py`` answers with ``response``.

Values are checked against their VR before anything is matched: a date that is not a date, a
range with more than two ends, a UID with a wildcard would otherwise match nothing (or
everything) as if the query were well formed; they are refused with 0xA900. Person Names match
case-insensitively with Unicode case folding (``fold``), on values pydicom decoded with the
identifier's Specific Character Set (stored values were decoded with the instance's own).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .dicomfile import valid_uid

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

#: The attributes the router can match and return, by the level they belong to.
ATTRIBUTES: dict[str, str] = {
    "PatientID": "PATIENT", "PatientName": "PATIENT", "PatientBirthDate": "PATIENT",
    "PatientSex": "PATIENT", "NumberOfPatientRelatedStudies": "PATIENT",
    "NumberOfPatientRelatedSeries": "PATIENT", "NumberOfPatientRelatedInstances": "PATIENT",
    "StudyInstanceUID": "STUDY", "StudyDate": "STUDY", "StudyTime": "STUDY",
    "AccessionNumber": "STUDY", "StudyID": "STUDY", "StudyDescription": "STUDY",
    "ReferringPhysicianName": "STUDY", "ModalitiesInStudy": "STUDY",
    "NumberOfStudyRelatedSeries": "STUDY", "NumberOfStudyRelatedInstances": "STUDY",
    "SeriesInstanceUID": "SERIES", "Modality": "SERIES", "SeriesNumber": "SERIES",
    "SeriesDescription": "SERIES", "BodyPartExamined": "SERIES", "InstitutionName": "SERIES",
    "StationName": "SERIES", "Manufacturer": "SERIES", "NumberOfSeriesRelatedInstances": "SERIES",
    "SOPInstanceUID": "IMAGE", "SOPClassUID": "IMAGE", "InstanceNumber": "IMAGE",
}
#: Counted or collected over the level below: returned, never matched (PS3.4 C.3.4).
AGGREGATES = frozenset(k for k in ATTRIBUTES if k.startswith("NumberOf"))
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
               "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
_RANGE_VRS = {"DA", "TM", "DT"}
_WILDCARD_VRS_EXCLUDED = {"DA", "TM", "DT", "UI", "IS", "DS", "SL", "SS", "UL", "US"}
#: Matched case-insensitively (PS3.4 C.2.2.2.1: an SCP may; the router does, for every letter).
PERSON_NAMES = frozenset({"PatientName", "ReferringPhysicianName"})
#: Keys that are part of every identifier, not attributes to match or return.
_CONTROL_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})
_TIME = re.compile(r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?")
_INTEGER = re.compile(r"[+-]?\d{1,12}")


class QueryError(ValueError):
    """An identifier the router cannot answer; ``status`` is the DIMSE failure to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Match:
    """One matching key: ``kind`` single | wildcard | range | list; ``values`` per kind:
    (value,), (pattern,), (low, high) with "" for an open end, or the listed values."""

    keyword: str
    kind: str
    values: tuple[str, ...]

    def accepts(self, value: str) -> bool:
        """The same matching in Python (for rows the database cannot filter, and tests)."""
        from fnmatch import fnmatchcase

        values = self.values
        if self.keyword in PERSON_NAMES:
            value, values = fold(value), tuple(fold(v) for v in values)
        if self.kind == "single":
            return value == values[0]
        if self.kind == "list":
            return value in values
        if self.kind == "wildcard":
            return fnmatchcase(value, values[0].replace("[", "[[]"))
        low, high = self.values
        return bool(value) and (not low or value >= low) and (not high or value <= high)


@dataclass(frozen=True)
class Query:
    level: str
    matches: tuple[Match, ...]
    return_keys: tuple[str, ...]  # keywords to put in each response, in the peer's order
    charset: str = ""
    #: keys of the identifier the router neither matches nor returns a value for (0xFF01)
    unsupported: tuple[str, ...] = ()


def fold(value: str) -> str:
    """A Person Name for case-insensitive comparison: Unicode case folding (``Müller`` and
    ``MÜLLER``, ``Åsa`` and ``ÅSA`` compare equal; wildcards are not letters and stay)."""
    return value.casefold()


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _valid(vr: str, value: str) -> bool:
    """Whether one value (not a range, not a list) is well formed for its VR."""
    if vr == "DA":
        if len(value) != 8 or not value.isdigit():
            return False
        try:
            dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
        except ValueError:
            return False
        return True
    if vr == "TM":
        return _TIME.fullmatch(value) is not None
    if vr == "UI":
        return valid_uid(value)
    if vr == "IS":
        return _INTEGER.fullmatch(value) is not None
    return True


def match_for(keyword: str, vr: str, raw: str) -> Match | None:
    """The Match a key's value asks for (None: universal matching); QueryError (0xA900) for a
    value its VR does not allow (``notadate``, a range with three ends, a UID wildcard)."""
    raw = raw.strip() if vr != "PN" else raw.rstrip()
    if raw in ("", "*"):
        return None
    if "\\" in raw:
        m = Match(keyword, "list", tuple(v.strip() for v in raw.split("\\")))
        bad = [v for v in m.values if not _valid(vr, v)]
    elif vr in _RANGE_VRS and "-" in raw:
        low, _, high = (v.strip() for v in raw.partition("-"))
        m = Match(keyword, "range", (low, high))
        bad = [raw] if "-" in high or not (low or high) else \
            [v for v in (low, high) if v and not _valid(vr, v)]
        if not bad and low and high and len(low) == len(high) and low > high:
            bad = [raw]  # an empty range is a mistake, not a query
    elif vr not in _WILDCARD_VRS_EXCLUDED and ("*" in raw or "?" in raw):
        return Match(keyword, "wildcard", (raw,))
    else:
        m = Match(keyword, "single", (raw,))
        bad = [] if _valid(vr, raw) else [raw]
    if bad:
        raise QueryError(0xA900, f"{keyword} {bad[0][:64]!r} is not a valid {vr} "
                         f"{'range' if m.kind == 'range' else 'value'}")
    return m


def parse(identifier: Dataset, models_patient_root: bool = False) -> Query:
    """The Query of a request identifier; raises QueryError for what cannot be answered."""
    level = _text(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS:
        raise QueryError(0xA900, f"QueryRetrieveLevel {level!r} is not one of "
                         f"{', '.join(LEVELS)}")
    if level == "PATIENT" and not models_patient_root:
        raise QueryError(0xA900, "level PATIENT needs the Patient Root information model")
    rank = LEVELS.index(level)
    matches: list[Match] = []
    keys: list[str] = []
    unsupported: list[str] = []
    for elem in identifier:
        kw = elem.keyword
        if kw in _CONTROL_KEYS:
            continue
        known = ATTRIBUTES.get(kw)
        if known is None:
            # an optional key the router does not support (0xFF01): a public attribute is
            # returned empty; private, unknown, sequence and File Meta (group 0002, never part
            # of an identifier) elements are neither matched nor echoed
            unsupported.append(kw or str(elem.tag))
            if kw and elem.tag.group > 0x0002 and elem.VR != "SQ":
                keys.append(kw)
            continue
        keys.append(kw)
        if kw in AGGREGATES:
            continue  # counted
        m = match_for(kw, elem.VR, _text(elem.value))  # checked whatever its level
        if LEVELS.index(known) > rank and kw != "ModalitiesInStudy":
            continue  # a key below the level: the standard has no meaning for it; returned empty
        if m is not None:
            if kw == "ModalitiesInStudy" and m.kind == "single":
                m = Match(kw, "list", m.values)
            matches.append(m)
    return Query(level, tuple(matches), tuple(keys),
                 _text(identifier.get("SpecificCharacterSet", "")), tuple(unsupported))


def response(query: Query, row: Mapping[str, str]) -> Dataset:
    """One C-FIND response identifier: the level, the unique keys down to it, the return keys."""
    ds = Dataset()
    values: dict[str, str] = {}
    rank = LEVELS.index(query.level)
    for lvl in LEVELS[:rank + 1]:
        if lvl == "PATIENT" and query.level != "PATIENT" and "PatientID" not in query.return_keys:
            continue
        values[UNIQUE_KEYS[lvl]] = row.get(UNIQUE_KEYS[lvl], "")
    for kw in query.return_keys:
        values[kw] = row.get(kw, "") if kw in ATTRIBUTES else ""
    if any(not v.isascii() for v in values.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = query.level
    for kw, value in values.items():
        setattr(ds, kw, _value(value))
    return ds


def _value(value: str) -> str | list[str]:
    return value.split("\\") if "\\" in value else value


def describe(query: Query) -> str:
    """A short, log-safe account of a query (values are escaped by the log filter)."""
    parts = [f"{m.keyword}{'=' if m.kind != 'range' else ' in '}"
             f"{'-'.join(m.values) if m.kind == 'range' else chr(92).join(m.values)}"
             for m in query.matches]
    return f"{query.level} level, " + (", ".join(parts) if parts else "no filter")


def unknown_keys(keys: Iterable[str]) -> list[str]:
    return [k for k in keys if k not in ATTRIBUTES]
