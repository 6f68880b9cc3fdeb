"""A DICOM peer holding priors (a ``known_aes`` entry or a ``dicom`` source): STUDY-level
C-FIND of the patient's studies, SERIES- and IMAGE-level C-FINDs when a filter or a partial
copy needs them, and the retrieve of what the router lacks (C-MOVE to the router's AE title,
or C-GET into the spool through the same ingest as a push). Also the C-FIND that asks a dicom
destination whether it holds a study already."""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from ..netutil import receive_c_store_into
from ..qrscu import Finder, PeerError, Remote, RetrieveResult, find, get, move
from ..scp import ingest
from ..spool import Spool
from ..tlsctx import client_context
from .priors import Candidate, Series

log = logging.getLogger("dicomrouter.prefetch")

#: SOP Instance UIDs per IMAGE-level retrieve
UIDS_PER_RETRIEVE = 200


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _count(value: str) -> int | None:
    try:
        return int(value) if value.strip() else None
    except ValueError:
        return None


class DicomPriors:
    """Query and retrieve priors at one DICOM peer."""

    def __init__(self, remote: Remote, model: str, retrieve: str, move_to: str,
                 spool: Spool) -> None:
        self.remote = remote
        self.model = model
        self.retrieve_by = retrieve
        self.move_to = move_to
        self.spool = spool
        if retrieve == "get":
            receive_c_store_into(spool.new_receive_file)  # C-GET stores stream to slots

    def describe(self) -> str:
        how = f"C-MOVE to {self.move_to}" if self.retrieve_by == "move" else "C-GET"
        return f"{self.remote} (C-FIND, {how})"

    # ---- queries -------------------------------------------------------------------------------

    def _ident(self, level: str, patient_id: str, study: str = "") -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        ds.PatientID = patient_id  # a key at every level of either model
        ds.StudyInstanceUID = study
        return ds

    def studies(self, patient_id: str) -> list[Candidate]:
        """Every study of the patient there. The filters (date, modality, body part) are the
        router's, after the query: a patient has a few dozen studies at most, every PACS
        filters the same way then, and each candidate's verdict is in the history."""
        q = self._ident("STUDY", patient_id)
        q.StudyDate = ""
        q.StudyTime = ""
        q.ModalitiesInStudy = ""
        q.NumberOfStudyRelatedInstances = ""
        q.AccessionNumber = ""
        q.StudyDescription = ""
        out: dict[str, Candidate] = {}
        for a in find(self.remote, q, self.model):
            uid = _text(a, "StudyInstanceUID")
            if not uid or _text(a, "PatientID") not in ("", patient_id):
                continue  # a peer that ignores the key: not this patient's
            mods = tuple(sorted({m.strip().upper() for m in
                                 _text(a, "ModalitiesInStudy").split("\\") if m.strip()}))
            out.setdefault(uid, Candidate(
                uid, _text(a, "StudyDate"), _text(a, "StudyTime"), mods,
                _count(_text(a, "NumberOfStudyRelatedInstances")), _text(a, "AccessionNumber"),
                _text(a, "StudyDescription")))
        return list(out.values())

    def series(self, patient_id: str, study: str, finder: Finder | None = None
               ) -> list[Series]:
        q = self._ident("SERIES", patient_id, study)
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.BodyPartExamined = ""
        q.NumberOfSeriesRelatedInstances = ""
        answers = finder.find(q) if finder is not None else find(self.remote, q, self.model)
        return [Series(_text(a, "SeriesInstanceUID"), _text(a, "Modality"),
                       _text(a, "BodyPartExamined"),
                       _count(_text(a, "NumberOfSeriesRelatedInstances")))
                for a in answers if _text(a, "SeriesInstanceUID")]

    def _images(self, finder: Finder, patient_id: str, study: str, series: str) -> set[str]:
        q = self._ident("IMAGE", patient_id, study)
        q.SeriesInstanceUID = series
        q.SOPInstanceUID = ""
        return {_text(a, "SOPInstanceUID") for a in finder.find(q)
                if _text(a, "SOPInstanceUID")}

    # ---- retrieve ------------------------------------------------------------------------------

    def fetch(self, patient_id: str, study: str, held: dict[str, str]) -> list[RetrieveResult]:
        """Retrieve what the router lacks of ``study`` (``held``: SOP → series it holds or
        held): the whole study when it holds nothing, else the series it lacks whole and
        the missing instances of the others (so a retrieve cut short by a crash is completed,
        and nothing is received twice)."""
        if not held:
            return [self._retrieve(self._ident("STUDY", patient_id, study))]
        have: dict[str, set[str]] = {}
        for sop, series in held.items():
            have.setdefault(series, set()).add(sop)
        plan: list[Dataset] = []
        with Finder(self.remote, self.model) as finder:
            for s in self.series(patient_id, study, finder):
                mine = have.get(s.uid, set())
                if not mine:
                    ident = self._ident("SERIES", patient_id, study)
                    ident.SeriesInstanceUID = s.uid
                    plan.append(ident)
                    continue
                if s.count is not None and s.count <= len(mine):
                    continue
                missing = sorted(self._images(finder, patient_id, study, s.uid) - mine)
                for i in range(0, len(missing), UIDS_PER_RETRIEVE):
                    part = missing[i:i + UIDS_PER_RETRIEVE]
                    ident = self._ident("IMAGE", patient_id, study)
                    ident.SeriesInstanceUID = s.uid
                    ident.SOPInstanceUID = part if len(part) > 1 else part[0]
                    plan.append(ident)
        return [self._retrieve(ident) for ident in plan]

    def _retrieve(self, ident: Dataset) -> RetrieveResult:
        if self.retrieve_by == "move":
            return move(self.remote, ident, self.move_to, self.model)
        return get(self.remote, ident, self._on_store, model=self.model,
                   called=self.remote.calling_ae)

    def _on_store(self, event: evt.Event) -> Any:
        """A C-STORE sub-operation of our C-GET: the same ingest as a push."""
        return ingest.store_retrieved(self.spool, event, self.remote.ae_title,
                                      self.remote.calling_ae)


def held_count(remote: Remote, study: str) -> int | None:
    """How many instances of ``study`` a destination answering C-FIND holds (0: none);
    None when it cannot be asked (no Q/R there, refused, down)."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study
    q.NumberOfStudyRelatedInstances = ""
    try:
        answers = find(remote, q)
    except PeerError as exc:
        log.debug("prefetch: cannot ask %s whether it holds %s: %s", remote, study, exc)
        return None
    if not answers:
        return 0
    return max((_count(_text(a, "NumberOfStudyRelatedInstances")) or 0) for a in answers)


def tls_for(tls: Any) -> Any:
    return client_context(tls) if tls else None


__all__ = ["DicomPriors", "held_count", "tls_for"]
