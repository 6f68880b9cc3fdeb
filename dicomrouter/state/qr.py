"""Query/Retrieve over the instances table (SQLite, PostgreSQL): the query attributes are columns.

Each attribute of ``query.ATTRIBUTES`` that is not already a column is a generated column
``kw_<Keyword>`` computed from the instance's index tags when the row is written, and the ones
queries filter on most are indexed, so a C-FIND is an indexed SELECT … GROUP BY, not a scan of
JSON. Matching follows PS3.4 C.2.2.2: single value, wildcard (``*``/``?`` → GLOB), range
(dates and times, either end open), list of values; Person Names case-insensitively, with
Unicode case folding: SQLite's ``upper()`` knows ASCII letters only, so each of its connections
gets ``dicom_fold`` (Python's ``str.casefold``, in ``sqlite.py``); PostgreSQL's ``lower()``
folds by the database's LC_CTYPE (every letter in a UTF-8 locale). What differs by backend is a
``Dialect`` each backend names; this module knows no database driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..query import AGGREGATES, ATTRIBUTES, LEVELS, PERSON_NAMES, Match, Query

_REAL_COLUMNS = {"StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid",
                 "SOPInstanceUID": "sop_uid", "SOPClassUID": "sop_class"}
_GENERATED = [kw for kw in ATTRIBUTES if kw not in _REAL_COLUMNS and kw not in AGGREGATES
              and kw != "ModalitiesInStudy"]
_INDEXED = ("PatientID", "PatientName", "StudyDate", "AccessionNumber", "Modality")
_GROUP_BY = {"PATIENT": "i.kw_PatientID", "STUDY": "i.study_uid", "SERIES": "i.series_uid",
             "IMAGE": ""}


@dataclass(frozen=True)
class Dialect:
    """What a backend's SQL does differently in Q/R matching (each backend gives its own)."""

    fold: str  # the SQL function folding a Person Name's case
    like_wildcards: bool  # wildcards as LIKE (GLOB is SQLite's, and case-sensitive there)
    number: str  # a text column, ``{col}``, as an integer for ordering
    group_concat: str  # the distinct values of ``{col}`` joined by commas


SQLITE = Dialect("dicom_fold", False, "CAST({col} AS INTEGER)",
                 "GROUP_CONCAT(DISTINCT {col})")
POSTGRESQL = Dialect(
    "lower", True,  # lower(): folds by the database's LC_CTYPE; CAST fails on non-numbers
    "(CASE WHEN {col} ~ '^ *[-+]{{0,1}}[0-9]{{1,9}} *$' THEN CAST(trim({col}) AS INTEGER) END)",
    "string_agg(DISTINCT {col}, ',')")


def generated_columns() -> tuple[list[str], tuple[str, ...]]:
    """The query keywords kept as generated columns, and those indexed."""
    return list(_GENERATED), _INDEXED


def column(keyword: str) -> str:
    return f"i.{_REAL_COLUMNS.get(keyword) or 'kw_' + keyword}"


def _like(pattern: str) -> str:
    """A DICOM wildcard (``*``, ``?``) as a LIKE pattern with ``\\`` as its escape."""
    out = []
    for ch in pattern:
        out.append("%" if ch == "*" else "_" if ch == "?" else
                   "\\" + ch if ch in "%_\\" else ch)
    return "".join(out)


def _condition(m: Match, dialect: Dialect = SQLITE) -> tuple[str, list[Any]]:
    if m.keyword == "ModalitiesInStudy":
        inner = _condition(Match("Modality", m.kind, m.values), dialect)
        where = inner[0].replace("i.", "m.")
        return (f"i.study_uid IN (SELECT m.study_uid FROM instances m WHERE m.present=1"
                f" AND {where})", inner[1])
    col = column(m.keyword)
    value = "?"
    if m.keyword in PERSON_NAMES:
        col, value = f"{dialect.fold}({col})", f"{dialect.fold}(?)"
    if m.kind == "single":
        return f"{col} = {value}", [m.values[0]]
    if m.kind == "wildcard" and dialect.like_wildcards:
        return f"{col} LIKE {value} ESCAPE '\\'", [_like(m.values[0])]
    if m.kind == "wildcard":
        return f"{col} GLOB {value}", [m.values[0].replace("[", "[[]")]
    if m.kind == "list":
        return f"{col} IN ({', '.join([value] * len(m.values))})", list(m.values)
    low, high = m.values
    parts, args = [f"COALESCE({col}, '') != ''"], []
    if low:
        parts.append(f"{col} >= ?")
        args.append(low)
    if high:
        # a date range "-20241231" includes the whole day; TM "-1030" includes 10:30:59
        parts.append(f"{col} <= ?")
        args.append(high + ("~" if len(high) < 14 and m.keyword.endswith("Time") else ""))
    return " AND ".join(parts), args


def qr_select(query: Query, limit: int = 0, instances: bool = False,
              dialect: Dialect = SQLITE, offset: int = 0) -> tuple[str, list[Any]]:
    """The SELECT answering ``query``: rows keyed by keyword, or instance rows (retrieve).
    Aliases are quoted: PostgreSQL folds unquoted names to lower case. ``offset`` skips the
    first matches (QIDO-RS paging); the order ends on the unique key, so pages do not overlap."""
    where, args = ["i.present=1"], []
    number = dialect.number.format(col="i.kw_InstanceNumber")
    for m in query.matches:
        sql, more = _condition(m, dialect)
        where.append(f"({sql})")
        args.extend(more)
    tail = f" LIMIT {int(limit)}" if limit > 0 else ""
    if offset > 0:
        tail = (tail or f" LIMIT {2**62}") + f" OFFSET {int(offset)}"
    if instances:
        return (f"SELECT i.* FROM instances i WHERE {' AND '.join(where)}"
                f" ORDER BY i.study_uid, i.series_uid, {number}, i.received_at{tail}", args)
    rank = LEVELS.index(query.level)
    group = _GROUP_BY[query.level]
    fields = []
    for kw, level in ATTRIBUTES.items():
        if LEVELS.index(level) > rank or kw in AGGREGATES or kw == "ModalitiesInStudy":
            continue
        fields.append(f'MIN({column(kw)}) AS "{kw}"' if group else f'{column(kw)} AS "{kw}"')
    concat = dialect.group_concat.format(col="i.kw_Modality")
    if query.level == "PATIENT":
        fields += ['COUNT(DISTINCT i.study_uid) AS "NumberOfPatientRelatedStudies"',
                   'COUNT(DISTINCT i.series_uid) AS "NumberOfPatientRelatedSeries"',
                   'COUNT(*) AS "NumberOfPatientRelatedInstances"']
    elif query.level == "STUDY":
        fields += ['COUNT(DISTINCT i.series_uid) AS "NumberOfStudyRelatedSeries"',
                   'COUNT(*) AS "NumberOfStudyRelatedInstances"',
                   f'{concat} AS "ModalitiesInStudy"']
    elif query.level == "SERIES":
        fields += ['COUNT(*) AS "NumberOfSeriesRelatedInstances"']
    sql = f"SELECT {', '.join(fields)} FROM instances i WHERE {' AND '.join(where)}"
    if group:
        sql += f" GROUP BY {group} ORDER BY MIN(i.received_at), {group}"
    else:
        sql += f" ORDER BY i.study_uid, i.series_uid, {number}, i.sop_uid"
    return sql + tail, args
