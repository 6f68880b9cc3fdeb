"""The state's SQL, shared by the SQLite (embedded default) and PostgreSQL backends.

The statements are written once in the SQL both engines speak (``?`` placeholders, which the
PostgreSQL connection turns into ``%s``; ``ON CONFLICT`` upserts; ``CASE`` instead of scalar
``MAX``); what differs lives in the subclasses: connections, transactions, the per-study
exclusion, schema and migrations, and a few dialect snippets (``_BUCKET``, ``_QR_DIALECT``).

A subclass provides ``_tx(study)`` (a write transaction; ``study`` names the study whose rows
it reads and then changes, so PostgreSQL serialises those across nodes with a transaction-level
advisory lock: SQLite's ``BEGIN IMMEDIATE`` serialises every writer anyway) and ``_query``
(a read); rows answer both ``row[0]`` and ``row["name"]``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ..query import Query
from .base import Instance, Job, Reception, Recorded, SourceStudy, State, Study
from .qr import qr_select

# A ledger row is one (instance, destination). Sent under another study than the row's (the
# instance moved), it starts over: that study's delivery says nothing about this one's.
_SAME_STUDY_UPSERT = (
    " sends=CASE WHEN ledger.study_uid<>excluded.study_uid THEN ?"
    " WHEN ledger.sends+? < 0 THEN 0 ELSE ledger.sends+? END,"
    " delivered_at=CASE WHEN ledger.study_uid<>excluded.study_uid THEN NULL"
    " ELSE ledger.delivered_at END,"
    " digest=CASE WHEN ledger.study_uid<>excluded.study_uid THEN NULL ELSE ledger.digest END,"
    " study_uid=excluded.study_uid")


class SQLState(State):
    """Everything the router asks of its state, in portable SQL (see the module's doc)."""

    #: the node this process is (the instances it records, the jobs it leases)
    node_id: str = socket.gethostname()
    #: jobs are leased (several nodes): a running job whose lease ran out is claimed again
    leases: bool = False
    lease: float = 30.0
    _BUCKET = "CAST((received_at-?)/? AS INTEGER)"  # throughput buckets (truncating)
    _QR_DIALECT = "sqlite"

    def _tx(self, study: str | None = None) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    @staticmethod
    def _event(db: Any, study_uid: str, text: str, now: float) -> None:
        db.execute("INSERT INTO events(study_uid, ts, event) VALUES (?,?,?)",
                   (study_uid, now, text))

    # ---- receiving -------------------------------------------------------------------------

    def _lock_study(self, db: Any, study_uid: str) -> None:
        """Inside a transaction begun for another study: exclude this one too (PostgreSQL's
        advisory lock; SQLite's writers are serialised already)."""

    def record_instance(self, tags: dict[str, str], tsuid: str, key: str, size: int,
                        calling_ae: str, called_ae: str,
                        shared: bool = True) -> Recorded:
        """Record a durable instance (see ``Recorded`` for what it returns).

        ``shared``: the instance is in the shared store already (or there is none); False
        (``ack_after: local``) until the upload behind the acknowledgement is done.

        A study that had already been routed is reopened (late arrival): its generation grows and
        only the new instances will be delivered. A re-sent SOP Instance UID replaces the old row
        and is delivered again (its content may have been corrected at the source). Received
        under another study (a PACS reconciliation), it *moves*: the newer reception is the
        only one (one row, one spool file: the caller deletes the ``superseded`` one), the
        history of both studies says so and which destinations had it under the old one.
        """
        now = time.time()
        study = tags["StudyInstanceUID"]
        sop = tags["SOPInstanceUID"]
        with self._tx(study) as db:
            row = db.execute("SELECT state, generation FROM studies WHERE study_uid=?",
                             (study,)).fetchone()
            if row is None:
                generation = 1
                db.execute(
                    "INSERT INTO studies(study_uid, patient_id, patient_name, study_date,"
                    " accession, description, calling_ae, called_ae, state, generation,"
                    " first_received, last_received, receiving_since)"
                    " VALUES (?,?,?,?,?,?,?,?,'receiving',1,?,?,?)",
                    (study, tags.get("PatientID"), tags.get("PatientName"), tags.get("StudyDate"),
                     tags.get("AccessionNumber"), tags.get("StudyDescription"), calling_ae,
                     called_ae, now, now, now))
                self._event(db, study, f"receiving from {calling_ae}", now)
            elif row["state"] != "receiving":
                generation = row["generation"] + 1
                db.execute("UPDATE studies SET state='receiving', generation=?, last_received=?,"
                           " in_spool=1, calling_ae=?, await_until=NULL, receiving_since=?"
                           " WHERE study_uid=?", (generation, now, calling_ae, now, study))
                self._event(db, study, f"reopened by a late arrival from {calling_ae} "
                            f"(generation {generation})", now)
            else:
                generation = row["generation"]
                db.execute("UPDATE studies SET last_received=?, await_until=NULL WHERE"
                           " study_uid=?", (now, study))
            old = db.execute("SELECT study_uid, path, size, present, tags FROM instances"
                             " WHERE sop_uid=?", (sop,)).fetchone()
            replaced_size = old["size"] if old is not None and old["present"] else 0
            superseded = old["path"] if old is not None and old["present"] and \
                old["path"] != key else ""
            moved_from = old["study_uid"] if old is not None and \
                old["study_uid"] != study else ""
            if moved_from:
                self._move_out(db, sop, moved_from, json.loads(old["tags"] or "{}"), study,
                               tags, now)
            db.execute(
                "INSERT INTO instances(sop_uid, study_uid, series_uid, sop_class,"
                " transfer_syntax, path, size, received_at, generation, calling_ae, called_ae,"
                " tags, present, node, shared) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,1,?,?)"
                " ON CONFLICT(sop_uid) DO UPDATE SET study_uid=excluded.study_uid,"
                " series_uid=excluded.series_uid, sop_class=excluded.sop_class,"
                " transfer_syntax=excluded.transfer_syntax, path=excluded.path,"
                " size=excluded.size, received_at=excluded.received_at,"
                " generation=excluded.generation, calling_ae=excluded.calling_ae,"
                " called_ae=excluded.called_ae, tags=excluded.tags, present=1,"
                " node=excluded.node, shared=excluded.shared",
                (sop, study, tags.get("SeriesInstanceUID"), tags.get("SOPClassUID"), tsuid,
                 key, size, now, generation, calling_ae, called_ae, json.dumps(tags),
                 self.node_id, int(shared)))
            if moved_from:  # delivered under its old study: nothing of that counts here
                db.execute("DELETE FROM ledger WHERE sop_uid=?", (sop,))
            elif old is not None:  # delivered again, unless a destination has these very
                # bytes (the ledger keeps the digest of what it delivered: delivery compares)
                db.execute("UPDATE ledger SET delivered_at=NULL, sends=0 WHERE sop_uid=?",
                           (sop,))
            if moved_from:
                self._emptied(db, moved_from, sop, study, now)
        return Recorded(old is not None, generation, replaced_size, superseded, moved_from)

    def _move_out(self, db: Any, sop: str, old_study: str, old_tags: dict[str, str],
                  new_study: str, tags: dict[str, str], now: float) -> None:
        """Record that ``sop`` leaves ``old_study`` for ``new_study`` (before its ledger rows
        go): a ``moves`` row and an event in both histories naming the destinations that got
        it under the old study. They keep that copy: DICOM gives a router no way to take an
        instance back, so the history is where an operator learns what to correct there."""
        self._lock_study(db, old_study)
        had = [r[0] for r in db.execute(
            "SELECT destination FROM ledger WHERE sop_uid=? AND delivered_at IS NOT NULL"
            " ORDER BY destination", (sop,))]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        old_pid, new_pid = old_tags.get("PatientID", ""), tags.get("PatientID", "")
        patient = f" (patient {old_pid or '?'} → {new_pid or '?'})" if old_pid != new_pid \
            else ""
        got = ", ".join(had) or "none"
        db.execute("INSERT INTO moves(sop_uid, from_study, to_study, moved_at, from_patient,"
                   " to_patient, delivered_to) VALUES (?,?,?,?,?,?,?)",
                   (sop, old_study, new_study, now, old_pid, new_pid, json.dumps(had)))
        self._event(db, old_study, f"instance {sop} moved to study {new_study}{patient} on "
                    f"{when}; destinations that received it under this study: {got}"
                    + (" (they keep that version: the router does not delete at destinations)"
                       if had else ""), now)
        self._event(db, new_study, f"instance {sop} moved here from study {old_study}"
                    f"{patient} on {when}; destinations that had it under that study: {got}; "
                    "it is delivered under this study like any new instance", now)

    def _emptied(self, db: Any, study: str, sop: str, new_study: str, now: float) -> None:
        """A study whose last instance moved away: ``moved``, nothing left to deliver (its jobs
        that had not delivered are dropped; one running finishes with nothing to send)."""
        if db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?",
                      (study,)).fetchone()[0]:
            return
        dropped = [r[0] for r in db.execute(
            "SELECT destination FROM jobs WHERE study_uid=? AND state IN"
            " ('pending','failed','dead') ORDER BY destination", (study,))]
        db.execute("DELETE FROM jobs WHERE study_uid=? AND state IN ('pending','failed','dead')",
                   (study,))
        db.execute("UPDATE studies SET state='moved', in_spool=0, await_until=NULL"
                   " WHERE study_uid=?", (study,))
        self._event(db, study, f"every instance moved to other studies (the last, {sop}, to "
                    f"{new_study}): nothing left to deliver" +
                    (f"; deliveries dropped: {', '.join(dropped)}" if dropped else ""), now)

    def reception(self, sop_uid: str) -> Reception | None:
        rows = self._query("SELECT study_uid, path, received_at, present FROM instances"
                           " WHERE sop_uid=?", (sop_uid,))
        if not rows:
            return None
        r = rows[0]
        return Reception(r["study_uid"], r["path"], r["received_at"] or 0.0, bool(r["present"]))

    _moves_table = False

    def _has_moves(self) -> bool:
        """Whether the ``moves`` table exists (a read-only look at a spool written before it
        was added has none)."""
        if not self._moves_table:
            try:
                self._query("SELECT 1 FROM moves WHERE 1=0")
                self._moves_table = True
            except Exception:
                return False
        return True

    def moves(self, study_uid: str) -> list[dict[str, Any]]:
        """Instances that moved out of or into a study, oldest first."""
        if not self._has_moves():
            return []
        rows = self._query("SELECT sop_uid, from_study, to_study, moved_at, from_patient,"
                           " to_patient, delivered_to FROM moves WHERE from_study=? OR"
                           " to_study=? ORDER BY id", (study_uid, study_uid))
        out = [dict(r) for r in rows]
        for r in out:
            r["delivered_to"] = json.loads(r["delivered_to"] or "[]")
        return out

    def mark_shared(self, sop_uid: str, key: str) -> None:
        """The instance recorded under ``key`` is now in the shared store too."""
        with self._tx() as db:
            db.execute("UPDATE instances SET shared=1 WHERE sop_uid=? AND path=?",
                       (sop_uid, key))

    def instance(self, sop_uid: str) -> Instance | None:
        rows = self._query("SELECT * FROM instances WHERE sop_uid=?", (sop_uid,))
        return self._instance(rows[0]) if rows else None

    def all_keys(self) -> set[str]:
        """The keys of every instance row, present or not (cluster: the objects rows know)."""
        return {r["path"] for r in self._query("SELECT path FROM instances")}

    def known_keys(self) -> set[str]:
        return {r["path"] for r in self._query("SELECT path FROM instances WHERE present=1")}

    def spool_bytes(self) -> int:
        rows = self._query("SELECT COALESCE(SUM(size),0) AS n FROM instances WHERE present=1")
        return int(rows[0]["n"])

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
                    seen: Study, explanation: str = "") -> bool:
        """Mark a stable study routed (one job per destination) or unrouted, atomically.

        ``seen`` is the study row the decision was made on; if an instance arrived since, nothing
        is changed and False is returned (the study stays receiving and completes later).
        """
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
                    " generation, created, updated, routes) VALUES (?,?,'pending',0,0,?,?,?,?)"
                    " ON CONFLICT(study_uid, destination) DO UPDATE SET"
                    "  state=CASE WHEN jobs.state='running' THEN 'running' ELSE 'pending' END,"
                    "  requeue=CASE WHEN jobs.state='running' THEN 1 ELSE 0 END,"
                    "  attempts=0, next_attempt=0, generation=excluded.generation,"
                    "  created=excluded.created, updated=excluded.updated,"
                    "  routes=excluded.routes, series_only=NULL",
                    (study_uid, dest, expected_generation, now, now, json.dumps(list(routes))))
            self._count_missing(db, study_uid, destinations, now)
        return True

    _MISSING = ("SELECT COUNT(*) FROM instances i WHERE i.study_uid=? AND i.present=0 AND"
                " NOT EXISTS (SELECT 1 FROM ledger l WHERE l.sop_uid=i.sop_uid AND"
                " l.destination=? AND l.delivered_at IS NOT NULL)")

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
            missing = db.execute(self._MISSING, (study_uid, dest)).fetchone()[0] if gone else 0
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
                     destinations: Sequence[str], why: str) -> None:
        """Deliver one stable series now: the jobs of ``destinations`` take it (only the
        series routed this way while the study still receives)."""
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
                               " series_only) VALUES (?,?,'pending',0,0,?,?,?,?,?)",
                               (study_uid, dest, generation, now, now, json.dumps([route]),
                                json.dumps([series_uid])))
                    continue
                series = json.loads(row["series_only"]) if row["series_only"] else []
                if row["series_only"] is not None and series_uid not in series:
                    series.append(series_uid)
                db.execute("UPDATE jobs SET state=CASE WHEN state='running' THEN 'running'"
                           " ELSE 'pending' END, requeue=CASE WHEN state='running' THEN 1"
                           " ELSE 0 END, attempts=0, next_attempt=0, updated=?,"
                           " series_only=? WHERE study_uid=? AND destination=?",
                           (now, json.dumps(series) if row["series_only"] is not None
                            else None, study_uid, dest))
            self._event(db, study_uid, why, now)

    def sweepable_studies(self) -> list[str]:
        """Studies the spool holds that are not receiving (the sweep re-evaluates them)."""
        return [r["study_uid"] for r in self._query(
            "SELECT study_uid FROM studies WHERE in_spool=1 AND state IN"
            " ('routed','delivered','failed','unrouted') ORDER BY first_received")]

    def sweep_study(self, study_uid: str, destinations: Sequence[str], routes: Sequence[str],
                    explanation: str = "", why: str = "sweep") -> list[str]:
        """Add jobs for the destinations the study has none for yet; the ones added."""
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
                           " next_attempt, generation, created, updated, routes)"
                           " VALUES (?,?,'pending',0,0,?,?,?,?)",
                           (study_uid, dest, row["generation"], now, now,
                            json.dumps(list(routes))))
            self._count_missing(db, study_uid, new, now)
            db.execute("UPDATE studies SET state='routed', completed_at=COALESCE(completed_at,"
                       " ?) WHERE study_uid=? AND state IN ('delivered','unrouted')",
                       (now, study_uid))
            self._event(db, study_uid, f"{why}: now also to {', '.join(new)} (routes: "
                        f"{', '.join(routes)})" + (f"; routing: {explanation}"
                                                   if explanation else ""), now)
        return new

    # ---- delivery jobs ---------------------------------------------------------------------

    def reset_running_jobs(self) -> tuple[int, int]:
        """At start-up: jobs left running by a crash of this node go back to pending, and jobs
        waiting for a retry are due now (a restart usually follows a fix). Returns (reset, made
        due). With leases, another node's running jobs are left alone: their lease says."""
        now = time.time()
        mine = " AND node=?" if self.leases else ""
        with self._tx() as db:
            reset = db.execute("UPDATE jobs SET state='pending', next_attempt=0, updated=?"
                               " WHERE state='running'" + mine,
                               (now, self.node_id) if self.leases else (now,)).rowcount
            due = db.execute("UPDATE jobs SET next_attempt=0 WHERE state='failed' AND"
                             " next_attempt > ?", (now,)).rowcount
            return reset, due

    _CLAIM_LOCK = ""  # PostgreSQL: FOR UPDATE SKIP LOCKED (nodes claim different jobs)

    def claim_job(self, destination: str, now: float | None = None) -> Job | None:
        """Take the oldest due job of a destination (pending, or failed and due for retry; with
        leases also running on a node whose lease ran out: it resumes from the ledger)."""
        now = now or time.time()
        expired = " OR (state='running' AND lease_until < ?)" if self.leases else ""
        args: tuple[Any, ...] = (destination, now, time.time()) if self.leases else \
            (destination, now)
        due = ("SELECT id, study_uid, attempts, generation, routes, series_only, state, node"
               " FROM jobs WHERE destination=? AND ((state IN ('pending','failed') AND"
               f" next_attempt <= ?){expired}) ORDER BY created, id LIMIT 1")
        if not self._query(due, args):
            return None  # nothing due: a read, no write transaction
        with self._tx() as db:
            row = db.execute(due + self._CLAIM_LOCK, args).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', requeue=0, updated=?, node=?,"
                       " lease_until=? WHERE id=?",
                       (now, self.node_id, time.time() + self.lease, row["id"]))
            if row["state"] == "running":
                self._event(db, row["study_uid"], f"delivery to {destination} resumed on node "
                            f"{self.node_id}: node {row['node']} stopped renewing its lease",
                            time.time())
        series = row["series_only"]
        return Job(row["id"], row["study_uid"], destination, row["attempts"], row["generation"],
                   tuple(json.loads(row["routes"] or "[]")),
                   tuple(json.loads(series)) if series else None)

    def release_job(self, job: Job) -> None:
        """A run cut short by shutdown: back to pending, not counted as an attempt."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='pending', updated=? WHERE id=? AND state='running'"
                       " AND node=?", (time.time(), job.id, self.node_id))

    # ---- nodes (several routers on one state) ------------------------------------------------

    def heartbeat(self, info: dict[str, Any] | None = None) -> None:
        """This node is alive: its row, and the leases of the jobs it runs, are renewed."""
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO nodes(node_id, started, heartbeat, info) VALUES (?,?,?,?)"
                       " ON CONFLICT(node_id) DO UPDATE SET heartbeat=excluded.heartbeat,"
                       " info=COALESCE(excluded.info, nodes.info)",
                       (self.node_id, now, now, json.dumps(info) if info else None))
            if info:  # (re)started
                db.execute("UPDATE nodes SET started=? WHERE node_id=?", (now, self.node_id))
            if self.leases:
                db.execute("UPDATE jobs SET lease_until=? WHERE state='running' AND node=?",
                           (now + self.lease, self.node_id))

    def hold_lease(self, name: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` (a pull source, the sweep) for ``ttl`` s: True if
        this node holds it now. One node does the work; another takes over once it lapses."""
        now = time.time()
        with self._tx() as db:
            n = db.execute("INSERT INTO leases(name, node, until) VALUES (?,?,?)"
                           " ON CONFLICT(name) DO UPDATE SET node=excluded.node,"
                           " until=excluded.until WHERE leases.until < ? OR"
                           " leases.node=excluded.node", (name, self.node_id, now + ttl, now)
                           ).rowcount
        return n > 0

    def nodes(self) -> list[dict[str, Any]]:
        """Every node that ever ran on this state, with ``alive`` (heartbeat within the lease)."""
        now = time.time()
        try:
            found = self._query(
                "SELECT node_id, started, heartbeat, info, (SELECT COUNT(*) FROM instances i WHERE"
            " i.node=n.node_id AND i.present=1) AS instances_in_spool, (SELECT COUNT(*) FROM"
            " jobs j WHERE j.node=n.node_id AND j.state='running') AS running_jobs"
                " FROM nodes n ORDER BY node_id")
        except Exception:  # a read-only look at a spool from before nodes were recorded
            return []
        rows = [dict(r) for r in found]
        for r in rows:
            r["info"] = json.loads(r["info"] or "{}")
            r["alive"] = (r["heartbeat"] or 0) > now - self.lease
        return rows

    def next_due(self, destination: str) -> float | None:
        """When the destination's next pending or failed job is due (None: it has none)."""
        rows = self._query("SELECT MIN(next_attempt) AS t FROM jobs"
                           " WHERE destination=? AND state IN ('pending','failed')",
                           (destination,))
        return rows[0]["t"]

    def undelivered(self, study_uid: str, destination: str) -> list[Instance]:
        rows = self._query(
            # a ledger row of another study (an instance that moved while a delivery of its
            # old study ran) does not count for this one
            "SELECT i.* FROM instances i LEFT JOIN ledger l ON l.sop_uid=i.sop_uid AND"
            " l.destination=? AND l.study_uid=i.study_uid WHERE i.study_uid=? AND i.present=1"
            " AND l.delivered_at IS NULL ORDER BY i.series_uid, i.received_at",
            (destination, study_uid))
        return [self._instance(r) for r in rows]

    def mark_sending(self, sop_uid: str, destination: str, study_uid: str,
                     delivered_before: str | None = None, count: bool = True,
                     digest: str | None = None) -> None:
        """Count a send before it goes on the wire (and, in the same commit, the previous one
        as delivered), so re-sends after a crash are visible in the ledger. ``count=False``:
        only buffered (the session counts it with :meth:`count_sends` when it leaves);
        ``digest``: the content digest of ``delivered_before``."""
        now = time.time()
        with self._tx(study_uid) as db:
            if delivered_before:
                self._delivered(db, delivered_before, destination, now, digest)
            db.execute(
                "INSERT INTO ledger(sop_uid, destination, study_uid, sends) VALUES (?,?,?,?)"
                " ON CONFLICT(sop_uid, destination) DO UPDATE SET" + _SAME_STUDY_UPSERT,
                (sop_uid, destination, study_uid, int(count), int(count), int(count),
                 int(count)))

    def count_sends(self, sop_uids: Sequence[str], destination: str, study_uid: str,
                    delta: int = 1) -> None:
        """A buffered batch went on the wire (``delta`` 1), or, announced, never left (-1)."""
        if not sop_uids:
            return
        with self._tx(study_uid) as db:
            for uid in sop_uids:
                db.execute(
                    "INSERT INTO ledger(sop_uid, destination, study_uid, sends) VALUES (?,?,?,?)"
                    " ON CONFLICT(sop_uid, destination) DO UPDATE SET" + _SAME_STUDY_UPSERT,
                    (uid, destination, study_uid, max(delta, 0), max(delta, 0), delta, delta))

    @staticmethod
    def _delivered(db: Any, sop_uid: str, destination: str, now: float,
                   digest: str | None = None) -> None:
        db.execute("UPDATE ledger SET delivered_at=?, digest=COALESCE(?, digest) WHERE"
                   " sop_uid=? AND destination=?", (now, digest, sop_uid, destination))

    def record_sent_uid(self, sop_uid: str, destination: str, sent_uid: str) -> None:
        """The SOP Instance UID the destination got for ``sop_uid`` (de-identification)."""
        with self._tx() as db:
            db.execute("UPDATE ledger SET sent_uid=? WHERE sop_uid=? AND destination=?",
                       (sent_uid, sop_uid, destination))

    def mark_delivered(self, sop_uids: Sequence[str], destination: str,
                       digests: Mapping[str, str] | None = None) -> None:
        """Record instances as delivered (durable at the destination), in one commit, with
        the digest of the content delivered (``digests``: SOP Instance UID → digest)."""
        if not sop_uids:
            return
        digests = digests or {}
        with self._tx() as db:
            now = time.time()
            for uid in sop_uids:
                self._delivered(db, uid, destination, now, digests.get(uid))

    def delivered_digests(self, study_uid: str, destination: str) -> dict[str, str]:
        """Instances to deliver again (re-received) whose earlier delivery here has a digest:
        SOP Instance UID → the digest of the content the destination got."""
        return {r["sop_uid"]: r["digest"] for r in self._query(
            "SELECT sop_uid, digest FROM ledger WHERE study_uid=? AND destination=? AND"
            " delivered_at IS NULL AND digest IS NOT NULL", (study_uid, destination))}

    def mark_identical(self, sop_uids: Sequence[str], destination: str, study_uid: str) -> None:
        """Re-received instances whose content ``destination`` already has: delivered there
        without sending them again (a sender retrying after a lost C-STORE response)."""
        if not sop_uids:
            return
        now = time.time()
        with self._tx(study_uid) as db:
            for uid in sop_uids:
                self._delivered(db, uid, destination, now)
            self._event(db, study_uid, f"{len(sop_uids)} instance(s) received again with "
                        f"identical content: not sent again to {destination}, which has them",
                        now)

    def finish_job(self, job: Job, error: str | None, max_attempts: int,
                   retry_in: float, permanent: bool = False) -> str:
        """Close a job run: delivered, failed (retry scheduled) or dead. Returns the new state."""
        now = time.time()
        with self._tx(job.study_uid) as db:
            row = db.execute("SELECT requeue, state, node FROM jobs WHERE id=?",
                             (job.id,)).fetchone()
            if self.leases and row is not None and (row["state"] != "running" or
                                                    row["node"] != self.node_id):
                # our lease ran out and another node took the job over: it closes it
                self._event(db, job.study_uid, f"node {self.node_id} finished a run of the "
                            f"delivery to {job.destination} after losing its lease; the "
                            f"run of node {row['node']} decides", now)
                return ""
            requeue = bool(row and row["requeue"])
            if error is None:
                state = "pending" if requeue else "delivered"
                db.execute("UPDATE jobs SET state=?, attempts=0, next_attempt=0, last_error=NULL,"
                           " requeue=0, updated=? WHERE id=?", (state, now, job.id))
                if not requeue:
                    self._event(db, job.study_uid, f"delivered to {job.destination}", now)
                return state
            attempts = job.attempts + 1
            if requeue:
                state, next_attempt = "pending", now
            elif attempts >= max_attempts or permanent:
                state, next_attempt = "dead", 0.0
            else:
                state, next_attempt = "failed", now + retry_in
            db.execute("UPDATE jobs SET state=?, attempts=?, next_attempt=?, last_error=?,"
                       " requeue=0, updated=? WHERE id=?",
                       (state, attempts, next_attempt, error, now, job.id))
            what = "will retry" if state != "dead" else \
                "dead-lettered, not retried: permanent" if permanent else "dead-lettered"
            self._event(db, job.study_uid, f"delivery to {job.destination} failed (attempt "
                        f"{attempts}/{max_attempts}, {what}): {error}", now)
            if state == "dead":
                db.execute("UPDATE studies SET state='failed' WHERE study_uid=? AND"
                           " state='routed'", (job.study_uid,))
            return state

    def settle_study(self, study_uid: str) -> bool:
        """If every job of a routed study is delivered, mark it delivered. Returns True then."""
        now = time.time()
        with self._tx(study_uid) as db:
            row = db.execute("SELECT state, await_until FROM studies WHERE study_uid=?",
                             (study_uid,)).fetchone()
            if row is None or row["state"] not in ("routed", "failed") or \
                    row["await_until"] is not None:  # a route still waits for its stable age
                return False
            open_jobs = db.execute("SELECT COUNT(*) FROM jobs WHERE study_uid=? AND"
                                   " state!='delivered'", (study_uid,)).fetchone()[0]
            if open_jobs:
                return False
            db.execute("UPDATE studies SET state='delivered', delivered_at=? WHERE study_uid=?",
                       (now, study_uid))
            dests = [r[0] for r in db.execute("SELECT destination FROM jobs WHERE study_uid=?"
                                              " ORDER BY destination", (study_uid,))]
            partial = self._count_missing(db, study_uid, dests, now, note=False)
            if partial:
                total = db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?",
                                   (study_uid,)).fetchone()[0]
                self._event(db, study_uid, "delivered to every destination, partially to " +
                            ", ".join(f"{d} ({total - n} of {total} instance(s): {n} deleted "
                                      "from the spool before the study was routed there)"
                                      for d, n in partial.items()), now)
            else:
                self._event(db, study_uid, "delivered to every destination", now)
        return True

    def partial_jobs(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Jobs whose destination misses instances it can no longer get (``missing``)."""
        where, args = ("AND study_uid=?", (study_uid,)) if study_uid else ("", ())
        return [dict(r) for r in self._query(
            "SELECT study_uid, destination, state, missing FROM jobs WHERE missing>0"
            f" {where} ORDER BY updated", args)]

    def forget_spool(self, study_uid: str, why: str) -> None:
        """The study's spool files are gone: keep its rows (history, ledger), mark them absent."""
        now = time.time()
        with self._tx(study_uid) as db:
            db.execute("UPDATE instances SET present=0 WHERE study_uid=?", (study_uid,))
            db.execute("UPDATE studies SET in_spool=0 WHERE study_uid=?", (study_uid,))
            self._event(db, study_uid, f"spool files deleted ({why})", now)

    def forget_delivered(self, study_uid: str, why: str) -> list[Instance] | None:
        """If the study is still delivered and in the spool, mark its instances absent and
        return them (their objects are the caller's to delete), in one transaction under the
        study's lock: a late arrival recorded meanwhile on any node reopens the study first,
        and then nothing is forgotten (None)."""
        now = time.time()
        with self._tx(study_uid) as db:
            row = db.execute("SELECT state, in_spool FROM studies WHERE study_uid=?",
                             (study_uid,)).fetchone()
            if row is None or row["state"] != "delivered" or not row["in_spool"]:
                return None
            found = [self._instance(r) for r in db.execute(
                "SELECT * FROM instances WHERE study_uid=? AND present=1", (study_uid,))
                .fetchall()]
            db.execute("UPDATE instances SET present=0 WHERE study_uid=?", (study_uid,))
            db.execute("UPDATE studies SET in_spool=0 WHERE study_uid=?", (study_uid,))
            self._event(db, study_uid, f"spool files deleted ({why})", now)
        return found

    def delivered_in_spool_before(self, cutoff: float) -> list[str]:
        return [r["study_uid"] for r in self._query(
            "SELECT study_uid FROM studies WHERE state='delivered' AND in_spool=1 AND"
            " delivered_at <= ?", (cutoff,))]

    def requeue(self, dead_only: bool, study_uid: str | None,
                destination: str | None) -> int:
        """Manual retry: put failed/dead jobs back to pending now, with a fresh attempt count."""
        cond = "state='dead'" if dead_only else "state IN ('dead','failed')"
        args: list[Any] = []
        if study_uid:
            cond += " AND study_uid=?"
            args.append(study_uid)
        if destination:
            cond += " AND destination=?"
            args.append(destination)
        now = time.time()
        with self._tx() as db:
            studies = [r[0] for r in db.execute(
                f"SELECT DISTINCT study_uid FROM jobs WHERE {cond}", args)]
            n = db.execute(f"UPDATE jobs SET state='pending', attempts=0, next_attempt=0,"
                           f" updated=? WHERE {cond}", [now, *args]).rowcount
            for s in studies:
                db.execute("UPDATE studies SET state='routed' WHERE study_uid=? AND"
                           " state='failed'", (s,))
                self._event(db, s, "requeued by hand", now)
        return n

    def purge(self, study_uid: str) -> list[str]:
        """Remove a study on purpose; returns the keys of its spool files for the caller.

        Its history (the audit trail) stays, with a last event saying what was purged and
        where it had been delivered; the study row stays as ``purged``. The same study sent
        again is a new reception (its instances are delivered again)."""
        now = time.time()
        with self._tx(study_uid) as db:
            paths = [r[0] for r in db.execute(
                "SELECT path FROM instances WHERE study_uid=? AND present=1", (study_uid,))]
            n = db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?",
                           (study_uid,)).fetchone()[0]
            delivered = [f"{r[0]} ({r[1]})" for r in db.execute(
                "SELECT destination, COUNT(*) FROM ledger WHERE study_uid=? AND delivered_at IS"
                " NOT NULL GROUP BY destination ORDER BY destination", (study_uid,))]
            for table in ("instances", "jobs", "ledger"):
                db.execute(f"DELETE FROM {table} WHERE study_uid=?", (study_uid,))
            db.execute("UPDATE studies SET state='purged', in_spool=0 WHERE study_uid=?",
                       (study_uid,))
            self._event(db, study_uid, f"purged by hand: {n} instance(s), {len(paths)} spool "
                        f"file(s); had been delivered to: {', '.join(delivered) or 'nowhere'}",
                        now)
        return paths

    # ---- query/retrieve ----------------------------------------------------------------------

    def qr_rows(self, query: Query, limit: int = 0) -> list[dict[str, str]]:
        sql, args = qr_select(query, limit, dialect=self._QR_DIALECT)
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

    # ---- pull sources ------------------------------------------------------------------------

    def source_cursor(self, name: str) -> str | None:
        rows = self._query("SELECT cursor FROM sources WHERE name=?", (name,))
        return rows[0]["cursor"] if rows else None

    def source_polled(self, name: str, error: str | None, cursor: str | None = None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO sources(name) VALUES (?) ON CONFLICT(name) DO NOTHING",
                       (name,))
            if error is None:
                db.execute("UPDATE sources SET last_poll=?, last_success=?, last_error=NULL,"
                           " cursor=COALESCE(?, cursor) WHERE name=?", (now, now, cursor, name))
            else:
                db.execute("UPDATE sources SET last_poll=?, last_error=?,"
                           " cursor=COALESCE(?, cursor) WHERE name=?", (now, error, cursor, name))

    def source_studies(self, name: str, keys: Sequence[str]) -> dict[str, SourceStudy]:
        out: dict[str, SourceStudy] = {}
        keys = list(keys)
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            for r in self._query(
                    "SELECT study_key, study_uid, pulled_at, source_instances, instances_pulled"
                    " FROM source_studies WHERE source=? AND study_key IN"
                    f" ({','.join('?' * len(part))})", [name, *part]):
                out[r["study_key"]] = SourceStudy(r["study_key"], r["study_uid"] or "",
                                                  r["pulled_at"], r["source_instances"],
                                                  int(r["instances_pulled"] or 0))
        return out

    def source_held(self, study_uid: str) -> dict[str, str]:
        return {r["sop_uid"]: r["series_uid"] or "" for r in self._query(
            "SELECT sop_uid, series_uid FROM instances WHERE study_uid=?", (study_uid,))}

    def source_pull_started(self, name: str, study_key: str, study_uid: str) -> None:
        with self._tx(study_uid) as db:
            db.execute("INSERT INTO sources(name) VALUES (?) ON CONFLICT(name) DO NOTHING",
                       (name,))
            held = db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?",
                              (study_uid,)).fetchone()[0]
            # an interrupted pull (kill -9) left its baseline: what it stored counts too
            db.execute("INSERT INTO source_studies(source, study_key, study_uid, held_before)"
                       " VALUES (?,?,?,?) ON CONFLICT(source, study_key) DO UPDATE SET"
                       " study_uid=excluded.study_uid, held_before=COALESCE("
                       "source_studies.held_before, excluded.held_before)",
                       (name, study_key, study_uid, held))

    def source_pulled(self, name: str, study_key: str, study_uid: str,
                      source_instances: int | None, delete_after: bool) -> tuple[bool, int]:
        now = time.time()
        with self._tx(study_uid) as db:
            db.execute("INSERT INTO sources(name) VALUES (?) ON CONFLICT(name) DO NOTHING",
                       (name,))
            held = int(db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?",
                                  (study_uid,)).fetchone()[0])
            row = db.execute("SELECT held_before, instances_pulled FROM source_studies WHERE"
                             " source=? AND study_key=?", (name, study_key)).fetchone()
            before = row["held_before"] if row is not None else None
            n = max(0, held - (held if before is None else int(before)))
            first = n > 0 and (row is None or not row["instances_pulled"])
            db.execute(
                "INSERT INTO source_studies(source, study_key, study_uid, pulled_at,"
                " delete_after, source_instances, instances_pulled) VALUES (?,?,?,?,?,?,?)"
                " ON CONFLICT(source, study_key) DO UPDATE SET study_uid=excluded.study_uid,"
                " pulled_at=excluded.pulled_at, delete_after=excluded.delete_after,"
                " deleted_at=NULL, held_before=NULL,"
                " source_instances=excluded.source_instances,"
                " instances_pulled=source_studies.instances_pulled+excluded.instances_pulled",
                (name, study_key, study_uid, now, int(delete_after), source_instances, n))
            db.execute("UPDATE sources SET studies_pulled=studies_pulled+?,"
                       " instances_pulled=instances_pulled+? WHERE name=?",
                       (1 if first else 0, n, name))
            if n:
                text = f"pulled {n} {'' if first else 'more '}instance(s) from source {name}"
                if source_instances is None:
                    text += " (the pull did not finish: the rest at the next poll)"
                self._event(db, study_uid, text, now)
        return first, n

    def source_deletable(self, name: str) -> list[tuple[str, str]]:
        """(study key, study UID) pulled with delete_after whose study is delivered everywhere."""
        rows = self._query(
            "SELECT p.study_key, p.study_uid FROM source_studies p JOIN studies s ON"
            " s.study_uid=p.study_uid WHERE p.source=? AND p.delete_after=1 AND"
            " p.deleted_at IS NULL AND s.state='delivered'", (name,))
        return [(r["study_key"], r["study_uid"]) for r in rows]

    def source_delivered(self, study_uid: str) -> set[str]:
        return {r[0] for r in self._query(
            "SELECT i.sop_uid FROM instances i WHERE i.study_uid=? AND EXISTS (SELECT 1 FROM"
            " jobs j WHERE j.study_uid=i.study_uid) AND NOT EXISTS (SELECT 1 FROM jobs j WHERE"
            " j.study_uid=i.study_uid AND NOT EXISTS (SELECT 1 FROM ledger l WHERE"
            " l.sop_uid=i.sop_uid AND l.destination=j.destination AND l.delivered_at IS NOT"
            " NULL))", (study_uid,))}

    def source_deleted(self, name: str, study_key: str, study_uid: str, deleted: int = 0,
                       left: int = 0) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE source_studies SET deleted_at=? WHERE source=? AND study_key=?",
                       (now, name, study_key))
            what = f"{deleted} instance(s) " if deleted else ""
            text = f"{what}deleted at source {name} (delivered everywhere)"
            if left:
                text = (text + "; " if deleted else f"nothing deleted at source {name}: ") + \
                    f"{left} instance(s) there not delivered yet stay for the next pull"
            self._event(db, study_uid, text, now)

    # ---- storage commitment --------------------------------------------------------------------

    def expect_commitment(self, transaction_uid: str, peer: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO commitments(transaction_uid, peer, requested)"
                       " VALUES (?,?,?) ON CONFLICT DO NOTHING",
                       (transaction_uid, peer, time.time()))

    def record_commitment(self, transaction_uid: str, committed: Sequence[str],
                          failed: dict[str, int]) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO commitments(transaction_uid, reported, committed, failed)"
                       " VALUES (?,?,?,?) ON CONFLICT(transaction_uid) DO UPDATE SET"
                       " reported=excluded.reported, committed=excluded.committed,"
                       " failed=excluded.failed",
                       (transaction_uid, time.time(), json.dumps(list(committed)),
                        json.dumps(failed)))

    def commitment(self, transaction_uid: str) -> tuple[list[str], dict[str, int]] | None:
        rows = self._query("SELECT committed, failed FROM commitments WHERE transaction_uid=?"
                           " AND reported IS NOT NULL", (transaction_uid,))
        if not rows:
            return None
        return json.loads(rows[0]["committed"] or "[]"), json.loads(rows[0]["failed"] or "{}")

    def held_instances(self, sop_uids: Iterable[str]) -> dict[str, str]:
        """SOP Instance UID → SOP Class UID of those the spool holds now."""
        out: dict[str, str] = {}
        uids = list(sop_uids)
        for i in range(0, len(uids), 500):
            part = uids[i:i + 500]
            for r in self._query("SELECT sop_uid, sop_class FROM instances WHERE present=1 AND"
                                 f" sop_uid IN ({','.join('?' * len(part))})", part):
                out[r["sop_uid"]] = r["sop_class"] or ""
        return out

    def has_instance(self, sop_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE sop_uid=?", (sop_uid,)))

    def source_rows(self) -> list[dict[str, Any]]:
        try:
            return [dict(r) for r in self._query("SELECT * FROM sources ORDER BY name")]
        except Exception:  # a read-only look at a spool from before sources
            return []

    # ---- reporting -------------------------------------------------------------------------

    def study_rows(self, with_done: bool = False,
                   study_uid: str | None = None) -> list[dict[str, Any]]:
        """The studies `status` lists (all of them, or one), with their spool counts."""
        if study_uid is not None:
            where, args = " WHERE s.study_uid=?", (study_uid,)
        else:
            where = "" if with_done else \
                " WHERE s.in_spool=1 OR s.state NOT IN ('delivered','moved')"
            args = ()
        rows = [dict(r) for r in self._query(
            "SELECT s.study_uid, s.patient_id, s.state, s.generation, s.calling_ae,"
            " s.first_received, s.last_received, s.completed_at, s.delivered_at, s.in_spool,"
            " (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid AND i.present=1)"
            "   AS instances_in_spool,"
            " (SELECT COALESCE(SUM(size),0) FROM instances i WHERE i.study_uid=s.study_uid"
            "   AND i.present=1) AS bytes_in_spool,"
            " (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid)"
            "   AS instances_received,"
            " (SELECT COALESCE(SUM(size),0) FROM instances i WHERE i.study_uid=s.study_uid)"
            "   AS bytes_received,"
            + (" (SELECT COUNT(*) FROM moves m WHERE m.from_study=s.study_uid) AS moved_out,"
               " (SELECT COUNT(*) FROM moves m WHERE m.to_study=s.study_uid) AS moved_in"
               if self._has_moves() else " 0 AS moved_out, 0 AS moved_in") +
            f" FROM studies s{where} ORDER BY s.first_received", args)]
        # the node(s) that received each study's instances (several routers on one state)
        by_study: dict[str, dict[str, int]] = {}
        node_where = " WHERE study_uid=?" if study_uid is not None else ""
        for r in self._query("SELECT study_uid, node, COUNT(*) AS n FROM instances"
                             f"{node_where} GROUP BY study_uid, node",
                             (study_uid,) if study_uid is not None else ()):
            by_study.setdefault(r["study_uid"], {})[r["node"] or "?"] = r["n"]
        for row in rows:
            row["received_by"] = by_study.get(row["study_uid"], {})
        return rows

    def summary(self, with_done: bool = False) -> dict[str, Any]:
        """Everything `status` shows, as plain data."""
        studies = self.study_rows(with_done)
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
        return {"studies": studies, "queues": queues, "dead": dead, "retrying": failing,
                "partial": partial,
                "spool_bytes": self.spool_bytes(), "sources": self.source_rows(),
                "nodes": self.nodes(), "cluster": self.leases}

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
               " j.last_error, j.routes, j.created, j.updated, j.node, j.missing,"
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
                           " AND state IN ('routed','delivered','failed','unrouted','held')",
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

