"""Recording receptions: an instance, its study (new, reopened), a move between studies."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from .base import Instance, Reception, Recorded
from .sql_base import SQLBase


class ReceivingSQL(SQLBase):
    """Receptions and the instances they leave in the spool."""

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
                # (when each had the earlier version: a changed one is a correction, sql_iocm)
                db.execute("UPDATE ledger SET replaced_at=COALESCE(delivered_at, replaced_at),"
                           " delivered_at=NULL, sends=0 WHERE sop_uid=?", (sop,))
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
            " ('pending','failed','dead','held') ORDER BY destination", (study,))]
        db.execute("DELETE FROM jobs WHERE study_uid=? AND state IN"
                   " ('pending','failed','dead','held')", (study,))
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

    def mark_shared(self, uploaded: Sequence[tuple[str, str]]) -> None:
        """These instances ((SOP Instance UID, key) of their reception) are now in the shared
        store too: one transaction for a batch."""
        if not uploaded:
            return
        with self._tx() as db:
            for sop_uid, key in uploaded:
                db.execute("UPDATE instances SET shared=1 WHERE sop_uid=? AND path=?",
                           (sop_uid, key))

    def current_keys(self, sop_uids: Sequence[str]) -> dict[str, str]:
        """SOP Instance UID → the key of its current reception (absent: no row)."""
        found: dict[str, str] = {}
        for i in range(0, len(sop_uids), 500):
            chunk = list(sop_uids[i:i + 500])
            found.update((r["sop_uid"], r["path"]) for r in self._query(
                f"SELECT sop_uid, path FROM instances WHERE sop_uid IN"
                f" ({','.join('?' * len(chunk))})", chunk))
        return found

    def instance(self, sop_uid: str) -> Instance | None:
        rows = self._query("SELECT * FROM instances WHERE sop_uid=?", (sop_uid,))
        return self._instance(rows[0]) if rows else None

    def all_keys(self) -> set[str]:
        """The keys of every instance row, present or not (cluster: the objects rows know)."""
        return {r["path"] for r in self._query("SELECT path FROM instances")}

    def known_keys(self, study_uid: str | None = None) -> set[str]:
        if study_uid is None:
            return {r["path"] for r in self._query("SELECT path FROM instances WHERE present=1")}
        return {r["path"] for r in self._query(
            "SELECT path FROM instances WHERE study_uid=? AND present=1", (study_uid,))}

    def spool_bytes(self) -> int:
        # the studies' totals, kept by triggers (a sum over the instances grows with them)
        rows = self._query("SELECT COALESCE(SUM(bytes_present),0) AS n FROM studies")
        return int(rows[0]["n"])
