"""A DICOMweb peer holding priors (a ``dicomweb`` source, usually with ``poll: false``):
QIDO-RS for the patient's studies and, when a filter needs them, their series; WADO-RS for the
instances the router lacks, one by one, streamed into the spool by the source's own code (the
same ingest as a push; the source's name is their calling AE title)."""

from __future__ import annotations

from typing import Any

import requests

from ..common.http import request_failure
from ..qrscu import RetrieveResult
from ..sources.base import PullError
from ..sources.dicomweb import DicomwebSource
from .priors import Candidate, Series

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
FIELDS = {"date": "00080020", "time": "00080030", "modalities": "00080061",
          "count": "00201208", "accession": "00080050", "description": "00081030",
          "patient": "00100020"}
SERIES_FIELDS = {"modality": "00080060", "body_part": "00180015", "count": "00201209"}


def _values(item: dict[str, Any], tag: str) -> list[str]:
    return [str(v) for v in item.get(tag, {}).get("Value") or [] if v is not None]


def _one(item: dict[str, Any], tag: str) -> str:
    values = _values(item, tag)
    return values[0].strip() if values else ""


def _count(item: dict[str, Any], tag: str) -> int | None:
    try:
        return int(_one(item, tag)) if _one(item, tag) else None
    except ValueError:
        return None


class WebPriors:
    """Query and retrieve priors at one DICOMweb server, through its ``dicomweb`` source."""

    retrieve_by = "wado"

    def __init__(self, source: DicomwebSource) -> None:
        self.source = source
        self.url = source.cfg.url

    def describe(self) -> str:
        return f"{self.url} (QIDO-RS, WADO-RS)"

    def _search(self, what: str, call: Any) -> list[dict[str, Any]]:
        try:
            return list(call())
        except requests.RequestException as exc:
            raise PullError(f"QIDO-RS {what} at {request_failure(exc, self.url)}") from None
        except ValueError as exc:
            raise PullError(f"QIDO-RS {what}: {type(exc).__name__}: {exc}") from None

    def studies(self, patient_id: str) -> list[Candidate]:
        client = self.source.client()
        found = self._search("studies", lambda: client.search_for_studies(
            search_filters={"PatientID": patient_id}, fields=list(FIELDS.values()),
            get_remaining=True))
        out: dict[str, Candidate] = {}
        for s in found:
            uid = _one(s, STUDY_UID)
            if not uid or _one(s, FIELDS["patient"]) not in ("", patient_id):
                continue
            mods = tuple(sorted({m.strip().upper() for m in _values(s, FIELDS["modalities"])
                                 if m.strip()}))
            out.setdefault(uid, Candidate(uid, _one(s, FIELDS["date"]), _one(s, FIELDS["time"]),
                                          mods, _count(s, FIELDS["count"]),
                                          _one(s, FIELDS["accession"]),
                                          _one(s, FIELDS["description"])))
        return list(out.values())

    def series(self, patient_id: str, study: str) -> list[Series]:
        client = self.source.client()
        found = self._search(f"series of {study}", lambda: client.search_for_series(
            study_instance_uid=study, fields=list(SERIES_FIELDS.values()), get_remaining=True))
        return [Series(_one(s, SERIES_UID), _one(s, SERIES_FIELDS["modality"]),
                       _one(s, SERIES_FIELDS["body_part"]), _count(s, SERIES_FIELDS["count"]))
                for s in found if _one(s, SERIES_UID)]

    def fetch(self, patient_id: str, study: str, held: dict[str, str]) -> list[RetrieveResult]:
        """WADO-RS of each instance of ``study`` the router does not hold (or held)."""
        listing = self.source.instances(study)
        missing = [(_one(i, SERIES_UID), sop) for i in listing
                   if (sop := _one(i, SOP_UID)) and sop not in held]
        for series, sop in missing:
            self.source.retrieve(study, series, sop)
        return [RetrieveResult(status=0, completed=len(missing))]


__all__ = ["WebPriors"]
