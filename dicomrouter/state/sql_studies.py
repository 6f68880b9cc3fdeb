"""Study completion and routing: what is due, held, expected, routed (whole or by series), swept;
and the Q/R index's reads."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ..query import Query
from .base import REQUEUE, REQUEUE_HELD, Instance, Placement, Study, priority_name
from .qr import qr_select
from .sql_base import SQLBase


class StudiesSQL(SQLBase):
    """Studies from receiving to routed."""

    # ---- study completion and routing ------------------------------------------------------

    def due_studies(self, stable_age: float, now: float | None = None,
                    force_after: float = 0.0) -> list[str]:
        """Studies receiving with no arrival for ``stable_age`` seconds (or every announced
        instance in, or receiving for ``force_after`` seconds when it is set)."""
        now = now or time.time()
        forced = now - force_after if force_after > 0 else -1.0
        rows = self._query(
            "SELECT study_uid FROM studies s WHERE state='receiving' AND"
            " (await_until IS NULL OR await_until <= ?) AND (last_received <= ? OR"
            " COALESCE(receiving_since, first_received) <= ? OR"
            " (expected_instances > 0 AND (SELECT COUNT(*) FROM instances i WHERE"
            "  i.study_uid=s.study_uid) >= expected_instances)) ORDER BY last_received",
            (now, now - stable_age, forced))
        return [r["study_uid"] for r in rows]

    def receiving_for(self, study_uid: str, now: float | None = None) -> float:
        """Seconds the study has been receiving (this generation)."""
        rows = self._query("SELECT COALESCE(receiving_since, first_received) AS t FROM studies"
                           " WHERE study_uid=?", (study_uid,))
        return (now or time.time()) - (rows[0]["t"] or 0) if rows else 0.0

    def note(self, study_uid: str, text: str) -> None:
        """One event in a study's history."""
        with self._tx(study_uid) as db:
            self._event(db, study_uid, text, time.time())

    def hold_study(self, study_uid: str, why: str) -> None:
        """A study that would not stop receiving, held for an operator (reroute)."""
        with self._tx(study_uid) as db:
            db.execute("UPDATE studies SET state='held' WHERE study_uid=? AND state='receiving'",
                       (study_uid,))
            self._event(db, study_uid, why, time.time())

    def hold_jobs(self, study_uid: str, destinations: Sequence[str], until: float,
                  why: str) -> None:
        """New jobs of a route with a delivery window wait for it."""
        with self._tx(study_uid) as db:
            for dest in destinations:
                db.execute("UPDATE jobs SET next_attempt=CASE WHEN next_attempt > ? THEN"
                           " next_attempt ELSE ? END WHERE study_uid=? AND destination=? AND"
                           " state='pending'", (until, until, study_uid, dest))
            self._event(db, study_uid, why, time.time())

    def to_count(self, calling_aes: Sequence[str]) -> list[tuple[str, str]]:
        """(study, calling AE) of receiving studies from these senders not asked yet."""
        if not calling_aes:
            return []
        return [(r["study_uid"], r["calling_ae"]) for r in self._query(
            "SELECT study_uid, calling_ae FROM studies WHERE state='receiving' AND"
            f" expected_instances IS NULL AND calling_ae IN ({','.join('?' * len(calling_aes))})",
            list(calling_aes))]

    def all_announced_in(self, study_uid: str) -> bool:
        """Whether the sender announced a count and that many instances are in."""
        rows = self._query("SELECT expected_instances AS want, (SELECT COUNT(*) FROM instances"
                           " WHERE study_uid=?) AS have FROM studies WHERE study_uid=?",
                           (study_uid, study_uid))
        return bool(rows) and (rows[0]["want"] or 0) > 0 and rows[0]["have"] >= rows[0]["want"]

    def set_expected(self, study_uid: str, count: int, why: str) -> None:
        """The instance count the sender announced (0: it could not say)."""
        with self._tx(study_uid) as db:
            db.execute("UPDATE studies SET expected_instances=? WHERE study_uid=?",
                       (count, study_uid))
            self._event(db, study_uid, why, time.time())

    def set_await(self, study_uid: str, until: float | None, why: str = "") -> None:
        """A route of the study waits for its own stable age: look at it again at ``until``
        (None: nothing waits any more)."""
        with self._tx(study_uid) as db:
            db.execute("UPDATE studies SET await_until=? WHERE study_uid=?", (until, study_uid))
            if why:
                self._event(db, study_uid, why, time.time())

    def awaiting_studies(self, now: float | None = None) -> list[str]:
        """Routed studies with a route whose stable age is now over."""
        return [r["study_uid"] for r in self._query(
            "SELECT study_uid FROM studies WHERE state!='receiving' AND await_until IS NOT NULL"
            " AND await_until <= ?", (now or time.time(),))]

    def studies_in_state(self, state: str) -> list[str]:
        return [r["study_uid"] for r in
                self._query("SELECT study_uid FROM studies WHERE state=?", (state,))]

    def study(self, study_uid: str) -> Study | None:
        rows = self._query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        if not rows:
            return None
        r = rows[0]
        return Study(r["study_uid"], r["state"], r["generation"], r["patient_id"] or "",
                     r["calling_ae"] or "", r["last_received"] or 0.0, bool(r["in_spool"]))

    def instances(self, study_uid: str, present_only: bool = True) -> list[Instance]:
        sql = "SELECT * FROM instances WHERE study_uid=?"
        if present_only:
            sql += " AND present=1"
        return [self._instance(r) for r in self._query(sql + " ORDER BY received_at", (study_uid,))]

    @staticmethod
    def _instance(r: Any) -> Instance:
        return Instance(r["sop_uid"], r["study_uid"], r["series_uid"] or "", r["sop_class"] or "",
                        r["transfer_syntax"] or "", r["path"], r["size"],
                        r["calling_ae"] or "", r["called_ae"] or "", json.loads(r["tags"] or "{}"),
                        r["generation"],
                        (r["node"] or "") if "node" in r.keys() else "")  # noqa: SIM118

    def route_study(self, study_uid: str, destinations: Sequence[str], routes: Sequence[str],
                    seen: Study, explanation: str = "",
                    placement: Placement | None = None) -> bool:
        """Mark a stable study routed (one job per destination) or unrouted, atomically.

        ``seen`` is the study row the decision was made on; if an instance arrived since, nothing
        is changed and False is returned (the study stays receiving and completes later).
        ``placement``: the jobs' priorities and the destinations whose jobs are held (in the
        same transaction: a held job is never claimable, not even for an instant).
        """
        placement = placement or Placement()
        now = time.time()
        expected_generation = seen.generation
        with self._tx(study_uid) as db:
            row = db.execute("SELECT state, generation, last_received FROM studies"
                             " WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None or row["state"] not in ("receiving", "unrouted", "held") \
                    or row["generation"] != expected_generation \
                    or row["last_received"] != seen.last_received:
                return False
            n = db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=? AND generation=?",
                           (study_uid, expected_generation)).fetchone()[0]
            announced = db.execute("SELECT expected_instances, (SELECT COUNT(*) FROM instances"
                                   " WHERE study_uid=?) FROM studies WHERE study_uid=?",
                                   (study_uid, study_uid)).fetchone()
            if announced[0] and announced[0] > 0 and row["state"] == "receiving":
                have, want = announced[1], announced[0]
                self._event(db, study_uid, f"complete with {have} of {want} announced "
                            "instance(s)" if have >= want else f"the stable age passed with "
                            f"only {have} of {want} announced instance(s): routed as it is",
                            now)
            if explanation and row["state"] != "unrouted":
                self._event(db, study_uid, f"routing: {explanation}", now)
            if not destinations:
                db.execute("UPDATE studies SET state='unrouted', completed_at=? WHERE study_uid=?",
                           (now, study_uid))
                if row["state"] != "unrouted":
                    self._event(db, study_uid, f"complete ({n} new instances); matched no route,"
                                " kept in the spool as unrouted", now)
                return True
            db.execute("UPDATE studies SET state='routed', completed_at=? WHERE study_uid=?",
                       (now, study_uid))
            self._event(db, study_uid, f"complete ({n} new instances, generation "
                        f"{expected_generation}); routes: {', '.join(routes)}; "
                        f"destinations: {', '.join(destinations)}", now)
            for dest in destinations:
                db.execute(
                    "INSERT INTO jobs(study_uid, destination, state, attempts, next_attempt,"
                    " generation, created, updated, routes, priority)"
                    " VALUES (?,?,?,0,0,?,?,?,?,?)"
                    " ON CONFLICT(study_uid, destination) DO UPDATE SET"
                    "  state=CASE WHEN jobs.state='running' THEN 'running' ELSE excluded.state"
                    "  END, requeue=CASE WHEN jobs.state='running' THEN ? ELSE 0 END,"
                    "  attempts=0, next_attempt=0, generation=excluded.generation,"
                    "  created=excluded.created, updated=excluded.updated, released=NULL,"
                    "  routes=excluded.routes, series_only=NULL, priority=excluded.priority",
                    (study_uid, dest, "held" if dest in placement.held else "pending",
                     expected_generation, now, now, json.dumps(list(routes)),
                     placement.priority(dest),
                     # a run still going when a held generation arrives: held once it ends
                     REQUEUE_HELD if dest in placement.held else REQUEUE))
            self._note_placement(db, study_uid, destinations, placement, now)
            self._count_missing(db, study_uid, destinations, now)
        return True

    def _note_placement(self, db: Any, study_uid: str, destinations: Sequence[str],
                        placement: Placement, now: float) -> None:
        """The history says which jobs are held, and which are not routine."""
        urgent = [f"{d} {priority_name(placement.priority(d))}" for d in destinations
                  if placement.priority(d) != Placement().priority(d)]
        if urgent:
            self._event(db, study_uid, "priority: " + ", ".join(urgent), now)
        held = [d for d in destinations if d in placement.held]
        if held:
            self._event(db, study_uid, f"held for {', '.join(held)} (a route with hold: true):"
                        f" waits for 'dicomrouter release {study_uid} --reason ...' or"
                        " 'dicomrouter reject'", now)

    _MISSING = ("SELECT COUNT(*) FROM instances i WHERE i.study_uid=? AND i.present=0 AND"
                " NOT EXISTS (SELECT 1 FROM ledger l WHERE l.sop_uid=i.sop_uid AND"
                " l.destination=? AND l.delivered_at IS NOT NULL)")

    def _missing_for(self, db: Any, study_uid: str, dest: str) -> int:
        """Instances of the study absent from the spool that the job owes ``dest``: a job
        limited to some series (processing results) owes none of the others."""
        row = db.execute("SELECT series_only FROM jobs WHERE study_uid=? AND destination=?",
                         (study_uid, dest)).fetchone()
        only = json.loads(row["series_only"]) if row is not None and row["series_only"] \
            is not None else None
        if only is None:
            return int(db.execute(self._MISSING, (study_uid, dest)).fetchone()[0])
        if not only:
            return 0
        marks = ",".join("?" * len(only))
        return int(db.execute(self._MISSING + f" AND i.series_uid IN ({marks})",
                              (study_uid, dest, *only)).fetchone()[0])

    def _count_missing(self, db: Any, study_uid: str, destinations: Iterable[str],
                       now: float, note: bool = True) -> dict[str, int]:
        """Record on each job how many of the study's instances its destination never got and
        never can: deleted from the spool (after their delivery elsewhere) before a late
        arrival made a route send the study there. Such a job delivers what the spool holds
        and stays *partial*, visibly (status, API, /metrics, the history). Returns those."""
        out: dict[str, int] = {}
        gone = db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=? AND present=0",
                          (study_uid,)).fetchone()[0]
        for dest in destinations:
            missing = self._missing_for(db, study_uid, dest) if gone else 0
            old = db.execute("UPDATE jobs SET missing=? WHERE study_uid=? AND destination=?"
                             " AND missing!=?", (missing, study_uid, dest, missing)).rowcount
            if missing:
                out[dest] = missing
                if note and old:
                    total = db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?",
                                       (study_uid,)).fetchone()[0]
                    self._event(db, study_uid, f"{dest}: {missing} of {total} instance(s) were "
                                "deleted from the spool (after their delivery elsewhere) before "
                                f"the study was routed there: it gets only the "
                                f"{total - missing} still held, a partial delivery (keep "
                                "studies for late arrivals with retention to send them whole)",
                                now)
        return out

    def stable_series(self, age: float, route: str,
                      now: float | None = None) -> list[tuple[str, str, int]]:
        """(study, series, generation) of receiving studies whose series had no arrival for
        ``age`` seconds and were not routed by ``route`` yet (this generation)."""
        rows = self._query(
            "SELECT i.study_uid, i.series_uid, MAX(s.generation) AS generation FROM instances i"
            " JOIN studies s ON"
            " s.study_uid=i.study_uid WHERE s.state='receiving' AND i.generation=s.generation"
            " AND NOT EXISTS (SELECT 1 FROM series_routed r WHERE r.study_uid=i.study_uid AND"
            " r.series_uid=i.series_uid AND r.route=? AND r.generation=s.generation)"
            " GROUP BY i.study_uid, i.series_uid HAVING MAX(i.received_at) <= ?",
            (route, (now or time.time()) - age))
        return [(r["study_uid"], r["series_uid"], r["generation"]) for r in rows]

    def route_series(self, study_uid: str, series_uid: str, generation: int, route: str,
                     destinations: Sequence[str], why: str, priority: int | None = None) -> None:
        """Deliver one stable series now: the jobs of ``destinations`` take it (only the
        series routed this way while the study still receives), at ``priority`` (routine)."""
        priority = Placement().priority("") if priority is None else priority
        now = time.time()
        with self._tx(study_uid) as db:
            db.execute("INSERT INTO series_routed VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                       (study_uid, series_uid, route, generation))
            for dest in destinations:
                row = db.execute("SELECT state, series_only FROM jobs WHERE study_uid=? AND"
                                 " destination=?", (study_uid, dest)).fetchone()
                if row is None:
                    db.execute("INSERT INTO jobs(study_uid, destination, state, attempts,"
                               " next_attempt, generation, created, updated, routes,"
                               " series_only, priority) VALUES (?,?,'pending',0,0,?,?,?,?,?,?)",
                               (study_uid, dest, generation, now, now, json.dumps([route]),
                                json.dumps([series_uid]), priority))
                    continue
                series = json.loads(row["series_only"]) if row["series_only"] else []
                if row["series_only"] is not None and series_uid not in series:
                    series.append(series_uid)
                db.execute("UPDATE jobs SET state=CASE WHEN state='running' THEN 'running'"
                           " ELSE 'pending' END, requeue=CASE WHEN state!='running' THEN 0"
                           " WHEN requeue=2 THEN 2 ELSE 1 END, attempts=0, next_attempt=0,"
                           " updated=?, series_only=?, priority=CASE WHEN priority < ?"
                           " THEN priority ELSE ? END WHERE study_uid=? AND destination=?",
                           (now, json.dumps(series) if row["series_only"] is not None
                            else None, priority, priority, study_uid, dest))
            self._event(db, study_uid, why, now)

    def receiving_studies(self) -> list[tuple[str, int, float]]:
        """(study, generation, last arrival) of every study still receiving."""
        return [(r["study_uid"], r["generation"], r["last_received"]) for r in self._query(
            "SELECT study_uid, generation, last_received FROM studies WHERE state='receiving'")]

    def forward_now(self, study_uid: str, generation: int, route: str,
                    destinations: Sequence[str], why: str,
                    priority: int | None = None) -> list[str]:
        """``forward: immediate``: the jobs of ``destinations`` take what the receiving study
        holds now (created, pending again when delivered, ``requeue`` when running; a job
        waiting for its retry, or dead, keeps waiting with its attempts). The destinations
        whose job is due now. ``priority``: the route's (routine when None)."""
        priority = Placement().priority("") if priority is None else priority
        now = time.time()
        due: list[str] = []
        with self._tx(study_uid) as db:
            row = db.execute("SELECT state, generation FROM studies WHERE study_uid=?",
                             (study_uid,)).fetchone()
            if row is None or row["state"] != "receiving" or row["generation"] != generation:
                return []
            for dest in destinations:
                job = db.execute("SELECT state, routes FROM jobs WHERE study_uid=? AND"
                                 " destination=?", (study_uid, dest)).fetchone()
                if job is None:
                    db.execute("INSERT INTO jobs(study_uid, destination, state, attempts,"
                               " next_attempt, generation, created, updated, routes, priority)"
                               " VALUES (?,?,'pending',0,0,?,?,?,?,?)",
                               (study_uid, dest, generation, now, now, json.dumps([route]),
                                priority))
                    self._event(db, study_uid, why.replace("{dest}", dest), now)
                    due.append(dest)
                    continue
                routes = json.loads(job["routes"] or "[]")
                if route not in routes:
                    routes.append(route)
                # one statement decides on the row as it is when written (a claim may commit
                # between the read above and here: a running job is only marked requeue); a
                # job that failed keeps its attempts and its backoff
                db.execute("UPDATE jobs SET"
                           " requeue=CASE WHEN state='running' AND requeue=0 THEN 1"
                           "  ELSE requeue END,"
                           " attempts=CASE WHEN state='delivered' THEN 0 ELSE attempts END,"
                           " next_attempt=CASE WHEN state='delivered' THEN 0"
                           "  ELSE next_attempt END,"
                           " generation=CASE WHEN state IN ('delivered','pending') THEN ?"
                           "  ELSE generation END,"
                           " series_only=CASE WHEN state IN ('delivered','pending') THEN NULL"
                           "  ELSE series_only END,"
                           " state=CASE WHEN state='delivered' THEN 'pending' ELSE state END,"
                           " updated=?, routes=?, priority=CASE WHEN priority < ? THEN"
                           "  priority ELSE ? END WHERE study_uid=? AND destination=?",
                           (generation, now, json.dumps(routes), priority, priority,
                            study_uid, dest))
                if job["state"] in ("delivered", "pending"):
                    due.append(dest)
        return due

    def sweepable_studies(self) -> list[str]:
        """Studies the spool holds that are not receiving (the sweep re-evaluates them)."""
        return [r["study_uid"] for r in self._query(
            "SELECT study_uid FROM studies WHERE in_spool=1 AND state IN"
            " ('routed','delivered','failed','unrouted') ORDER BY first_received")]

    def sweep_study(self, study_uid: str, destinations: Sequence[str], routes: Sequence[str],
                    explanation: str = "", why: str = "sweep",
                    placement: Placement | None = None) -> list[str]:
        """Add jobs for the destinations the study has none for yet; the ones added
        (``placement``: their priorities, those held)."""
        placement = placement or Placement()
        now = time.time()
        with self._tx(study_uid) as db:
            row = db.execute("SELECT state, generation, in_spool FROM studies WHERE"
                             " study_uid=?", (study_uid,)).fetchone()
            if row is None or not row["in_spool"] or row["state"] == "receiving":
                return []
            have = {r[0] for r in db.execute("SELECT destination FROM jobs WHERE study_uid=?",
                                             (study_uid,))}
            new = [d for d in destinations if d not in have]
            if not new:
                return []
            for dest in new:
                db.execute("INSERT INTO jobs(study_uid, destination, state, attempts,"
                           " next_attempt, generation, created, updated, routes, priority)"
                           " VALUES (?,?,?,0,0,?,?,?,?,?)",
                           (study_uid, dest, "held" if dest in placement.held else "pending",
                            row["generation"], now, now, json.dumps(list(routes)),
                            placement.priority(dest)))
            self._count_missing(db, study_uid, new, now)
            db.execute("UPDATE studies SET state='routed', completed_at=COALESCE(completed_at,"
                       " ?) WHERE study_uid=? AND state IN ('delivered','unrouted')",
                       (now, study_uid))
            self._event(db, study_uid, f"{why}: now also to {', '.join(new)} (routes: "
                        f"{', '.join(routes)})" + (f"; routing: {explanation}"
                                                   if explanation else ""), now)
            self._note_placement(db, study_uid, new, placement, now)
        return new

    # ---- query/retrieve ----------------------------------------------------------------------

    def qr_rows(self, query: Query, limit: int = 0, offset: int = 0) -> list[dict[str, str]]:
        sql, args = qr_select(query, limit, dialect=self._QR_DIALECT, offset=offset)
        rows = [{k: "" if v is None else str(v) for k, v in dict(r).items()}
                for r in self._query(sql, args)]
        for row in rows:
            if "ModalitiesInStudy" in row:  # GROUP_CONCAT's separator is fixed
                row["ModalitiesInStudy"] = row["ModalitiesInStudy"].replace(",", "\\")
        return rows

    def qr_instances(self, query: Query) -> list[Instance]:
        sql, args = qr_select(query, 0, instances=True,
                               dialect=self._QR_DIALECT)
        return [self._instance(r) for r in self._query(sql, args)]
