"""The lookup sources of ``coerce:`` (config/coerce.py): a Modality Worklist C-FIND, a table
(a CSV file read again when it changes, or inline rows) and the latest HL7 order the router
stored. Each answers for one instance's identifying values: the attributes it knows (keyword →
value, empty values left out), several disagreeing answers, or nothing; ``Unavailable`` when
it cannot be asked at all (the caller's ``on_unavailable`` decides what then).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from . import qrscu
from .config import Config
from .config.coerce import LookupModel, Row, TableLookup, WorklistLookup, read_table
from .dicomfile import text
from .values import ConfigError

log = logging.getLogger("dicomrouter.coerce")

#: what an instance is matched by (besides a table's own ``from`` keywords)
KEY_KEYWORDS = ("AccessionNumber", "PatientID", "IssuerOfPatientID", "StudyDate")


class Unavailable(Exception):
    """The source could not be asked (down, refused, timed out, unreadable): the reason."""


@dataclass(frozen=True)
class Answer:
    """What one source said: ``values`` (one entry, or several that agree), or ``several``
    entries that disagree (nothing is taken from them); ``how`` says what was asked."""

    how: str
    values: dict[str, str]
    several: int = 0


def _values(ds: Any, attributes: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for kw in attributes:
        value = text(ds.get(kw)) if isinstance(ds, Dataset) else str(ds.get(kw) or "").strip()
        if value:
            out[kw] = value
    return out


def _one(how: str, candidates: list[dict[str, str]]) -> Answer | None:
    """No candidate: None; candidates that all give the same values: that answer (a worklist
    lists one requested procedure once per scheduled step); otherwise several."""
    distinct = {tuple(sorted(c.items())) for c in candidates}
    if not distinct:
        return None
    if len(distinct) > 1:
        return Answer(how, {}, several=len(distinct))
    return Answer(how, candidates[0])


class Table:
    """A table's rows; a file is read again when its modification time, size or inode
    changes (a file that no longer parses keeps the previous rows, with one log line)."""

    def __init__(self, model: TableLookup) -> None:
        self.path = model.file
        self.rows = model.loaded
        self._lock = threading.Lock()
        self._stamp = self._stat() if self.path else None
        self._bad: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path or "")
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> tuple[Row, ...]:
        if not self.path:
            return self.rows
        with self._lock:
            stamp = self._stat()
            if stamp is None:
                raise Unavailable(f"table {self.path}: cannot read it")
            if stamp != self._stamp and stamp != self._bad:
                try:
                    self.rows = read_table(self.path)
                    self._stamp, self._bad = stamp, None
                    log.info("coerce: table %s read again: %d row(s)", self.path,
                             len(self.rows))
                except ConfigError as exc:
                    self._bad = stamp
                    log.error("coerce: table %s changed but is not valid, the previous "
                              "version stays in use: %s", self.path, exc.problem)
            return self.rows

    def ask(self, current: dict[str, str], attributes: tuple[str, ...]) -> Answer | None:
        rows = self.current()
        name = f"table {self.path}" if self.path else "table"
        found = [dict(r.values) for r in rows
                 if all(current.get(k, "") == v for k, v in r.match)]
        keys = sorted({k for r in rows for k, _ in r.match})
        how = f"{name} by " + ", ".join(f"{k} {current.get(k, '')!r}" for k in keys)
        answer = _one(how, [{k: v for k, v in f.items() if v and k in attributes}
                            for f in found])
        return answer


class Lookups:
    """Every lookup source of the configuration, asked by ``coerce``'s runs."""

    def __init__(self, cfg: Config, state: Any) -> None:
        self.cfg = cfg
        self.state = state
        self._tables: dict[int, Table] = {}
        self._lock = threading.Lock()
        self._no_hl7_logged = False

    def ask(self, source: LookupModel, current: dict[str, str],
            attributes: tuple[str, ...]) -> Answer | None:
        """``source``'s answer for an instance whose values are ``current``."""
        if source.worklist is not None:
            return self._worklist(source.worklist, current, attributes)
        if source.table is not None:
            return self._table(source.table).ask(current, attributes)
        return self._hl7(current, attributes)

    def _table(self, model: TableLookup) -> Table:
        with self._lock:
            table = self._tables.get(id(model))
            if table is None:
                table = self._tables[id(model)] = Table(model)
            return table

    def _worklist(self, model: WorklistLookup, current: dict[str, str],
                  attributes: tuple[str, ...]) -> Answer | None:
        known = self.cfg.known_aes[model.ae]
        remote = qrscu.Remote(model.ae, known.host, known.port,
                              known.calling_ae or self.cfg.ae_title, model.timeout)
        for how in model.match:
            query = Dataset()
            query.SpecificCharacterSet = ""
            for kw in attributes:
                setattr(query, kw, "")
            step = Dataset()
            step.ScheduledProcedureStepStartDate = ""
            if how == "accession":
                if not current.get("AccessionNumber"):
                    continue
                query.AccessionNumber = current["AccessionNumber"]
                asked = f"AccessionNumber {current['AccessionNumber']!r}"
            else:
                if not current.get("PatientID") or not current.get("StudyDate"):
                    continue
                query.PatientID = current["PatientID"]
                step.ScheduledProcedureStepStartDate = current["StudyDate"]
                asked = f"PatientID {current['PatientID']!r} on {current['StudyDate']}"
            query.ScheduledProcedureStepSequence = [step]
            try:
                found = [_values(ds, attributes)
                         for ds in qrscu.find(remote, query, model="worklist")]
            except qrscu.PeerError as exc:
                raise Unavailable(f"worklist {model.ae}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - an answer pydicom cannot read
                raise Unavailable(f"worklist {model.ae}: its answer could not be read: "
                                  f"{type(exc).__name__}: {exc}") from None
            answer = _one(f"worklist {model.ae} by {asked}", found)
            if answer is not None:
                return answer
        return None

    def _hl7(self, current: dict[str, str], attributes: tuple[str, ...]) -> Answer | None:
        latest = getattr(self.state, "latest_hl7_order", None)
        if latest is None:  # a router without the HL7 listener's store
            if not self._no_hl7_logged:
                self._no_hl7_logged = True
                log.warning("coerce: an hl7 lookup is configured but this router keeps no "
                            "HL7 messages; it finds nothing")
            return None
        accession = current.get("AccessionNumber") or None
        patient = current.get("PatientID") or None
        if accession is None and patient is None:
            return None
        try:
            order = latest(accession=accession, patient_id=patient)
        except OSError as exc:
            raise Unavailable(f"hl7: the state database: {exc}") from None
        how = "hl7 by " + (f"AccessionNumber {accession!r}" if accession else
                           f"PatientID {patient!r}")
        return _one(how, [_values(order, attributes)] if order else [])
