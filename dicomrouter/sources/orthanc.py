"""The ``orthanc`` source: Orthanc's change feed (``/changes``), StableStudy events, each study
retrieved instance by instance over the REST API (``/instances/{id}/file``, streamed to disk).

The last change index read is kept in the state database, so a restart resumes where it
stopped; instances the router already holds are not fetched again, so a study that gained
instances in Orthanc (a new StableStudy) brings only those. Orthanc's own stability
(``StableAge``) decides when a study is pulled. With ``delete_after_pull: true`` (move
semantics) a study's instances are deleted in Orthanc once the router delivered the study to
every destination, instance by instance and only those delivered: an instance stored there
since stays (and is pulled at its StableStudy); a failing destination keeps them all there.
"""

from __future__ import annotations

import logging
from typing import Any

import requests

from ..common.http import http_session, request_failure
from ..config.peers import OrthancSourceModel
from .base import PullError, Source, describe_pull
from .registry import implements

log = logging.getLogger("dicomrouter.sources")

CHUNK = 1 << 20


@implements(OrthancSourceModel)
class OrthancSource(Source):
    def describe(self) -> str:
        o = self.cfg
        return (f"orthanc {o.url} change feed"
                + (", deletes studies there once delivered" if o.delete_after_pull else ""))

    _session: requests.Session | None = None  # made at the first request

    def _http(self) -> requests.Session:
        if self._session is None:
            self._session = http_session(self.cfg)
        return self._session

    def _url(self, path: str) -> str:
        return self.cfg.url.rstrip("/") + path

    def _get(self, path: str, stream: bool = False) -> requests.Response:
        try:
            r = self._http().get(self._url(path), timeout=self.cfg.timeout,
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
            feed = self._json(f"/changes?since={since}&limit={self.cfg.batch}")
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
        held = self.state.source_held(uid)
        missing = [i for i in instances
                   if i.get("MainDicomTags", {}).get("SOPInstanceUID", "") not in held]
        with self.pulling(study_id, uid, bool(self.cfg.delete_after_pull)) as pull:
            for inst in missing:
                if self.stopping.is_set():
                    raise PullError("stopping")
                r = self._get(f"/instances/{inst['ID']}/file", stream=True)
                if r.status_code == 404:
                    continue  # deleted in between
                with r:
                    self.store(r.iter_content(CHUNK))
            pull.source_instances = len(instances)
        log.info("source %s: study %s pulled (%s)", self.name, uid,
                 describe_pull(pull, len(missing), len(instances)))
        return 1 if pull.brought else 0

    def housekeeping(self) -> None:
        if not self.cfg.delete_after_pull:
            return
        for study_id, uid in self.state.source_deletable(self.name):
            instances = self._json(f"/studies/{study_id}/instances")
            if instances is None:  # already gone there
                self.state.source_deleted(self.name, study_id, uid)
                continue
            delivered = self.state.source_delivered(uid)
            done = [i for i in instances
                    if i.get("MainDicomTags", {}).get("SOPInstanceUID") in delivered]
            for inst in done:  # never the study: what was stored since is not ours to delete
                path = f"/instances/{inst['ID']}"
                try:
                    r = self._http().delete(self._url(path),
                                            timeout=self.cfg.timeout)
                except requests.RequestException as exc:
                    raise PullError(f"DELETE an instance of study {uid} in Orthanc at "
                                    f"{request_failure(exc, self._url(path))}") from None
                if r.status_code >= 400 and r.status_code != 404:
                    raise PullError(f"DELETE {path} (study {uid}) in Orthanc: "
                                    f"HTTP {r.status_code}")
            left = len(instances) - len(done)
            self.state.source_deleted(self.name, study_id, uid, len(done), left)
            log.info("source %s: study %s: %d instance(s) deleted in Orthanc (delivered to "
                     "every destination)%s", self.name, uid, len(done),
                     f"; {left} not delivered yet stay there" if left else "")
