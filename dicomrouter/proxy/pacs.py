"""The PACS behind the Q/R proxy, one class per kind, the same three calls:

* ``find(identifier, limit)``: a C-FIND's answers at the PACS (QIDO-RS for a DICOMweb PACS),
  and whether it stopped before every match (``limit`` reached, or capped by the PACS);
* ``listing(studies, series, sops)``: the instances the PACS holds of those studies (SERIES-
  then IMAGE-level C-FINDs over one association; QIDO-RS instances);
* ``retrieve(missing, arrived)``: brings those instances into the spool (C-GET at IMAGE level
  per series, on the same association; WADO-RS instance by instance) through the same ingest
  as a C-STORE, each marked ``Proxied``, and calls ``arrived(instance)`` for each once it is
  placed, so the caller can send it on while the rest still comes.

C-GET rather than C-MOVE: the instances come back on the router's own association, so they
are known to be the proxy's (and marked) before they are placed, whatever listener or receiver
process would have taken a C-MOVE's sub-association, and the PACS needs no route back to the
router's port.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import requests
from pydicom.dataset import Dataset
from pynetdicom import evt

from ..common.http import request_failure
from ..config import Config
from ..destinations.base import Context
from ..netutil import receive_c_store_into
from ..qrscu import Finder, FindTruncated, PeerError, Remote, find, get
from ..scp.ingest import store_file, store_retrieved
from ..sources.base import PullError
from ..sources.dicomweb import SERIES_UID, SOP_UID, STUDY_UID, DicomwebSource
from ..spool import Spool
from ..state import Instance, State
from ..values import PROXIED_TAG

log = logging.getLogger("dicomrouter.proxy")

#: SOP Instance UIDs per IMAGE-level C-GET
UIDS_PER_GET = 200
SOP_CLASS = "00080016"

Arrived = Callable[[Instance], None]


class PacsError(Exception):
    """The PACS could not be reached, refused, or failed the request."""


@dataclass(frozen=True)
class Listed:
    """One instance the PACS holds."""

    study: str
    series: str
    sop: str
    sop_class: str = ""


def _text(value: Any) -> str:
    return str(value if value is not None else "").strip()


def _uids(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [_text(v) for v in items if _text(v)]


class DicomPacs:
    """A DICOM Q/R PACS from ``known_aes``: C-FIND and C-GET (Study Root)."""

    def __init__(self, cfg: Config, state: State, spool: Spool, ae: str) -> None:
        known = cfg.known_aes[ae]
        self.cfg, self.state, self.spool = cfg, state, spool
        self.remote = Remote(ae, known.host, known.port, known.calling_ae or cfg.ae_title,
                             cfg.query_retrieve_proxy_timeout)
        receive_c_store_into(spool.new_receive_file)  # C-GET stores stream to receive slots
        self._arrived: dict[int, Arrived] = {}

    def describe(self) -> str:
        return f"DICOM {self.remote} (C-FIND, C-GET)"

    def find(self, identifier: Dataset, limit: int,
             model: str = "study") -> tuple[list[Dataset], bool]:
        try:
            answers = find(self.remote, identifier, model, limit)
        except FindTruncated as exc:
            return exc.answers, True
        except PeerError as exc:
            raise PacsError(str(exc)) from None
        return answers, len(answers) >= limit

    def studies(self, identifier: Dataset) -> list[str]:
        """The Study Instance UIDs a PATIENT- or STUDY-level identifier matches there."""
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        for elem in identifier:
            if elem.keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyDate",
                                "StudyID") and elem.value:
                q[elem.tag] = elem
        q.StudyInstanceUID = ""
        answers, _capped = self.find(q, 10_000)
        return [uid for a in answers if (uid := _text(a.get("StudyInstanceUID")))]

    def listing(self, studies: Sequence[str], series: Sequence[str] = (),
                sops: Sequence[str] = ()) -> list[Listed]:
        out: list[Listed] = []
        try:
            with Finder(self.remote, "study") as finder:
                for study in studies:
                    q = Dataset()
                    q.QueryRetrieveLevel = "SERIES"
                    q.StudyInstanceUID = study
                    q.SeriesInstanceUID = list(series) if len(series) > 1 else \
                        (series[0] if series else "")
                    q.NumberOfSeriesRelatedInstances = ""
                    found = {_text(a.get("SeriesInstanceUID")):
                             _text(a.get("NumberOfSeriesRelatedInstances"))
                             for a in finder.find(q)}
                    for s, count in found.items():
                        if s:
                            out += self._images(finder, study, s, sops,
                                                int(count) if count.isdigit() else 0)
        except PeerError as exc:
            raise PacsError(str(exc)) from None
        return out

    def _images(self, finder: Finder, study: str, series: str, sops: Sequence[str],
                count: int) -> list[Listed]:
        """The instances of one series there. Fewer than the series' count (and no SOP
        Instance UIDs asked for): asked once more on a new association (a response pynetdicom's
        reactor took for itself under load would otherwise lose an instance)."""
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study
        q.SeriesInstanceUID = series
        q.SOPInstanceUID = list(sops) if len(sops) > 1 else (sops[0] if sops else "")
        q.SOPClassUID = ""
        for attempt in range(2):
            found = [Listed(study, series, sop, _text(a.get("SOPClassUID")))
                     for a in finder.find(q) if (sop := _text(a.get("SOPInstanceUID")))]
            if sops or len(found) >= count or attempt:
                break
            log.warning("Q/R proxy: %s listed %d of the %d instance(s) of series %s; asking "
                        "again", self.remote, len(found), count, series)
            finder.close()
        return found

    def retrieve(self, missing: Sequence[Listed], arrived: Arrived) -> None:
        by_series: dict[tuple[str, str], list[Listed]] = {}
        for item in missing:
            by_series.setdefault((item.study, item.series), []).append(item)
        classes = sorted({i.sop_class for i in missing if i.sop_class}) or None

        def on_store(event: evt.Event) -> Any:
            return self._on_store(event, arrived)

        for (study, series), items in by_series.items():
            for start in range(0, len(items), UIDS_PER_GET):
                chunk = [i.sop for i in items[start:start + UIDS_PER_GET]]
                q = Dataset()
                q.QueryRetrieveLevel = "IMAGE"
                q.StudyInstanceUID = study
                q.SeriesInstanceUID = series
                q.SOPInstanceUID = chunk if len(chunk) > 1 else chunk[0]
                try:
                    result = get(self.remote, q, on_store, classes, "study",
                                 self.cfg.ae_title, {PROXIED_TAG: "1"})
                except PeerError as exc:
                    raise PacsError(str(exc)) from None
                if not result.ok:
                    log.warning("Q/R proxy: C-GET of %d instance(s) of series %s from %s: %s",
                                len(chunk), series, self.remote, result.describe())

    def _on_store(self, event: evt.Event, arrived: Arrived) -> Any:
        """A C-STORE sub-operation of the proxy's C-GET: the same ingest as a push, marked
        as the proxy's (the Proxied key), then handed on to the requester."""
        status = store_retrieved(self.spool, event, self.remote.ae_title, self.cfg.ae_title,
                                 {PROXIED_TAG: "1"})
        if status == 0x0000:
            inst = self.state.instance(str(event.request.AffectedSOPInstanceUID))
            if inst is not None:
                arrived(inst)
        return status


