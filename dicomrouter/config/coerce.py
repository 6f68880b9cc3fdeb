"""``coerce:`` on a route or a destination: reconciliation of patient and order attributes
before delivery, from lookup sources tried in order (a Modality Worklist, a table, the latest
HL7 order). The models and the table parser; what runs is ``dicomrouter/coerce.py`` (the plan
per job and the transform) and ``dicomrouter/lookups.py`` (the sources).

A table is a CSV file (columns ``from.<Keyword>`` and ``to.<Keyword>``, one header line) or
inline ``rows: [{from: {...}, to: {...}}]``; every row of one table matches on the same
keywords, and two rows with the same ``from`` values are refused (a table never guesses).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import PrivateAttr, model_validator
from pydicom.datadict import dictionary_VR, tag_for_keyword

from ..schema import AETitle, Choice, Duration, ReadableFile, Strict, parsed, readable
from .base import ConfigError, show

#: what ``coerce`` may change unless ``attributes`` says otherwise
DEFAULT_ATTRIBUTES = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                      "PatientSex", "AccessionNumber", "RequestedProcedureID")
#: how a worklist entry is found: by the instance's AccessionNumber, or by its PatientID and
#: StudyDate (= ScheduledProcedureStepStartDate)
MATCHES = ("accession", "patient_date")


def keyword_value(value: Any, key: str) -> str:
    """A top-level DICOM keyword that coerce may write: not a UID (the ledger and the
    references hang on them), not a sequence, not the file meta information or pixel data."""
    if not isinstance(value, str) or tag_for_keyword(value) is None:
        raise ConfigError(key, f"{show(value)} is not a DICOM keyword")
    tag = int(tag_for_keyword(value))  # type: ignore[arg-type]
    vr = dictionary_VR(tag)
    if vr in ("UI", "SQ") or tag >> 16 <= 0x0002 or tag >= 0x7FE00000:
        raise ConfigError(key, f"{value} cannot be coerced (UIDs, sequences, the file meta "
                          "information and the pixel data are not targets)")
    return value


def attributes_value(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "expected a list of DICOM keywords")
    return tuple(dict.fromkeys(keyword_value(v, f"[{i}]") for i, v in enumerate(value)))


def match_value(value: Any, key: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(key, f"expected a list of {', '.join(MATCHES)}")
    for i, item in enumerate(items):
        if item not in MATCHES:
            raise ConfigError(f"[{i}]" if isinstance(value, list) else "",
                              f"one of {', '.join(MATCHES)}; got {show(item)}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class Row:
    """One row of a table: the values it matches on and the values it gives."""

    match: tuple[tuple[str, str], ...]
    values: tuple[tuple[str, str], ...]


def _check_rows(rows: list[Row], where: str, names: list[str]) -> tuple[Row, ...]:
    """Every row matches on the same keywords; no two rows on the same values."""
    seen: dict[tuple[tuple[str, str], ...], str] = {}
    first = {k for k, _ in rows[0].match} if rows else set()
    for row, name in zip(rows, names, strict=True):
        if {k for k, _ in row.match} != first:
            raise ConfigError(f"{where}{name}.from", "every row of a table matches on the "
                              f"same keywords ({', '.join(sorted(first))})")
        if row.match in seen:
            raise ConfigError(f"{where}{name}.from", f"the same values as {seen[row.match]} "
                              "(a table gives one answer per key: remove one of them)")
        seen[row.match] = name.strip(".") or name
    return tuple(rows)


def _pairs(raw: Any, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(key, "expected a mapping of DICOM keywords to values")
    out = []
    for kw, v in raw.items():
        if isinstance(v, bool) or v is None or isinstance(v, dict | list):
            raise ConfigError(f"{key}.{kw}", f"expected a text value, got {show(v)}")
        out.append((keyword_value(kw, f"{key}.{kw}"), str(v).strip()))
    return tuple(sorted(out))


def rows_value(value: Any, key: str) -> tuple[Row, ...]:
    """Inline rows: ``[{from: {PatientID: A1, IssuerOfPatientID: SITE_A}, to: {...}}]``."""
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "expected a list of {from: {...}, to: {...}}")
    rows = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"from", "to"}:
            raise ConfigError(f"[{i}]", "expected {from: {Keyword: value}, to: {Keyword: "
                              "value}}")
        rows.append(Row(_pairs(item["from"], f"[{i}].from"), _pairs(item["to"], f"[{i}].to")))
    return _check_rows(rows, "", [f"[{i}]" for i in range(len(rows))])


def read_table(path: str) -> tuple[Row, ...]:
    """A CSV table (UTF-8, a header line of ``from.<Keyword>`` / ``to.<Keyword>`` columns);
    ConfigError names the line that is wrong."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None
    if not lines:
        raise ConfigError("", f"{path} is empty (it needs a header line of from.<Keyword> "
                          "and to.<Keyword> columns)")
    header = [h.strip() for h in lines[0]]
    columns = []
    for h in header:
        side, _, kw = h.partition(".")
        if side not in ("from", "to") or not kw:
            raise ConfigError("", f"{path} line 1: column {show(h)} is not from.<Keyword> or "
                              "to.<Keyword>")
        columns.append((side, keyword_value(kw, f"{path} line 1")))
    if not any(s == "from" for s, _ in columns) or not any(s == "to" for s, _ in columns):
        raise ConfigError("", f"{path} line 1: needs at least one from. and one to. column")
    rows, names = [], []
    for n, line in enumerate(lines[1:], start=2):
        if not any(c.strip() for c in line):
            continue
        if len(line) != len(columns):
            raise ConfigError("", f"{path} line {n}: {len(line)} values for {len(columns)} "
                              "columns")
        rows.append(Row(
            tuple(sorted((kw, v.strip()) for (s, kw), v in zip(columns, line, strict=True)
                         if s == "from")),
            tuple(sorted((kw, v.strip()) for (s, kw), v in zip(columns, line, strict=True)
                         if s == "to"))))
        names.append(f"{path} line {n}")
    try:
        return _check_rows(rows, "", names)
    except ConfigError as exc:  # the file's line, not a YAML key
        raise ConfigError("", f"{exc.key.removesuffix('.from')}: {exc.problem}") from None


