"""The Q/R proxy's cache (issue 28): when each study fetched from the PACS was last fetched or
retrieved, so studies nobody asked for within ``query_retrieve_proxy_cache`` leave the spool."""

from __future__ import annotations

from .sql_base import SQLBase

#: the table, for both backends' migrations (SQLite 13, PostgreSQL 12)
PROXY_CACHE = ("CREATE TABLE IF NOT EXISTS proxy_cache (study_uid TEXT PRIMARY KEY,"
               " fetched_at {real} NOT NULL, used_at {real} NOT NULL)")


class ProxySQL(SQLBase):
    """``proxy_cache``: one row per study the proxy fetched something of."""

    def proxy_used(self, study_uid: str, now: float) -> None:
        with self._tx(study_uid) as db:
            db.execute("INSERT INTO proxy_cache(study_uid, fetched_at, used_at) VALUES (?,?,?)"
                       " ON CONFLICT(study_uid) DO UPDATE SET used_at=excluded.used_at",
                       (study_uid, now, now))

    def proxy_unused_since(self, before: float) -> list[str]:
        return [r[0] for r in self._query("SELECT study_uid FROM proxy_cache WHERE used_at < ?"
                                          " ORDER BY used_at", (before,))]

    def proxy_forget(self, study_uid: str) -> None:
        with self._tx(study_uid) as db:
            db.execute("DELETE FROM proxy_cache WHERE study_uid=?", (study_uid,))
