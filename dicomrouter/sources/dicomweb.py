"""The ``dicomweb`` source: QIDO-RS for the studies of the last ``lookback`` (or all), then each
study whose instance count there (NumberOfStudyRelatedInstances) differs from what the router
pulled, once that count has been stable for ``source_stable_age``, is listed (QIDO-RS,
instances) and the instances the router does not hold are retrieved by WADO-RS, one by one,
each response streamed to disk (``multipart.py``: flat memory). A server that does not count
has each study of the window listed at every poll.

QIDO-RS goes through dicomweb-client; the HTTP session (auth, TLS) is the router's one.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

import requests

from ..common.http import http_session, request_failure
from ..config.peers import DicomwebSourceModel
from .base import PullError, Source, describe_pull
from .multipart import MultipartError, MultipartReader, boundary_of
from .registry import implements

if TYPE_CHECKING:  # imported when first used: it imports numpy and Pillow (nocodecs.py)
    from dicomweb_client.api import DICOMwebClient

log = logging.getLogger("dicomrouter.sources")

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
COUNT = "00201208"  # NumberOfStudyRelatedInstances
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_DEFAULT = 'multipart/related; type="application/dicom"'
CHUNK = 1 << 20


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _count(study: dict[str, Any]) -> int | None:
    """NumberOfStudyRelatedInstances of a QIDO-RS study (None: the server did not say)."""
    try:
        return int(_value(study, COUNT)) if _value(study, COUNT) != "" else None
    except ValueError:
        return None


@implements(DicomwebSourceModel)
class DicomwebSource(Source):
    def describe(self) -> str:
        o = self.cfg
        window = f"studies of the last {o.lookback / 86400:g} day(s)" if o.lookback \
            else "all studies"
        return (f"dicomweb {o.url}: QIDO-RS {window}, WADO-RS retrieve once their count is "
                f"stable for {o.source_stable_age:g} s")

    _dw: DICOMwebClient | None = None  # made at the first request

    def client(self) -> DICOMwebClient:
        if self._dw is None:
            from dicomweb_client.api import DICOMwebClient

            self._session = http_session(self.cfg)
            self._dw = DICOMwebClient(self.cfg.url.rstrip("/"),
                                      session=self._session)
            self._dw.set_http_retry_params(retry=False)
        return self._dw

    def poll(self) -> int:
        client = self.client()
        now = time.time()
        filters: dict[str, Any] = {}
        if self.cfg.lookback:
            since = dt.datetime.now() - dt.timedelta(seconds=self.cfg.lookback)
            filters["StudyDate"] = since.strftime("%Y%m%d") + "-"
        try:
            studies = client.search_for_studies(search_filters=filters, get_remaining=True,
                                                fields=[COUNT])
        except requests.RequestException as exc:
            raise PullError("QIDO-RS studies at "
                            f"{request_failure(exc, self.cfg.url)}") from None
        except ValueError as exc:
            raise PullError(f"QIDO-RS studies: {type(exc).__name__}: {exc}") from None
        counts = {uid: _count(study) for study in studies if (uid := _value(study, STUDY_UID))}
        rows = self.state.source_studies(self.name, list(counts))
        due: list[tuple[str, int, list[dict[str, Any]] | None]] = []
        for uid, count in counts.items():
            listing = None
            if count is None:  # the server does not count: list the study's instances
                listing = self.instances(uid)
                count = len(listing)
            if self.due(rows.get(uid), uid, count, now):
                due.append((uid, count, listing))
        self.stability.keep_only(counts)
        pulled = 0
        for uid, count, listing in due:
            if self.stopping.is_set():
                break
            pulled += self._pull(uid, count, listing)
        self.wake_at = self.stability.next_ready()
        return pulled

    def instances(self, study_uid: str) -> list[dict[str, Any]]:
        try:
            return self.client().search_for_instances(study_instance_uid=study_uid,
                                                       get_remaining=True)
        except requests.RequestException as exc:
            raise PullError(f"QIDO-RS instances of {study_uid} at "
                            f"{request_failure(exc, self.cfg.url)}") from None
        except ValueError as exc:
            raise PullError(f"QIDO-RS instances of {study_uid}: {type(exc).__name__}: "
                            f"{exc}") from None

    def _pull(self, study_uid: str, count: int, listing: list[dict[str, Any]] | None) -> int:
        """Retrieve the instances of the study the router does not hold; 1 if any came."""
        instances = listing if listing is not None else self.instances(study_uid)
        held = self.state.source_held(study_uid)
        missing = [(_value(i, SERIES_UID), sop) for i in instances
                   if (sop := _value(i, SOP_UID)) and sop not in held]
        with self.pulling(study_uid, study_uid) as pull:
            for series, sop in missing:
                if self.stopping.is_set():
                    raise PullError("stopping")
                self.retrieve(study_uid, series, sop)
            pull.source_instances = count
        log.info("source %s: study %s pulled (%s)", self.name, study_uid,
                 describe_pull(pull, len(missing), count))
        return 1 if pull.brought else 0

    def retrieve(self, study: str, series: str, sop: str) -> None:
        url = (f"{self.cfg.url.rstrip('/')}/studies/{study}/series/{series}"
               f"/instances/{sop}")
        self.client()
        timeout = self.cfg.timeout
        try:
            r = self._session.get(url, headers={"Accept": ACCEPT_AS_STORED}, stream=True,
                                  timeout=timeout)
            if r.status_code in (400, 406):  # no "as stored" here: the server's default
                r.close()
                r = self._session.get(url, headers={"Accept": ACCEPT_DEFAULT}, stream=True,
                                      timeout=timeout)
        except requests.RequestException as exc:
            raise PullError(f"WADO-RS at {request_failure(exc, url)}") from None
        with r:
            if r.status_code >= 400:
                raise PullError(f"WADO-RS {url}: HTTP {r.status_code}")
            try:
                reader = MultipartReader(r.iter_content(CHUNK),
                                         boundary_of(r.headers.get("Content-Type", "")))
                part = reader.next_part()
                if part is None:
                    raise PullError(f"WADO-RS {url}: an empty multipart response")
                self.store(part)
            except (MultipartError, requests.RequestException) as exc:
                raise PullError(f"WADO-RS {url}: {type(exc).__name__}: {exc}") from None
