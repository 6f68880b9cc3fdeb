"""Priorities and held jobs (issue 26): whether a more urgent job waits for a destination, the
release and the rejection of a held study (audited in its history), the queue by priority."""

from __future__ import annotations

import time
from typing import Any

from .base import Placement, priority_name
from .sql_base import SQLBase


class HoldSQL(SQLBase):
    """Held jobs (``state='held'``) and priorities (``jobs.priority``, 0: stat)."""

    def urgent_due(self, destination: str, priority: int, now: float | None = None) -> bool:
        """A pending (or failed and due) job of ``destination`` more urgent than ``priority``."""
        rows = self._query("SELECT 1 FROM jobs WHERE destination=? AND priority<? AND state IN"
                           " ('pending','failed') AND next_attempt <= ? LIMIT 1",
                           (destination, priority, now or time.time()))
        return bool(rows)

    def _decide(self, study_uid: str, who: str, why: str, to: str, verb: str) -> list[str]:
        now = time.time()
        with self._tx(study_uid) as db:
            dests = [r[0] for r in db.execute(
                "SELECT destination FROM jobs WHERE study_uid=? AND state='held'"
                " ORDER BY destination", (study_uid,))]
            if not dests:
                return []
            db.execute("UPDATE jobs SET state=?, next_attempt=0, updated=?, released=? WHERE"
                       " study_uid=? AND state='held'",
                       (to, now, now if to == "pending" else None, study_uid))
            self._event(db, study_uid, f"{verb} by {who} for {', '.join(dests)}: {why}", now)
        return dests

    def hold_placed(self, study_uid: str, placement: Placement) -> list[str]:
        """Jobs queued before a route that holds (or is more urgent for) their destination
        matched: pending or failed ones are held now (unless an operator released this
        generation) and get the placement's priority if it is more urgent. Running and
        delivered jobs are left alone. The destinations held now."""
        rows = self._query("SELECT destination, state, priority, released FROM jobs WHERE"
                           " study_uid=?", (study_uid,))
        if not any(r["state"] in ("pending", "failed", "held") and
                   r["priority"] > placement.priorities.get(r["destination"], r["priority"]) or
                   r["state"] in ("pending", "failed") and r["released"] is None and
                   r["destination"] in placement.held for r in rows):
            return []  # the usual case (the sweep asks for every study): no write
        now = time.time()
        held: list[str] = []
        with self._tx(study_uid) as db:
            raised = []
            for dest, rank in sorted(placement.priorities.items()):
                if db.execute("UPDATE jobs SET priority=? WHERE study_uid=? AND destination=?"
                              " AND state IN ('pending','failed','held') AND priority>?",
                              (rank, study_uid, dest, rank)).rowcount:
                    raised.append(f"{dest} {priority_name(rank)}")
            for dest in sorted(placement.held):
                if db.execute("UPDATE jobs SET state='held', next_attempt=0, updated=? WHERE"
                              " study_uid=? AND destination=? AND state IN ('pending','failed')"
                              " AND released IS NULL", (now, study_uid, dest)).rowcount:
                    held.append(dest)
            if raised:
                self._event(db, study_uid, "priority raised: " + ", ".join(raised), now)
            if held:
                self._event(db, study_uid, f"held for {', '.join(held)} (a route with hold: "
                            "true matched after the job was queued): waits for 'dicomrouter "
                            f"release {study_uid} --reason ...' or 'dicomrouter reject'", now)
        return held

    def release_study(self, study_uid: str, who: str, why: str) -> list[str]:
        return self._decide(study_uid, who, why, "pending", "released")

    def reject_study(self, study_uid: str, who: str, why: str) -> list[str]:
        dests = self._decide(study_uid, who, why, "rejected", "rejected (not delivered)")
        if dests:
            self.settle_study(study_uid)  # its other jobs may all be delivered already
        return dests

    def queued_by_priority(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self._query("SELECT destination, priority, COUNT(*) AS n FROM jobs WHERE state"
                             " IN ('pending','failed','running') GROUP BY destination, priority"):
            name = priority_name(r["priority"])
            by = out.setdefault(r["destination"], {})
            by[name] = by.get(name, 0) + int(r["n"])
        return out

    def held_studies(self) -> list[dict[str, Any]]:
        """Studies with held jobs, oldest first: study, patient, destinations, since."""
        rows = self._query(
            "SELECT j.study_uid, s.patient_id, j.destination, j.updated FROM jobs j JOIN"
            " studies s ON s.study_uid=j.study_uid WHERE j.state='held'"
            " ORDER BY j.updated, j.study_uid, j.destination")
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            row = out.setdefault(r["study_uid"], {"study_uid": r["study_uid"],
                                                  "patient_id": r["patient_id"],
                                                  "destinations": [], "since": r["updated"]})
            row["destinations"].append(r["destination"])
        return list(out.values())
