"""The studies in processing, step by step (issue 29): what the status page's Processing card
and ``GET /api/processing`` list. A study is listed while one of its ``process:<route>`` jobs
is not finished (pending, running, failed, dead, held), and for an hour after it was
(delivered: the results are in; rejected); its steps are read from its history
(``processing/steps_view.py``)."""

from __future__ import annotations

import time
from typing import Any

from ..config import Config
from ..config.processing import PROCESS_PREFIX
from ..processing.steps_view import study_steps
from ..state import JobState, State

RECENT_S = 3600  # a finished processing job stays listed this long
LIMIT = 50  # studies listed (the newest first); per state and route, jobs read
UNFINISHED = (JobState.PENDING, JobState.RUNNING, JobState.FAILED, JobState.DEAD,
              JobState.HELD)
FINISHED = (JobState.DELIVERED, JobState.REJECTED)


def processing_rows(state: State, cfg: Config, now: float | None = None) -> list[dict[str, Any]]:
    """One row per study in processing, the most recently changed first: the study, its
    ``process:<route>`` jobs and its steps (``StepView.as_dict``)."""
    since = (time.time() if now is None else now) - RECENT_S
    by_study: dict[str, list[dict[str, Any]]] = {}
    for dest in cfg.destinations:
        if not dest.startswith(PROCESS_PREFIX):
            continue
        for job_state in (*UNFINISHED, *FINISHED):
            for job in state.jobs(job_state, dest, limit=LIMIT):
                if job_state in UNFINISHED or (job["updated"] or 0) >= since:
                    by_study.setdefault(job["study_uid"], []).append(job)
    newest = sorted(by_study, key=lambda uid: max(j["updated"] or 0 for j in by_study[uid]),
                    reverse=True)[:LIMIT]
    rows = []
    for uid in newest:
        study = state.study(uid)
        jobs = sorted(by_study[uid], key=lambda j: j["destination"])
        rows.append({"study_uid": uid,
                     "patient_id": study.patient_id if study is not None else "",
                     "state": str(study.state) if study is not None else "",
                     "jobs": jobs,
                     "steps": [s.as_dict() for s in
                               study_steps(state.history(uid), cfg.routes, jobs)]})
    return rows
