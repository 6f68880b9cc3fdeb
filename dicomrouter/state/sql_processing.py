"""Processing results (issue 29, items 1 and 2): a generation of a study made only of the
results its processing steps wrote is routed by the route's ``results:`` rules, each
destination's job limited to the result series (``series_only``), so the originals are not
sent to a destination that only takes results (the sender)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

from .base import REQUEUE, Placement, Study
from .sql_base import SQLBase


class ProcessingSQL(SQLBase):
    def route_results(self, study_uid: str, seen: Study,
                      series_by_dest: Mapping[str, Sequence[str]], why: str) -> bool:
        """Mark the study routed and give each destination a job for the result series (a
        job still sending the whole study keeps doing so; a delivered one takes only the
        results). False when an instance arrived since ``seen`` (it completes later)."""
        now = time.time()
        with self._tx(study_uid) as db:
            row = db.execute("SELECT state, generation, last_received FROM studies"
                             " WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None or row["state"] not in ("receiving", "unrouted", "held") \
                    or row["generation"] != seen.generation \
                    or row["last_received"] != seen.last_received:
                return False
            db.execute("UPDATE studies SET state='routed', completed_at=? WHERE study_uid=?",
                       (now, study_uid))
            self._event(db, study_uid, why, now)
            for dest, series in series_by_dest.items():
                job = db.execute("SELECT state, series_only FROM jobs WHERE study_uid=? AND"
                                 " destination=?", (study_uid, dest)).fetchone()
                if job is None:
                    db.execute("INSERT INTO jobs(study_uid, destination, state, attempts,"
                               " next_attempt, generation, created, updated, routes,"
                               " series_only, priority) VALUES (?,?,'pending',0,0,?,?,?,?,?,?)",
                               (study_uid, dest, seen.generation, now, now, json.dumps([]),
                                json.dumps(sorted(series)), Placement().priority("")))
                    continue
                if job["state"] == "delivered":
                    only: list[str] | None = sorted(series)
                elif job["series_only"] is None:
                    only = None  # still owes the whole study: the results come with it
                else:
                    only = sorted(set(json.loads(job["series_only"])) | set(series))
                db.execute("UPDATE jobs SET state=CASE WHEN state='running' THEN 'running'"
                           " ELSE 'pending' END, requeue=CASE WHEN state='running' THEN ?"
                           " ELSE 0 END, attempts=0, next_attempt=0, generation=?, updated=?,"
                           " series_only=? WHERE study_uid=? AND destination=?",
                           (REQUEUE, seen.generation, now,
                            None if only is None else json.dumps(only), study_uid, dest))
        return True