class WorklistLookup(Strict):
    """``worklist: {ae: WORKLIST}``: a Modality Worklist C-FIND at a ``known_aes`` entry."""

    ae: AETitle
    match: Annotated[tuple[str, ...], parsed(match_value)] = ("accession",)
    timeout: Duration = 10.0  # association set-up and between two responses


class TableLookup(Strict):
    """``table: {file: ids.csv}`` or ``table: {rows: [...]}``."""

    file: ReadableFile | None = None
    rows: Annotated[tuple[Row, ...], parsed(rows_value)] = ()

    _rows: tuple[Row, ...] = PrivateAttr(())

    @model_validator(mode="after")
    def _one(self) -> TableLookup:
        if bool(self.file) == bool(self.rows):
            raise ConfigError("file", "give file (a CSV) or rows, one of them")
        if self.file:
            readable(self.file, "file")
            try:
                self._rows = read_table(self.file)
            except ConfigError as exc:
                raise ConfigError("file", exc.problem) from None
        else:
            self._rows = self.rows
        return self

    @property
    def loaded(self) -> tuple[Row, ...]:
        """The rows as the configuration was loaded (a file is read again when it changes)."""
        return self._rows

    def keywords(self) -> tuple[set[str], set[str]]:
        """The keywords the table matches on, and those it gives."""
        rows = self._rows
        return ({k for r in rows for k, _ in r.match}, {k for r in rows for k, _ in r.values})


class Hl7Lookup(Strict):
    """``hl7: {}``: the latest HL7 order (or ADT) the router received for the accession number
    or the patient (the ``hl7:`` listener stores them)."""


