"""Query/Retrieve over the instances table (SQLite, PostgreSQL): the query attributes are columns.

Each attribute of ``query.ATTRIBUTES`` that is not already a column is a generated column
``kw_<Keyword>`` computed from the instance's index tags when the row is written, and the ones
queries filter on most are indexed, so a C-FIND is an indexed SELECT … GROUP BY, not a scan of
JSON. Matching follows PS3.4 C.2.2.2: single value, wildcard (``*``/``?`` → GLOB), range
(dates and times, either end open), list of values; Person Names case-insensitively, with
Unicode case folding: SQLite's ``upper()`` knows ASCII letters only, so each connection gets
``dicom_fold`` (Python's ``str.casefold``, ``register_functions``); PostgreSQL's ``lower()``
folds by the database's LC_CTYPE (every letter in a UTF-8 locale).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..query import AGGREGATES, ATTRIBUTES, LEVELS, PERSON_NAMES, Match, Query, fold

_REAL_COLUMNS = {"StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid",
                 "SOPInstanceUID": "sop_uid", "SOPClassUID": "sop_class"}
_GENERATED = [kw for kw in ATTRIBUTES if kw not in _REAL_COLUMNS and kw not in AGGREGATES
              and kw != "ModalitiesInStudy"]
_INDEXED = ("PatientID", "PatientName", "StudyDate", "AccessionNumber", "Modality")
_GROUP_BY = {"PATIENT": "i.kw_PatientID", "STUDY": "i.study_uid", "SERIES": "i.series_uid",
             "IMAGE": ""}


def generated_columns() -> tuple[list[str], tuple[str, ...]]:
    """The query keywords kept as generated columns, and those indexed."""
    return list(_GENERATED), _INDEXED


def qr_columns(db: sqlite3.Connection) -> None:
    """Add the generated query columns and their indexes (in the caller's transaction)."""
    have = {r[1] for r in db.execute("PRAGMA table_xinfo(instances)")}
    for kw in _GENERATED:
        if f"kw_{kw}" not in have:
            db.execute(f"ALTER TABLE instances ADD COLUMN kw_{kw} TEXT GENERATED ALWAYS AS"
                       f" (json_extract(tags, '$.{kw}')) VIRTUAL")
    for kw in _INDEXED:
        db.execute(f"CREATE INDEX IF NOT EXISTS instances_{kw} ON instances(kw_{kw})")


def _fold(value: object) -> object:
    return fold(value) if isinstance(value, str) else value


def register_functions(db: sqlite3.Connection) -> None:
    """The SQL functions the Q/R SELECTs call, on one SQLite connection."""
    db.create_function("dicom_fold", 1, _fold, deterministic=True)


def column(keyword: str) -> str:
    return f"i.{_REAL_COLUMNS.get(keyword) or 'kw_' + keyword}"


def _like(pattern: str) -> str:
    """A DICOM wildcard (``*``, ``?``) as a LIKE pattern with ``\\`` as its escape."""
    out = []
    for ch in pattern:
        out.append("%" if ch == "*" else "_" if ch == "?" else
                   "\\" + ch if ch in "%_\\" else ch)
    return "".join(out)


def _condition(m: Match, dialect: str = "sqlite") -> tuple[str, list[Any]]:
    if m.keyword == "ModalitiesInStudy":
        inner = _condition(Match("Modality", m.kind, m.values), dialect)
        where = inner[0].replace("i.", "m.")
        return (f"i.study_uid IN (SELECT m.study_uid FROM instances m WHERE m.present=1"
                f" AND {where})", inner[1])
    col = column(m.keyword)
    value = "?"
    if m.keyword in PERSON_NAMES:
        func = "lower" if dialect == "postgresql" else "dicom_fold"
        col, value = f"{func}({col})", f"{func}(?)"
    if m.kind == "single":
        return f"{col} = {value}", [m.values[0]]
    if m.kind == "wildcard" and dialect == "postgresql":  # LIKE is case-sensitive there
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


def _number(col: str, dialect: str) -> str:
    """``col`` (text) as an integer for ordering; PostgreSQL's CAST fails on non-numbers."""
    if dialect == "postgresql":
        return f"(CASE WHEN {col} ~ '^ *[-+]{{0,1}}[0-9]{{1,9}} *$' THEN CAST(trim({col}) AS" \
            " INTEGER) END)"
    return f"CAST({col} AS INTEGER)"


def qr_select(query: Query, limit: int = 0, instances: bool = False,
              dialect: str = "sqlite") -> tuple[str, list[Any]]:
    """The SELECT answering ``query``: rows keyed by keyword, or instance rows (retrieve).
    Aliases are quoted: PostgreSQL folds unquoted names to lower case."""
    where, args = ["i.present=1"], []
    number = _number("i.kw_InstanceNumber", dialect)
    for m in query.matches:
        sql, more = _condition(m, dialect)
        where.append(f"({sql})")
        args.extend(more)
    tail = f" LIMIT {int(limit)}" if limit > 0 else ""
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
    concat = "string_agg(DISTINCT i.kw_Modality, ',')" if dialect == "postgresql" else \
        "GROUP_CONCAT(DISTINCT i.kw_Modality)"
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
        sql += f" GROUP BY {group} ORDER BY MIN(i.received_at)"
    else:
        sql += f" ORDER BY i.study_uid, i.series_uid, {number}"
    return sql + tail, args
