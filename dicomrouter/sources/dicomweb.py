"""The ``dicomweb`` source: QIDO-RS for the studies of the last ``lookback`` (or all), then each
study not pulled before is retrieved by WADO-RS, instance by instance (the ones the router does
not hold yet), each response streamed to disk (``multipart.py``: flat memory).

QIDO-RS goes through dicomweb-client; the HTTP session (auth, TLS) is the router's one.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient

from ..httpauth import http_session, request_failure
from .base import PullError, Source
from .multipart import MultipartError, MultipartReader, boundary_of

log = logging.getLogger("dicomrouter.sources")

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_DEFAULT = 'multipart/related; type="application/dicom"'
CHUNK = 1 << 20


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


class DicomwebSource(Source):
    def describe(self) -> str:
        o = self.cfg.options
        window = f"studies of the last {o['lookback'] / 86400:g} day(s)" if o["lookback"] \
            else "all studies"
        return f"dicomweb {o['url']}: QIDO-RS {window}, WADO-RS retrieve"

    def _client(self) -> DICOMwebClient:
        if not hasattr(self, "_dw"):
            self._session = http_session(self.cfg.options)
            self._dw = DICOMwebClient(self.cfg.options["url"].rstrip("/"),
                                      session=self._session)
            self._dw.set_http_retry_params(retry=False)
        return self._dw

    def poll(self) -> int:
        client = self._client()
        filters: dict[str, Any] = {}
        if self.cfg.options["lookback"]:
            since = dt.datetime.now() - dt.timedelta(seconds=self.cfg.options["lookback"])
            filters["StudyDate"] = since.strftime("%Y%m%d") + "-"
        try:
            studies = client.search_for_studies(search_filters=filters, get_remaining=True)
        except requests.RequestException as exc:
            raise PullError("QIDO-RS studies at "
                            f"{request_failure(exc, self.cfg.options['url'])}") from None
        except ValueError as exc:
            raise PullError(f"QIDO-RS studies: {type(exc).__name__}: {exc}") from None
        pulled = 0
        for study in studies:
            uid = _value(study, STUDY_UID)
            if not uid or self.state.source_seen(self.name, uid):
                continue
            if self.stopping.is_set():
                break
            n = self._pull(uid)
            self.state.source_pulled(self.name, uid, uid, n, False)
            log.info("source %s: study %s pulled (%d new instance(s))", self.name, uid, n)
            pulled += 1
        return pulled

    def _pull(self, study_uid: str) -> int:
        try:
            instances = self._client().search_for_instances(study_instance_uid=study_uid,
                                                            get_remaining=True)
        except requests.RequestException as exc:
            raise PullError(f"QIDO-RS instances of {study_uid} at "
                            f"{request_failure(exc, self.cfg.options['url'])}") from None
        except ValueError as exc:
            raise PullError(f"QIDO-RS instances of {study_uid}: {type(exc).__name__}: "
                            f"{exc}") from None
        new = 0
        for inst in instances:
            sop = _value(inst, SOP_UID)
            if not sop or self.state.has_instance(sop):
                continue
            if self.stopping.is_set():
                raise PullError("stopping")
            self._retrieve(study_uid, _value(inst, SERIES_UID), sop)
            new += 1
        return new

    def _retrieve(self, study: str, series: str, sop: str) -> None:
        url = (f"{self.cfg.options['url'].rstrip('/')}/studies/{study}/series/{series}"
               f"/instances/{sop}")
        self._client()
        timeout = self.cfg.options["timeout"]
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
