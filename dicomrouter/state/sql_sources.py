"""Pull sources (cursors, what was pulled of each study, what may be deleted at the source),
storage commitment transactions, nodes and their leases."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .base import SourceStudy
from .sql_base import SQLBase

#: pull sources fetch what a study gained at the source since (PostgreSQL: migration 6)
SOURCE_DELTAS = (
    # the source's instance count when a pull last left nothing missing
    "ALTER TABLE source_studies ADD COLUMN source_instances INTEGER",
    # what the source brought into the router for the study, and the router's count of the
    # study when an unfinished pull began (its baseline: a kill -9 loses no count)
    "ALTER TABLE source_studies ADD COLUMN instances_pulled INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE source_studies ADD COLUMN held_before INTEGER",
    "UPDATE source_studies SET instances_pulled=(SELECT COUNT(*) FROM instances i WHERE"
    " i.study_uid=source_studies.study_uid) WHERE pulled_at IS NOT NULL",
)


class PeersSQL(SQLBase):
    """What the router keeps about its peers: sources, commitments, the other nodes."""

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
            # One node (embedded): every instance is its own, counted on the studies' rows.
            # Several: counted by node (PostgreSQL indexes instances by node).
            mine = "(SELECT COUNT(*) FROM instances i WHERE i.node=n.node_id AND" \
                " i.present=1)" if self.leases else \
                "(SELECT COALESCE(SUM(instances_present),0) FROM studies)"
            found = self._query(
                f"SELECT node_id, started, heartbeat, info, {mine} AS instances_in_spool,"
                " (SELECT COUNT(*) FROM jobs j WHERE j.node=n.node_id AND j.state='running')"
                " AS running_jobs FROM nodes n ORDER BY node_id")
        except Exception:  # a read-only look at a spool from before nodes were recorded
            return []
        rows = [dict(r) for r in found]
        for r in rows:
            r["info"] = json.loads(r["info"] or "{}")
            r["alive"] = (r["heartbeat"] or 0) > now - self.lease
        return rows

    def publish_breakers(self, breakers: dict[str, dict[str, Any]]) -> None:
        with self._tx() as db:
            row = db.execute("SELECT info FROM nodes WHERE node_id=?", (self.node_id,)).fetchone()
            info = json.loads(row["info"] or "{}") if row is not None else {}
            info["breakers"] = breakers
            if row is None:
                now = time.time()
                db.execute("INSERT INTO nodes(node_id, started, heartbeat, info) VALUES"
                           " (?,?,?,?)", (self.node_id, now, now, json.dumps(info)))
            else:
                db.execute("UPDATE nodes SET info=? WHERE node_id=?",
                           (json.dumps(info), self.node_id))

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
