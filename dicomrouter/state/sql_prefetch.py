"""Prior prefetch (issue 27, item 3): the triggers (a durable queue, and the suppression
window's memory) and the priors each brought (``prefetch_studies``: what the ``Prefetch`` and
``PrefetchRule`` routing keys read)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from .base import Instance
from .sql_base import SQLBase

#: SQLite migration 16, PostgreSQL migration 15 (the same statements; REAL is a double in both)
PREFETCH_TABLES = (
    # one row per trigger and rule: pending → running → done | failed (retried) → dead;
    # suppressed: a trigger for the same patient inside the rule's window (nothing fetched)
    "CREATE TABLE IF NOT EXISTS prefetch_triggers ("
    " rule TEXT NOT NULL, trigger_key TEXT NOT NULL, patient_id TEXT, study_uid TEXT,"
    " state TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0, next_attempt DOUBLE PRECISION NOT NULL DEFAULT 0,"
    " last_error TEXT, detail TEXT, outcome TEXT, updated DOUBLE PRECISION,"
    " PRIMARY KEY (rule, trigger_key))",
    "CREATE INDEX IF NOT EXISTS prefetch_triggers_patient"
    " ON prefetch_triggers(rule, patient_id, created)",
    "CREATE INDEX IF NOT EXISTS prefetch_triggers_due ON prefetch_triggers(state, next_attempt)",
    # a prior study a trigger fetched (written before its retrieve begins)
    "CREATE TABLE IF NOT EXISTS prefetch_studies ("
    " study_uid TEXT PRIMARY KEY, rule TEXT NOT NULL, trigger_key TEXT NOT NULL,"
    " created DOUBLE PRECISION NOT NULL)",
)

_COLUMNS = ("rule, trigger_key, patient_id, study_uid, state, created, attempts, next_attempt,"
            " last_error, detail, outcome, updated")


def _trigger(r: Any) -> dict[str, Any]:
    out = {k.strip(): r[k.strip()] for k in _COLUMNS.split(",")}
    out["detail"] = json.loads(out["detail"] or "{}")
    return out


class PrefetchSQL(SQLBase):
    """The prefetch queue and the priors it brought."""

    def prefetch_trigger(self, rule: str, trigger_key: str, patient_id: str, study_uid: str,
                         detail: dict[str, Any], window: float,
                         now: float | None = None) -> tuple[str, dict[str, Any] | None]:
        """Record a trigger: ('new', None) queued now; ('seen', row) this trigger was
        recorded before (a restart, a re-sent order); ('suppressed', earlier) a trigger of
        the rule for the same patient was accepted less than ``window`` s ago."""
        now = time.time() if now is None else now
        # PostgreSQL: nodes deciding for the same rule and patient take turns
        with self._tx(f"prefetch {rule} {patient_id}") as db:
            seen = db.execute(f"SELECT {_COLUMNS} FROM prefetch_triggers WHERE rule=? AND"
                              " trigger_key=?", (rule, trigger_key)).fetchall()
            if seen:
                return "seen", _trigger(seen[0])
            earlier = db.execute(
                f"SELECT {_COLUMNS} FROM prefetch_triggers WHERE rule=? AND patient_id=? AND"
                " created > ? AND state <> 'suppressed' ORDER BY created DESC LIMIT 1",
                (rule, patient_id, now - window)).fetchall() if window > 0 else []
            state = "suppressed" if earlier else "pending"
            db.execute(f"INSERT INTO prefetch_triggers({_COLUMNS}) VALUES"
                       " (?,?,?,?,?,?,0,?,NULL,?,?,?)",
                       (rule, trigger_key, patient_id, study_uid, state, now, now,
                        json.dumps(detail),
                        f"suppressed: {earlier[0]['trigger_key']} triggered it for the same "
                        "patient" if earlier else None, now))
        return ("suppressed", _trigger(earlier[0])) if earlier else ("new", None)

    def prefetch_claim(self, now: float | None = None) -> dict[str, Any] | None:
        """The oldest due trigger, now running (None without writing if none is due)."""
        now = time.time() if now is None else now
        due = "state IN ('pending','failed') AND next_attempt <= ?"
        if not self._query(f"SELECT 1 FROM prefetch_triggers WHERE {due} LIMIT 1", (now,)):
            return None
        with self._tx() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM prefetch_triggers WHERE {due}"
                              " ORDER BY next_attempt, created LIMIT 1", (now,)).fetchall()
            if not rows:
                return None
            row = _trigger(rows[0])
            db.execute("UPDATE prefetch_triggers SET state='running', updated=? WHERE rule=?"
                       " AND trigger_key=?", (now, row["rule"], row["trigger_key"]))
        row["state"] = "running"
        return row

    def prefetch_next_due(self) -> float | None:
        rows = self._query("SELECT MIN(next_attempt) FROM prefetch_triggers WHERE state IN"
                           " ('pending','failed')")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def prefetch_finished(self, rule: str, trigger_key: str, state: str, outcome: str,
                          error: str | None = None, next_attempt: float = 0.0,
                          attempts: int | None = None) -> None:
        """The run's end: done (``outcome`` says what it did), failed (tried again at
        ``next_attempt``) or dead."""
        with self._tx() as db:
            db.execute("UPDATE prefetch_triggers SET state=?, outcome=?, last_error=?,"
                       " next_attempt=?, attempts=COALESCE(?, attempts), updated=?"
                       " WHERE rule=? AND trigger_key=?",
                       (state, outcome, error, next_attempt, attempts, time.time(), rule,
                        trigger_key))

    def prefetch_reset_running(self) -> int:
        """Runs a stop interrupted are due again (start-up)."""
        with self._tx() as db:
            return int(db.execute("UPDATE prefetch_triggers SET state='pending', next_attempt=0"
                                  " WHERE state='running'").rowcount)

    def prefetch_mark_prior(self, study_uid: str, rule: str, trigger_key: str) -> None:
        """``study_uid`` is a prior ``rule`` fetches for ``trigger_key`` (before the retrieve:
        its instances are routed as a prefetch from the first one on)."""
        with self._tx(study_uid) as db:
            db.execute("INSERT INTO prefetch_studies(study_uid, rule, trigger_key, created)"
                       " VALUES (?,?,?,?) ON CONFLICT(study_uid) DO NOTHING",
                       (study_uid, rule, trigger_key, time.time()))

    def prefetch_prior(self, study_uid: str) -> dict[str, Any] | None:
        """The rule and trigger that fetched the study (None: no prefetch brought it)."""
        rows = self._query("SELECT study_uid, rule, trigger_key, created FROM prefetch_studies"
                           " WHERE study_uid=?", (study_uid,))
        return dict(rows[0]) if rows else None

    def prefetch_runs(self, study_uid: str,
                      trigger_keys: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The triggers a study (or an order naming its Study Instance UID) caused, and those
        with one of ``trigger_keys`` (the study's HL7 order, ``order:<control id>``, when the
        order did not name the UID), oldest first."""
        keys = [k for k in trigger_keys if k]
        where = "study_uid=?" + "".join(" OR trigger_key=?" for _ in keys) if study_uid else \
            " OR ".join("trigger_key=?" for _ in keys)
        if not where:
            return []
        params = ([study_uid] if study_uid else []) + keys
        return [_trigger(r) for r in self._query(
            f"SELECT {_COLUMNS} FROM prefetch_triggers WHERE {where} ORDER BY created",
            tuple(params))]

    def prefetch_queue(self) -> list[dict[str, Any]]:
        """Triggers not done yet (pending, running, failed, dead), oldest first."""
        return [_trigger(r) for r in self._query(
            f"SELECT {_COLUMNS} FROM prefetch_triggers WHERE state IN"
            " ('pending','running','failed','dead') ORDER BY created")]

    def instances(self, study_uid: str, present_only: bool = True) -> list[Instance]:
        """Also says, in each instance's index tags (``_PrefetchRule``), which prefetch rule
        brought the study: the ``Prefetch`` / ``PrefetchRule`` routing keys read it."""
        found: Sequence[Instance] = super().instances(study_uid, present_only)
        if found:
            rows = self._query("SELECT rule FROM prefetch_studies WHERE study_uid=?",
                               (study_uid,))
            if rows:
                for inst in found:
                    inst.tags["_PrefetchRule"] = rows[0][0]
        return list(found)
