"""Reversible pseudonymization (issue 29, item 3): the mapping original ↔ pseudonymized of each
(route, original study), sealed by ``pseudonym.py`` before it gets here: the state holds
the pseudonymized UIDs only as keyed hashes (to find a mapping again), every original value
and pseudonym only encrypted; the original Study Instance UID in the clear (to purge the
mapping with its study)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .sql_base import SQLBase

#: SQLite migration 21, PostgreSQL migration 20 (the same statements): ``pseudonyms`` one row
#: per (route, original study): the keyed hash of its pseudonymized Study Instance UID and the
#: sealed identity (patient, accession, dates, shift); ``pseudonym_uids`` one row per UID the
#: de-identification replaced: the keyed hash of the new UID and the sealed (new, original)
PSEUDONYM_TABLES = (
    "CREATE TABLE IF NOT EXISTS pseudonyms ("
    " route TEXT NOT NULL, study_uid TEXT NOT NULL, pseudo_study_tag TEXT NOT NULL,"
    " sealed TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, key_check TEXT NOT NULL,"
    " PRIMARY KEY (route, study_uid))",
    "CREATE INDEX IF NOT EXISTS pseudonyms_pseudo ON pseudonyms(pseudo_study_tag)",
    "CREATE TABLE IF NOT EXISTS pseudonym_uids ("
    " route TEXT NOT NULL, study_uid TEXT NOT NULL, pseudo_tag TEXT NOT NULL,"
    " sealed TEXT NOT NULL, PRIMARY KEY (route, study_uid, pseudo_tag))",
)


class PseudonymsSQL(SQLBase):
    """The sealed pseudonymization mappings."""

    def pseudonym_save(self, route: str, study_uid: str, pseudo_study_tag: str, sealed: str,
                       uids: Mapping[str, str], key_check: str) -> None:
        """Keep the mapping of one instance: the study's identity (the first one written
        stays: the same original always gets the same pseudonyms) and its UIDs (keyed hash of
        the new UID → sealed (new, original))."""
        now = time.time()
        with self._tx(study_uid) as db:
            new = db.execute(
                "INSERT INTO pseudonyms(route, study_uid, pseudo_study_tag, sealed, created_at,"
                " key_check) VALUES (?,?,?,?,?,?) ON CONFLICT (route, study_uid) DO NOTHING",
                (route, study_uid, pseudo_study_tag, sealed, now, key_check)).rowcount
            for pseudo, original in uids.items():
                db.execute("INSERT INTO pseudonym_uids(route, study_uid, pseudo_tag, sealed)"
                           " VALUES (?,?,?,?) ON CONFLICT (route, study_uid, pseudo_tag)"
                           " DO NOTHING", (route, study_uid, pseudo, original))
            if new:
                self._event(db, study_uid, f"route {route}: pseudonymization mapping kept "
                            "(encrypted)", now)

    def pseudonym_find(self, pseudo_study_tag: str) -> dict[str, Any] | None:
        """The mapping whose pseudonymized Study Instance UID has this keyed hash (the newest if
        several routes pseudonymized the same way): route, study_uid, sealed and uids."""
        rows = self._query("SELECT route, study_uid, sealed FROM pseudonyms WHERE"
                           " pseudo_study_tag=? ORDER BY created_at DESC LIMIT 1",
                           (pseudo_study_tag,))
        if not rows:
            return None
        route, study_uid, sealed = rows[0][0], rows[0][1], rows[0][2]
        uids = {r[0]: r[1] for r in self._query(
            "SELECT pseudo_tag, sealed FROM pseudonym_uids WHERE route=? AND study_uid=?",
            (route, study_uid))}
        return {"route": route, "study_uid": study_uid, "sealed": sealed, "uids": uids}

    def pseudonym_key_checks(self) -> set[str]:
        """The fingerprints of the keys the mappings kept were sealed with."""
        return {r[0] for r in self._query("SELECT DISTINCT key_check FROM pseudonyms")}

    def pseudonym_purge(self, study_uid: str, why: str) -> int:
        """Forget every mapping of an original study; how many (routes) there were."""
        now = time.time()
        with self._tx(study_uid) as db:
            n = db.execute("DELETE FROM pseudonyms WHERE study_uid=?", (study_uid,)).rowcount
            db.execute("DELETE FROM pseudonym_uids WHERE study_uid=?", (study_uid,))
            if n:
                self._event(db, study_uid, f"pseudonymization mapping deleted ({why})", now)
        return int(n or 0)

    def pseudonym_studies_before(self, cutoff: float) -> list[str]:
        """Original studies with a mapping, delivered (or purged) at ``cutoff`` or before."""
        return [r[0] for r in self._query(
            "SELECT DISTINCT p.study_uid FROM pseudonyms p JOIN studies s ON"
            " s.study_uid=p.study_uid WHERE s.state IN ('delivered','purged') AND"
            " s.delivered_at <= ?", (cutoff,))]

    def purge(self, study_uid: str) -> list[str]:
        """The study's purge (``sql_delivery``), and its mappings with it."""
        paths = super().purge(study_uid)  # type: ignore[safe-super]
        self.pseudonym_purge(study_uid, "the study was purged")
        return paths
