"""The state database in SQLite (WAL): studies, instances, delivery jobs, the ledger, study history.

Every write is one short transaction under one lock. ``synchronous=NORMAL`` (in WAL mode): a
committed transaction survives any crash of the process, and a power cut can lose only the last
transactions. That is safe because the spool files, fsync'd before an instance is acknowledged,
are the source of truth: at start-up ``Spool.adopt_orphans`` records every spool file that has no
row (see docs/architecture.md). A lost ledger update means at most a re-send. Readers in other
processes (``dicomrouter status``) see a consistent snapshot thanks to WAL.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .qr import qr_columns, register_functions
from .sql import SQLState

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid      TEXT PRIMARY KEY,
    patient_id     TEXT, patient_name TEXT, study_date TEXT, accession TEXT, description TEXT,
    calling_ae     TEXT, called_ae TEXT,
    state          TEXT NOT NULL,  -- receiving|routed|delivered|unrouted|failed|held|moved|purged
    generation     INTEGER NOT NULL DEFAULT 1,
    first_received REAL, last_received REAL, completed_at REAL, delivered_at REAL,
    in_spool       INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state, last_received);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid     TEXT PRIMARY KEY,
    study_uid   TEXT NOT NULL,
    series_uid  TEXT, sop_class TEXT, transfer_syntax TEXT,
    path        TEXT, size INTEGER NOT NULL DEFAULT 0,  -- spool-relative: data/<study>/<sop>.dcm
    received_at REAL, generation INTEGER NOT NULL DEFAULT 1,
    calling_ae  TEXT, called_ae TEXT,
    tags        TEXT,                        -- JSON of dicomfile.INDEX_KEYWORDS
    present     INTEGER NOT NULL DEFAULT 1   -- 0 once the spool file was deleted
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY,
    study_uid    TEXT NOT NULL,
    destination  TEXT NOT NULL,
    state        TEXT NOT NULL,              -- pending | running | delivered | failed | dead
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error   TEXT,
    generation   INTEGER NOT NULL DEFAULT 1,
    requeue      INTEGER NOT NULL DEFAULT 0, -- new instances arrived while it was running
    routes       TEXT,                       -- JSON list of the routes that matched
    created      REAL, updated REAL,
    UNIQUE (study_uid, destination)
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs(destination, state, next_attempt, created);
CREATE TABLE IF NOT EXISTS ledger (
    sop_uid      TEXT NOT NULL,
    destination  TEXT NOT NULL,
    study_uid    TEXT NOT NULL,
    sends        INTEGER NOT NULL DEFAULT 0, -- times put on the wire (re-sends show here)
    delivered_at REAL,
    PRIMARY KEY (sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS ledger_study ON ledger(study_uid, destination);
CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    ts        REAL NOT NULL,
    event     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_study ON events(study_uid, id);
CREATE TABLE IF NOT EXISTS sources (
    name            TEXT PRIMARY KEY,
    cursor          TEXT,                  -- where the next poll starts (Orthanc: change index)
    last_poll       REAL, last_success REAL, last_error TEXT,
    studies_pulled  INTEGER NOT NULL DEFAULT 0,
    instances_pulled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS series_routed (  -- series routed on their own (level: series)
    study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, route TEXT NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (study_uid, series_uid, route, generation)
);
CREATE TABLE IF NOT EXISTS commitments (     -- storage commitment transactions we asked for
    transaction_uid TEXT PRIMARY KEY,
    peer        TEXT,
    requested   REAL,
    reported    REAL,                      -- when the N-EVENT-REPORT came (NULL: not yet)
    committed   TEXT,                      -- JSON list of SOP Instance UIDs
    failed      TEXT                       -- JSON object: SOP Instance UID → Failure Reason
);
CREATE TABLE IF NOT EXISTS nodes (          -- the routers on this state (one, embedded)
    node_id   TEXT PRIMARY KEY,
    started   REAL, heartbeat REAL,
    info      TEXT                         -- JSON: host, pid, version, listeners
);
CREATE TABLE IF NOT EXISTS moves (          -- SOP Instance UIDs received under another study
    id           INTEGER PRIMARY KEY,
    sop_uid      TEXT NOT NULL,
    from_study   TEXT NOT NULL, to_study TEXT NOT NULL,
    moved_at     REAL NOT NULL,
    from_patient TEXT, to_patient TEXT,
    delivered_to TEXT                       -- JSON list: destinations that had it before
);
CREATE INDEX IF NOT EXISTS moves_from ON moves(from_study);
CREATE INDEX IF NOT EXISTS moves_to ON moves(to_study);
CREATE TABLE IF NOT EXISTS source_studies (  -- what each source already pulled
    source      TEXT NOT NULL,
    study_key   TEXT NOT NULL,             -- the source's id of the study (UID, Orthanc id)
    study_uid   TEXT,
    pulled_at   REAL,
    delete_after INTEGER NOT NULL DEFAULT 0, -- move semantics: delete there once delivered
    deleted_at  REAL,
    PRIMARY KEY (source, study_key)
);
"""


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


