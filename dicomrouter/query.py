"""A C-FIND/C-MOVE/C-GET identifier as plain data (PS3.4 C.2.2 matching), with no SQL.

``parse`` turns the identifier a peer sent into a ``Query``: the level, one ``Match`` per key
with a value (single value, wildcard, range, list of values) and the keys to return (every key
of the identifier: universal matching is "return this"). ``state`` translates a Query into its
own language over indexed columns; ``scp/qr.py`` answers with ``response``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

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

        if self.kind == "single":
            return value == self.values[0]
        if self.kind == "list":
            return value in self.values
        if self.kind == "wildcard":
            return fnmatchcase(value, self.values[0].replace("[", "[[]"))
        low, high = self.values
        return bool(value) and (not low or value >= low) and (not high or value <= high)


@dataclass(frozen=True)
class Query:
    level: str
    matches: tuple[Match, ...]
    return_keys: tuple[str, ...]  # keywords to put in each response, in the peer's order
    charset: str = ""


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def match_for(keyword: str, vr: str, raw: str) -> Match | None:
    """The Match a key's value asks for (None: universal matching)."""
    raw = raw.strip() if vr != "PN" else raw.rstrip()
    if raw in ("", "*"):
        return None
    if "\\" in raw:
        return Match(keyword, "list", tuple(v.strip() for v in raw.split("\\")))
    if vr in _RANGE_VRS and "-" in raw:
        low, _, high = raw.partition("-")
        return Match(keyword, "range", (low.strip(), high.strip()))
    if vr not in _WILDCARD_VRS_EXCLUDED and ("*" in raw or "?" in raw):
        return Match(keyword, "wildcard", (raw,))
    return Match(keyword, "single", (raw,))


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
    for elem in identifier:
        kw = elem.keyword
        if not kw or kw in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        keys.append(kw)
        known = ATTRIBUTES.get(kw)
        if known is None or kw in AGGREGATES:
            continue  # returned empty, or counted
        if LEVELS.index(known) > rank and kw != "ModalitiesInStudy":
            continue  # a key below the level: the standard has no meaning for it; returned empty
        m = match_for(kw, elem.VR, _text(elem.value))
        if m is not None:
            if kw == "ModalitiesInStudy" and m.kind == "single":
                m = Match(kw, "list", m.values)
            matches.append(m)
    return Query(level, tuple(matches), tuple(keys),
                 _text(identifier.get("SpecificCharacterSet", "")))


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
