"""Delivery jobs and the ledger: claims, sends, what each destination has, the end of a job,
settling a study, retries, purge."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .base import REQUEUE_HELD, Instance, Job
from .sql_base import SAME_STUDY_UPSERT, SQLBase
from .sql_iocm import KOS, allowed


class DeliverySQL(SQLBase):
    """Jobs per (study, destination) and the per-instance ledger."""

    # ---- delivery jobs ---------------------------------------------------------------------

    def reset_running_jobs(self) -> tuple[int, int]:
        """At start-up: jobs left running by a crash of this node go back to pending, and jobs
        waiting for a retry are due now (a restart usually follows a fix). Returns (reset, made
        due). With leases, another node's running jobs are left alone: their lease says."""
        now = time.time()
        mine = " AND node=?" if self.leases else ""
        with self._tx() as db:
            reset = db.execute("UPDATE jobs SET state=CASE WHEN requeue=? THEN 'held' ELSE"
                               " 'pending' END, requeue=0, next_attempt=0, updated=?"
                               " WHERE state='running'" + mine,
                               (REQUEUE_HELD, now, self.node_id) if self.leases else
                               (REQUEUE_HELD, now)).rowcount
            due = db.execute("UPDATE jobs SET next_attempt=0 WHERE state='failed' AND"
                             " next_attempt > ?", (now,)).rowcount
            return reset, due

    _CLAIM_LOCK = ""  # PostgreSQL: FOR UPDATE SKIP LOCKED (nodes claim different jobs)

    def claim_job(self, destination: str, now: float | None = None) -> Job | None:
        """Take the most urgent due job of a destination, the oldest of that priority (pending,
        or failed and due for retry; with leases also running on a node whose lease ran out: it
        resumes from the ledger). Held jobs wait for release."""
        now = now or time.time()
        expired = " OR (state='running' AND lease_until < ?)" if self.leases else ""
        args: tuple[Any, ...] = (destination, now, time.time()) if self.leases else \
            (destination, now)
        due = ("SELECT id, study_uid, attempts, generation, routes, series_only, state, node,"
               " priority, requeue FROM jobs WHERE destination=? AND"
               f" ((state IN ('pending','failed') AND next_attempt <= ?){expired})"
               " ORDER BY priority, created, id LIMIT 1")
        if not self._query(due, args):
            return None  # nothing due: a read, no write transaction
        with self._tx() as db:
            row = db.execute(due + self._CLAIM_LOCK, args).fetchone()
            if row is None:
                return None
            if row["state"] == "running" and row["requeue"] == REQUEUE_HELD:
                # its node stopped while a held generation arrived: held, not resumed
                db.execute("UPDATE jobs SET state='held', requeue=0, updated=? WHERE id=?",
                           (time.time(), row["id"]))
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
                   tuple(json.loads(series)) if series else None, row["priority"])

    def retry_now(self, destination: str) -> int:
        now = time.time()
        with self._tx() as db:
            return int(db.execute("UPDATE jobs SET next_attempt=?, updated=? WHERE"
                                  " destination=? AND state='failed' AND next_attempt > ?",
                                  (now, now, destination, now)).rowcount)

    def release_job(self, job: Job) -> None:
        """A run cut short by shutdown (or yielding to a more urgent job): back to pending, not
        counted as an attempt; held if a held generation arrived while it ran."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state=CASE WHEN requeue=? THEN 'held' ELSE 'pending'"
                       " END, requeue=CASE WHEN requeue=? THEN 0 ELSE requeue END, updated=?"
                       " WHERE id=? AND state='running' AND node=?",
                       (REQUEUE_HELD, REQUEUE_HELD, time.time(), job.id, self.node_id))

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
            " AND l.delivered_at IS NULL AND i.rejected_by IS NULL AND NOT"
            # a key object selection waits until the tracker examined it (a rejection note?)
            f" (i.sop_class='{KOS}' AND i.iocm IS NULL)"
            " ORDER BY i.series_uid, i.received_at", (destination, study_uid))
        # a rejection note goes only where a rejected instance went (sql_iocm)
        return [self._instance(r) for r in rows if allowed(r["only_to"], destination)]

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
                " ON CONFLICT(sop_uid, destination) DO UPDATE SET" + SAME_STUDY_UPSERT,
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
                    " ON CONFLICT(sop_uid, destination) DO UPDATE SET" + SAME_STUDY_UPSERT,
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

    def delivered_uids(self, study_uid: str, destination: str) -> set[str]:
        return {r["sop_uid"] for r in self._query(
            "SELECT sop_uid FROM ledger WHERE study_uid=? AND destination=? AND"
            " delivered_at IS NOT NULL", (study_uid, destination))}

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
            # new instances arrived while it ran: pending again, or held (a route holds them)
            again = "held" if row and row["requeue"] == REQUEUE_HELD else "pending"
            if error is None:
                state = again if requeue else "delivered"
                db.execute("UPDATE jobs SET state=?, attempts=0, next_attempt=0, last_error=NULL,"
                           " requeue=0, updated=? WHERE id=?", (state, now, job.id))
                if not requeue:
                    self._event(db, job.study_uid, f"delivered to {job.destination}", now)
                return state
            attempts = job.attempts + 1
            if requeue:
                state, next_attempt = again, now
            elif attempts >= max_attempts or permanent:
                state, next_attempt = "dead", 0.0
            else:
                state, next_attempt = "failed", now + retry_in
            db.execute("UPDATE jobs SET state=?, attempts=?, next_attempt=?, last_error=?,"
                       " requeue=0, updated=? WHERE id=?",
                       (state, attempts, next_attempt, error, now, job.id))
            what = "held: its new generation waits for release" if state == "held" else \
                "will retry" if state != "dead" else \
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
                                   " state NOT IN ('delivered','rejected')",
                                   (study_uid,)).fetchone()[0]
            if open_jobs:
                return False
            if not db.execute("SELECT COUNT(*) FROM jobs WHERE study_uid=? AND"
                              " state='delivered'", (study_uid,)).fetchone()[0] and \
                    db.execute("SELECT COUNT(*) FROM jobs WHERE study_uid=?",
                               (study_uid,)).fetchone()[0]:
                # every job rejected by an operator: kept in the spool, delivered nowhere
                db.execute("UPDATE studies SET state='rejected' WHERE study_uid=?",
                           (study_uid,))
                return False
            db.execute("UPDATE studies SET state='delivered', delivered_at=? WHERE study_uid=?",
                       (now, study_uid))
            dests = [r[0] for r in db.execute("SELECT destination FROM jobs WHERE study_uid=?"
                                              " AND state='delivered' ORDER BY destination",
                                              (study_uid,))]
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
