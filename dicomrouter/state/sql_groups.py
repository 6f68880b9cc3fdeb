"""Destination groups (issue 29, item 4): which member each study of a group went to, durable
(a restart keeps it), and what the strategies and ``status`` read from it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .sql_base import SQLBase

#: SQLite migration 19, PostgreSQL migration 18 (the same statements): one row per (group,
#: study): the member it goes to now; ``moved_from`` the member it left (its circuit opened)
GROUP_TABLES = (
    "CREATE TABLE IF NOT EXISTS group_assignments ("
    " group_name TEXT NOT NULL, study_uid TEXT NOT NULL, member TEXT NOT NULL,"
    " strategy TEXT NOT NULL, patient_id TEXT, assigned_at DOUBLE PRECISION NOT NULL,"
    " moved_from TEXT, PRIMARY KEY (group_name, study_uid))",
    "CREATE INDEX IF NOT EXISTS group_assignments_patient"
    " ON group_assignments(group_name, patient_id, assigned_at)",
    "CREATE INDEX IF NOT EXISTS group_assignments_recent"
    " ON group_assignments(group_name, assigned_at)",
)

#: a job state that is still waiting for (or in) delivery
_QUEUED = "('pending','running','failed','held')"


class GroupsSQL(SQLBase):
    """The members chosen for the studies of destination groups."""

    def group_member(self, group: str, study_uid: str) -> str | None:
        rows = self._query("SELECT member FROM group_assignments WHERE group_name=? AND"
                           " study_uid=?", (group, study_uid))
        return rows[0][0] if rows else None

    def group_assign(self, group: str, study_uid: str, member: str, strategy: str,
                     patient_id: str, replaces: str | None = None,
                     note: str = "") -> str:
        """Record ``member`` for the study (``replaces``: the member it had, which is left);
        the member in effect is returned: another process may have decided first (then
        nothing is written). The study's history gets one line (with ``note``)."""
        now = time.time()
        with self._tx(study_uid) as db:
            rows = db.execute("SELECT member FROM group_assignments WHERE group_name=? AND"
                              " study_uid=?", (group, study_uid)).fetchall()
            current = rows[0][0] if rows else None
            if current is not None and current != replaces:
                return str(current)
            if current is None:
                db.execute("INSERT INTO group_assignments(group_name, study_uid, member,"
                           " strategy, patient_id, assigned_at) VALUES (?,?,?,?,?,?)",
                           (group, study_uid, member, strategy, patient_id, now))
                self._event(db, study_uid, f"group {group} → {member} ({strategy})"
                            + (f"; {note}" if note else ""), now)
            else:
                db.execute("UPDATE group_assignments SET member=?, strategy=?, assigned_at=?,"
                           " moved_from=? WHERE group_name=? AND study_uid=?",
                           (member, strategy, now, current, group, study_uid))
                self._event(db, study_uid, f"group {group} → {member} ({strategy}), moved "
                            f"from {current}" + (f": {note}" if note else ""), now)
        return member

    def group_last_member(self, group: str) -> str | None:
        """The member the group's latest new study went to (round_robin goes on after it)."""
        rows = self._query("SELECT member FROM group_assignments WHERE group_name=? AND"
                           " moved_from IS NULL ORDER BY assigned_at DESC LIMIT 1", (group,))
        return rows[0][0] if rows else None

    def group_patient_member(self, group: str, patient_id: str) -> str | None:
        """The member the patient's latest study in the group went to (affinity: patient)."""
        rows = self._query("SELECT member FROM group_assignments WHERE group_name=? AND"
                           " patient_id=? ORDER BY assigned_at DESC LIMIT 1",
                           (group, patient_id))
        return rows[0][0] if rows else None

    def group_load(self, group: str, members: Sequence[str]) -> dict[str, int]:
        """Studies queued per member: the group's studies assigned to it whose job is not
        done, plus the member's own queued jobs (other routes to it)."""
        load = dict.fromkeys(members, 0)
        for r in self._query(
                "SELECT g.member, COUNT(*) FROM group_assignments g JOIN jobs j ON"
                " j.study_uid=g.study_uid AND j.destination=g.group_name WHERE"
                f" g.group_name=? AND j.state IN {_QUEUED} GROUP BY g.member", (group,)):
            if r[0] in load:
                load[r[0]] += r[1]
        marks = ",".join("?" * len(members))
        for r in self._query(f"SELECT destination, COUNT(*) FROM jobs WHERE destination IN"
                             f" ({marks}) AND state IN {_QUEUED} GROUP BY destination",
                             list(members)):
            load[r[0]] += r[1]
        return load

    def group_spread(self, group: str, pending_limit: int = 50) -> dict[str, Any]:
        """Studies per member (all assignments) and the member of each study still queued."""
        spread = {r[0]: r[1] for r in self._query(
            "SELECT member, COUNT(*) FROM group_assignments WHERE group_name=? GROUP BY"
            " member", (group,))}
        moved = self._query("SELECT COUNT(*) FROM group_assignments WHERE group_name=? AND"
                            " moved_from IS NOT NULL", (group,))[0][0]
        pending = [{"study_uid": r[0], "member": r[1], "state": r[2]} for r in self._query(
            "SELECT g.study_uid, g.member, j.state FROM group_assignments g JOIN jobs j ON"
            " j.study_uid=g.study_uid AND j.destination=g.group_name WHERE g.group_name=?"
            f" AND j.state IN {_QUEUED} ORDER BY g.assigned_at LIMIT ?",
            (group, pending_limit))]
        return {"studies": spread, "moved": moved, "pending": pending}

    def group_spreads(self, pending_limit: int = 50) -> dict[str, dict[str, Any]]:
        """``group_spread`` of every group that has given out a study."""
        return {r[0]: self.group_spread(r[0], pending_limit) for r in self._query(
            "SELECT DISTINCT group_name FROM group_assignments ORDER BY group_name")}

    def purge(self, study_uid: str) -> list[str]:
        """The study's purge (``sql_delivery``), and its group assignments with it (else the
        table and ``status``'s spread grow for ever)."""
        paths = super().purge(study_uid)  # type: ignore[safe-super]
        with self._tx(study_uid) as db:
            db.execute("DELETE FROM group_assignments WHERE study_uid=?", (study_uid,))
        return paths
