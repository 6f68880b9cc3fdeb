"""The base of the state's SQL, shared by the SQLite (embedded default) and PostgreSQL backends.

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

import socket
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from .qr import SQLITE
from .roles import State

# A ledger row is one (instance, destination). Sent under another study than the row's (the
# instance moved), it starts over: that study's delivery says nothing about this one's.
SAME_STUDY_UPSERT = (
    " sends=CASE WHEN ledger.study_uid<>excluded.study_uid THEN ?"
    " WHEN ledger.sends+? < 0 THEN 0 ELSE ledger.sends+? END,"
    " delivered_at=CASE WHEN ledger.study_uid<>excluded.study_uid THEN NULL"
    " ELSE ledger.delivered_at END,"
    " digest=CASE WHEN ledger.study_uid<>excluded.study_uid THEN NULL ELSE ledger.digest END,"
    " study_uid=excluded.study_uid")


class SQLBase(State):
    """What every part of the SQL state uses: the transaction and query hooks a backend
    provides, the history of a study, and the attributes a backend sets."""

    #: the node this process is (the instances it records, the jobs it leases)
    node_id: str = socket.gethostname()
    #: jobs are leased (several nodes): a running job whose lease ran out is claimed again
    leases: bool = False
    lease: float = 30.0
    _BUCKET = "CAST((received_at-?)/? AS INTEGER)"  # throughput buckets (truncating)
    _QR_DIALECT = SQLITE

    def _tx(self, study: str | None = None) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    @staticmethod
    def _event(db: Any, study_uid: str, text: str, now: float) -> None:
        db.execute("INSERT INTO events(study_uid, ts, event) VALUES (?,?,?)",
                   (study_uid, now, text))
