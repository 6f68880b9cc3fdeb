"""The ``orthanc`` source: Orthanc's change feed (``/changes``), StableStudy events, each study
retrieved instance by instance over the REST API (``/instances/{id}/file``, streamed to disk).

The last change index read is kept in the state database, so a restart resumes where it
stopped; instances the router already holds are not fetched again. With
``delete_after_pull: true`` (move semantics) a study is deleted in Orthanc only once the
router delivered it to every destination, and only if every instance Orthanc has of it is
one the router holds (nothing that arrived there since is lost); a failing destination keeps
it in Orthanc.
"""

from __future__ import annotations

import logging
from typing import Any

import requests

from ..httpauth import http_session, request_failure
from .base import PullError, Source

log = logging.getLogger("dicomrouter.sources")

CHUNK = 1 << 20


class OrthancSource(Source):
    def describe(self) -> str:
        o = self.cfg.options
        return (f"orthanc {o['url']} change feed"
                + (", deletes studies there once delivered" if o["delete_after_pull"] else ""))

    def _http(self) -> requests.Session:
        if not hasattr(self, "_session"):
            self._session = http_session(self.cfg.options)
        return self._session

    def _url(self, path: str) -> str:
        return self.cfg.options["url"].rstrip("/") + path

    def _get(self, path: str, stream: bool = False) -> requests.Response:
        try:
            r = self._http().get(self._url(path), timeout=self.cfg.options["timeout"],
                                 stream=stream)
        except requests.RequestException as exc:
            raise PullError(f"GET {path} from {request_failure(exc, self._url(path))}") from None
        if r.status_code == 404:
            return r
        if r.status_code >= 400:
            raise PullError(f"GET {self._url(path)}: HTTP {r.status_code} "
                            f"{r.text[:200] if not stream else ''}".rstrip())
        return r

    def _json(self, path: str) -> Any:
        r = self._get(path)
        if r.status_code == 404:
            return None
        return r.json()

    def poll(self) -> int:
        cursor = self.state.source_cursor(self.name)
        if cursor is None:  # first poll ever: start at the end of the feed (studies from now on)
            last = self._json("/changes?last")
            start = int((last or {}).get("Last", 0))
            self.state.source_polled(self.name, None, str(start))
            log.info("source %s: following Orthanc's changes after index %d", self.name, start)
            return 0
        since = int(cursor)
        pulled = 0
        while not self.stopping.is_set():
            feed = self._json(f"/changes?since={since}&limit={self.cfg.options['batch']}")
            if not feed:
                break
            for change in feed.get("Changes", []):
                if change.get("ChangeType") == "StableStudy":
                    pulled += self._pull(str(change["ID"]))
                since = int(change["Seq"])
                self.state.source_polled(self.name, None, str(since))  # resume after it
            if feed.get("Done", True):
                since = max(since, int(feed.get("Last", since)))
                self.state.source_polled(self.name, None, str(since))
                break
        return pulled

    def _pull(self, study_id: str) -> int:
        study = self._json(f"/studies/{study_id}")
        if study is None:
            log.info("source %s: study %s is gone from Orthanc; skipped", self.name, study_id)
            return 0
        uid = study["MainDicomTags"]["StudyInstanceUID"]
        instances = self._json(f"/studies/{study_id}/instances") or []
        new = 0
        for inst in instances:
            if self.stopping.is_set():
                raise PullError("stopping")
            sop = inst.get("MainDicomTags", {}).get("SOPInstanceUID", "")
            if sop and self.state.has_instance(sop):
                continue
            r = self._get(f"/instances/{inst['ID']}/file", stream=True)
            if r.status_code == 404:
                continue  # deleted in between
            with r:
                self.store(r.iter_content(CHUNK))
            new += 1
        delete_after = bool(self.cfg.options["delete_after_pull"])
        self.state.source_pulled(self.name, study_id, uid, new, delete_after)
        log.info("source %s: study %s pulled (%d new of %d instance(s))", self.name, uid, new,
                 len(instances))
        return 1 if new else 0

    def housekeeping(self) -> None:
        if not self.cfg.options["delete_after_pull"]:
            return
        for study_id, uid in self.state.source_deletable(self.name):
            instances = self._json(f"/studies/{study_id}/instances")
            if instances is None:  # already gone there
                self.state.source_deleted(self.name, study_id, uid)
                continue
            unknown = [i for i in instances
                       if not self.state.has_instance(i["MainDicomTags"]["SOPInstanceUID"])]
            if unknown:
                log.info("source %s: study %s has %d instance(s) in Orthanc the router has not "
                         "pulled yet; not deleted there", self.name, uid, len(unknown))
                continue
            try:
                r = self._http().delete(self._url(f"/studies/{study_id}"),
                                        timeout=self.cfg.options["timeout"])
            except requests.RequestException as exc:
                raise PullError(f"DELETE study {uid} in Orthanc at "
                                f"{request_failure(exc, self._url('/'))}") from None
            if r.status_code >= 400 and r.status_code != 404:
                raise PullError(f"DELETE study {uid} in Orthanc: HTTP {r.status_code}")
            self.state.source_deleted(self.name, study_id, uid)
            log.info("source %s: study %s deleted in Orthanc (delivered to every destination)",
                     self.name, uid)