class _Wado(DicomwebSource):
    """The dicomweb source's WADO-RS reader, storing what it reads as the proxy's."""

    arrived: Arrived | None = None

    def store(self, chunks: Iterable[bytes]) -> dict[str, str]:
        status, comment, tags = store_file(self.spool, chunks, self.name, self.router.ae_title,
                                           {PROXIED_TAG: "1"})
        if tags is None:
            raise PullError(f"an instance was refused with 0x{status:04X}: {comment}")
        inst = self.state.instance(tags.get("SOPInstanceUID", ""))
        if inst is not None and self.arrived is not None:
            self.arrived(inst)
        return tags

    def fetch_one(self, study: str, series: str, sop: str) -> None:
        self.retrieve(study, series, sop)


_QIDO_LEVEL = {"STUDY": "search_for_studies", "SERIES": "search_for_series",
               "IMAGE": "search_for_instances"}


class DicomwebPacs:
    """A DICOMweb PACS: a ``dicomweb`` source of the configuration (its URL, auth, TLS)."""

    def __init__(self, cfg: Config, state: State, spool: Spool, name: str) -> None:
        self.name = name
        self.url = cfg.sources[name].url
        self._wado = _Wado(cfg.sources[name], Context(cfg.ae_title, state, spool, cfg))
        self._lock = threading.Lock()  # one retrieve at a time (``arrived`` is the reader's)

    def describe(self) -> str:
        return f"DICOMweb {self.url} (QIDO-RS, WADO-RS)"

    def _call(self, method: str, **kwargs: Any) -> list[dict[str, Any]]:
        try:
            return list(getattr(self._wado.client(), method)(**kwargs))
        except requests.RequestException as exc:
            raise PacsError(f"QIDO-RS at {request_failure(exc, self.url)}") from None
        except ValueError as exc:
            raise PacsError(f"QIDO-RS: {type(exc).__name__}: {exc}") from None

    def find(self, identifier: Dataset, limit: int,
             model: str = "study") -> tuple[list[Dataset], bool]:
        level = _text(identifier.get("QueryRetrieveLevel")).upper()
        if level == "PATIENT":  # QIDO-RS has no patient level: the spool answers alone
            return [], False
        if level not in _QIDO_LEVEL:
            raise PacsError(f"QIDO-RS has no {level or 'empty'} level")
        filters: dict[str, Any] = {}
        fields: list[str] = []
        kwargs: dict[str, Any] = {}
        for elem in identifier:
            kw = elem.keyword
            if kw in ("QueryRetrieveLevel", "SpecificCharacterSet") or not kw:
                continue
            value = elem.value
            if kw == "StudyInstanceUID" and level != "STUDY" and value:
                kwargs["study_instance_uid"] = _text(value)
            elif kw == "SeriesInstanceUID" and level == "IMAGE" and value:
                kwargs["series_instance_uid"] = _text(value)
            elif value not in (None, "") and not (isinstance(value, Sequence) and
                                                 not isinstance(value, str) and not value):
                filters[kw] = "\\".join(_uids(value)) if not isinstance(value, str) else \
                    str(value)
            else:
                fields.append(kw)
        found = self._call(_QIDO_LEVEL[level], search_filters=filters, fields=fields or None,
                           limit=limit + 1, **kwargs)
        answers = []
        for item in found[:limit]:
            ds = Dataset.from_json(item)
            ds.QueryRetrieveLevel = level
            answers.append(ds)
        return answers, len(found) > limit

    def studies(self, identifier: Dataset) -> list[str]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        if _text(identifier.get("PatientID")):
            q.PatientID = identifier.PatientID
        q.StudyInstanceUID = ""
        answers, _capped = self.find(q, 10_000)
        return [uid for a in answers if (uid := _text(a.get("StudyInstanceUID")))]

    def listing(self, studies: Sequence[str], series: Sequence[str] = (),
                sops: Sequence[str] = ()) -> list[Listed]:
        out = []
        for study in studies:
            for listed in self._study_instances(study):
                if (series and listed.series not in series) or (sops and listed.sop not in sops):
                    continue
                out.append(listed)
        return out

    def _study_instances(self, study: str) -> list[Listed]:
        """Every instance QIDO-RS lists of ``study``, page by page (``offset``), until a page
        brings nothing new: a server that ignores ``offset`` answers the same page again, and
        dicomweb-client's ``get_remaining`` would ask forever (and hold every answer)."""
        found: dict[str, Listed] = {}
        offset = 0
        while True:
            page = self._call("search_for_instances", study_instance_uid=study,
                              fields=["SOPClassUID"], **({"offset": offset} if offset else {}))
            before = len(found)
            for item in page:
                def value(tag: str, item: dict[str, Any] = item) -> str:
                    return _text((item.get(tag, {}).get("Value") or [""])[0])
                listed = Listed(study, value(SERIES_UID), value(SOP_UID), value(SOP_CLASS))
                if value(STUDY_UID) in ("", study) and listed.sop:
                    found.setdefault(listed.sop, listed)
            if not page or len(found) == before:
                return list(found.values())
            offset += len(page)

    def retrieve(self, missing: Sequence[Listed], arrived: Arrived) -> None:
        with self._lock:
            self._wado.arrived = arrived
            for item in missing:
                try:
                    self._wado.fetch_one(item.study, item.series, item.sop)
                except PullError as exc:
                    log.warning("Q/R proxy: WADO-RS of instance %s: %s", item.sop, exc)


Pacs = DicomPacs | DicomwebPacs


def pacs_for(cfg: Config, state: State, spool: Spool) -> Pacs | None:
    """The configured PACS (None: no proxy)."""
    name = cfg.query_retrieve_proxy
    if name is None:
        return None
    if name in cfg.known_aes:
        return DicomPacs(cfg, state, spool, name)
    return DicomwebPacs(cfg, state, spool, name)