class LookupModel(Strict):
    """One entry of ``coerce.sources``: exactly one of worklist, table, hl7."""

    worklist: WorklistLookup | None = None
    table: TableLookup | None = None
    hl7: Hl7Lookup | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if data == "hl7":  # ``- hl7``: it has no options
            return {"hl7": {}}
        if isinstance(data, dict) and "hl7" in data and data["hl7"] is None:
            return {**data, "hl7": {}}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> LookupModel:
        given = [k for k in ("worklist", "table", "hl7") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("", "one lookup per entry: worklist, table or hl7")
        return self

    @property
    def kind(self) -> str:
        return "worklist" if self.worklist else "table" if self.table else "hl7"

    def describe(self) -> str:
        if self.worklist:
            return f"worklist {self.worklist.ae} (by {' or '.join(self.worklist.match)})"
        if self.table:
            return f"table {self.table.file}" if self.table.file else \
                f"table ({len(self.table.rows)} row(s))"
        return "hl7 (latest order)"


class CoerceModel(Strict):
    """``coerce:`` on a route or a destination."""

    sources: tuple[LookupModel, ...]
    # fill: only attributes that are missing or empty; overwrite: correct every one that
    # differs from the lookup
    mode: Choice("fill", "overwrite") = "fill"
    attributes: Annotated[tuple[str, ...], parsed(attributes_value)] = DEFAULT_ATTRIBUTES
    # a source that cannot be asked: hold (the job waits and is retried), send (unchanged),
    # fail (dead-lettered at once)
    on_unavailable: Choice("hold", "send", "fail") = "hold"

    @model_validator(mode="before")
    @classmethod
    def _sources_required(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("sources"):
            raise ConfigError("sources", "required: the lookups to try, in order (worklist, "
                              "table, hl7)")
        return data

    @model_validator(mode="after")
    def _tables_give_attributes(self) -> CoerceModel:
        for i, src in enumerate(self.sources):
            if src.table is None:
                continue
            extra = sorted(src.table.keywords()[1] - set(self.attributes))
            if extra:
                raise ConfigError(f"sources[{i}].table", f"gives {', '.join(extra)}, which is "
                                  "not in attributes (add it there, or drop the column)")
        return self

    def describe(self) -> str:
        return (f"coerce ({self.mode}; {', '.join(self.attributes)}) from "
                f"{'; then '.join(s.describe() for s in self.sources)}; "
                f"source unavailable: {self.on_unavailable}")


def check_known_aes(cfg: Any) -> Any:
    """Every worklist lookup names a ``known_aes`` entry (its address), and nothing coerces
    what a ``move`` destination sends (the source PACS sends it, not the router); returns
    ``cfg``."""
    known = set(cfg.known_aes)
    moves = {n for n, d in cfg.destinations.items() if d.type == "move"}
    for where, to, model in [(f"routes[{i}].coerce", r.to, r.coerce) for i, r in
                             enumerate(cfg.routes)] + [(f"destinations.{n}.coerce", (n,),
                                                        d.coerce)
                                                       for n, d in cfg.destinations.items()]:
        if model is not None and moves.intersection(to):
            raise ConfigError(where, f"{sorted(moves.intersection(to))[0]} is a move "
                              "destination: the source PACS sends the study, the router "
                              "has no copy to correct")
    for where, model in [(f"routes[{i}].coerce", r.coerce) for i, r in enumerate(cfg.routes)] \
            + [(f"destinations.{n}.coerce", d.coerce) for n, d in cfg.destinations.items()]:
        for i, src in enumerate(model.sources if model is not None else ()):
            if src.worklist and src.worklist.ae not in known:
                raise ConfigError(f"{where}.sources[{i}].worklist.ae", f"{src.worklist.ae} is "
                                  f"not in known_aes (known: {', '.join(sorted(known)) or 'none'})"
                                  "; the worklist SCP's address is given there")
    return cfg
