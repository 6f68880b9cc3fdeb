"""Corrections that follow the ledger (issue 29, item 5): IOCM rejection notes and corrected
instances.

A rejected instance keeps its row (``instances.rejected_by``: the note's SOP Instance UID) and
is never delivered again anywhere (``undelivered`` leaves it out); its sends that were still
due are marked cancelled in the ledger (``ledger.cancelled_at``). A rejection note goes only to
the destinations the ledger shows received at least one rejected instance
(``instances.only_to``, a JSON list; NULL for every other instance: routing decides). A
re-received instance keeps, per destination, when the destination got its previous version
(``ledger.replaced_at``): the corrections a completion sends."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Instance
from .sql_base import SQLBase

KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
IOCM_INSTANCE_COLUMNS = ("rejected_by TEXT", "only_to TEXT", "iocm TEXT")
IOCM_LEDGER_COLUMNS = ("cancelled_at REAL", "replaced_at REAL")
# the tracker's look for notes not examined yet: by SOP class, among the unexamined only
IOCM_INDEX = ("CREATE INDEX IF NOT EXISTS instances_iocm ON instances(sop_class)"
              " WHERE iocm IS NULL")


def allowed(only_to: str | None, destination: str) -> bool:
    """Whether an instance with this ``only_to`` may go to ``destination``."""
    return only_to is None or destination in json.loads(only_to)


class IocmSQL(SQLBase):
    """Rejection notes, rejected instances, corrected instances."""

    def unexamined_notes(self, sop_class: str, limit: int = 100) -> list[Instance]:
        return [self._instance(r) for r in self._query(
            "SELECT * FROM instances WHERE sop_class=? AND iocm IS NULL AND present=1"
            f" ORDER BY received_at LIMIT {int(limit)}", (sop_class,))]

    def note_examined(self, sop_uid: str) -> None:
        """A Key Object Selection that is not a rejection note: routed like any instance."""
        with self._tx() as db:
            db.execute("UPDATE instances SET iocm='' WHERE sop_uid=?", (sop_uid,))

    def reject_instances(self, note: Instance, code: str, meaning: str,
                         rejected: Sequence[str]) -> dict[str, Any]:
        """Record a rejection note: its instances rejected (in any study), their due sends
        cancelled, the note sent only where the ledger shows one of them delivered. Returns
        ``{"rejected": n held, "to": {destination: n delivered}, "cancelled": {destination:
        n}}`` and writes the history (the note's study and every other study concerned)."""
        now = time.time()
        to: dict[str, int] = {}
        cancelled: dict[str, int] = {}
        studies: set[str] = set()
        held = 0
        with self._tx(note.study_uid) as db:
            if not db.execute("UPDATE instances SET iocm=? WHERE sop_uid=? AND iocm IS NULL",
                              (code, note.sop_uid)).rowcount:
                # examined already (another node's tracker): once
                return {"rejected": 0, "to": {}, "cancelled": {}, "text": ""}
            for sop in dict.fromkeys(rejected):
                row = db.execute("SELECT study_uid FROM instances WHERE sop_uid=?",
                                 (sop,)).fetchone()
                for r in db.execute("SELECT destination FROM ledger WHERE sop_uid=? AND"
                                    " delivered_at IS NOT NULL", (sop,)).fetchall():
                    to[r[0]] = to.get(r[0], 0) + 1
                if row is None:
                    continue  # not held here (never received, or purged)
                held += 1
                study = row[0]
                studies.add(study)
                if study != note.study_uid:
                    self._lock_study(db, study)
                for r in db.execute(
                        "SELECT j.destination FROM jobs j WHERE j.study_uid=? AND NOT EXISTS"
                        " (SELECT 1 FROM ledger l WHERE l.sop_uid=? AND"
                        " l.destination=j.destination AND l.delivered_at IS NOT NULL)",
                        (study, sop)).fetchall():
                    cancelled[r[0]] = cancelled.get(r[0], 0) + 1
                    db.execute(
                        "INSERT INTO ledger(sop_uid, destination, study_uid, sends,"
                        " cancelled_at) VALUES (?,?,?,0,?) ON CONFLICT(sop_uid, destination)"
                        " DO UPDATE SET cancelled_at=excluded.cancelled_at",
                        (sop, r[0], study, now))
                db.execute("UPDATE instances SET rejected_by=? WHERE sop_uid=?",
                           (note.sop_uid, sop))
            db.execute("UPDATE instances SET only_to=? WHERE sop_uid=?",
                       (json.dumps(sorted(to)), note.sop_uid))
            text = (f"rejection note {note.sop_uid} ({code} {meaning}): {held} instance(s)"
                    + (f" → {', '.join(sorted(to))}" if to else
                       ": no destination received them, the note goes nowhere"))
            if cancelled:
                text += "; " + ", ".join(f"{n} pending send(s) to {d}" for d, n in
                                         sorted(cancelled.items())) + " cancelled"
            if len(rejected) > held:
                text += f" ({len(rejected) - held} referenced instance(s) not held here)"
            for study in {note.study_uid, *studies}:
                self._event(db, study, text, now)
        return {"rejected": held, "to": to, "cancelled": cancelled, "text": text}

    def rejected_uids(self, study_uid: str) -> set[str]:
        return {r["sop_uid"] for r in self._query(
            "SELECT sop_uid FROM instances WHERE study_uid=? AND rejected_by IS NOT NULL",
            (study_uid,))}

    def directed_instances(self, study_uid: str, generation: int) -> dict[str, list[str]]:
        """Series of this generation's instances that go only to some destinations (rejection
        notes), and where: destination → series, for the destinations of those notes."""
        out: dict[str, list[str]] = {}
        for r in self._query("SELECT series_uid, only_to FROM instances WHERE study_uid=? AND"
                             " generation=? AND only_to IS NOT NULL AND present=1",
                             (study_uid, generation)):
            for dest in json.loads(r["only_to"]):
                out.setdefault(dest, [])
                if r["series_uid"] not in out[dest]:
                    out[dest].append(r["series_uid"])
        return out

    def replaced_deliveries(self, study_uid: str,
                            generation: int) -> dict[str, dict[str, str | None]]:
        """Instances of this generation received again whose earlier version a destination
        has (and this version not yet): SOP Instance UID → {destination: the digest of what
        it got}."""
        out: dict[str, dict[str, str | None]] = {}
        for r in self._query(
                "SELECT l.sop_uid, l.destination, l.digest FROM ledger l JOIN instances i ON"
                " i.sop_uid=l.sop_uid AND i.study_uid=l.study_uid WHERE i.study_uid=? AND"
                " i.generation=? AND i.present=1 AND i.rejected_by IS NULL AND"
                " l.replaced_at IS NOT NULL AND l.delivered_at IS NULL",
                (study_uid, generation)):
            out.setdefault(r["sop_uid"], {})[r["destination"]] = r["digest"]
        return out

    def send_also(self, study_uid: str, series: Mapping[str, Sequence[str]], why: str) -> None:
        """Jobs for destinations routing did not pick this time that must get these series'
        undelivered instances (corrections and rejection notes follow the ledger)."""
        if not series:
            return
        now = time.time()
        with self._tx(study_uid) as db:
            gen = db.execute("SELECT generation FROM studies WHERE study_uid=?",
                             (study_uid,)).fetchone()
            for dest, uids in series.items():
                db.execute(
                    "INSERT INTO jobs(study_uid, destination, state, attempts, next_attempt,"
                    " generation, created, updated, routes, series_only)"
                    " VALUES (?,?,'pending',0,0,?,?,?,'[]',?)"
                    " ON CONFLICT(study_uid, destination) DO UPDATE SET"
                    # held and rejected jobs wait for their operator, as routed ones do
                    "  state=CASE WHEN jobs.state IN ('running','held','rejected')"
                    "  THEN jobs.state ELSE 'pending' END,"
                    "  requeue=CASE WHEN jobs.state='running' THEN 1 ELSE 0 END, attempts=0,"
                    "  next_attempt=0, generation=excluded.generation, updated=excluded.updated,"
                    "  series_only=excluded.series_only",
                    (study_uid, dest, gen[0] if gen else 1, now, now, json.dumps(list(uids))))
            db.execute("UPDATE studies SET state='routed' WHERE study_uid=? AND state IN"
                       " ('unrouted','delivered')", (study_uid,))
            self._event(db, study_uid, why, now)
