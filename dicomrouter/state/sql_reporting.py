"""What status, the web side and the audit read: summaries, studies, jobs, history, throughput, the
ledger's counts; and the operator's requeue and reopen."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from .base import priority_name
from .sql_base import SQLBase


class ReportingSQL(SQLBase):
    """Reads for the faces, and the operator's actions on jobs."""

    # ---- reporting -------------------------------------------------------------------------

    def study_rows(self, with_done: bool = False, study_uid: str | None = None,
                   limit: int = 0) -> list[dict[str, Any]]:
        """The studies `status` lists (all of them, the newest ``limit`` of them, or one), with
        their spool counts, oldest first. Each row's counts read the instances of that study
        only (by index): the cost follows the studies listed, not the spool's size."""
        if study_uid is not None:
            where, args = " WHERE s.study_uid=?", [study_uid]
        else:
            where, args = ("" if with_done else f" WHERE {self.LISTED}"), []
        newest = ""
        if limit > 0 and study_uid is None:
            newest = " ORDER BY s.first_received DESC LIMIT ?"
            args.append(limit)
        # the studies chosen (and limited) first: the counts below are computed for them only
        chosen = f"(SELECT * FROM studies s{where}{newest})"
        rows = [dict(r) for r in self._query(
            "SELECT s.study_uid, s.patient_id, s.state, s.generation, s.calling_ae,"
            " s.first_received, s.last_received, s.completed_at, s.delivered_at, s.in_spool,"
            " s.incomplete,"
            " s.instances_present AS instances_in_spool, s.bytes_present AS bytes_in_spool,"
            " (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid)"
            "   AS instances_received,"
            " (SELECT COALESCE(SUM(size),0) FROM instances i WHERE i.study_uid=s.study_uid)"
            "   AS bytes_received,"
            + (" (SELECT COUNT(*) FROM moves m WHERE m.from_study=s.study_uid) AS moved_out,"
               " (SELECT COUNT(*) FROM moves m WHERE m.to_study=s.study_uid) AS moved_in"
               if self._has_moves() else " 0 AS moved_out, 0 AS moved_in") +
            f" FROM {chosen} s ORDER BY s.first_received", args)]
        # the node(s) that received each listed study's instances (several routers, one state)
        by_study: dict[str, dict[str, int]] = {}
        uids = [r["study_uid"] for r in rows]
        for first in range(0, len(uids), 500):
            chunk = uids[first:first + 500]
            for r in self._query("SELECT study_uid, node, COUNT(*) AS n FROM instances WHERE"
                                 f" study_uid IN ({','.join('?' * len(chunk))})"
                                 " GROUP BY study_uid, node", chunk):
                by_study.setdefault(r["study_uid"], {})[r["node"] or "?"] = r["n"]
        for row in rows:
            row["received_by"] = by_study.get(row["study_uid"], {})
        return rows

    #: the studies ``status`` lists without ``--all``: in the spool, or not done with
    LISTED = "(s.in_spool=1 OR s.state NOT IN ('delivered','moved'))"

    def study_counts(self, with_done: bool = False) -> dict[str, int]:
        """How many studies ``status`` would list, and how many of them are receiving."""
        where = "" if with_done else f" WHERE {self.LISTED}"
        row = self._query("SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN s.state='receiving'"
                          f" THEN 1 ELSE 0 END),0) AS receiving FROM studies s{where}")[0]
        return {"studies": int(row["n"]), "receiving": int(row["receiving"])}

    def gauges(self) -> dict[str, Any]:
        """What the metrics and the destinations' health read: the queues by destination and
        state, retrying and dead jobs, partial jobs, the spool's bytes, the sources. Nothing
        here grows with the number of instances (the spool total is kept on the studies)."""
        queues: dict[str, dict[str, int]] = {}
        for r in self._query("SELECT destination, state, COUNT(*) AS n FROM jobs"
                             " GROUP BY destination, state"):
            queues.setdefault(r["destination"], {})[r["state"]] = r["n"]
        dead = [dict(r) for r in self._query(
            "SELECT study_uid, destination, attempts, last_error, updated FROM jobs"
            " WHERE state='dead' ORDER BY updated")]
        failing = [dict(r) for r in self._query(
            "SELECT study_uid, destination, attempts, last_error, next_attempt FROM jobs"
            " WHERE state='failed' ORDER BY next_attempt")]
        partial: dict[str, dict[str, int]] = {}
        for r in self._query("SELECT destination, COUNT(*) AS jobs, SUM(missing) AS missing"
                             " FROM jobs WHERE missing>0 GROUP BY destination"):
            partial[r["destination"]] = {"jobs": int(r["jobs"]), "missing": int(r["missing"])}
        return {"queues": queues, "dead": dead, "retrying": failing, "partial": partial,
                "spool_bytes": self.spool_bytes(), "sources": self.source_rows(),
                "by_priority": self.queued_by_priority()}

    def summary(self, with_done: bool = False, limit: int = 0) -> dict[str, Any]:
        """Everything `status` shows, as plain data: ``studies`` lists the newest ``limit``
        (0: all), ``studies_total`` how many there are."""
        counts = self.study_counts(with_done)
        return {"studies": self.study_rows(with_done, limit=limit),
                "studies_total": counts["studies"], "studies_receiving": counts["receiving"],
                **self.gauges(), "nodes": self.nodes(), "cluster": self.leases}

    def count_studies(self, state: str, before: float) -> int:
        row = self._query("SELECT COUNT(*) AS n FROM studies WHERE state=? AND last_received<?",
                          [state, before])
        return int(row[0]["n"])

    def recent_studies(self, limit: int, offset: int = 0, state: str | None = None,
                       patient_id: str | None = None,
                       since: float | None = None) -> list[dict[str, Any]]:
        """Studies, newest first, with their instance counts (for the API and the page)."""
        where, args = [], []  # type: ignore[var-annotated]
        for cond, value in (("s.state=?", state), ("s.patient_id=?", patient_id),
                            ("s.last_received>=?", since)):
            if value is not None:
                where.append(cond)
                args.append(value)
        sql = ("SELECT s.study_uid, s.patient_id, s.patient_name, s.study_date, s.accession,"
               " s.description, s.calling_ae, s.called_ae, s.state, s.generation,"
               " s.first_received, s.last_received, s.completed_at, s.delivered_at, s.in_spool,"
               " s.incomplete,"
               " (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid) AS instances,"
               " (SELECT COALESCE(SUM(size),0) FROM instances i WHERE i.study_uid=s.study_uid)"
               " AS bytes FROM studies s")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY s.last_received DESC LIMIT ? OFFSET ?"
        return [dict(r) for r in self._query(sql, [*args, limit, offset])]

    def jobs(self, state: str | None = None, destination: str | None = None,
             study_uids: Sequence[str] | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Delivery jobs with their progress: ``delivered`` of ``total`` instances."""
        where, args = [], []  # type: ignore[var-annotated]
        if state:
            where.append("j.state=?")
            args.append(state)
        if destination:
            where.append("j.destination=?")
            args.append(destination)
        if study_uids is not None:
            if not study_uids:
                return []
            where.append(f"j.study_uid IN ({','.join('?' * len(study_uids))})")
            args.extend(study_uids)
        sql = ("SELECT j.id, j.study_uid, j.destination, j.state, j.attempts, j.next_attempt,"
               " j.last_error, j.routes, j.created, j.updated, j.node, j.missing, j.priority,"
               " (SELECT COUNT(*) FROM ledger l WHERE l.study_uid=j.study_uid AND"
               "  l.destination=j.destination AND l.delivered_at IS NOT NULL) AS delivered,"
               " (SELECT COUNT(*) FROM instances i WHERE i.study_uid=j.study_uid) AS total"
               " FROM jobs j")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY j.updated DESC LIMIT ?"
        rows = [dict(r) for r in self._query(sql, [*args, limit])]
        for r in rows:
            r["routes"] = json.loads(r["routes"] or "[]")
            r["partial"] = bool(r["missing"])
            r["priority"] = priority_name(r["priority"])
        return rows

    def requeue_job(self, job_id: int) -> dict[str, Any] | None:
        """Put one failed or dead job back to pending now; its study and destination."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT study_uid, destination FROM jobs WHERE id=? AND state IN"
                             " ('failed','dead')", (job_id,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='pending', attempts=0, next_attempt=0, updated=?"
                       " WHERE id=?", (now, job_id))
            db.execute("UPDATE studies SET state='routed' WHERE study_uid=? AND state='failed'",
                       (row["study_uid"],))
            self._event(db, row["study_uid"], f"delivery to {row['destination']} requeued by "
                        "hand (API)", now)
        return {"study_uid": row["study_uid"], "destination": row["destination"]}

    def reopen_study(self, study_uid: str) -> bool:
        """Make a study in the spool routable again (``reroute``): False if it is not there."""
        now = time.time()
        with self._tx() as db:
            n = db.execute("UPDATE studies SET state='unrouted' WHERE study_uid=? AND in_spool=1"
                           " AND state IN ('routed','delivered','failed','unrouted','held',"
                           " 'rejected')",
                           (study_uid,)).rowcount
            if n:
                self._event(db, study_uid, "rerouted by hand", now)
        return bool(n)

    def throughput(self, since: float, bucket: float) -> list[tuple[float, int]]:
        """Instances received per ``bucket`` seconds since ``since`` (start of each bucket)."""
        rows = self._query(f"SELECT {self._BUCKET} AS b, COUNT(*) AS n"
                           " FROM instances WHERE received_at>=? GROUP BY b ORDER BY b",
                           (since, bucket, since))
        return [(since + r["b"] * bucket, r["n"]) for r in rows]

    def events_since(self, since: float, study_uid: str | None = None) -> list[dict[str, Any]]:
        """The audit trail: every study event since ``since``, oldest first."""
        sql = "SELECT id, study_uid, ts, event FROM events WHERE ts>=?"
        args: list[Any] = [since]
        if study_uid:
            sql += " AND study_uid=?"
            args.append(study_uid)
        return [dict(r) for r in self._query(sql + " ORDER BY id", args)]

    def history(self, study_uid: str) -> list[tuple[float, str]]:
        return [(r["ts"], r["event"]) for r in self._query(
            "SELECT ts, event FROM events WHERE study_uid=? ORDER BY id", (study_uid,))]

    def ledger_stats(self, destination: str | None = None) -> dict[str, int]:
        sql = ("SELECT COUNT(*) AS entries, COALESCE(SUM(sends),0) AS sends,"
               " COALESCE(SUM(CASE WHEN delivered_at IS NOT NULL THEN 1 ELSE 0 END),0)"
               " AS delivered,"
               " COALESCE(SUM(CASE WHEN sends > 1 THEN sends - 1 ELSE 0 END),0) AS resent"
               " FROM ledger")
        rows = self._query(sql + (" WHERE destination=?" if destination else ""),
                           (destination,) if destination else ())
        r = rows[0]
        return {"entries": r["entries"], "sends": r["sends"], "delivered": r["delivered"],
                "resent": r["resent"]}