#: the errors this backend raises for a locked, full or broken database (state.STATE_ERRORS)
DATABASE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,)

class SQLiteState(SQLState):
    """The state database of one spool in SQLite (WAL); thread-safe."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.write_transactions = 0
        self._lock = threading.RLock()
        # Per-study exclusion: 64 stripes, each a thread lock and then the same stripe as a
        # byte-range lock on <spool>/locks, so receiver processes and `purge` exclude each
        # other too (the stripe is a stable hash: it must agree across processes).
        self._study_locks = [threading.Lock() for _ in range(64)]
        self._lock_fd = -1
        if readonly:
            uri = f"file:{path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                       check_same_thread=False, timeout=30)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None,
                                       check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._migrate()
            self._lock_fd = os.open(path.parent / "locks", os.O_RDWR | os.O_CREAT, 0o644)
        self._db.row_factory = sqlite3.Row
        register_functions(self._db)  # Q/R matching (Person Names folded with Unicode rules)
        self._db.execute("PRAGMA busy_timeout=30000")

    def _migrate(self) -> None:
        """Spools written before keys were spool-relative stored absolute paths: make them keys,
        so a spool moved to another folder is the same spool (nothing re-adopted or re-sent).
        The spool's layout makes the key of every instance ``data/<study>/<sop>.dcm``."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            n = self._db.execute(
                "UPDATE instances SET path='data/'||study_uid||'/'||sop_uid||'.dcm'"
                " WHERE path LIKE '/%'").rowcount
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            if "routes" not in columns:  # spools from before manifests named the route
                self._db.execute("ALTER TABLE jobs ADD COLUMN routes TEXT")
            if "series_only" not in columns:  # level: series, while the study still receives
                self._db.execute("ALTER TABLE jobs ADD COLUMN series_only TEXT")
            qr_columns(self._db)
            study_columns = {r[1] for r in self._db.execute("PRAGMA table_info(studies)")}
            if "await_until" not in study_columns:
                self._db.execute("ALTER TABLE studies ADD COLUMN await_until REAL")
            if "expected_instances" not in study_columns:  # announced by the sender (C-FIND)
                self._db.execute("ALTER TABLE studies ADD COLUMN expected_instances INTEGER")
            if "receiving_since" not in study_columns:  # force_complete_after counts from it
                self._db.execute("ALTER TABLE studies ADD COLUMN receiving_since REAL")
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(ledger)")}
            if "sent_uid" not in columns:  # de-identified copies go out under another UID
                self._db.execute("ALTER TABLE ledger ADD COLUMN sent_uid TEXT")
            if "digest" not in columns:  # what was delivered (an identical re-send is not)
                self._db.execute("ALTER TABLE ledger ADD COLUMN digest TEXT")
            # several routers (the same columns as PostgreSQL's; one node here)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(instances)")}
            if "node" not in columns:
                self._db.execute("ALTER TABLE instances ADD COLUMN node TEXT")
                self._db.execute("ALTER TABLE instances ADD COLUMN shared INTEGER NOT NULL"
                                 " DEFAULT 1")
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            if "node" not in columns:
                self._db.execute("ALTER TABLE jobs ADD COLUMN node TEXT")
                self._db.execute("ALTER TABLE jobs ADD COLUMN lease_until REAL")
            if "missing" not in columns:  # instances deleted before it was routed (partial)
                self._db.execute("ALTER TABLE jobs ADD COLUMN missing INTEGER NOT NULL"
                                 " DEFAULT 0")
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(source_studies)")}
            if "source_instances" not in columns:  # delta pulls (same as PostgreSQL's v6)
                for statement in SOURCE_DELTAS:
                    self._db.execute(statement)
            self._db.execute("COMMIT")
        self.migrated = n

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def study_lock(self, study_uid: str) -> StudyLock:
        i = zlib.crc32(study_uid.encode()) % len(self._study_locks)
        return StudyLock(self._study_locks[i], self._lock_fd, i)

    @contextmanager
    def _tx(self, study: str | None = None) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.write_transactions += 1  # counted: idle workers must not write (tests)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def hold_lease(self, name: str, ttl: float) -> bool:
        return True  # one node per SQLite state: no write for it

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()


class StudyLock:
    """One stripe: a thread lock, then the same stripe as a byte-range lock (other processes)."""

    __slots__ = ("_thread_lock", "_fd", "_index")

    def __init__(self, thread_lock: threading.Lock, fd: int, index: int) -> None:
        self._thread_lock = thread_lock
        self._fd = fd
        self._index = index

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._fd >= 0:
                fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self._index)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd >= 0:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._index)
        finally:
            self._thread_lock.release()
