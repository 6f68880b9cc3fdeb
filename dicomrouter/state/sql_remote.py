"""Remote processing steps (issue 29, item 1): what a step sent to an AI node and the results
that came back for it. The row outlives a crash, so the retry of a step killed while it waited
does not send the study again (the AI node would answer twice: duplicate results), and results
that come back after the step gave up still count for its next attempt."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Study
from .sql_base import SQLBase

#: SQLite migration 22, PostgreSQL migration 21 (the same statements)
REMOTE_TABLES = (
    "CREATE TABLE IF NOT EXISTS remote_awaits ("
    " origin_uid TEXT NOT NULL, route TEXT NOT NULL, step TEXT NOT NULL,"
    " state TEXT NOT NULL, destination TEXT NOT NULL, match TEXT NOT NULL,"
    " results_from TEXT NOT NULL, sent_study TEXT NOT NULL, sent_series TEXT NOT NULL,"
    " sent_sops TEXT NOT NULL, origin_ae TEXT NOT NULL, sent_at DOUBLE PRECISION,"
    " deadline DOUBLE PRECISION, results TEXT NOT NULL,"
    " PRIMARY KEY (origin_uid, route, step))",
    "CREATE INDEX IF NOT EXISTS remote_awaits_state ON remote_awaits(state)",
)
_JSON = ("results_from", "sent_series", "sent_sops", "results")
_COLUMNS = ("origin_uid", "route", "step", "state", "destination", "match", "results_from",
            "sent_study", "sent_series", "sent_sops", "origin_ae", "sent_at", "deadline",
            "results")


def _row(row: Any) -> dict[str, Any]:
    out = {k: row[k] for k in _COLUMNS}
    for k in _JSON:
        out[k] = json.loads(out[k] or "[]")
    return out


class RemoteAwaitsSQL(SQLBase):
    """The awaits of remote processing steps."""

    def remote_await(self, origin_uid: str, route: str, step: str) -> dict[str, Any] | None:
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM remote_awaits WHERE"
                           " origin_uid=? AND route=? AND step=?", (origin_uid, route, step))
        return _row(rows[0]) if rows else None

    def remote_await_open(self, origin_uid: str, route: str, step: str,
                          facts: Mapping[str, Any]) -> None:
        values = (origin_uid, route, step, "sending", facts["destination"], facts["match"],
                  json.dumps(list(facts["results_from"])), facts["sent_study"],
                  json.dumps(list(facts["sent_series"])), json.dumps(list(facts["sent_sops"])),
                  facts["origin_ae"], None, None, "[]")
        with self._tx(origin_uid) as db:
            db.execute(f"INSERT INTO remote_awaits({', '.join(_COLUMNS)}) VALUES"
                       f" ({', '.join('?' * len(_COLUMNS))}) ON CONFLICT (origin_uid, route, step)"
                       " DO UPDATE SET state=excluded.state, destination=excluded.destination,"
                       " match=excluded.match, results_from=excluded.results_from,"
                       " sent_study=excluded.sent_study, sent_series=excluded.sent_series,"
                       " sent_sops=excluded.sent_sops, origin_ae=excluded.origin_ae,"
                       " sent_at=NULL, deadline=NULL, results='[]'", values)

    def remote_await_sent(self, origin_uid: str, route: str, step: str, sent_at: float,
                          deadline: float, why: str) -> None:
        with self._tx(origin_uid) as db:
            db.execute("UPDATE remote_awaits SET state='waiting', sent_at=?, deadline=? WHERE"
                       " origin_uid=? AND route=? AND step=?",
                       (sent_at, deadline, origin_uid, route, step))
            self._event(db, origin_uid, why, time.time())

    def remote_await_expire(self, origin_uid: str, route: str, step: str, why: str) -> None:
        with self._tx(origin_uid) as db:
            db.execute("UPDATE remote_awaits SET state='expired' WHERE origin_uid=? AND"
                       " route=? AND step=?", (origin_uid, route, step))
            self._event(db, origin_uid, why, time.time())

    def remote_awaits_open(self, now: float | None = None) -> list[dict[str, Any]]:
        # 'sending' too: a fast node answers before the send is recorded as finished;
        # 'done' until its deadline: a node that answers in several associations
        now = time.time() if now is None else now
        rows = [_row(r) for r in self._query(
            f"SELECT {', '.join(_COLUMNS)} FROM remote_awaits WHERE state IN"
            " ('sending', 'waiting', 'expired') OR (state='done' AND deadline>?)", (now,))]
        return sorted(rows, key=lambda r: r["state"] == "done")  # an unfinished step first

    def remote_claim(self, await_row: Mapping[str, Any], study_uid: str, seen: Study,
                     sop_uids: Sequence[str], tags: Mapping[str, str], why: str,
                     mark_routed: bool = True) -> bool:
        now = time.time()
        key = (await_row["origin_uid"], await_row["route"], await_row["step"])
        with self._tx(study_uid) as db:
            row = db.execute("SELECT state, generation, last_received FROM studies"
                             " WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None or row["generation"] != seen.generation \
                    or row["last_received"] != seen.last_received:
                return False
            for sop in sop_uids:
                found = db.execute("SELECT tags FROM instances WHERE sop_uid=?",
                                   (sop,)).fetchone()
                if found is not None:
                    merged = {**json.loads(found["tags"] or "{}"), **tags}
                    db.execute("UPDATE instances SET tags=? WHERE sop_uid=?",
                               (json.dumps(merged), sop))
            current = db.execute("SELECT results FROM remote_awaits WHERE origin_uid=? AND"
                                 " route=? AND step=?", key).fetchone()
            if current is not None:
                have = json.loads(current["results"] or "[]")
                have += [[study_uid, s] for s in sop_uids if [study_uid, s] not in have]
                db.execute("UPDATE remote_awaits SET results=? WHERE origin_uid=? AND"
                           " route=? AND step=?", (json.dumps(have), *key))
            if mark_routed and row["state"] in ("receiving", "unrouted", "held"):
                db.execute("UPDATE studies SET state='routed', completed_at=? WHERE"
                           " study_uid=?", (now, study_uid))
            self._event(db, study_uid, why, now)
            if study_uid != key[0]:
                self._event(db, key[0], why, now)
        return True

    def remote_await_done(self, origin_uid: str, route: str) -> None:
        with self._tx(origin_uid) as db:  # kept until its deadline: results that come late
            db.execute("UPDATE remote_awaits SET state='done' WHERE origin_uid=? AND"
                       " route=?", (origin_uid, route))
            # earlier chains' awaits past their deadline count nothing more: the table holds
            # the steps in flight and the recent ones, not every study ever processed
            db.execute("DELETE FROM remote_awaits WHERE state='done' AND (deadline IS NULL"
                       " OR deadline<=?)", (time.time(),))

    def purge(self, study_uid: str) -> list[str]:
        """The study's purge, and its awaits with it."""
        paths = super().purge(study_uid)  # type: ignore[safe-super]
        with self._tx(study_uid) as db:
            db.execute("DELETE FROM remote_awaits WHERE origin_uid=?", (study_uid,))
        return paths
