"""After delivery, and every few seconds: settle delivered studies, delete their spool files
(on a thread of its own: unlinking a big study is slow), retention, the spool quota warning and
the spool's own housekeeping (placements to retry, a cluster node's copies and orphans)."""

from __future__ import annotations

import logging
import queue
import threading
import time

from ..config import Config
from ..spool import Spool
from ..state import Job, JobState, State

log = logging.getLogger("dicomrouter")

class Housekeeping:
    def __init__(self, cfg: Config, state: State, spool: Spool) -> None:
        self.cfg = cfg
        self.state = state
        self.spool = spool
        self._cleanup: queue.Queue[str | None] = queue.Queue()
        self._cleaner = threading.Thread(target=self._clean, name="spool-cleanup", daemon=True)
        self._warned_quota = False

    def start(self) -> None:
        self._cleaner.start()

    def stop(self) -> None:
        self._cleanup.put(None)
        self._cleaner.join(30)

    @property
    def deletes_after_delivery(self) -> bool:
        return not self.cfg.keep_after_delivery and self.cfg.retention <= 0

    def job_finished(self, job: Job, outcome: str) -> None:
        """A delivery job ended ``delivered``: the study may be delivered everywhere now."""
        if outcome == JobState.DELIVERED and self.state.settle_study(job.study_uid):
            self.settled(job.study_uid)

    def settled(self, study_uid: str) -> None:
        """The study is delivered everywhere: say so, and delete its files unless kept."""
        partial = self.state.partial_jobs(study_uid)
        if not partial:
            log.info("study %s delivered to every destination", study_uid)
        else:
            log.warning("study %s delivered to every destination, partially to %s: instances "
                        "deleted from the spool before a late arrival routed the study there "
                        "(keep studies for late arrivals with retention)", study_uid,
                        ", ".join(f"{j['destination']} ({j['missing']} missing)"
                                  for j in partial))
        if self.deletes_after_delivery:
            self._cleanup.put(study_uid)  # not on the delivery thread: unlinks are slow

    def _clean(self) -> None:
        """Delete the spool files of delivered studies (checked again under the study lock)."""
        while True:
            study = self._cleanup.get()
            if study is None:
                return
            try:
                freed = self.spool.delete_delivered(study, "delivered")
                if freed:
                    log.info("study %s: spool files deleted (%d bytes)", study, freed)
            except Exception as exc:
                log.error("study %s: spool cleanup failed (%s: %s); the files stay and are "
                          "deleted at the next housekeeping", study, type(exc).__name__, exc)

    def run(self) -> None:
        """The periodic part (the study tracker calls it every few seconds)."""
        self.spool.housekeeping(self.state)
        if not self.cfg.keep_after_delivery:
            # Retention over, or a cleanup that a stop interrupted: delete off this thread.
            cutoff = time.time() - max(self.cfg.retention, 0.0)
            for study in self.state.delivered_in_spool_before(cutoff):
                if self.cfg.retention > 0:
                    log.info("study %s: retention period over", study)
                self._cleanup.put(study)
            if self.cfg.retention > 0:  # reversible pseudonymization: the mapping goes too
                for study in self.state.pseudonym_studies_before(cutoff):
                    self.state.pseudonym_purge(study, "retention period over")
        if self.spool.max_bytes:
            full = self.spool.over_quota()
            if full and not self._warned_quota:
                log.warning("spool quota reached (%d of %d bytes): new instances are refused "
                            "with 0xA700 until space frees", self.spool.used_bytes,
                            self.spool.max_bytes)
            elif not full and self._warned_quota:
                log.info("spool below its quota again; receiving")
            self._warned_quota = full
